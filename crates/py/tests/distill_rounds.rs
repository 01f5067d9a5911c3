//! Server-side distillation stepped by the ServerApp against `fedhubert_fl::run` with the same
//! `ServerDistill` strategy (what `fedhubert distill --mode server` runs): the same global
//! weights, server heads and optimizer state, history and distillation log, across a resume.

mod common;

use fedhubert_fl::store::Start;
use fedhubert_train::core::Reported;
use std::path::{Path, PathBuf};

use common::{Fake, drive, same_history};
use fedhubert::{ServerDistillation, distill_run_file};
use fedhubert_audio::partition::{Method, PartitionConfig, partition, write_partition};
use fedhubert_distill::{DistillRunFile, DistillSetup};
use fedhubert_model::{HubertForPretraining, cpu_device};

/// A tiny teacher with a 20-class head (untrained: only its outputs' reproducibility matters
/// here) and a server-side set of sample utterances without labels.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let rf = fedhubert::run_file("tiny", &["pretraining.vocab_size=20".into()]).unwrap();
    let teacher = HubertForPretraining::new(
        &rf.model_config().unwrap(),
        &rf.pretrain_config().unwrap(),
        3,
        &cpu_device(),
    )
    .unwrap();
    let t = dir.join("teacher.safetensors");
    teacher.save_checkpoint(&t).unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/librispeech-sample/train-clean-100");
    let corpus = fedhubert_audio::scan::scan_dir(&sample, false).unwrap();
    let pcfg = PartitionConfig {
        method: Method::Iid,
        num_clients: 1,
        seed: 0,
        valid_fraction: 0.1,
        min_client_utterances: 1,
    };
    let parts = partition(&corpus, &pcfg).unwrap();
    write_partition(&dir.join("set"), &corpus, &parts, &pcfg).unwrap();
    (t, dir.join("set/client_0"))
}

fn config(teacher: &Path, set: &Path, rounds: u64) -> DistillRunFile {
    let mut rf = distill_run_file(
        "tiny_student",
        &[
            format!("federated.num_rounds={rounds}"),
            "federated.client_fraction=0.5".into(),
            "federated.min_fit_clients=2".into(),
            "federated.fraction_evaluate=0.5".into(),
            "federated.seed=5".into(),
            "federated.strategy=fedadam".into(),
            // No labels on the server-side set: distillation losses only.
            "distillation.alpha=1.0".into(),
            "distillation.server_steps=2".into(),
            // DistilHuBERT heads: server-only parameters that must survive the resume.
            "distillation.pred_weight=1.0".into(),
            "distillation.server_max_utterances=8".into(),
        ],
    )
    .unwrap();
    rf.distillation.teacher = Some(teacher.to_path_buf());
    rf.distillation.server_set = Some(set.to_path_buf());
    rf
}

#[test]
fn stepped_server_distillation_matches_the_native_loop_across_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, set) = fixture(dir.path());
    let rf = config(&teacher, &set, 3);

    // The native run: fedhubert_fl::run with the strategy `fedhubert distill --mode server` builds.
    let dev = cpu_device();
    let setup = DistillSetup::new(&rf, &dev).unwrap();
    let base = rf.run_file();
    let strategy = setup
        .server_strategy(&rf, base.strategy().unwrap().build().unwrap(), &dev)
        .unwrap();
    let log = strategy.log_handle();
    let native_out = dir.path().join("native");
    let want = fedhubert_fl::run(
        &mut Fake { n: 5 },
        Box::new(strategy),
        setup.initial(),
        &base.run_config().unwrap(),
        Some(&native_out),
        false,
        |_| {},
    )
    .unwrap();
    let want_log = log.lock().unwrap().clone();
    assert_eq!(want_log.len(), 3);

    let out = dir.path().join("stepped");
    let sd = ServerDistillation::new(rf.clone()).unwrap();
    // The clients train the student the server aggregates: its head follows the teacher's.
    assert_eq!(sd.client_run_file().pretraining.vocab_size, 20);
    let mut s = sd.server(&out, 5, Start::Fresh).unwrap();
    drive(&mut s, &mut Fake { n: 5 }, Some(1));
    assert_eq!(s.server_log().len(), 1);
    drop(s);
    // A restarted ServerApp picks up after round 1: checkpoint, server heads and moments, log.
    let mut s = ServerDistillation::new(rf.clone())
        .unwrap()
        .server(&out, 5, Start::Resume)
        .unwrap();
    assert_eq!(s.rounds.next_round(), Some(2));
    drive(&mut s, &mut Fake { n: 5 }, None);
    assert_eq!(s.rounds.next_round(), None);
    assert!(
        *s.rounds.global() == want.weights,
        "global weights differ from fedhubert_fl::run"
    );
    assert_ne!(want.weights, setup.initial(), "the student did not change");
    same_history(s.rounds.history(), &want.history);
    let ck = fedhubert_fl::store::load_checkpoint(&out.join("checkpoint.safetensors")).unwrap();
    let ck_native =
        fedhubert_fl::store::load_checkpoint(&native_out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ck.round, 3);
    assert!(ck.state.contains_key("server_aux") && ck.state.contains_key("server_adam_m"));
    assert!(
        ck.global == ck_native.global
            && ck.state == ck_native.state
            && ck.synced == ck_native.synced
    );
    // Round 1's entry came back from server_distill.jsonl; rounds 2 and 3 were computed again.
    let got = s.server_log();
    assert_eq!(
        got.iter().map(|r| r.round).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for (a, b) in got.iter().zip(&want_log) {
        // Exact: round 1 went through the file's JSON (read back exactly), and the global
        // gradient norm is summed in one fixed order.
        for (x, y) in [(&a.first, &b.first), (&a.mean, &b.mean), (&a.last, &b.last)] {
            for ((k, u), (_, v)) in x.to_map().iter().zip(y.to_map()) {
                assert!(*u == v, "round {} {k}: stepped {u} native {v}", a.round);
            }
        }
    }
    assert!(want_log[2].last.pred_l1 > 0.0);
    let summary = s.export().unwrap();
    assert_eq!(summary["rounds"], 3);
    assert!(summary["server_distillation"]["last_round_last_step"]["kl"].is_number());
    for f in [
        "student.safetensors",
        "hf/model.safetensors",
        "server_distill.jsonl",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
}

#[test]
fn missing_teacher_and_server_set_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (teacher, set) = fixture(dir.path());
    let e = ServerDistillation::new(config(&dir.path().join("nope.safetensors"), &set, 1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
    let e = ServerDistillation::new(config(&teacher, &dir.path().join("no-set"), 1))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("distillation.server_set") && e.contains("no-set"),
        "{e}"
    );
    let mut rf = config(&teacher, &set, 1);
    rf.distillation.server_set = None;
    let e = ServerDistillation::new(rf).err().unwrap().to_string();
    assert!(e.contains("distillation.server_set"), "{e}");
}
