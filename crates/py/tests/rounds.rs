//! The ServerApp's stepped round loop against `fedhubert_fl::run`: with the same clients they
//! must sample, seed, aggregate and checkpoint identically, including across a resume.

mod common;

use fedhubert_fl::store::Start;
use std::collections::BTreeMap;

use common::{Fake, drive, same_history};
use fedhubert::{RoundServer, run_file};
use fedhubert_fl::{Reply, Upload};

fn config(strategy: &str, rounds: u64) -> fedhubert_train::RunFile {
    run_file(
        "tiny",
        &[
            format!("federated.strategy={strategy}"),
            format!("federated.num_rounds={rounds}"),
            "federated.client_fraction=0.5".into(),
            "federated.min_fit_clients=2".into(),
            "federated.fraction_evaluate=0.5".into(),
            "federated.seed=5".into(),
            "pretraining.freeze_feature_extractor=true".into(),
        ],
    )
    .unwrap()
}

fn native(rf: &fedhubert_train::RunFile, out: &std::path::Path) -> fedhubert_fl::RunResult {
    let template = fedhubert_model::HubertForPretraining::new(
        &rf.model_config().unwrap(),
        &rf.pretrain_config().unwrap(),
        rf.federated.run.seed,
        &fedhubert_model::cpu_device(),
    )
    .unwrap();
    let initial = fedhubert_model::collect_tensors(&template);
    fedhubert_fl::run(
        &mut Fake { n: 5 },
        rf.strategy().unwrap().build().unwrap(),
        initial,
        &rf.run_config().unwrap(),
        Some(out),
        false,
        |_| {},
    )
    .unwrap()
}

#[test]
fn stepped_rounds_match_the_native_loop_with_failures_and_resume() {
    for strategy in ["fedavg", "fedadam"] {
        let dir = tempfile::tempdir().unwrap();
        let rf = config(strategy, 3);
        let want = native(&rf, &dir.path().join("native"));
        // Seed 5 samples the failing client 2 at least once, so a round is retried.
        assert!(
            want.history
                .iter()
                .any(|r| !r.failures.is_empty() && r.attempts > 1),
            "client 2 should have failed and its round been retried"
        );

        let out = dir.path().join("stepped");
        let mut s = RoundServer::new(rf.clone(), &out, 5, Start::Fresh).unwrap();
        drive(&mut s, &mut Fake { n: 5 }, Some(1));
        assert_eq!(s.history().len(), 1);
        drop(s);
        // A restarted ServerApp picks up after round 1 from the checkpoint.
        let mut s = RoundServer::new(rf.clone(), &out, 5, Start::Resume).unwrap();
        assert_eq!(s.next_round(), Some(2));
        drive(&mut s, &mut Fake { n: 5 }, None);
        assert_eq!(s.next_round(), None);
        assert!(
            *s.global() == want.weights,
            "{strategy}: global weights differ from fedhubert_fl::run"
        );
        same_history(s.history(), &want.history);
        let ck = fedhubert_fl::store::load_checkpoint(&out.join("checkpoint.safetensors")).unwrap();
        let ck_native =
            fedhubert_fl::store::load_checkpoint(&dir.path().join("native/checkpoint.safetensors"))
                .unwrap();
        assert_eq!(ck.round, 3);
        assert!(
            ck.global == ck_native.global
                && ck.state == ck_native.state
                && ck.synced == ck_native.synced
        );
        s.export("test").unwrap();
        assert!(out.join("hf/model.safetensors").is_file());
    }
}

#[test]
fn unsampled_and_repeated_replies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = RoundServer::new(config("fedavg", 1), dir.path(), 5, Start::Fresh).unwrap();
    let ex = s.next_exchange().unwrap().unwrap();
    let sampled: Vec<usize> = ex.clients.iter().map(|(c, _)| *c).collect();
    let other = (0..5).find(|c| !sampled.contains(c)).unwrap();
    let w = s.global().clone();
    let reply = |w: &fedhubert_fl::Weights| Reply::Fit {
        upload: Upload::Weights(w.clone()),
        num_examples: 1,
        metrics: BTreeMap::new(),
    };
    let e = s.deliver(other, reply(&w)).unwrap_err();
    assert!(e.to_string().contains("not sampled"), "{e}");
    // Out of client order is fine (replies are buffered and aggregated in client order) ...
    s.deliver(sampled[1], reply(&w)).unwrap();
    // ... but a second reply from one client is refused.
    let e = s.deliver(sampled[1], reply(&w)).unwrap_err();
    assert!(e.to_string().contains("replied twice"), "{e}");
}

#[test]
fn resume_refuses_a_checkpoint_of_another_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = RoundServer::new(config("fedavg", 1), dir.path(), 5, Start::Fresh).unwrap();
    drive(&mut s, &mut Fake { n: 5 }, None);
    drop(s);
    let e = RoundServer::new(config("fedadam", 2), dir.path(), 5, Start::Resume)
        .err()
        .unwrap();
    assert!(e.to_string().contains("strategy"), "{e}");
}

#[test]
fn a_server_owns_its_folder_and_never_silently_restarts_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = RoundServer::new(config("fedavg", 1), dir.path(), 5, Start::Fresh).unwrap();
    // A second ServerApp on the same out-dir while the first lives.
    let e = RoundServer::new(config("fedavg", 1), dir.path(), 5, Start::Resume)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("in use by another fedhubert run"), "{e}");
    drive(&mut s, &mut Fake { n: 5 }, None);
    drop(s);
    // Started again without resume: refused, naming both ways out; the checkpoint is untouched.
    let ck = dir.path().join("checkpoint.safetensors");
    let before = std::fs::read(&ck).unwrap();
    let e = RoundServer::new(config("fedavg", 1), dir.path(), 5, Start::Fresh)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("resume") && e.contains("overwrite"), "{e}");
    assert_eq!(std::fs::read(&ck).unwrap(), before);
    // overwrite=true discards it and starts at round 1.
    let s = RoundServer::new(config("fedavg", 1), dir.path(), 5, Start::Overwrite).unwrap();
    assert_eq!(s.next_round(), Some(1));
    assert!(!ck.exists());
}
