//! The local trainer a client (or the centralized baseline) runs: the masked-prediction loss on
//! the model, then the shared trainer core ([`crate::core`]): clipping, FedProx, host AdamW.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use fedhubert_fl::LrSchedule;
use fedhubert_io::Weights;
use fedhubert_io::seeds::{self, mix};
use fedhubert_model::{
    HubertForPretraining, PretrainBatch, PretrainOutput, collect_tensors, compute_mask_indices,
    load_tensors,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::core::{self, AdamState, Reported, StepMetrics, StepPlan, Update};
use crate::data::{BatchConfig, Utt, make_batch};

/// Optimizer, schedule and batching (fairseq HuBERT recipe defaults).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub adam_betas: (f64, f64),
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Over the trainer's own steps (a federated client follows its instructions instead).
    pub lr_schedule: LrSchedule,
    /// Global gradient-norm clip (fairseq `clip_norm` 10); 0 disables.
    pub clip_norm: f64,
    /// Micro-batches per update (fairseq `update_freq`).
    pub update_freq: usize,
    /// Keep the conv front-end fixed: no backward through it, no update, not sent.
    pub freeze_feature_extractor: bool,
    #[serde(flatten)]
    pub batch: BatchConfig,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 5e-4,
            adam_betas: (0.9, 0.98),
            adam_eps: 1e-6,
            weight_decay: 0.01,
            lr_schedule: LrSchedule::PolynomialDecay {
                warmup_updates: 32_000,
                total_updates: 400_000,
            },
            clip_norm: 10.0,
            update_freq: 1,
            freeze_feature_extractor: false,
            batch: BatchConfig::default(),
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |k: &str, why: String| Err(TrainError::Config(format!("{k}: {why}")));
        if !(self.learning_rate > 0.0) {
            return bad(
                "pretraining.learning_rate",
                format!("must be > 0, got {}", self.learning_rate),
            );
        }
        if !(0.0..1.0).contains(&self.adam_betas.0) || !(0.0..1.0).contains(&self.adam_betas.1) {
            return bad(
                "adam_betas",
                format!("must be in [0, 1), got {:?}", self.adam_betas),
            );
        }
        if self.update_freq == 0 {
            return bad("pretraining.update_freq", "must be >= 1".into());
        }
        if self.batch.batch_size == 0 {
            return bad("pretraining.batch_size", "must be >= 1".into());
        }
        if self.batch.min_sample_size > self.batch.max_sample_size {
            return bad(
                "pretraining.min_audio_length",
                format!(
                    "{} exceeds pretraining.max_audio_length {}",
                    self.batch.min_sample_size, self.batch.max_sample_size
                ),
            );
        }
        Ok(())
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr_schedule.lr_at(self.learning_rate, step as f64)
    }
}

const TRAINER_FORMAT: &str = "fedhubert-trainer";
/// Version of the trainer checkpoint layout (version 1 wrote `format: fedhubert-trainer-v1` and
/// has the same contents, so it is read as is).
pub const TRAINER_VERSION: u32 = 2;

fn check_trainer_format(path: &Path, meta: &BTreeMap<String, String>) -> Result<(), TrainError> {
    let version = fedhubert_io::format_version(meta, TRAINER_FORMAT).unwrap_or(0);
    match version {
        0 => Err(TrainError::Data(format!(
            "{}: not a fedhubert trainer checkpoint",
            path.display()
        ))),
        v if v > TRAINER_VERSION => Err(TrainError::Data(format!(
            "{}: trainer checkpoint format version {v} is newer than this fedhubert's ({TRAINER_VERSION}): upgrade fedhubert",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// A scalar loss tensor's value.
pub fn read_loss(loss: &Tensor<1>) -> Result<f64, TrainError> {
    Ok(loss
        .clone()
        .into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .map_err(|e| TrainError::Diverged(format!("cannot read the loss: {e:?}")))?[0])
}

/// Prefix of the conv front-end's parameters (frozen with `freeze_feature_extractor`).
pub const FEATURE_EXTRACTOR: &str = "hubert.feature_extractor.";

/// Aggregated numbers over some steps or an evaluation pass.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    pub loss_masked: f64,
    pub acc_masked: f64,
    pub acc_unmasked: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub steps: u64,
    pub utterances: u64,
    pub seconds_of_audio: f64,
}

impl StepMetrics for Metrics {
    fn running_mean(&mut self, m: &Self, n: f64) {
        self.loss += (m.loss - self.loss) / n;
        self.loss_masked += (m.loss_masked - self.loss_masked) / n;
        self.acc_masked += (m.acc_masked - self.acc_masked) / n;
        self.acc_unmasked += (m.acc_unmasked - self.acc_unmasked) / n;
        self.grad_norm += (m.grad_norm - self.grad_norm) / n;
        self.lr = m.lr;
        self.steps += 1;
        self.utterances += m.utterances;
        self.seconds_of_audio += m.seconds_of_audio;
    }
}

impl Reported for Metrics {
    fn utterances(&self) -> u64 {
        self.utterances
    }
}

/// What one micro-batch of a step was, exactly: utterances, crops, label windows and the mask
/// drawn, so another implementation can train on the same batches (bench/pytorch_train_parity.py).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TracedBatch {
    pub ids: Vec<String>,
    /// Crop start of each utterance (samples) and the common crop length.
    pub starts: Vec<usize>,
    pub samples: usize,
    pub labels: Vec<Vec<u32>>,
    /// `[B][T]` over the label-aligned frames.
    pub mask: Vec<Vec<bool>>,
}

/// A model on an autodiff device plus its optimizer state.
pub struct LocalTrainer {
    pub model: HubertForPretraining,
    pub opt: AdamState,
    pub cfg: TrainConfig,
    device: Device,
    /// When set, every step appends its micro-batches here (see [`TracedBatch`]).
    pub trace: Option<Vec<Vec<TracedBatch>>>,
}

impl LocalTrainer {
    /// Wraps `model` (moved to the autodiff version of `device`).
    pub fn new(
        model: HubertForPretraining,
        cfg: TrainConfig,
        device: &Device,
    ) -> Result<Self, TrainError> {
        cfg.validate()?;
        let ad = device.clone().autodiff();
        let mut model = model.to_device(&ad).train();
        if cfg.freeze_feature_extractor {
            model.pretrain.feature_grad_mult = 0.0;
            // Untracked weights keep the front-end out of the autodiff graph altogether, so its
            // activations are freed as soon as the forward moves on (a detach alone still records
            // them, and the frozen step then peaked above the unfrozen one).
            model.hubert.feature_extractor = model.hubert.feature_extractor.no_grad();
        }
        Ok(Self {
            model,
            opt: AdamState::default(),
            trace: None,
            cfg,
            device: ad,
        })
    }

    pub fn weights(&self) -> Weights {
        collect_tensors(&self.model)
    }

    pub fn set_weights(&mut self, w: &Weights) -> Result<(), TrainError> {
        let m = self.model.clone();
        self.model = load_tensors(m, w.clone())?;
        Ok(())
    }

    fn batch_tensor(&self, wavs: &[Vec<f32>], device: &Device) -> Tensor<2> {
        let (b, s) = (wavs.len(), wavs[0].len());
        let flat: Vec<f32> = wavs.iter().flat_map(|w| w.iter().copied()).collect();
        Tensor::<2>::from_data(TensorData::new(flat, [b, s]), device)
    }

    /// One optimizer update on `micro` batches (update_freq), returning metrics of that step.
    /// `prox`: FedProx's global weights and mu, adding `mu * (w - w_global)` to each gradient.
    pub fn step(
        &mut self,
        micro: &[Vec<&Utt>],
        lr: f64,
        seed: u64,
        prox: Option<(&Weights, f32)>,
    ) -> Result<Metrics, TrainError> {
        let mut m = Metrics {
            lr,
            steps: 1,
            ..Default::default()
        };
        let mut counts = [0usize; 4];
        let mut batches = Vec::new();
        let upd = Update {
            lr,
            seed,
            dropout_tag: seeds::PRETRAIN_DROPOUT,
            frozen_prefix: self
                .cfg
                .freeze_feature_extractor
                .then_some(FEATURE_EXTRACTOR),
            prox,
        };
        // The optimizer state is lent to the core while the loss closure reads the trainer.
        let mut opt = std::mem::take(&mut self.opt);
        let n = micro.len() as f64;
        let result = core::update(
            self.model.clone(),
            micro,
            &self.device,
            &upd,
            &mut opt,
            &self.cfg,
            |model, utts, rng| {
                let (out, loss, wav_len, traced) = self.micro_loss(model, utts, lr, rng)?;
                batches.push(traced);
                m.loss += loss / n;
                m.loss_masked += out.loss_masked / n;
                let found = [
                    out.correct_masked,
                    out.count_masked,
                    out.correct_unmasked,
                    out.count_unmasked,
                ];
                counts.iter_mut().zip(found).for_each(|(a, b)| *a += b);
                m.utterances += utts.len() as u64;
                m.seconds_of_audio += utts.len() as f64 * wav_len as f64 / 16_000.0;
                Ok::<_, TrainError>(out.loss)
            },
        );
        self.opt = opt;
        let (model, grad_norm) = result?;
        self.model = model;
        if let Some(trace) = &mut self.trace {
            trace.push(batches);
        }
        let [cm, nm, cu, nu] = counts;
        m.acc_masked = cm as f64 / nm.max(1) as f64;
        m.acc_unmasked = cu as f64 / nu.max(1) as f64;
        m.grad_norm = grad_norm;
        Ok(m)
    }

    /// The masked-prediction forward of one micro-batch: its output, the loss value (checked
    /// finite) and the crop length in samples.
    fn micro_loss(
        &self,
        model: &HubertForPretraining,
        utts: &[&Utt],
        lr: f64,
        rng: &mut ChaCha8Rng,
    ) -> Result<(PretrainOutput, f64, usize, TracedBatch), TrainError> {
        let label_rate = model.pretrain.label_rate;
        let batch = make_batch(utts, self.cfg.batch.max_sample_size, label_rate, rng);
        let mut traced = TracedBatch {
            ids: utts.iter().map(|u| u.id.clone()).collect(),
            starts: batch.starts.clone(),
            samples: batch.wavs.first().map_or(0, Vec::len),
            labels: batch.labels.clone(),
            mask: vec![],
        };
        let pb = PretrainBatch {
            waveform: self.batch_tensor(&batch.wavs, &self.device),
            sample_lengths: None,
            labels: batch.labels,
        };
        let mask_cfg = model.mask_config();
        let out = model.forward_pretrain_with(&pb, |b, t, lens| {
            traced.mask = compute_mask_indices(b, t, lens, &mask_cfg, rng);
            traced.mask.clone()
        })?;
        let loss_val = read_loss(&out.loss)?;
        if !loss_val.is_finite() {
            return Err(TrainError::Diverged(format!(
                "loss is {loss_val} at lr {lr}"
            )));
        }
        Ok((out, loss_val, pb.waveform.dims()[1], traced))
    }

    /// Runs `steps` updates over `utts` starting at global step `start` (epochs are reshuffled
    /// with seeds derived from `seed`; step k's randomness from `(seed, k)`); step k runs at
    /// learning rate `lr(k)` (`|k| cfg.lr_at(k)` for the configured schedule).
    #[allow(clippy::too_many_arguments)]
    pub fn train(
        &mut self,
        utts: &[Utt],
        start: u64,
        steps: u64,
        lr: impl Fn(u64) -> f64,
        seed: u64,
        prox: Option<(&Weights, f32)>,
        on_step: impl FnMut(u64, &Metrics),
    ) -> Result<Metrics, TrainError> {
        let mut plan = StepPlan::new(utts, &self.cfg.batch, self.cfg.update_freq, seed)?;
        core::run_steps(
            &mut plan,
            start,
            steps,
            |k, micro, step_seed| self.step(micro, lr(k), step_seed, prox),
            on_step,
        )
    }

    /// Masked-prediction loss and accuracies on `utts` in evaluation mode (no dropout), one
    /// utterance at a time, with masks drawn from `seed` so evaluations are comparable.
    pub fn evaluate(&self, utts: &[Utt], seed: u64) -> Result<Metrics, TrainError> {
        evaluate_model(&self.model, utts, &self.cfg.batch, seed)
    }

    /// Saves model, optimizer moments and step atomically to one safetensors file.
    pub fn save(&self, path: &Path, extra: BTreeMap<String, String>) -> Result<(), TrainError> {
        let model = self.weights();
        let (m, v) = self.opt.moments();
        let groups = [("model/", &model), ("adam_m/", &m), ("adam_v/", &v)];
        let mut meta = extra;
        meta.insert("format".into(), TRAINER_FORMAT.into());
        meta.insert("format_version".into(), TRAINER_VERSION.to_string());
        meta.insert("adam_step".into(), self.opt.step.to_string());
        meta.insert("hubert_config".into(), self.model.hubert.config.to_json()?);
        meta.insert(
            "pretrain_config".into(),
            serde_json::to_string(&self.model.pretrain)
                .map_err(|e| TrainError::Config(e.to_string()))?,
        );
        meta.insert(
            "train_config".into(),
            serde_json::to_string(&self.cfg).map_err(|e| TrainError::Config(e.to_string()))?,
        );
        meta.insert("order".into(), fedhubert_io::order_metadata(&groups));
        fedhubert_io::save_safetensors(path, &groups, meta)?;
        Ok(())
    }

    /// Restores what `save` wrote into this trainer (same architecture); returns the metadata.
    pub fn load(&mut self, path: &Path) -> Result<BTreeMap<String, String>, TrainError> {
        let (mut groups, meta) = fedhubert_io::load_safetensors(path)?;
        check_trainer_format(path, &meta)?;
        let model = groups
            .remove("model")
            .ok_or_else(|| TrainError::Data(format!("{}: no model tensors", path.display())))?;
        self.set_weights(&model)?;
        let step = meta
            .get("adam_step")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        self.opt = AdamState::from_moments(
            groups.remove("adam_m").unwrap_or_default(),
            groups.remove("adam_v").unwrap_or_default(),
            step,
        );
        Ok(meta)
    }
}

/// See [`LocalTrainer::evaluate`]; works on any copy of the model.
pub fn evaluate_model(
    model: &HubertForPretraining,
    utts: &[Utt],
    batch: &BatchConfig,
    seed: u64,
) -> Result<Metrics, TrainError> {
    let model = model.valid();
    let device = model.hubert.masked_spec_embed.device();
    let label_rate = model.pretrain.label_rate;
    let mut m = Metrics::default();
    let (mut cm, mut nm, mut cu, mut nu) = (0usize, 0usize, 0usize, 0usize);
    let mut weight = 0f64;
    for (i, u) in utts.iter().enumerate() {
        if u.wav.len() < 400 * 2 || u.labels.is_empty() {
            continue;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &[seeds::EVAL, i as u64]));
        let b = make_batch(&[u], batch.max_sample_size, label_rate, &mut rng);
        let len = b.wavs[0].len();
        let wav = Tensor::<2>::from_data(
            TensorData::new(b.wavs.into_iter().flatten().collect::<Vec<f32>>(), [1, len]),
            &device,
        );
        let out = model.forward_pretrain(
            &PretrainBatch {
                waveform: wav,
                sample_lengths: None,
                labels: b.labels,
            },
            &mut rng,
        )?;
        let loss = read_loss(&out.loss)?;
        let w = out.count_masked as f64;
        m.loss += loss * w;
        m.loss_masked += out.loss_masked * w;
        weight += w;
        (cm, nm, cu, nu) = (
            cm + out.correct_masked,
            nm + out.count_masked,
            cu + out.correct_unmasked,
            nu + out.count_unmasked,
        );
        m.utterances += 1;
        m.seconds_of_audio += len as f64 / 16_000.0;
    }
    if weight > 0.0 {
        m.loss /= weight;
        m.loss_masked /= weight;
    }
    m.acc_masked = cm as f64 / nm.max(1) as f64;
    m.acc_unmasked = cu as f64 / nu.max(1) as f64;
    Ok(m)
}
