//! The local trainer a client (or the centralized baseline) runs: masked-prediction loss, backward
//! in burn, then global-norm clipping, FedProx's proximal gradient and AdamW on host copies of
//! the parameters.
//!
//! Why the optimizer lives on the host: its state is then plain named arrays, so it checkpoints,
//! resumes bit for bit, and skips frozen tensors without any engine support; its cost is one
//! elementwise pass over the parameters per step, small next to forward and backward.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use fedhubert_fl::rounds::mix;
use fedhubert_fl::{Tensor as FlTensor, Weights};
use fedhubert_model::{
    HostTensor, HubertForPretraining, PretrainBatch, collect_tensors, load_tensors,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::data::{BatchConfig, Utt, epoch_batches, make_batch};

/// burn's CPU random generator is process-global: one training step at a time per process keeps
/// dropout draws tied to the step's seed, which exact resume relies on.
static ENGINE_RNG: Mutex<()> = Mutex::new(());

/// Optimizer, schedule and batching (fairseq HuBERT recipe defaults).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub adam_betas: (f64, f64),
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up steps, then linear decay to 0 at `max_steps`.
    pub warmup_steps: u64,
    pub max_steps: u64,
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
            warmup_steps: 32_000,
            max_steps: 400_000,
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
                "learning_rate",
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
            return bad("update_freq", "must be >= 1".into());
        }
        if self.batch.batch_size == 0 {
            return bad("batch_size", "must be >= 1".into());
        }
        if self.batch.min_sample_size > self.batch.max_sample_size {
            return bad(
                "min_sample_size",
                format!(
                    "{} exceeds max_sample_size {}",
                    self.batch.min_sample_size, self.batch.max_sample_size
                ),
            );
        }
        Ok(())
    }

    /// Linear warm-up to `learning_rate`, then linear decay to 0 at `max_steps` (fairseq's
    /// polynomial_decay with power 1).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let rest = self.max_steps.saturating_sub(self.warmup_steps).max(1);
        self.learning_rate * (1.0 - (step - self.warmup_steps) as f64 / rest as f64).max(0.0)
    }
}

/// Prefix of the conv front-end's parameters (frozen with `freeze_feature_extractor`).
pub const FEATURE_EXTRACTOR: &str = "hubert.feature_extractor.";

/// Host AdamW state (torch `AdamW` semantics, decoupled weight decay).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamState {
    pub step: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

impl AdamState {
    /// One AdamW update of `params` by `grads` (parameters without a gradient are left alone)
    /// at learning rate `lr`, with `cfg`'s betas, epsilon and weight decay.
    pub fn update(
        &mut self,
        params: &mut [(String, HostTensor)],
        grads: &BTreeMap<String, Vec<f32>>,
        lr: f64,
        cfg: &TrainConfig,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = cfg.adam_betas;
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
        let step_size = (lr / bc1) as f32;
        let (b1, b2, eps) = (b1 as f32, b2 as f32, cfg.adam_eps as f32);
        let decay = (1.0 - lr * cfg.weight_decay) as f32;
        for (name, p) in params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            for (((w, &gi), mi), vi) in p.data.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
            {
                *w *= decay;
                *mi = b1 * *mi + (1.0 - b1) * gi;
                *vi = b2 * *vi + (1.0 - b2) * gi * gi;
                *w -= step_size * *mi / (vi.sqrt() / bc2_sqrt + eps);
            }
        }
    }
}

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

impl Metrics {
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        let v = serde_json::to_value(self).expect("metrics serialise");
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
            .collect()
    }
}

pub fn to_weights(named: Vec<(String, HostTensor)>) -> Weights {
    Weights::new(
        named
            .into_iter()
            .map(|(name, t)| FlTensor {
                name,
                shape: t.shape,
                data: t.data,
            })
            .collect(),
    )
}

pub fn from_weights(w: &Weights) -> HashMap<String, HostTensor> {
    w.tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                HostTensor {
                    shape: t.shape.clone(),
                    data: t.data.clone(),
                },
            )
        })
        .collect()
}

/// A model on an autodiff device plus its optimizer state.
pub struct LocalTrainer {
    pub model: HubertForPretraining,
    pub opt: AdamState,
    pub cfg: TrainConfig,
    device: Device,
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
            cfg,
            device: ad,
        })
    }

    pub fn weights(&self) -> Weights {
        to_weights(collect_tensors(&self.model))
    }

    pub fn set_weights(&mut self, w: &Weights) -> Result<(), TrainError> {
        let m = self.model.clone();
        self.model = load_tensors(m, from_weights(w))?;
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
        let _guard = ENGINE_RNG.lock().unwrap_or_else(|p| p.into_inner());
        self.device.seed(mix(seed, &[0xD80F]));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let label_rate = self.model.pretrain.label_rate;
        let mut grads: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut m = Metrics {
            lr,
            steps: 1,
            ..Default::default()
        };
        let (mut cm, mut nm, mut cu, mut nu) = (0usize, 0usize, 0usize, 0usize);
        for utts in micro {
            let batch = make_batch(utts, self.cfg.batch.max_sample_size, label_rate, &mut rng);
            let pb = PretrainBatch {
                waveform: self.batch_tensor(&batch.wavs, &self.device),
                sample_lengths: None,
                labels: batch.labels,
            };
            let out = self.model.forward_pretrain(&pb, &mut rng)?;
            let loss_val = out
                .loss
                .clone()
                .into_data()
                .convert::<f64>()
                .try_to_vec::<f64>()
                .map_err(|e| TrainError::Diverged(format!("cannot read the loss: {e:?}")))?[0];
            if !loss_val.is_finite() {
                return Err(TrainError::Diverged(format!(
                    "loss is {loss_val} at lr {lr}"
                )));
            }
            let gp = GradientsParams::from_grads(out.loss.backward(), &self.model);
            let col_out = fedhubert_model::collect_grads(&self.model, &gp);
            for (k, g) in col_out {
                match grads.get_mut(&k) {
                    Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
                    None => {
                        grads.insert(k, g);
                    }
                }
            }
            m.loss += loss_val / micro.len() as f64;
            m.loss_masked += out.loss_masked / micro.len() as f64;
            (cm, nm, cu, nu) = (
                cm + out.correct_masked,
                nm + out.count_masked,
                cu + out.correct_unmasked,
                nu + out.count_unmasked,
            );
            m.utterances += utts.len() as u64;
            m.seconds_of_audio += utts.len() as f64 * pb.waveform.dims()[1] as f64 / 16_000.0;
        }
        m.acc_masked = cm as f64 / nm.max(1) as f64;
        m.acc_unmasked = cu as f64 / nu.max(1) as f64;
        let inv = 1.0 / micro.len() as f32;
        if self.cfg.freeze_feature_extractor {
            grads.retain(|k, _| !k.starts_with(FEATURE_EXTRACTOR));
        }
        let mut norm2 = 0f64;
        for g in grads.values_mut() {
            g.iter_mut().for_each(|x| *x *= inv);
            norm2 += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
        m.grad_norm = norm2.sqrt();
        if self.cfg.clip_norm > 0.0 {
            let factor = self.cfg.clip_norm / (m.grad_norm + 1e-6);
            if factor < 1.0 {
                grads
                    .values_mut()
                    .for_each(|g| g.iter_mut().for_each(|x| *x *= factor as f32));
            }
        }
        let mut params = collect_tensors(&self.model);
        if let Some((global, mu)) = prox
            && mu > 0.0
        {
            let gmap: HashMap<&str, &Vec<f32>> = global
                .tensors
                .iter()
                .map(|t| (t.name.as_str(), &t.data))
                .collect();
            for (name, p) in &params {
                if let (Some(g), Some(w0)) = (grads.get_mut(name), gmap.get(name.as_str())) {
                    g.iter_mut()
                        .zip(p.data.iter().zip(w0.iter()))
                        .for_each(|(g, (w, w0))| *g += mu * (w - w0));
                }
            }
        }
        self.opt.update(&mut params, &grads, lr, &self.cfg);
        let m2 = self.model.clone();
        self.model = load_tensors(m2, params.into_iter().collect())?;
        Ok(m)
    }

    /// Runs `steps` updates over `utts` starting at global step `start` (epochs are reshuffled
    /// with seeds derived from `seed`; step k's randomness from `(seed, k)`), at a fixed `lr` or
    /// the configured schedule when `lr` is None.
    pub fn train(
        &mut self,
        utts: &[Utt],
        start: u64,
        steps: u64,
        lr: Option<f64>,
        seed: u64,
        prox: Option<(&Weights, f32)>,
        mut on_step: impl FnMut(u64, &Metrics),
    ) -> Result<Metrics, TrainError> {
        let bcfg = self.cfg.batch.clone();
        let plan = |epoch: u64| {
            epoch_batches(
                utts,
                &bcfg,
                &mut ChaCha8Rng::seed_from_u64(mix(seed, &[0xE90C, epoch])),
            )
        };
        let first = plan(0);
        if first.is_empty() {
            return Err(TrainError::Data(format!(
                "no utterance is at least min_sample_size = {} samples long",
                self.cfg.batch.min_sample_size
            )));
        }
        let per_epoch = (first.len() / self.cfg.update_freq).max(1) as u64;
        let mut total = Metrics::default();
        let mut cache: Option<(u64, Vec<Vec<usize>>)> = Some((0, first));
        for k in start..start + steps {
            let epoch = k / per_epoch;
            if cache.as_ref().map(|c| c.0) != Some(epoch) {
                cache = Some((epoch, plan(epoch)));
            }
            let batches = &cache.as_ref().unwrap().1;
            let j = (k % per_epoch) as usize * self.cfg.update_freq;
            let micro: Vec<Vec<&Utt>> = (0..self.cfg.update_freq)
                .map(|u| {
                    batches[(j + u) % batches.len()]
                        .iter()
                        .map(|&i| &utts[i])
                        .collect()
                })
                .collect();
            let lr_k = lr.unwrap_or_else(|| self.cfg.lr_at(k));
            let m = self.step(&micro, lr_k, mix(seed, &[0x57E9, k]), prox)?;
            on_step(k, &m);
            let n = (k - start + 1) as f64;
            total.loss += (m.loss - total.loss) / n;
            total.loss_masked += (m.loss_masked - total.loss_masked) / n;
            total.acc_masked += (m.acc_masked - total.acc_masked) / n;
            total.acc_unmasked += (m.acc_unmasked - total.acc_unmasked) / n;
            total.grad_norm += (m.grad_norm - total.grad_norm) / n;
            total.lr = m.lr;
            total.steps += 1;
            total.utterances += m.utterances;
            total.seconds_of_audio += m.seconds_of_audio;
        }
        Ok(total)
    }

    /// Masked-prediction loss and accuracies on `utts` in evaluation mode (no dropout), one
    /// utterance at a time, with masks drawn from `seed` so evaluations are comparable.
    pub fn evaluate(&self, utts: &[Utt], seed: u64) -> Result<Metrics, TrainError> {
        evaluate_model(&self.model, utts, &self.cfg.batch, seed)
    }

    /// Saves model, optimizer moments and step atomically to one safetensors file.
    pub fn save(&self, path: &Path, extra: BTreeMap<String, String>) -> Result<(), TrainError> {
        let model = self.weights();
        let m = Weights::new(
            self.opt
                .m
                .iter()
                .map(|(k, v)| FlTensor {
                    name: k.clone(),
                    shape: vec![v.len()],
                    data: v.clone(),
                })
                .collect(),
        );
        let v = Weights::new(
            self.opt
                .v
                .iter()
                .map(|(k, v)| FlTensor {
                    name: k.clone(),
                    shape: vec![v.len()],
                    data: v.clone(),
                })
                .collect(),
        );
        let groups = [("model/", &model), ("adam_m/", &m), ("adam_v/", &v)];
        let mut meta = extra;
        meta.insert("format".into(), "fedhubert-trainer-v1".into());
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
        meta.insert(
            "order".into(),
            fedhubert_fl::weights::order_metadata(&groups),
        );
        fedhubert_fl::weights::save_safetensors(path, &groups, meta)?;
        Ok(())
    }

    /// Restores what `save` wrote into this trainer (same architecture); returns the metadata.
    pub fn load(&mut self, path: &Path) -> Result<BTreeMap<String, String>, TrainError> {
        let (mut groups, meta) = fedhubert_fl::weights::load_safetensors(path)?;
        if meta.get("format").map(String::as_str) != Some("fedhubert-trainer-v1") {
            return Err(TrainError::Data(format!(
                "{}: not a fedhubert trainer checkpoint",
                path.display()
            )));
        }
        let model = groups
            .remove("model")
            .ok_or_else(|| TrainError::Data(format!("{}: no model tensors", path.display())))?;
        self.set_weights(&model)?;
        let flat = |w: Option<Weights>| -> BTreeMap<String, Vec<f32>> {
            w.map(|w| w.tensors.into_iter().map(|t| (t.name, t.data)).collect())
                .unwrap_or_default()
        };
        self.opt.m = flat(groups.remove("adam_m"));
        self.opt.v = flat(groups.remove("adam_v"));
        self.opt.step = meta
            .get("adam_step")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
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
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &[0xE7A1, i as u64]));
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
        let loss = out
            .loss
            .into_data()
            .convert::<f64>()
            .try_to_vec::<f64>()
            .map_err(|e| TrainError::Diverged(format!("cannot read the loss: {e:?}")))?[0];
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
