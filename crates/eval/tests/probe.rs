//! End-to-end tests of the probe: loader, split, extraction + head on real and synthetic clips,
//! report files, upstream loading and fine-tuning.

use std::collections::BTreeSet;
use std::f32::consts::PI;
use std::path::{Path, PathBuf};

use fedhubert_eval::*;
use fedhubert_model::{
    HubertConfig, HubertForPretraining, HubertModel, PretrainConfig, collect_tensors, cpu_device,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn speech_commands() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/speech-commands-sample")
}

fn write_wav(path: &Path, samples: &[f32]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        w.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
}

/// `per_class` clips of 0.5 s per class: a pure tone at 220 Hz (`low`) or 3520 Hz (`high`)
/// with random amplitude and phase plus a little noise. Names carry no speaker id.
fn tone_dataset(dir: &Path, per_class: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (class, f) in [("high", 3520.0f32), ("low", 220.0)] {
        for k in 0..per_class {
            let amp = rng.random_range(0.1f32..0.5);
            let phase = rng.random_range(0.0f32..2.0 * PI);
            let x: Vec<f32> = (0..8000)
                .map(|t| {
                    amp * (2.0 * PI * f * t as f32 / 16_000.0 + phase).sin()
                        + rng.random_range(-0.01f32..0.01)
                })
                .collect();
            write_wav(&dir.join(class).join(format!("tone_{k}.wav")), &x);
        }
    }
}

fn tiny_random() -> HubertModel {
    HubertModel::new(&HubertConfig::tiny(), 0, &cpu_device()).unwrap()
}

#[test]
fn speech_commands_split_is_speaker_disjoint_seeded_and_near_target() {
    let data = load_labelled_dir(&speech_commands(), &LoadConfig::default()).unwrap();
    assert_eq!(data.clips.len(), 300);
    assert_eq!(data.classes.len(), 30);
    assert!(data.class_counts().iter().all(|&c| c == 10));
    assert!(data.has_speakers());
    let cfg = SplitConfig::default();
    let a = split_clips(&data, &cfg).unwrap();
    let b = split_clips(&data, &cfg).unwrap();
    assert_eq!(a, b, "same seed, same split");
    let c = split_clips(
        &data,
        &SplitConfig {
            seed: 1,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(a, c, "another seed, another split");
    for s in [&a, &c] {
        assert!(s.speaker_disjoint);
        let mut all: Vec<usize> = s.parts().concat();
        all.sort();
        assert_eq!(
            all,
            (0..300).collect::<Vec<_>>(),
            "every clip in exactly one split"
        );
        let spk: Vec<BTreeSet<&str>> = s
            .parts()
            .iter()
            .map(|p| {
                p.iter()
                    .map(|&i| data.clips[i].speaker.as_deref().unwrap())
                    .collect()
            })
            .collect();
        for (i, j) in [(0, 1), (0, 2), (1, 2)] {
            assert!(
                spk[i].is_disjoint(&spk[j]),
                "splits {i} and {j} share a speaker"
            );
        }
        let [tr, va, te] = s.parts().map(|p| p.len() as f64 / 300.0);
        eprintln!(
            "split achieved: train {tr:.3} valid {va:.3} test {te:.3}; speakers {:?}",
            spk.iter().map(|s| s.len()).collect::<Vec<_>>()
        );
        assert!((tr - 0.70).abs() < 0.05 && (va - 0.15).abs() < 0.05 && (te - 0.15).abs() < 0.05);
    }
}

#[test]
fn stratified_split_without_speaker_ids_covers_every_class() {
    let dir = tempfile::tempdir().unwrap();
    tone_dataset(dir.path(), 20, 1);
    let data = load_labelled_dir(dir.path(), &LoadConfig::default()).unwrap();
    assert!(!data.has_speakers());
    assert_eq!(data.classes, vec!["high", "low"]);
    let s = split_clips(&data, &SplitConfig::default()).unwrap();
    assert!(!s.speaker_disjoint);
    assert_eq!(s, split_clips(&data, &SplitConfig::default()).unwrap());
    for part in s.parts() {
        let classes: BTreeSet<usize> = part.iter().map(|&i| data.clips[i].label).collect();
        assert_eq!(classes.len(), 2);
    }
    assert_eq!(s.valid.len(), 6);
    assert_eq!(s.test.len(), 6);
    assert_eq!(s.train.len(), 28);
}

#[test]
fn loader_errors_name_the_problem() {
    let cfg = LoadConfig::default();
    let dir = tempfile::tempdir().unwrap();
    // Missing folder.
    let err = load_labelled_dir(&dir.path().join("nope"), &cfg).unwrap_err();
    assert!(matches!(err, EvalError::Io { .. }), "{err}");
    // Empty folder (a loose file at the top level is not a class).
    std::fs::write(dir.path().join("README.md"), "x").unwrap();
    let err = load_labelled_dir(dir.path(), &cfg).unwrap_err();
    assert!(matches!(err, EvalError::EmptyDataset { .. }), "{err}");
    // A class without clips.
    write_wav(&dir.path().join("yes/a_nohash_0.wav"), &[0.1; 1600]);
    std::fs::create_dir_all(dir.path().join("no")).unwrap();
    std::fs::write(dir.path().join("no/notes.txt"), "x").unwrap();
    let err = load_labelled_dir(dir.path(), &cfg).unwrap_err();
    assert!(
        matches!(&err, EvalError::EmptyClass { class, .. } if class == "no"),
        "{err}"
    );
    // Bad audio names the file.
    std::fs::write(
        dir.path().join("no/broken_nohash_0.wav"),
        b"RIFF not really a wav",
    )
    .unwrap();
    let err = load_labelled_dir(dir.path(), &cfg).unwrap_err();
    assert!(matches!(err, EvalError::Audio(_)), "{err}");
    assert!(err.to_string().contains("broken_nohash_0.wav"), "{err}");
    // Too short for the conv front-end.
    write_wav(&dir.path().join("no/broken_nohash_0.wav"), &[0.1; 100]);
    let err = load_labelled_dir(dir.path(), &cfg).unwrap_err();
    assert!(
        matches!(err, EvalError::TooShort { samples: 100, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("broken_nohash_0.wav"), "{err}");
    // Fixed: loads, and `_background_noise_` is skipped.
    write_wav(&dir.path().join("no/broken_nohash_0.wav"), &[0.1; 1600]);
    write_wav(
        &dir.path().join("_background_noise_/white.wav"),
        &[0.1; 1600],
    );
    let data = load_labelled_dir(dir.path(), &cfg).unwrap();
    assert_eq!(data.classes, vec!["no", "yes"]);
    assert_eq!(data.clips.len(), 2);
}

#[test]
fn probe_tiny_random_upstream_on_speech_commands_end_to_end() {
    let data = load_labelled_dir(&speech_commands(), &LoadConfig::default()).unwrap();
    let cfg = ProbeConfig {
        upstream_name: "random tiny".into(),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let r = probe(Upstream::Hubert(&tiny_random()), &data, &cfg).unwrap();
    eprintln!(
        "random tiny on speech commands: test {:.3} valid {:.3} train {:.3} majority {:.3}, best epoch {}/{}, layer weights {:?}, extract {:.1}s head {:.1}s total {:.1}s",
        r.test_accuracy,
        r.valid_accuracy,
        r.train_accuracy,
        r.majority_baseline,
        r.best_epoch,
        r.epochs_run,
        r.layer_weights,
        r.extract_seconds,
        r.train_seconds,
        t.elapsed().as_secs_f64()
    );
    assert!((0.0..=1.0).contains(&r.test_accuracy) && (0.0..=1.0).contains(&r.valid_accuracy));
    assert_eq!(r.num_hidden_states, 3);
    assert_eq!(r.hidden_size, 48);
    assert_eq!(r.layer_weights.len(), 3);
    assert!((r.layer_weights.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    // Row sums = per-class test counts of the (independently recomputed) split.
    let split = split_clips(&data, &cfg.split).unwrap();
    let mut per_class = vec![0usize; 30];
    split
        .test
        .iter()
        .for_each(|&i| per_class[data.clips[i].label] += 1);
    assert_eq!(r.confusion.row_sums(), per_class);
    assert_eq!(r.split.test_per_class, per_class);
    assert_eq!(
        r.split.clips,
        [split.train.len(), split.valid.len(), split.test.len()]
    );
    assert!((r.confusion.accuracy() - r.test_accuracy).abs() < 1e-12);

    let out = tempfile::tempdir().unwrap();
    write_report(&r, out.path()).unwrap();
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(out.path().join("confusion.png")).unwrap(),
    ));
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), confusion_png_size(30));
    assert_eq!(
        (info.width, info.height),
        (30 * CELL_PX + 1, 30 * CELL_PX + 1)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("probe.json")).unwrap())
            .unwrap();
    assert_eq!(json["test_accuracy"].as_f64().unwrap(), r.test_accuracy);
    assert_eq!(json["classes"].as_array().unwrap().len(), 30);
    let cm: ConfusionMatrix =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("confusion.json")).unwrap())
            .unwrap();
    assert_eq!(cm, r.confusion);
    let csv = std::fs::read_to_string(out.path().join("confusion.csv")).unwrap();
    assert_eq!(csv.lines().count(), 31);
    assert!(csv.lines().nth(1).unwrap().starts_with("bed,"));
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn probe_separates_pure_tones_with_a_random_tiny_upstream() {
    let dir = tempfile::tempdir().unwrap();
    tone_dataset(dir.path(), 20, 2);
    let data = load_labelled_dir(dir.path(), &LoadConfig::default()).unwrap();
    for kind in [HeadKind::Linear, HeadKind::Mlp { hidden: 16 }] {
        let cfg = ProbeConfig {
            head: HeadConfig {
                kind,
                ..Default::default()
            },
            folds: 4,
            ..Default::default()
        };
        let r = probe(Upstream::Hubert(&tiny_random()), &data, &cfg).unwrap();
        eprintln!(
            "tones ({kind:?}): test {:.3} valid {:.3} train {:.3}",
            r.test_accuracy, r.valid_accuracy, r.train_accuracy
        );
        assert!(
            r.test_accuracy >= 0.9,
            "{kind:?}: test accuracy {}",
            r.test_accuracy
        );
        assert_eq!(r.confusion.row_sums(), vec![3, 3]);
        let cv = r.cross_validation.as_ref().unwrap();
        assert_eq!(cv.fold_accuracies.len(), 4);
        assert_eq!(
            cv.confusion.row_sums(),
            vec![20, 20],
            "every clip tested once"
        );
        assert!(
            cv.accuracy >= 0.9,
            "{kind:?}: cross-validated accuracy {}",
            cv.accuracy
        );
    }
}

#[test]
fn upstream_specs_load_checkpoints_hf_dirs_and_random() {
    let dev = cpu_device();
    let cfg = HubertConfig::tiny();
    let full = HubertForPretraining::new(&cfg, &PretrainConfig::default(), 5, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("model.safetensors");
    full.save_checkpoint(&ckpt).unwrap();
    full.hubert.save_hf(dir.path().join("hf")).unwrap();
    let want = collect_tensors(&full.hubert);
    for spec in [
        ckpt.to_str().unwrap(),
        dir.path().join("hf").to_str().unwrap(),
    ] {
        let s = UpstreamSpec::parse(spec, cfg.clone(), 0).unwrap();
        let m = load_upstream(&s, &dev).unwrap();
        assert_eq!(collect_tensors(&m), want, "{}", s.describe());
    }
    let r1 = load_upstream(
        &UpstreamSpec::parse("random", cfg.clone(), 3).unwrap(),
        &dev,
    )
    .unwrap();
    let r2 = load_upstream(
        &UpstreamSpec::parse("random", cfg.clone(), 3).unwrap(),
        &dev,
    )
    .unwrap();
    assert_eq!(collect_tensors(&r1), collect_tensors(&r2));
    assert_ne!(collect_tensors(&r1), want);
    let err =
        UpstreamSpec::parse(dir.path().join("missing").to_str().unwrap(), cfg, 0).unwrap_err();
    assert!(matches!(err, EvalError::Upstream { .. }), "{err}");
}

#[test]
fn acoustic_baselines_separate_tones_and_per_layer_probes_cover_every_hidden_state() {
    let dir = tempfile::tempdir().unwrap();
    tone_dataset(dir.path(), 10, 3);
    let data = load_labelled_dir(dir.path(), &LoadConfig::default()).unwrap();
    let cfg = ProbeConfig {
        head: HeadConfig {
            epochs: 60,
            ..Default::default()
        },
        per_layer: true,
        ..Default::default()
    };
    for (a, dim) in [(AcousticFeature::Mfcc, 39), (AcousticFeature::Fbank, 80)] {
        let r = probe(Upstream::Acoustic(a), &data, &cfg).unwrap();
        assert_eq!((r.num_hidden_states, r.hidden_size), (1, dim), "{a:?}");
        // Pure tones of distinct pitch: a spectral feature separates them (chance 1/3).
        assert!(r.test_accuracy > 0.6, "{a:?}: {}", r.test_accuracy);
        assert_eq!(r.per_layer.len(), 1);
        assert_eq!(r.per_layer[0].test_accuracy, r.test_accuracy, "{a:?}");
    }
    let m = tiny_random();
    let r = probe(Upstream::Hubert(&m), &data, &cfg).unwrap();
    let layers: Vec<usize> = r.per_layer.iter().map(|l| l.layer).collect();
    assert_eq!(
        layers,
        (0..=m.config().num_hidden_layers).collect::<Vec<_>>()
    );
    let ft = ProbeConfig {
        finetune: Some(FinetuneConfig::default()),
        ..cfg
    };
    let e = probe(Upstream::Acoustic(AcousticFeature::Mfcc), &data, &ft).unwrap_err();
    assert!(e.to_string().contains("fine-tuning needs a model"), "{e}");
}

#[test]
fn finetuning_runs_and_never_selects_worse_than_the_frozen_probe_on_validation() {
    let dir = tempfile::tempdir().unwrap();
    tone_dataset(dir.path(), 10, 3);
    let data = load_labelled_dir(dir.path(), &LoadConfig::default()).unwrap();
    let cfg = ProbeConfig {
        head: HeadConfig {
            epochs: 30,
            ..Default::default()
        },
        finetune: Some(FinetuneConfig {
            epochs: 2,
            batch_size: 4,
            upstream_lr: 1e-4,
            head_lr: 1e-3,
            seed: 0,
        }),
        ..Default::default()
    };
    let r = probe(Upstream::Hubert(&tiny_random()), &data, &cfg).unwrap();
    let f = r.finetune.as_ref().unwrap();
    eprintln!(
        "fine-tune: frozen valid {:.3} test {:.3} -> tuned valid {:.3} test {:.3}, {} steps {:.1}s",
        r.valid_accuracy, r.test_accuracy, f.valid_accuracy, f.test_accuracy, f.steps, f.seconds
    );
    assert_eq!(f.steps, 2 * 12usize.div_ceil(4));
    assert!(f.valid_accuracy >= r.valid_accuracy);
    assert!((0.0..=1.0).contains(&f.test_accuracy));
    assert_eq!(f.confusion.row_sums(), r.confusion.row_sums());
    let out = tempfile::tempdir().unwrap();
    write_report(&r, out.path()).unwrap();
    assert!(out.path().join("confusion_finetuned.png").is_file());
}

#[test]
fn finetuning_updates_the_transformer_lowers_train_loss_and_keeps_the_conv_front_end() {
    let data = load_labelled_dir(&speech_commands(), &LoadConfig::default()).unwrap();
    let split = split_clips(&data, &SplitConfig::default()).unwrap();
    let upstream = tiny_random();
    let waves: Vec<&[f32]> = data.clips.iter().map(|c| c.samples.as_slice()).collect();
    let feats = extract_pooled(&upstream, &waves, 8).unwrap();
    let labels: Vec<usize> = data.clips.iter().map(|c| c.label).collect();
    let frozen = train_probe(
        &feats,
        &labels,
        30,
        &split.train,
        &split.valid,
        &HeadConfig {
            epochs: 5,
            patience: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = FinetuneConfig {
        epochs: 3,
        batch_size: 8,
        upstream_lr: 1e-3,
        head_lr: 5e-3,
        seed: 0,
    };
    let t = std::time::Instant::now();
    let ft = finetune(&upstream, &frozen.head, &data, &split, &cfg).unwrap();
    let s = &ft.summary;
    eprintln!(
        "fine-tune on speech commands: frozen valid {:.3} -> tuned valid {:.3} test {:.3}; epoch losses {:?}; {} steps, {:.1}s",
        frozen.valid_accuracy,
        s.valid_accuracy,
        s.test_accuracy,
        s.epoch_train_loss,
        s.steps,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(s.epoch_train_loss.len(), 3);
    assert!(
        s.epoch_train_loss[2] < s.epoch_train_loss[0],
        "train loss did not go down: {:?}",
        s.epoch_train_loss
    );
    assert!(s.valid_accuracy >= frozen.valid_accuracy);
    let before = collect_tensors(&upstream);
    let after = collect_tensors(&ft.upstream);
    for (a, b) in before.tensors.iter().zip(&after.tensors) {
        if a.name.starts_with("feature_extractor.") {
            assert_eq!(
                a, b,
                "{} changed although the conv front-end is frozen",
                a.name
            );
        }
    }
    if s.valid_accuracy > frozen.valid_accuracy {
        assert!(
            before
                .tensors
                .iter()
                .zip(&after.tensors)
                .any(|(a, b)| a.name.starts_with("encoder.") && a != b),
            "a better epoch was selected, so the encoder must differ"
        );
    }
    assert_eq!(
        s.confusion.row_sums().iter().sum::<usize>(),
        split.test.len()
    );
}
