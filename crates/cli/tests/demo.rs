//! The quick demo runs end to end through the real binary, and a rerun skips finished stages.

use std::process::Command;

#[test]
fn quick_demo_runs_and_resumes() {
    let out = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_fedhubert"))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .args(["demo", "--quick", "--out"])
            .arg(out.path())
            .output()
            .unwrap()
    };
    let first = run();
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(text.contains("fedhubert demo summary"), "{text}");
    for f in [
        "partition/partition.json",
        "partition/client_9/km.npy",
        "kmeans/codebook.safetensors",
        "pretrain/hf/model.safetensors",
        "pretrain/metrics.jsonl",
    ] {
        assert!(out.path().join(f).is_file(), "missing {f}");
    }
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("pretrain/summary.json")).unwrap(),
    )
    .unwrap();
    assert!(
        summary["final_train_loss"].as_f64().unwrap()
            < summary["first_round_train_loss"].as_f64().unwrap()
    );
    let second = run();
    let text = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success());
    assert_eq!(text.matches("already done").count(), 4, "{text}");
}
