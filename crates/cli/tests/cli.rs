//! The subcommands through the real binary on the bundled sample: a tiny teacher is pretrained
//! once, then exported, embedded and distilled with each of the three methods.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::{fail, ok, root};

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// partition (3 clients + a server-side set) -> MFCC -> federated k-means -> 2 rounds of a tiny teacher.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_path_buf();
        let s = |x: &Path| x.to_str().unwrap().to_string();
        let parts = s(&p.join("parts"));
        ok(&[
            "prepare",
            "--data",
            "assets/librispeech-sample",
            "--out",
            &parts,
            "--num-clients",
            "4",
        ]);
        ok(&["features", "--clients", &parts]);
        ok(&[
            "kmeans",
            "--clients",
            &parts,
            "--mode",
            "federated",
            "--k",
            "20",
            "--out",
            &s(&p.join("km")),
        ]);
        ok(&[
            "pretrain",
            "--simulation",
            "--config",
            "configs/tiny.yaml",
            "--clients",
            &parts,
            "--out",
            &s(&p.join("teacher")),
            "--num-clients",
            "3",
            "--num-rounds",
            "2",
            "--set",
            "pretraining.vocab_size=20",
            "--set",
            "pretraining.local_steps=2",
        ]);
        Fixture { _dir: dir, path: p }
    })
}

fn read(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let d = t
                .data()
                .chunks(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, t.shape().to_vec(), d)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn export_writes_a_huggingface_directory_and_embed_matches_it() {
    let f = fixture();
    let ckpt = f.path.join("teacher/model.safetensors");
    let hf = f.path.join("export");
    let text = ok(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(text.contains("bit-exact"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "hubert");
    assert_eq!(cfg["architectures"][0], "HubertModel");
    let pre: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(hf.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(pre["sampling_rate"], 16000);
    assert_eq!(pre["do_normalize"], false);
    // A checkpoint in its run folder gets the run's model card (config and metrics beside it).
    let card = std::fs::read_to_string(hf.join("README.md")).unwrap();
    assert!(
        card.contains("exported from its run folder") && card.contains("2 federated rounds"),
        "{card}"
    );
    assert!(card.contains("No differential privacy"), "{card}");
    let names: Vec<String> = read(&hf.join("model.safetensors"))
        .into_iter()
        .map(|t| t.0)
        .collect();
    for n in [
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
        "feature_extractor.conv_layers.0.conv.weight",
        "encoder.layers.1.attention.q_proj.weight",
        "masked_spec_embed",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.starts_with("final_proj")),
        "head in HubertModel weights"
    );

    // The checkpoint and its export give the same hidden states, bit for bit.
    let audio = walk_first_flac(&root().join("assets/librispeech-sample"));
    let (a, b) = (f.path.join("a.safetensors"), f.path.join("b.safetensors"));
    for (src, dst) in [(&ckpt, &a), (&hf, &b)] {
        let t = ok(&[
            "embed",
            "--checkpoint",
            src.to_str().unwrap(),
            "--audio",
            audio.to_str().unwrap(),
            "--out",
            dst.to_str().unwrap(),
        ]);
        assert!(t.contains("frames"), "{t}");
    }
    let (ta, tb) = (read(&a), read(&b));
    assert_eq!(
        ta.len(),
        1 + 3 + 1,
        "input_values, hidden_states.0..2, last_hidden_state"
    );
    assert_eq!(ta, tb);
    let last = ta.iter().find(|t| t.0 == "last_hidden_state").unwrap();
    let hs2 = ta.iter().find(|t| t.0 == "hidden_states.2").unwrap();
    assert_eq!(last.1[0], 1);
    assert_eq!(last.1[2], 128);
    assert_eq!(
        last.2, hs2.2,
        "post-LN: the last hidden state is hidden_states[-1]"
    );
    assert!(last.2.iter().all(|v| v.is_finite()));
    // In 1 s pieces: the same frames as the whole file, every hidden state.
    let c = f.path.join("chunked.safetensors");
    ok(&[
        "embed",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--audio",
        audio.to_str().unwrap(),
        "--out",
        c.to_str().unwrap(),
        "--chunk-seconds",
        "1",
    ]);
    let tc = read(&c);
    let shapes = |t: &[(String, Vec<usize>, Vec<f32>)]| {
        t.iter()
            .map(|x| (x.0.clone(), x.1.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(shapes(&tc), shapes(&ta));
    assert_ne!(tc, ta, "a chunked run attends within its pieces");

    // Bad input names the file.
    let err = fail(&[
        "export",
        "--checkpoint",
        "/nonexistent/x.safetensors",
        "--out",
        "/tmp/x",
    ]);
    assert!(err.contains("/nonexistent/x.safetensors"), "{err}");
    let err = fail(&[
        "embed",
        "--checkpoint",
        hf.to_str().unwrap(),
        "--audio",
        "README.md",
        "--out",
        f.path.join("c.safetensors").to_str().unwrap(),
    ]);
    assert!(err.contains("README.md"), "{err}");
}

fn walk_first_flac(dir: &Path) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "flac") {
                return p;
            }
        }
    }
    panic!("no flac under {}", dir.display())
}

fn distill(mode: &str) -> serde_json::Value {
    distill_with(mode, mode, &[])
}

fn distill_with(mode: &str, name: &str, extra: &[&str]) -> serde_json::Value {
    let f = fixture();
    let out = f.path.join(format!("distill-{name}"));
    let parts = f.path.join("parts");
    let (teacher, server_set) = (
        f.path.join("teacher/model.safetensors"),
        parts.join("client_3"),
    );
    let mut args = vec![
        "distill",
        "--mode",
        mode,
        "--config",
        "configs/tiny_student.yaml",
        "--teacher",
        teacher.to_str().unwrap(),
        "--clients",
        parts.to_str().unwrap(),
        "--server-set",
        server_set.to_str().unwrap(),
        "--num-clients",
        "3",
        "--num-rounds",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "pretraining.local_steps=3",
        "--set",
        "distillation.server_steps=3",
        "--set",
        "distillation.mvq.max_frames=4000",
    ];
    args.extend_from_slice(extra);
    let text = ok(&args);
    assert!(text.contains("round   2"), "{text}");
    for f in [
        "student.safetensors",
        "hf/model.safetensors",
        "hf/config.json",
        "curves.png",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{mode}: missing {f}");
    }
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn distill_server_mode_runs_from_the_cli() {
    let s = distill("server");
    let log = &s["server_distillation"];
    let (a, b) = (
        log["first_round_first_step"]["loss"].as_f64().unwrap(),
        log["last_round_last_step"]["loss"].as_f64().unwrap(),
    );
    assert!(b < a, "server distillation loss {a} -> {b}");
    assert!(s["bytes_up"].as_u64().unwrap() > 0);
}

#[test]
fn distill_client_mode_runs_from_the_cli() {
    let s = distill("client");
    let m = &s["final_round_client_metrics"];
    assert!(m["kl"].as_f64().unwrap().is_finite() && m["feature_mse"].as_f64().unwrap() > 0.0);
}

#[test]
fn distill_mvq_mode_runs_from_the_cli() {
    let s = distill("mvq");
    let q = &s["quantizer"];
    assert_eq!(q["bytes_per_frame"], 4);
    let e = q["rel_error"].as_f64().unwrap();
    assert!(e > 0.0 && e < 1.0, "relative reconstruction error {e}");
    assert!(
        s["final_round_client_metrics"]["mvq_ce"]
            .as_f64()
            .unwrap()
            .is_finite()
    );
}

#[test]
fn distill_mvq_from_precomputed_codes() {
    // MVQ-KD as icefall runs it: the teacher encodes every client's audio once (`mvq encode`),
    // then the students train on the stored codes without a teacher pass.
    let f = fixture();
    let parts = f.path.join("parts");
    let teacher = f.path.join("teacher/model.safetensors");
    let q = f.path.join("codes-quantizer.safetensors");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&[
        "mvq",
        "train",
        "--teacher",
        &s(&teacher),
        "--data",
        &s(&parts.join("client_3")),
        "--out",
        &s(&q),
        "--num-codebooks",
        "4",
        "--set",
        "distillation.mvq.max_frames=4000",
    ]);
    // Short chunks, so that utterances span several teacher passes: the codes must still give
    // exactly one frame per frame of each whole utterance (encode checks it and fails otherwise).
    let text = ok(&[
        "mvq",
        "encode",
        "--teacher",
        &s(&teacher),
        "--quantizer",
        &s(&q),
        "--clients",
        &s(&parts),
        "--stem",
        "codes-test",
        "--chunk-samples",
        "16000",
    ]);
    assert!(text.contains("4 bytes/frame"), "{text}");
    let len = std::fs::read_to_string(parts.join("client_0/codes-test.len")).unwrap();
    let frames: usize = len.lines().map(|l| l.parse::<usize>().unwrap()).sum();
    let bytes = std::fs::metadata(parts.join("client_0/codes-test.u8"))
        .unwrap()
        .len();
    assert_eq!(bytes as usize, frames * 4);

    let qs = s(&q);
    let m = distill_with(
        "mvq",
        "mvq-codes",
        &[
            "--quantizer",
            &qs,
            "--set",
            "distillation.mvq.codes=codes-test",
        ],
    );
    let ce = m["final_round_client_metrics"]["mvq_ce"].as_f64().unwrap();
    assert!(ce.is_finite() && ce > 0.0, "mvq_ce {ce}");

    // Missing codes are an error naming the file, not a silent fall-back to the teacher.
    let out = f.path.join("distill-mvq-nocodes");
    let err = fail(&[
        "distill",
        "--mode",
        "mvq",
        "--config",
        "configs/tiny_student.yaml",
        "--teacher",
        &s(&teacher),
        "--quantizer",
        &qs,
        "--clients",
        &s(&parts),
        "--num-clients",
        "3",
        "--num-rounds",
        "1",
        "--out",
        &s(&out),
        "--set",
        "pretraining.local_steps=1",
        "--set",
        "distillation.mvq.codes=no-such-codes",
    ]);
    assert!(err.contains("no-such-codes.u8"), "{err}");
}

/// The server-side set (client_3, never trained on with --num-clients 3) relabelled with the
/// fixture's codebook by `kmeans --codebook` gets the labels the fit gave it, and `pretrain
/// --heldout` evaluates every round's global model on it.
#[test]
fn heldout_speakers_are_labelled_with_the_codebook_and_evaluated_every_round() {
    let f = fixture();
    let s = |x: &Path| x.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let held = dir.path().join("held");
    std::fs::create_dir_all(held.join("client_3")).unwrap();
    let parts = f.path.join("parts");
    std::fs::copy(parts.join("partition.json"), held.join("partition.json")).unwrap();
    for name in [
        "manifest.csv",
        "mfcc.npy",
        "mfcc.len",
        "mfcc.provenance.json",
    ] {
        std::fs::copy(
            parts.join("client_3").join(name),
            held.join("client_3").join(name),
        )
        .unwrap();
    }
    ok(&[
        "kmeans",
        "--clients",
        &s(&held),
        "--codebook",
        &s(&f.path.join("km/codebook.safetensors")),
        "--out",
        &s(&dir.path().join("km")),
    ]);
    for name in ["km.npy", "km.len"] {
        assert_eq!(
            std::fs::read(held.join("client_3").join(name)).unwrap(),
            std::fs::read(parts.join("client_3").join(name)).unwrap(),
            "{name}"
        );
    }
    let out = dir.path().join("run");
    let text = ok(&[
        "pretrain",
        "--simulation",
        "--config",
        "configs/tiny.yaml",
        "--clients",
        &s(&parts),
        "--out",
        &s(&out),
        "--num-clients",
        "3",
        "--num-rounds",
        "2",
        "--heldout",
        &s(&held.join("client_3")),
        "--set",
        "pretraining.vocab_size=20",
        "--set",
        "pretraining.local_steps=2",
    ]);
    assert!(text.contains("held-out acc_masked"), "{text}");
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2);
    for r in &recs {
        let acc = r["server_eval"]["acc_masked"].as_f64().unwrap();
        let maj = r["server_eval"]["majority_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && maj > 0.0 && maj < 1.0, "{r}");
    }
    // warmup_rounds 1 of 2, 2 updates a round: fairseq's rates for updates 0..4 with a warm-up
    // of 2 are p/2, p/2 (warm-up), p, p/2 (decay to 0 at update 4).
    let lr = |r: &serde_json::Value| (r["lr"][0].as_f64().unwrap(), r["lr"][1].as_f64().unwrap());
    assert_eq!(lr(&recs[0]), (1e-3, 1e-3));
    assert_eq!(lr(&recs[1]), (2e-3, 1e-3));
}

/// The fixture's teacher command line, into `out` with `extra` arguments.
fn teacher_args(parts: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "pretrain",
        "--simulation",
        "--config",
        "configs/tiny.yaml",
        "--clients",
        parts,
        "--out",
        out,
        "--num-clients",
        "3",
        "--num-rounds",
        "2",
        "--set",
        "pretraining.vocab_size=20",
        "--set",
        "pretraining.local_steps=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_rerun_without_resume_is_refused_and_keeps_the_checkpoint() {
    let f = fixture();
    let parts = f.path.join("parts");
    let teacher = f.path.join("teacher");
    let ck = teacher.join("checkpoint.safetensors");
    let before = std::fs::read(&ck).unwrap();
    let args = teacher_args(parts.to_str().unwrap(), teacher.to_str().unwrap(), &[]);
    let e = fail(&strs(&args));
    assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    assert!(e.contains("checkpoint.safetensors"), "{e}");
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        before,
        "the checkpoint was touched"
    );
    // The resolved configuration of the run that made it is beside it.
    let cfg = std::fs::read_to_string(teacher.join("config.yaml")).unwrap();
    assert!(
        cfg.contains("vocab_size: 20") && cfg.contains("local_steps: 2"),
        "{cfg}"
    );
}

/// A copy of the fixture partition's first two clients (audio stays where it is).
fn copy_partition(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("partition.json"), dst.join("partition.json")).unwrap();
    for c in ["client_0", "client_1"] {
        std::fs::create_dir_all(dst.join(c)).unwrap();
        for e in std::fs::read_dir(src.join(c)).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), dst.join(c).join(e.file_name())).unwrap();
            }
        }
    }
}

fn two_client_run(parts: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = teacher_args(parts.to_str().unwrap(), out.to_str().unwrap(), extra);
    let i = v.iter().position(|a| a == "--num-clients").unwrap();
    v[i + 1] = "2".into();
    v
}

#[test]
fn stale_labels_are_refused_before_training_naming_what_to_rerun() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    copy_partition(&f.path.join("parts"), &p);
    let out = dir.path().join("out");
    // Two manifest rows swapped after `kmeans`: same rows, other order.
    let m = p.join("client_0/manifest.csv");
    let text = std::fs::read_to_string(&m).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(1, 2);
    std::fs::write(&m, lines.join("\n") + "\n").unwrap();
    let e = fail(&strs(&two_client_run(&p, &out, &[])));
    assert!(
        e.contains("client_0/manifest.csv") && e.contains("rerun `fedhubert kmeans`"),
        "{e}"
    );
    assert!(!out.join("checkpoint.safetensors").exists());
    std::fs::write(&m, &text).unwrap();
    // Labels at 100 Hz read at another rate.
    let e = fail(&strs(&two_client_run(
        &p,
        &out,
        &["--set", "pretraining.label_rate=50"],
    )));
    assert!(e.contains("label_rate") && e.contains("100"), "{e}");
    // Client 1 relabelled by another codebook (a kmeans that stopped half way).
    let q = dir.path().join("q");
    copy_partition(&f.path.join("parts"), &q);
    let km = dir.path().join("km10");
    let qs = q.to_str().unwrap();
    ok(&[
        "kmeans",
        "--clients",
        qs,
        "--mode",
        "federated",
        "--k",
        "10",
        "--out",
        km.to_str().unwrap(),
    ]);
    for name in ["km.npy", "km.len", "km.provenance.json"] {
        std::fs::copy(q.join("client_1").join(name), p.join("client_1").join(name)).unwrap();
    }
    let e = fail(&strs(&two_client_run(&p, &out, &[])));
    assert!(
        e.contains("different codebooks") && e.contains("k=10") && e.contains("k=20"),
        "{e}"
    );
    // A run on the k=10 labels, then the partition relabelled: its resume is refused.
    let qrun = dir.path().join("qrun");
    ok(&strs(&two_client_run(&q, &qrun, &[])));
    let km20 = dir.path().join("km20");
    ok(&[
        "kmeans",
        "--clients",
        qs,
        "--mode",
        "federated",
        "--k",
        "20",
        "--out",
        km20.to_str().unwrap(),
    ]);
    let e = fail(&strs(&two_client_run(&q, &qrun, &["--resume"])));
    assert!(e.contains("labels.json") && e.contains("relabelled"), "{e}");
}

#[test]
fn a_corrupt_checkpoint_is_refused_naming_the_tensor() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(f.path.join("teacher/model.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&bad, &bytes).unwrap();
    let e = fail(&[
        "export",
        "--checkpoint",
        bad.to_str().unwrap(),
        "--out",
        dir.path().join("hf").to_str().unwrap(),
    ]);
    assert!(
        e.contains("model.safetensors") && e.contains("tensor `") && e.contains("corrupt"),
        "{e}"
    );
}

#[test]
fn iteration_two_labels_run_at_the_teachers_rate_and_a_wrong_rate_is_refused() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    copy_partition(&f.path.join("parts"), &p);
    let ps = p.to_str().unwrap();
    let teacher = f.path.join("teacher/model.safetensors");
    let t = teacher.to_str().unwrap();
    let e = fail(&["features", "--clients", ps, "--model", t, "--layer", "9"]);
    assert!(
        e.contains("--layer 9") && e.contains("2 transformer layers"),
        "{e}"
    );
    let text = ok(&["features", "--clients", ps, "--model", t, "--layer", "1"]);
    assert!(text.contains("layer 1 (128 dims, 50 Hz)"), "{text}");
    let km = dir.path().join("km2");
    ok(&[
        "kmeans",
        "--clients",
        ps,
        "--feature",
        "hubert_1",
        "--labels",
        "km2",
        "--k",
        "10",
        "--percent",
        "0.5",
        "--out",
        km.to_str().unwrap(),
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(km.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["percent"], 0.5);
    let e = fail(&[
        "kmeans",
        "--clients",
        ps,
        "--percent",
        "1.5",
        "--out",
        km.to_str().unwrap(),
    ]);
    assert!(e.contains("--percent") && e.contains("(0, 1]"), "{e}");
    let out = dir.path().join("out");
    // 50 Hz labels read at the default 100 Hz: refused before training, naming both rates.
    let e = fail(&strs(&two_client_run(
        &p,
        &out,
        &["--set", "pretraining.label_stem=km2"],
    )));
    assert!(
        e.contains("km2.npy") && e.contains("50") && e.contains("label_rate"),
        "{e}"
    );
    let run = two_client_run(
        &p,
        &out,
        &[
            "--set",
            "pretraining.label_stem=km2",
            "--set",
            "pretraining.label_rate=50",
        ],
    );
    let text = ok(&strs(&run));
    assert!(text.contains("round   2"), "{text}");
}

fn published(name: &str) -> String {
    root()
        .join("assets/fixtures/published_hubert_tiny")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// A published HuBERT (fairseq, torchaudio) goes through `import`, `features` and
/// `pretrain --init` as it is; a malicious pickle is refused by name.
#[test]
fn a_published_checkpoint_is_imported_extracted_and_continued() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("imported");
    let text = ok(&[
        "import",
        &published("fairseq_postnorm.pt"),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(
        text.contains("Fairseq") && text.contains("2 layers of 64"),
        "{text}"
    );
    for file in [
        "config.json",
        "model.safetensors",
        "pretraining_head.safetensors",
        "import.json",
        "README.md",
    ] {
        assert!(hf.join(file).is_file(), "missing {file}");
    }
    let card = std::fs::read_to_string(hf.join("README.md")).unwrap();
    let sha = fedhubert_io::provenance::sha256_file(std::path::Path::new(&published(
        "fairseq_postnorm.pt",
    )))
    .unwrap();
    assert!(
        card.contains("imported by fedhubert") && card.contains(&sha),
        "{card}"
    );
    let bad = dir.path().join("bad");
    let e = fail(&[
        "import",
        &published("malicious_root.pt"),
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert!(e.contains("posix.system") && e.contains("malicious"), "{e}");
    assert!(!bad.join("model.safetensors").exists());

    let p = dir.path().join("p");
    copy_partition(&f.path.join("parts"), &p);
    let ps = p.to_str().unwrap();
    let model = published("torchaudio_prenorm.pt");
    let text = ok(&[
        "features",
        "--clients",
        ps,
        "--model",
        &model,
        "--layer",
        "1",
    ]);
    assert!(text.contains("layer 1 (64 dims, 50 Hz)"), "{text}");

    let out = dir.path().join("continued");
    let init = published("fairseq_postnorm.pt");
    let text = ok(&strs(&two_client_run(&p, &out, &["--init", &init])));
    assert!(
        text.contains("initialised from") && text.contains("round   2"),
        "{text}"
    );
    let cfg = std::fs::read_to_string(out.join("hf/config.json")).unwrap();
    assert!(
        cfg.contains("\"hidden_size\": 64"),
        "the checkpoint's architecture is kept: {cfg}"
    );
}

/// The sorted file names of the partition's client folders.
fn client_files(parts: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for c in ["client_0", "client_1"] {
        for e in std::fs::read_dir(parts.join(c)).unwrap().flatten() {
            v.push(format!("{c}/{}", e.file_name().to_string_lossy()));
        }
    }
    v.sort();
    v
}

/// `fedhubert layers` on the 2-layer teacher: one row per hidden state, finite inertias
/// normalised into (0, 1], every layer probed alone, and no scratch shard left behind, also
/// when a layer's fit fails.
#[test]
fn layers_reports_every_layer_and_leaves_no_scratch_shards() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    copy_partition(&f.path.join("parts"), &p);
    let before = client_files(&p);
    let (ps, out) = (p.to_str().unwrap(), dir.path().join("layers"));
    let teacher = f.path.join("teacher/model.safetensors");
    let t = teacher.to_str().unwrap();
    let args = |k: &'static str| {
        let mut v = vec!["layers", "--model", t, "--clients", ps, "--k", k];
        v.extend(["--percent", "0.5", "--out", out.to_str().unwrap()]);
        v
    };
    let mut run = args("8");
    run.extend([
        "--probe-data",
        "assets/speech-commands-sample",
        "--folds",
        "3",
    ]);
    let text = ok(&run);
    assert!(
        text.contains("normalised") && text.contains("fairseq takes layer 6"),
        "{text}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("layers.json")).unwrap()).unwrap();
    let rows = r["layers"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{r}");
    for (l, row) in rows.iter().enumerate() {
        assert_eq!(row["layer"], l);
        let per_frame = row["inertia_per_frame"].as_f64().unwrap();
        let norm = row["normalised_inertia"].as_f64().unwrap();
        assert!(per_frame.is_finite() && per_frame > 0.0, "{row}");
        assert!(norm > 0.0 && norm <= 1.0, "{row}");
        let acc = row["probe_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{row}");
        assert!(row["probe_fold_std"].as_f64().unwrap().is_finite(), "{row}");
    }
    let md = std::fs::read_to_string(out.join("layers.md")).unwrap();
    assert!(
        md.contains("| 2 | 128 |") && md.contains("Lowest normalised inertia"),
        "{md}"
    );
    assert_eq!(client_files(&p), before, "scratch shards left behind");
    // A fit that cannot run names the flag, and still removes the layer's scratch shards.
    let e = fail(&args("60000"));
    assert!(e.contains("--k 60000") && e.contains("layer 0"), "{e}");
    assert_eq!(client_files(&p), before, "scratch shards left behind");
    let e = fail(&[
        "layers",
        "--model",
        "nope.safetensors",
        "--clients",
        ps,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--model nope.safetensors"), "{e}");
}

const DP: [&str; 10] = [
    "--set",
    "privacy.mode=central",
    "--set",
    "privacy.clipping_norm=0.5",
    "--set",
    "privacy.delta=0.001",
    "--set",
    "privacy.sampling=fixed",
    "--set",
    "privacy.noise_multiplier=1.0",
];

#[test]
fn differential_privacy_runs_from_the_cli_reports_epsilon_and_stops_at_max_epsilon() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let parts = f.path.join("parts");
    let out = dir.path().join("dp");
    // q = 1, z = 1: one round spends epsilon 3.2 at delta 1e-3, two 4.9.
    let mut extra = DP.to_vec();
    extra.extend(["--set", "privacy.max_epsilon=4"]);
    let args = teacher_args(parts.to_str().unwrap(), out.to_str().unwrap(), &extra);
    let text = ok(&strs(&args));
    assert!(
        text.contains("epsilon") && text.contains("stopped after round 1"),
        "{text}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let eps = s["privacy"]["epsilon"].as_f64().unwrap();
    assert!(eps > 3.0 && eps <= 4.0, "{s}");
    assert!(
        s["stopped"]
            .as_str()
            .unwrap()
            .contains("privacy.max_epsilon"),
        "{s}"
    );
    let line = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let r: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(
        r["train"],
        serde_json::json!({}),
        "client metrics were published: {r}"
    );
    assert_eq!(r["privacy"]["denominator"], 3.0);
    assert!(out.join("hf/model.safetensors").is_file());
    // The export's model card: owners with hours and manifest hashes, the codebook, epsilon.
    let card = std::fs::read_to_string(out.join("hf/README.md")).unwrap();
    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("labels.json")).unwrap()).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: transformers"),
        "{card}"
    );
    assert!(
        card.contains("3 data owners") && card.contains("| client_2 |"),
        "{card}"
    );
    assert!(
        card.contains(labels["codebook"].as_str().unwrap()),
        "{card}"
    );
    assert!(card.contains(&format!("epsilon {eps:.4}")), "{card}");
    assert!(card.contains("clipping_norm: 0.5"), "{card}");

    // Keys DP cannot honour, named.
    let bad = |extra: &[&str], want: &str| {
        let o = dir.path().join(format!("bad{}", want.len()));
        let e = fail(&strs(&teacher_args(
            parts.to_str().unwrap(),
            o.to_str().unwrap(),
            extra,
        )));
        assert!(e.contains(want), "{extra:?}: {e}");
    };
    bad(
        &["--set", "privacy.mode=central"],
        "give noise_multiplier or target_epsilon",
    );
    bad(&["--set", "privacy.clip_norm=1"], "clip_norm");
    let mut median = DP.to_vec();
    median.extend(["--strategy", "fedmedian"]);
    bad(&median, "fedmedian");
    let mut delta = DP.to_vec();
    delta.extend(["--set", "privacy.delta=0.5"]);
    bad(&delta, "privacy.delta");
}

#[test]
fn distillation_client_updates_take_the_privacy_section() {
    let mut extra = DP.to_vec();
    extra.extend(["--set", "privacy.noise=seeded"]);
    let s = distill_with("client", "client-dp", &extra);
    let p = &s["privacy"];
    assert!(p["epsilon"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(p["replied"], 3);
    assert_eq!(s["final_round_client_metrics"], serde_json::json!({}));
    let card =
        std::fs::read_to_string(fixture().path.join("distill-client-dp/hf/README.md")).unwrap();
    assert!(
        card.contains("student distilled") && card.contains("differential privacy"),
        "{card}"
    );
}
