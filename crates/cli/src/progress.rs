//! Progress bars that draw only on a terminal (logs and CI stay clean).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    if std::io::stderr().is_terminal() {
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
    } else {
        b.set_draw_target(ProgressDrawTarget::hidden());
    }
    b
}
