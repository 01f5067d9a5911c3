//! The quick demo runs end to end through the real binary, both HuBERT iterations, and a rerun
//! skips finished stages.

use std::process::Command;

#[test]
fn quick_demo_runs_and_resumes() {
    let out = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_fedhubert"))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .args(["demo", "--quick", "--iterations", "2", "--out"])
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
        "pretrain/curves.png",
        "distill/hf/model.safetensors",
        "distill/curves.png",
        "probe/teacher/probe.json",
        "probe/student/confusion.png",
        "probe/random/probe.json",
        "report/report.md",
        "report/summary.json",
        "report/pretrain_curves.png",
        "report/distill_curves.png",
        "report/probe_teacher_confusion.png",
        "report/hf/teacher/config.json",
        "report/hf/student/model.safetensors",
        // Iteration 2: layer features of the first teacher, their k-means, the second teacher.
        "partition/client_0/hubert_1.npy",
        "partition/client_0/hubert_1.provenance.json",
        "partition/client_0/km2.npy",
        "kmeans2/codebook.safetensors",
        "pretrain2/hf/model.safetensors",
        "probe/teacher-it2/probe.json",
        // The layer report of the first teacher that explains the layer iteration 2 takes.
        "layers/layers.json",
        "layers/layers.md",
        "report/layers.md",
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
    // The client folders train; the extra speaker group is the server's distillation set only.
    assert!(
        out.path()
            .join("partition/client_10/manifest.csv")
            .is_file()
    );
    let pre_metrics = std::fs::read_to_string(out.path().join("pretrain/metrics.jsonl")).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(pre_metrics.lines().last().unwrap()).unwrap();
    let who: Vec<u64> = last["participated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(who.len(), 10, "{who:?}");
    assert!(
        who.iter().all(|&c| c < 10),
        "server set trained as a client: {who:?}"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("report/summary.json")).unwrap(),
    )
    .unwrap();
    // The second teacher trained on 50 Hz labels of the first one's layer 1.
    let labels: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("pretrain2/labels.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(labels["label_rate"], 50.0);
    assert_eq!(labels["label_stem"], "km2");
    let it2: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("pretrain2/summary.json")).unwrap(),
    )
    .unwrap();
    assert!(it2["final_train_loss"].as_f64().unwrap().is_finite());
    for m in ["teacher", "student", "random", "mfcc", "teacher-it2"] {
        let acc = report["probe"][m]["cv_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{m}: {acc}");
    }
    let md = std::fs::read_to_string(out.path().join("report/report.md")).unwrap();
    assert!(
        md.contains("| random |")
            && md.contains("| mfcc |")
            && md.contains("server-side distillation"),
        "{md}"
    );
    assert!(text.contains("speech commands"), "{text}");
    assert!(
        text.contains("layer report of the iteration-1 teacher")
            && md.contains("## Choosing the layer"),
        "{text}"
    );
    let layers: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("layers/layers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(layers["layers"].as_array().unwrap().len(), 3, "{layers}");
    // The report's scratch shards are gone; iteration 2's own layer features are kept.
    let client = std::fs::read_dir(out.path().join("partition/client_0")).unwrap();
    let names: Vec<String> = client
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("layers_report_")),
        "{names:?}"
    );
    let second = run();
    let text = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success());
    // prepare, features, kmeans, pretrain, distill, the four probes and iteration 2's five.
    assert_eq!(text.matches("already done").count(), 14, "{text}");
}
