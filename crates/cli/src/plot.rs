//! Training curves as a self-contained SVG (opens in any browser; no font or system library needed).

use std::path::Path;

use fedhubert_fl::RoundRecord;

/// Plots train loss, eval loss and eval masked accuracy per round.
pub fn curves(history: &[RoundRecord], path: &Path) -> anyhow::Result<()> {
    let series: Vec<(&str, &str, Vec<(f64, f64)>)> = vec![
        (
            "train loss",
            "#1f77b4",
            history
                .iter()
                .filter_map(|r| r.train.get("loss").map(|v| (r.round as f64, *v)))
                .collect(),
        ),
        (
            "eval loss",
            "#d62728",
            history
                .iter()
                .filter_map(|r| r.eval.get("loss").map(|v| (r.round as f64, *v)))
                .collect(),
        ),
        (
            "eval acc_masked x10",
            "#2ca02c",
            history
                .iter()
                .filter_map(|r| {
                    r.eval
                        .get("acc_masked")
                        .map(|v| (r.round as f64, *v * 10.0))
                })
                .collect(),
        ),
    ];
    std::fs::write(
        path,
        svg(&series, "round", "fedhubert federated pretraining"),
    )?;
    Ok(())
}

/// A line chart of named series (x, y) with axes and a legend.
pub fn svg(series: &[(&str, &str, Vec<(f64, f64)>)], xlabel: &str, title: &str) -> String {
    let (w, h, m) = (720.0, 420.0, 60.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    let (y0, y1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if y1 > y0 {
        (y0.min(0.0), y1 * 1.05)
    } else {
        (y0 - 1.0, y1 + 1.0)
    };
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n",
        w / 2.0
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - m,
        w - m,
        h - m
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - m
    );
    for i in 0..=5 {
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        let xv = x0 + (x1 - x0) * i as f64 / 5.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.3}</text>\n",
            m - 6.0,
            sy(yv) + 4.0,
            yv
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>\n",
            sx(xv),
            h - m + 18.0,
            xv
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text>\n",
        w / 2.0,
        h - 16.0
    );
    for (i, (name, color, p)) in series.iter().enumerate() {
        if !p.is_empty() {
            let path: Vec<String> = p
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
                path.join(" ")
            );
            for (x, y) in p {
                s += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                    sx(*x),
                    sy(*y)
                );
            }
        }
        let ly = m + 16.0 * i as f64;
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            w - m - 150.0,
            ly,
            w - m - 132.0,
            ly + 5.0
        );
    }
    s + "</svg>\n"
}
