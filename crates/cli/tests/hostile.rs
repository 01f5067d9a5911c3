//! Hostile input through the real binary: every case exits non-zero and its message names the
//! file, field or folder at fault. None of these needs a trained model, so they run in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fedhubert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedhubert"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}

/// Runs the command, asserts it failed, and returns its stderr.
fn refused(args: &[&str]) -> String {
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

fn pretrain_with(config: &Path, set: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = vec![
        "pretrain",
        "--simulation",
        "--config",
        config.to_str().unwrap(),
        "--clients",
        "no-such-partition",
        "--out",
        out.to_str().unwrap(),
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    refused(&args)
}

#[test]
fn pretrain_and_distill_need_a_config_or_a_named_preset() {
    for args in [["pretrain", "--simulation"], ["distill", "--mode=server"]] {
        let e = refused(&[args[0], args[1], "--clients", "x", "--out", "y"]);
        assert!(e.contains("--config"), "{args:?}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing but a comment\n").unwrap();
    let e = pretrain_with(&empty, &[]);
    assert!(e.contains("empty.yaml") && e.contains("empty"), "{e}");
}

#[test]
fn config_type_errors_name_the_field_and_line_or_the_override() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "pretraining:\n  preset: tiny\n  learning_rate: fast\n").unwrap();
    let e = pretrain_with(&bad, &[]);
    assert!(
        e.contains("bad.yaml") && e.contains("pretraining.learning_rate") && e.contains("line 3"),
        "{e}"
    );
    let tiny = root().join("configs/tiny.yaml");
    let e = pretrain_with(&tiny, &["pretraining.learning_rate=fast"]);
    assert!(e.contains("--set pretraining.learning_rate=fast"), "{e}");
    // Checked under the run file's names, not the model's (mask_time_prob) or Flower's.
    let e = pretrain_with(&tiny, &["pretraining.mask_prob=2"]);
    assert!(e.contains("mask_prob") && !e.contains("mask_time_prob"), "{e}");
    let e = pretrain_with(&tiny, &["federated.client_fraction=0"]);
    assert!(e.contains("client_fraction") && !e.contains("fraction_fit"), "{e}");
}

#[test]
fn audio_lengths_below_the_receptive_field_are_refused() {
    let tiny = root().join("configs/tiny.yaml");
    for key in ["min_audio_length", "max_audio_length"] {
        let e = pretrain_with(&tiny, &[&format!("pretraining.{key}=100")]);
        assert!(e.contains(&format!("pretraining.{key}")) && e.contains("400"), "{e}");
    }
}

#[test]
fn a_deeply_nested_config_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("deep.yaml");
    let n = 20_000;
    std::fs::write(&deep, format!("a: {}{}\n", "[".repeat(n), "]".repeat(n))).unwrap();
    let t0 = Instant::now();
    let e = pretrain_with(&deep, &[]);
    assert!(e.contains("deep.yaml") && e.contains("nested"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
}

#[test]
fn thread_counts_are_bounded() {
    let e = refused(&["features", "--clients", "x", "--threads", "100000"]);
    assert!(e.contains("--threads") && e.contains("1024"), "{e}");
}

#[test]
fn a_folder_another_run_writes_is_refused_naming_that_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("parts");
    let lock = fedhubert_fl::FolderLock::acquire(&out, "prepare").unwrap();
    let e = refused(&[
        "prepare",
        "--data",
        "assets/librispeech-sample",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("in use by another fedhubert run"), "{e}");
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    drop(lock);
}

#[test]
fn a_broken_config_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{\"hidden_size\": \"wide\"").unwrap();
    std::fs::write(hf.join("model.safetensors"), b"").unwrap();
    let wav = root().join("assets/speech-commands-sample");
    let clip = std::fs::read_dir(&wav)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "wav"))
        .expect("a bundled clip");
    let e = refused(&[
        "embed",
        "--checkpoint",
        hf.to_str().unwrap(),
        "--audio",
        clip.to_str().unwrap(),
        "--out",
        dir.path().join("e.safetensors").to_str().unwrap(),
    ]);
    assert!(e.contains("config.json"), "{e}");
}
