//! Running the real binary from the repository root, for every CLI test file.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fedhubert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedhubert"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}

/// Runs the command, asserts it succeeded, and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = fedhubert(args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "fedhubert {}\n{out}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Runs the command, asserts it failed with an error (not a panic), and returns its stderr.
pub fn fail(args: &[&str]) -> String {
    let o = fedhubert(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success(),
        "fedhubert {} should fail\n{}\n{err}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!err.contains("panicked"), "a panic, not an error: {err}");
    err
}
