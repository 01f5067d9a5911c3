//! Our side of the training-dynamics parity check (bench/pytorch_train_parity.py; BENCHMARKS.md,
//! "Training dynamics: fedhubert vs PyTorch"): trains a model on the bundled LibriSpeech sample
//! with `LocalTrainer` and writes everything another implementation needs to train the same
//! model on the same batches: the initial weights (HF export + head), every step's utterances,
//! crops, label windows and masks, and our per-step loss, masked accuracy, learning rate and
//! gradient norm.
//!
//!     cargo run --release -p fedhubert-train --example parity_trace -- OUT [tiny|student] [STEPS]
//!
//! Dropout and LayerDrop are off (their random streams cannot be shared across engines).

#[path = "../tests/common.rs"]
#[allow(dead_code)]
mod common;

use fedhubert_train::LabelSpec;
use std::collections::BTreeMap;
use std::path::PathBuf;

use fedhubert_audio::Manifest;
use fedhubert_fl::LrSchedule;
use fedhubert_model::{HubertConfig, HubertForPretraining, PretrainConfig, cpu_device};
use fedhubert_train::{BatchConfig, LocalTrainer, TrainConfig, load_client_dir};

fn model_config(preset: &str) -> HubertConfig {
    let mut c = match preset {
        "student" => HubertConfig::student(),
        "tiny" => HubertConfig {
            hidden_size: 128,
            intermediate_size: 256,
            conv_dim: vec![64; 7],
            ..HubertConfig::tiny()
        },
        other => panic!("preset {other}: expected tiny or student"),
    };
    c.hidden_dropout = 0.0;
    c.attention_dropout = 0.0;
    c.activation_dropout = 0.0;
    c.feat_proj_dropout = 0.0;
    c.final_dropout = 0.0;
    c.layerdrop = 0.0;
    c
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(
        args.get(1)
            .expect("usage: parity_trace OUT [tiny|student] [STEPS]"),
    );
    let preset = args.get(2).map_or("tiny", String::as_str);
    let steps: u64 = args.get(3).map_or(50, |s| s.parse().expect("STEPS"));
    std::fs::create_dir_all(&out).unwrap();
    let data_dir = out.join("data");
    let _ = std::fs::remove_dir_all(&data_dir);
    let k = 50;
    let dirs = common::labelled_partition(&data_dir, 1, k);
    let data = load_client_dir(&dirs[0], &LabelSpec::default()).unwrap();
    let manifest = Manifest::load(&dirs[0].join("manifest.csv")).unwrap();
    let audio: BTreeMap<String, String> = (manifest.entries.iter())
        .map(|e| (e.id.clone(), manifest.abs_path(e).display().to_string()))
        .collect();

    let cfg = model_config(preset);
    let pre = PretrainConfig {
        num_classes: k,
        final_dim: if cfg.hidden_size >= 256 { 256 } else { 64 },
        ..Default::default()
    };
    let dev = cpu_device();
    let model = HubertForPretraining::new(&cfg, &pre, 0, &dev).unwrap();
    model.save_hf(out.join("init")).unwrap();
    let tc = TrainConfig {
        learning_rate: if preset == "tiny" { 2e-3 } else { 5e-4 },
        lr_schedule: LrSchedule::PolynomialDecay {
            warmup_updates: steps / 10,
            total_updates: steps,
        },
        batch: BatchConfig {
            batch_size: 2,
            max_tokens: 1_000_000,
            max_sample_size: 32_000,
            min_sample_size: 16_000,
        },
        ..Default::default()
    };
    let mut tr = LocalTrainer::new(model, tc.clone(), &dev).unwrap();
    tr.trace = Some(Vec::new());
    let mut metrics = Vec::new();
    tr.train(
        &data.train,
        0,
        steps,
        |k| tc.lr_at(k),
        11,
        None,
        |_, m| {
            metrics.push(serde_json::json!({
                "loss": m.loss, "acc_masked": m.acc_masked, "lr": m.lr, "grad_norm": m.grad_norm,
            }));
        },
    )
    .unwrap();
    let steps_json: Vec<_> = (tr.trace.take().unwrap().into_iter())
        .zip(metrics)
        .map(|(batches, mut m)| {
            m["batches"] = serde_json::to_value(batches).unwrap();
            m
        })
        .collect();
    let trace = serde_json::json!({
        "preset": preset,
        "train_config": tc,
        "pretrain_config": pre,
        "audio": audio,
        "steps": steps_json,
    });
    std::fs::write(
        out.join("trace.json"),
        serde_json::to_string(&trace).unwrap(),
    )
    .unwrap();
    println!(
        "{preset}: {steps} steps traced into {}",
        out.join("trace.json").display()
    );
}
