//! The local trainer on real data: loss falls, federated resume is bit-exact, freezing works.

mod common;

use fedhubert_fl::{
    ClientSettings, LocalWork, RunConfig, StrategyConfig, UploadPlan, Weights, run,
};
use fedhubert_model::{HubertConfig, HubertForPretraining, PretrainConfig, cpu_device};
use fedhubert_train::{
    BatchConfig, HubertClients, LocalTrainer, SimConfig, TrainConfig, load_client_dir,
};

fn tiny() -> (HubertConfig, PretrainConfig) {
    let cfg = HubertConfig::tiny();
    let pre = PretrainConfig {
        num_classes: 20,
        final_dim: 32,
        ..Default::default()
    };
    (cfg, pre)
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        learning_rate: 2e-3,
        warmup_steps: 10,
        max_steps: 120,
        batch: BatchConfig {
            batch_size: 4,
            max_tokens: 200_000,
            max_sample_size: 32_000,
            min_sample_size: 16_000,
        },
        ..Default::default()
    }
}

#[test]
fn masked_loss_falls_and_masked_accuracy_rises_on_real_data() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = common::labelled_partition(dir.path(), 1, 20);
    let data = load_client_dir(&dirs[0], "km").unwrap();
    let (cfg, pre) = tiny();
    let dev = cpu_device();
    let mut tr = LocalTrainer::new(
        HubertForPretraining::new(&cfg, &pre, 0, &dev).unwrap(),
        train_cfg(),
        &dev,
    )
    .unwrap();
    let before = tr.evaluate(&data.valid, 0).unwrap();
    let mut losses = Vec::new();
    let mut accs = Vec::new();
    tr.train(&data.train, 0, 120, None, 7, None, |_, m| {
        losses.push(m.loss);
        accs.push(m.acc_masked);
    })
    .unwrap();
    let after = tr.evaluate(&data.valid, 0).unwrap();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (l0, l1) = (mean(&losses[..15]), mean(&losses[losses.len() - 15..]));
    let (a0, a1) = (mean(&accs[..15]), mean(&accs[accs.len() - 15..]));
    println!(
        "train loss {l0:.4} -> {l1:.4}, masked acc {a0:.3} -> {a1:.3}; valid loss {:.4} -> {:.4}, valid acc {:.3} -> {:.3}",
        before.loss, after.loss, before.acc_masked, after.acc_masked
    );
    assert!(l1 < l0 - 0.1, "training loss did not fall: {l0} -> {l1}");
    assert!(a1 > a0 + 0.01, "masked accuracy did not rise: {a0} -> {a1}");
    assert!(
        after.acc_masked > before.acc_masked,
        "validation masked accuracy did not rise"
    );
    assert!(
        after.loss < before.loss,
        "validation loss did not fall: {} -> {}",
        before.loss,
        after.loss
    );
}

fn pool(
    dirs: &[std::path::PathBuf],
    cfg: &HubertConfig,
    pre: &PretrainConfig,
    freeze: bool,
) -> (HubertClients, Weights) {
    let dev = cpu_device();
    let template = HubertForPretraining::new(cfg, pre, 3, &dev).unwrap();
    let w = fedhubert_model::collect_tensors(&template);
    let tc = TrainConfig {
        freeze_feature_extractor: freeze,
        ..train_cfg()
    };
    (
        HubertClients::new(dirs.to_vec(), template, tc, SimConfig::default(), dev),
        w,
    )
}

/// Two local steps at the trainer's learning rate each round.
fn two_steps() -> ClientSettings {
    ClientSettings {
        learning_rate: train_cfg().learning_rate,
        local: LocalWork::Steps(2),
        proximal_mu: 0.0,
    }
}

#[test]
fn federated_resume_is_bit_exact_with_dropout_and_fedadam() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = common::labelled_partition(dir.path(), 3, 20);
    let (mut cfg, pre) = tiny();
    cfg.hidden_dropout = 0.1;
    cfg.attention_dropout = 0.1;
    let strategy = StrategyConfig::from_name("fedadam").unwrap();
    let rc = |rounds| RunConfig {
        num_rounds: rounds,
        fraction_fit: 0.67,
        min_fit_clients: 2,
        seed: 5,
        client: two_steps(),
        ..Default::default()
    };

    let full_dir = tempfile::tempdir().unwrap();
    let (mut p, w0) = pool(&dirs, &cfg, &pre, false);
    let full = run(
        &mut p,
        strategy.build().unwrap(),
        w0.clone(),
        &rc(3),
        Some(full_dir.path()),
        false,
        |_| {},
    )
    .unwrap();

    let part = tempfile::tempdir().unwrap();
    let (mut p, _) = pool(&dirs, &cfg, &pre, false);
    run(
        &mut p,
        strategy.build().unwrap(),
        w0.clone(),
        &rc(1),
        Some(part.path()),
        false,
        |_| {},
    )
    .unwrap();
    let (mut p, _) = pool(&dirs, &cfg, &pre, false);
    let resumed = run(
        &mut p,
        strategy.build().unwrap(),
        w0.clone(),
        &rc(3),
        Some(part.path()),
        true,
        |_| {},
    )
    .unwrap();

    let bits = |w: &Weights| w.iter_data().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_ne!(bits(&full.weights), bits(&w0), "training changed nothing");
    assert_eq!(
        bits(&full.weights),
        bits(&resumed.weights),
        "resumed run differs from the uninterrupted one"
    );
    assert_eq!(full.history[2].train, resumed.history[2].train);
}

#[test]
fn frozen_front_end_is_untouched_and_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = common::labelled_partition(dir.path(), 2, 20);
    let (cfg, pre) = tiny();
    let (mut p, w0) = pool(&dirs, &cfg, &pre, true);
    let prefix = fedhubert_train::FEATURE_EXTRACTOR.to_string();
    let rc = RunConfig {
        num_rounds: 1,
        min_fit_clients: 2,
        upload: UploadPlan {
            frozen_prefixes: vec![prefix.clone()],
            ..Default::default()
        },
        client: two_steps(),
        ..Default::default()
    };
    let (mut p2, _) = pool(&dirs, &cfg, &pre, false);
    let r = run(
        &mut p,
        StrategyConfig::default().build().unwrap(),
        w0.clone(),
        &rc,
        None,
        false,
        |_| {},
    )
    .unwrap();
    let r_full = run(
        &mut p2,
        StrategyConfig::default().build().unwrap(),
        w0.clone(),
        &RunConfig {
            upload: UploadPlan::default(),
            ..rc.clone()
        },
        None,
        false,
        |_| {},
    )
    .unwrap();
    for (a, b) in r.weights.tensors.iter().zip(&w0.tensors) {
        if a.name.starts_with(&prefix) {
            assert_eq!(a.data, b.data, "{} changed while frozen", a.name);
        }
    }
    assert!(
        r.weights
            .tensors
            .iter()
            .zip(&w0.tensors)
            .any(|(a, b)| !a.name.starts_with(&prefix) && a.data != b.data)
    );
    assert!(r.history[0].bytes_up < r_full.history[0].bytes_up);
    println!(
        "uplink bytes frozen {} vs full {}",
        r.history[0].bytes_up, r_full.history[0].bytes_up
    );
}
