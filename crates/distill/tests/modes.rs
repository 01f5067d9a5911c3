//! End-to-end checks of the three distillation modes on the bundled LibriSpeech sample with a tiny
//! teacher. The fixture is built with the project's own pipeline: scan + partition of the sample,
//! 39-dim MFCC, a quick k-means into 16 classes, labels written as `km.npy` / `km.len`, and a tiny
//! teacher briefly pretrained on them.

use fedhubert_train::LabelSpec;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use fedhubert_audio::partition::{Method, PartitionConfig, partition, write_partition};
use fedhubert_audio::scan::scan_dir;
use fedhubert_audio::{Manifest, load_audio};
use fedhubert_distill::config::Mode;
use fedhubert_distill::data::load_audio_dir;
use fedhubert_distill::student::{DistillStudent, hubert_param_count, init_from_teacher};
use fedhubert_distill::{
    DistillConfig, DistillParts, DistillTrainer, Quantizer, ServerDistill, Teacher,
};
use fedhubert_features::shard::ShardWriter;
use fedhubert_features::{Mfcc, MfccConfig};
use fedhubert_fl::{ClientSettings, LocalWork, RunConfig, StrategyConfig};
use fedhubert_model::{
    HeadKind, HubertConfig, HubertForPretraining, HubertModel, PretrainConfig, collect_tensors,
    cpu_device, param_shapes,
};
use fedhubert_train::data::BatchConfig;
use fedhubert_train::{HubertClients, SimConfig, TrainConfig};

const CLASSES: usize = 16;

struct Fixture {
    root: PathBuf,
    teacher: PathBuf,
}

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/librispeech-sample/train-clean-100")
}

/// Lloyd's k-means (init on evenly spaced frames) for the fixture labels.
fn quick_kmeans(x: &[f32], d: usize, k: usize, iters: usize) -> Vec<f32> {
    let n = x.len() / d;
    let mut c: Vec<f32> = (0..k)
        .flat_map(|j| x[(j * n / k) * d..(j * n / k + 1) * d].to_vec())
        .collect();
    for _ in 0..iters {
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for f in 0..n {
            let a = nearest(&c, &x[f * d..(f + 1) * d], d);
            counts[a] += 1;
            for q in 0..d {
                sums[a * d + q] += x[f * d + q] as f64;
            }
        }
        for j in 0..k {
            if counts[j] > 0 {
                for q in 0..d {
                    c[j * d + q] = (sums[j * d + q] / counts[j] as f64) as f32;
                }
            }
        }
    }
    c
}

fn nearest(c: &[f32], x: &[f32], d: usize) -> usize {
    (0..c.len() / d)
        .map(|j| {
            (
                j,
                c[j * d..(j + 1) * d]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>(),
            )
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
        .0
}

fn tiny_train() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-3,
        lr_schedule: fedhubert_fl::LrSchedule::Fixed { warmup_updates: 0 },
        batch: BatchConfig {
            batch_size: 4,
            max_tokens: 1_000_000,
            max_sample_size: 16_000,
            min_sample_size: 16_000,
        },
        ..Default::default()
    }
}

fn teacher_pretrain() -> PretrainConfig {
    PretrainConfig {
        num_classes: CLASSES,
        final_dim: 32,
        head: HeadKind::Cosine,
        ..Default::default()
    }
}

fn build() -> Fixture {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // Fixtures of earlier test processes that have exited are removed.
    for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("distill-fixture-")
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let root = tmp.join(format!("distill-fixture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let corpus = scan_dir(&sample_dir(), false).unwrap();
    let pcfg = PartitionConfig {
        method: Method::Iid,
        num_clients: 3,
        seed: 0,
        valid_fraction: 0.1,
        min_client_utterances: 1,
    };
    let clients = partition(&corpus, &pcfg).unwrap();
    write_partition(&root, &corpus, &clients, &pcfg).unwrap();
    // MFCC of every utterance, k-means on a subsample, labels per MFCC frame.
    let mfcc = Mfcc::new(MfccConfig::default());
    let mut feats: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut pool = Vec::new();
    for k in 0..3 {
        let m = Manifest::load(&root.join(format!("client_{k}/manifest.csv"))).unwrap();
        let mut per = Vec::new();
        for e in &m.entries {
            let a = load_audio(&m.abs_path(e)).unwrap();
            let f = mfcc.compute(&a.samples);
            assert_eq!(f.len() / 39, 1 + (a.samples.len() - 400) / 160);
            pool.extend(f.chunks_exact(39).step_by(7).flatten().copied());
            per.push(f);
        }
        feats.push(per);
    }
    let centres = quick_kmeans(&pool, 39, CLASSES, 8);
    for (k, per) in feats.iter().enumerate() {
        let dir = root.join(format!("client_{k}"));
        let mut w = ShardWriter::<u16>::create(&dir, "km", None).unwrap();
        for f in per {
            let labels: Vec<u16> = f
                .chunks_exact(39)
                .map(|x| nearest(&centres, x, 39) as u16)
                .collect();
            w.push(&labels).unwrap();
        }
        w.finish().unwrap();
        // Labels made here, recorded as `fedhubert kmeans` records its own.
        fedhubert_io::provenance::Provenance::new("labels", "test")
            .input_file("manifest", &dir.join("manifest.csv"))
            .unwrap()
            .param("label_rate", 100.0)
            .write_for_shard(&dir, "km")
            .unwrap();
    }
    // Tiny teacher, briefly pretrained (masked prediction only: alpha 0, no distillation term) on
    // client 2, the server-side set of these tests.
    let dev = cpu_device();
    let model =
        HubertForPretraining::new(&HubertConfig::tiny(), &teacher_pretrain(), 11, &dev).unwrap();
    let cfg = DistillConfig {
        alpha: 0.0,
        kl_weight: 0.0,
        feature_weight: 0.0,
        ..Default::default()
    };
    let plan = cfg.layer_plan(2, 2).unwrap();
    let ds = DistillStudent::new(model.clone(), 48, &plan, false, false, None, 0);
    let parts = DistillParts {
        teacher: Teacher::from_model(model, true),
        cfg: cfg,
        mode: Mode::Client,
        plan: plan,
        quantizer: None,
        train: tiny_train(),
    };
    let mut tr = DistillTrainer::new(ds, parts, &dev).unwrap();
    let data = load_audio_dir(&root.join("client_2"), &LabelSpec::default(), 0).unwrap();
    let m = tr
        .train_steps(&data.train, 12, |_| 2e-3, 3, None, |_, _| {})
        .unwrap();
    assert!(m.mlm > 0.0 && m.distill == 0.0, "{m:?}");
    let teacher = root.join("teacher.safetensors");
    tr.model.student.save_checkpoint(&teacher).unwrap();
    Fixture { root, teacher }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build)
}

/// Tiny student: the teacher's conv front-end, width 32 (so feature distillation needs projections).
fn student_cfg() -> HubertConfig {
    HubertConfig {
        hidden_size: 32,
        num_attention_heads: 4,
        intermediate_size: 64,
        ..HubertConfig::tiny()
    }
}

fn student_pretrain() -> PretrainConfig {
    PretrainConfig {
        final_dim: 16,
        ..teacher_pretrain()
    }
}

fn client_dirs(f: &Fixture) -> Vec<PathBuf> {
    (0..2).map(|k| f.root.join(format!("client_{k}"))).collect()
}

fn run_cfg(rounds: u64, local_steps: u64, lr: f64) -> RunConfig {
    RunConfig {
        num_rounds: rounds,
        min_fit_clients: 2,
        eval_every: 0,
        fraction_evaluate: 0.0,
        client: ClientSettings {
            learning_rate: lr,
            local: LocalWork::Steps(local_steps),
            ..ClientSettings::default()
        },
        ..Default::default()
    }
}

#[test]
fn student_384_3_parameter_count_matches_the_formula() {
    let cfg = HubertConfig::student();
    let model = HubertModel::new(&cfg, 0, &cpu_device()).unwrap();
    let actual: usize = param_shapes(&model)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    // conv 4,200,448 + projection 198,016 + mask 384 + pos conv 1,180,160 + LN 768 + 3 x 1,774,464.
    assert_eq!(hubert_param_count(&cfg), 10_903_168);
    assert_eq!(actual, 10_903_168);
    let tiny = HubertModel::new(&HubertConfig::tiny(), 0, &cpu_device()).unwrap();
    assert_eq!(
        hubert_param_count(&HubertConfig::tiny()),
        param_shapes(&tiny)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    );
}

#[test]
fn server_mode_distils_the_aggregate_and_losses_fall() {
    let f = fixture();
    let dev = cpu_device();
    let teacher = Teacher::load(&f.teacher, &dev).unwrap();
    let cfg = DistillConfig {
        pred_weight: 1.0,
        alpha: 0.7,
        ..Default::default()
    };
    let plan = cfg.layer_plan(2, teacher.num_layers()).unwrap();
    let student = HubertForPretraining::new(&student_cfg(), &student_pretrain(), 5, &dev).unwrap();
    let initial = collect_tensors(&student);
    let ds = DistillStudent::new(
        student.clone(),
        teacher.hidden_size(),
        &plan,
        true,
        true,
        None,
        5,
    );
    assert_eq!(ds.feat_proj.len(), plan.feature.len());
    let server_data = load_audio_dir(&f.root.join("client_2"), &LabelSpec::default(), 0).unwrap();
    let parts = DistillParts {
        teacher: teacher,
        cfg: cfg,
        mode: Mode::Server,
        plan: plan,
        quantizer: None,
        train: tiny_train(),
    };
    let trainer = DistillTrainer::new(ds, parts, &dev).unwrap();
    let inner = StrategyConfig::default().build().unwrap();
    let strategy = ServerDistill::new(
        inner,
        trainer,
        server_data.train,
        initial.clone(),
        6,
        2e-3,
        0,
    );
    let log = strategy.log_handle();
    let mut pool = HubertClients::new(
        client_dirs(f),
        student,
        tiny_train(),
        SimConfig::default(),
        dev.clone(),
    );
    let out = tempfile::tempdir().unwrap();
    let res = fedhubert_fl::run(
        &mut pool,
        Box::new(strategy),
        initial.clone(),
        &run_cfg(3, 2, 1e-3),
        Some(out.path()),
        false,
        |_| {},
    )
    .unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 3);
    let (first, last) = (&log[0].first, &log[2].last);
    eprintln!(
        "server distill: first {first:?}\nlast {last:?}\nbytes up {} down {}",
        res.history.iter().map(|r| r.bytes_up).sum::<u64>(),
        res.history.iter().map(|r| r.bytes_down).sum::<u64>()
    );
    assert!(
        last.distill < first.distill,
        "distill loss {} -> {}",
        first.distill,
        last.distill
    );
    assert!(last.kl < first.kl, "kl {} -> {}", first.kl, last.kl);
    assert!(
        last.feature_mse < first.feature_mse,
        "feature {} -> {}",
        first.feature_mse,
        last.feature_mse
    );
    assert!(
        log[2].mean.pred_l1 < log[0].mean.pred_l1,
        "pred l1 {} -> {}",
        log[0].mean.pred_l1,
        log[2].mean.pred_l1
    );
    // The global model is the distilled one, and the traffic is the student only.
    assert_ne!(res.weights, initial);
    assert_eq!(res.history[0].bytes_up, 2 * initial.nbytes() as u64);
    // Resume: the checkpoint carries the server heads and optimizer state.
    let ck =
        fedhubert_fl::store::load_checkpoint(&out.path().join("checkpoint.safetensors")).unwrap();
    assert!(ck.state.contains_key("server_aux") && ck.state.contains_key("server_adam_m"));
}

#[test]
fn client_mode_losses_fall_and_student_exports_to_hf() {
    let f = fixture();
    let dev = cpu_device();
    let teacher = Teacher::load(&f.teacher, &dev).unwrap();
    let cfg = DistillConfig {
        pred_weight: 1.0,
        ..Default::default()
    };
    let plan = cfg.layer_plan(2, teacher.num_layers()).unwrap();
    let student = HubertForPretraining::new(&student_cfg(), &student_pretrain(), 5, &dev).unwrap();
    let (student, rep) = init_from_teacher(student, &teacher.model, 0).unwrap();
    assert!(
        rep.copied
            .iter()
            .any(|n| n.starts_with("feature_extractor.")),
        "{rep:?}"
    );
    assert!(
        rep.skipped_shape
            .iter()
            .any(|n| n.starts_with("feature_projection.projection")),
        "{rep:?}"
    );
    let ds = DistillStudent::new(student, teacher.hidden_size(), &plan, true, true, None, 5);
    let initial = ds.weights();
    let parts = DistillParts {
        teacher: teacher.clone(),
        cfg: cfg,
        mode: Mode::Client,
        plan: plan,
        quantizer: None,
        train: tiny_train(),
    };
    let mut pool = fedhubert_distill::DistillClients::new(
        client_dirs(f),
        ds,
        parts,
        SimConfig::default(),
        dev.clone(),
    );
    let res = fedhubert_fl::run(
        &mut pool,
        StrategyConfig::default().build().unwrap(),
        initial.clone(),
        &run_cfg(3, 4, 2e-3),
        None,
        false,
        |_| {},
    )
    .unwrap();
    let (a, b) = (&res.history[0].train, &res.history[2].train);
    eprintln!("client mode round 1 {a:?}\nround 3 {b:?}");
    for k in ["loss", "distill", "kl", "feature_mse", "pred_l1"] {
        assert!(b[k] < a[k], "{k}: {} -> {}", a[k], b[k]);
    }
    // Export the student alone in the HF layout and read it back.
    let model = DistillStudentExport::student(&res.weights, &dev);
    let dir = tempfile::tempdir().unwrap();
    model.save_hf(dir.path()).unwrap();
    let back = HubertModel::from_hf_dir(dir.path(), &dev).unwrap();
    assert_eq!(back.config, student_cfg());
    let theirs = collect_tensors(&back);
    let mine = collect_tensors(&model.hubert);
    assert_eq!(theirs, mine);
}

/// Rebuilds the student from the pool's global weights (student.* names).
struct DistillStudentExport;
impl DistillStudentExport {
    fn student(w: &fedhubert_fl::Weights, dev: &fedhubert_model::Device) -> HubertForPretraining {
        let own = fedhubert_fl::Weights::new(
            w.tensors
                .iter()
                .filter_map(|t| {
                    t.name
                        .strip_prefix("student.")
                        .map(|n| fedhubert_fl::Tensor {
                            name: n.to_string(),
                            shape: t.shape.clone(),
                            data: t.data.clone(),
                        })
                })
                .collect(),
        );
        let m = HubertForPretraining::new(&student_cfg(), &student_pretrain(), 0, dev).unwrap();
        fedhubert_model::load_tensors(m, own).unwrap()
    }
}

#[test]
fn mvq_mode_quantizer_and_codebook_loss_falls() {
    let f = fixture();
    let dev = cpu_device();
    let teacher = Teacher::load(&f.teacher, &dev).unwrap();
    let mut cfg = DistillConfig {
        alpha: 0.7,
        ..Default::default()
    };
    cfg.mvq.num_codebooks = 4;
    cfg.mvq.refine_iters = 2;
    let plan = cfg.layer_plan(2, teacher.num_layers()).unwrap();
    let server = load_audio_dir(&f.root.join("client_2"), &LabelSpec::default(), 0).unwrap();
    let (x, dim) = teacher
        .layer_frames(&server.train, plan.mvq, 160_000, 8_000, 0)
        .unwrap();
    let (q, rep) = Quantizer::train(&x, dim, &cfg.mvq, plan.mvq, 0).unwrap();
    eprintln!("quantizer {rep:?}");
    assert_eq!(rep.bytes_per_frame, 4);
    assert!(
        rep.rel_error < rep.rel_error_init && rep.rel_error < 0.5,
        "{rep:?}"
    );
    // Held-out frames (client 0's audio) encode with a similar error.
    let held = load_audio_dir(&f.root.join("client_0"), &LabelSpec::default(), 3).unwrap();
    let (hx, _) = teacher
        .layer_frames(&held.train, plan.mvq, 160_000, 4_000, 0)
        .unwrap();
    let codes = q.encode(&hx).unwrap();
    let held_err = q.rel_error(&hx, &codes);
    eprintln!("held-out relative error {held_err:.4}");
    assert!(held_err < 0.6, "{held_err}");
    let student = HubertForPretraining::new(&student_cfg(), &student_pretrain(), 5, &dev).unwrap();
    let ds = DistillStudent::new(
        student,
        teacher.hidden_size(),
        &plan,
        false,
        false,
        Some(4),
        5,
    );
    let initial = ds.weights();
    let parts = DistillParts {
        teacher: teacher,
        cfg: cfg,
        mode: Mode::Mvq,
        plan: plan,
        quantizer: Some(Arc::new(q)),
        train: tiny_train(),
    };
    let mut pool = fedhubert_distill::DistillClients::new(
        client_dirs(f),
        ds,
        parts,
        SimConfig::default(),
        dev.clone(),
    );
    let res = fedhubert_fl::run(
        &mut pool,
        StrategyConfig::default().build().unwrap(),
        initial,
        &run_cfg(3, 4, 2e-3),
        None,
        false,
        |_| {},
    )
    .unwrap();
    let (a, b) = (&res.history[0].train, &res.history[2].train);
    eprintln!("mvq mode round 1 {a:?}\nround 3 {b:?}");
    assert!(
        b["mvq_ce"] < a["mvq_ce"],
        "mvq_ce {} -> {}",
        a["mvq_ce"],
        b["mvq_ce"]
    );
    assert!(b["loss"] < a["loss"], "loss {} -> {}", a["loss"], b["loss"]);
    assert!(a["mvq_ce"] > 0.0 && b["mvq_acc"] > 0.0);
}

#[test]
fn teacher_without_head_refuses_output_distillation() {
    let f = fixture();
    let dev = cpu_device();
    let t = Teacher::load(&f.teacher, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    t.model.hubert.save_hf(dir.path()).unwrap();
    let bare = Teacher::load(dir.path(), &dev).unwrap();
    assert!(!bare.has_head);
    let cfg = DistillConfig::default();
    let plan = cfg.layer_plan(2, 2).unwrap();
    let student = HubertForPretraining::new(&student_cfg(), &student_pretrain(), 5, &dev).unwrap();
    let ds = DistillStudent::new(student, 48, &plan, true, false, None, 5);
    let parts = DistillParts {
        teacher: bare,
        cfg: cfg,
        mode: Mode::Client,
        plan: plan,
        quantizer: None,
        train: tiny_train(),
    };
    let e = DistillTrainer::new(ds, parts, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("distillation.kl_weight"), "{e}");
}

#[test]
fn distillation_steps_honour_update_freq_and_proximal_mu() {
    let f = fixture();
    let dev = cpu_device();
    let data = load_audio_dir(&f.root.join("client_0"), &LabelSpec::default(), 0).unwrap();
    let make = |update_freq: usize| {
        let teacher = Teacher::load(&f.teacher, &dev).unwrap();
        let cfg = DistillConfig {
            alpha: 0.7,
            ..Default::default()
        };
        let plan = cfg.layer_plan(2, teacher.num_layers()).unwrap();
        let student =
            HubertForPretraining::new(&student_cfg(), &student_pretrain(), 5, &dev).unwrap();
        let ds = DistillStudent::new(student, teacher.hidden_size(), &plan, true, false, None, 5);
        let train = TrainConfig {
            update_freq,
            ..tiny_train()
        };
        let parts = DistillParts {
            teacher: teacher,
            cfg: cfg,
            mode: Mode::Client,
            plan: plan,
            quantizer: None,
            train: train,
        };
        DistillTrainer::new(ds, parts, &dev).unwrap()
    };
    // update_freq 2: every update averages two micro-batches, so it sees more utterances.
    let mut one = make(1);
    let w0 = one.model.weights();
    let m1 = one
        .train_steps(&data.train, 3, |_| 2e-3, 7, None, |_, _| {})
        .unwrap();
    let m2 = make(2)
        .train_steps(&data.train, 3, |_| 2e-3, 7, None, |_, _| {})
        .unwrap();
    assert!(m2.utterances > m1.utterances, "{m2:?} vs {m1:?}");
    assert_eq!((m1.steps, m2.steps), (3, 3));
    // FedProx: a strong proximal term keeps the student closer to the global weights.
    let mut prox = make(1);
    prox.train_steps(&data.train, 3, |_| 2e-3, 7, Some((&w0, 50.0)), |_, _| {})
        .unwrap();
    let (free, held) = (
        one.model.weights().dist2(&w0),
        prox.model.weights().dist2(&w0),
    );
    assert!(
        held < free,
        "proximal term did not hold the weights: {held} vs {free}"
    );
}

/// A published fairseq or torchaudio checkpoint is a teacher as it is, with its pretraining
/// head (so output distillation can use it); the same weights give the same teacher.
#[test]
fn a_published_checkpoint_is_a_teacher_with_its_head() {
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/fixtures/published_hubert_tiny");
    let dev = cpu_device();
    let load = |f: &str| Teacher::load(&fixtures.join(f), &dev).unwrap();
    let fairseq = load("fairseq_postnorm.pt");
    assert!(fairseq.has_head);
    assert_eq!(fairseq.model.pretrain.num_classes, 20);
    let torchaudio = load("torchaudio_postnorm.pt");
    assert!(torchaudio.has_head);
    assert_eq!(
        collect_tensors(&fairseq.model).tensors,
        collect_tensors(&torchaudio.model).tensors
    );
    let Err(e) = Teacher::load(&fixtures.join("malicious_root.pt"), &dev) else {
        panic!("a malicious pickle became a teacher");
    };
    assert!(e.to_string().contains("posix.system"), "{e}");
}
