//! The one trainer core that pretraining, distillation and fine-tuning steps share: the engine
//! RNG lock, gradients collected in name order, global-norm clipping, FedProx's proximal term,
//! host AdamW, the epoch plan and the step loop over a loss closure.
//!
//! Why the optimizer lives on the host: its state is then plain named arrays, so it checkpoints,
//! resumes bit for bit, and skips frozen tensors without any engine support; its cost is one
//! elementwise pass over the parameters per step, small next to forward and backward.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use fedhubert_io::seeds::{self, mix};
use fedhubert_io::{Tensor as HostTensor, Weights};
use fedhubert_model::{collect_tensors, load_tensors};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::TrainError;
use crate::data::{BatchConfig, Utt, epoch_batches};
use crate::trainer::TrainConfig;

/// burn's CPU random generator is process-global: one training step at a time per process keeps
/// dropout draws tied to the step's seed, which exact resume relies on.
static ENGINE_RNG: Mutex<()> = Mutex::new(());

/// Takes the engine RNG for one step and seeds `device`'s generator from `seed`; the step's
/// dropout draws are then a function of the seed alone while the guard lives.
pub fn engine_rng(device: &Device, seed: u64) -> MutexGuard<'static, ()> {
    let guard = ENGINE_RNG.lock().unwrap_or_else(|p| p.into_inner());
    device.seed(seed);
    guard
}

/// Gradients by parameter name, in name order (sums over them are then the same in every run).
pub type Grads = BTreeMap<String, Vec<f32>>;

/// The gradients of `loss` with respect to `model`'s parameters.
pub fn backward<M: Module>(loss: Tensor<1>, model: &M) -> Grads {
    let gp = GradientsParams::from_grads(loss.backward(), model);
    fedhubert_model::collect_grads(model, &gp)
}

/// Adds `g` into the running sum `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Grads, g: Grads) {
    for (k, g) in g {
        match acc.get_mut(&k) {
            Some(a) => a.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
            None => {
                acc.insert(k, g);
            }
        }
    }
}

/// The one gradient clipping: scales every gradient by `1 / micro` (the mean over
/// micro-batches), then clips their global L2 norm to `max_norm` with torch's and fairseq's rule
/// `min(1, max_norm / (norm + 1e-6))`, the norm summed in f64 in name order. `max_norm` 0 leaves
/// the norm unclipped. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, micro: usize, max_norm: f64) -> f64 {
    let inv = 1.0 / micro as f32;
    let mut norm2 = 0f64;
    for g in grads.values_mut() {
        g.iter_mut().for_each(|x| *x *= inv);
        norm2 += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    }
    let norm = norm2.sqrt();
    if max_norm > 0.0 {
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            grads
                .values_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= factor as f32));
        }
    }
    norm
}

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
    pub fn update(&mut self, params: &mut Weights, grads: &Grads, lr: f64, cfg: &TrainConfig) {
        self.update_groups(params, grads, |_| lr, cfg)
    }

    /// As [`AdamState::update`], with a learning rate per parameter (`lr_of(name)`), as torch's
    /// parameter groups (fine-tuning: one rate for the head, another for the upstream).
    pub fn update_groups(
        &mut self,
        params: &mut Weights,
        grads: &Grads,
        lr_of: impl Fn(&str) -> f64,
        cfg: &TrainConfig,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = cfg.adam_betas;
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
        let (b1, b2, eps) = (b1 as f32, b2 as f32, cfg.adam_eps as f32);
        for p in params.tensors.iter_mut() {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let lr = lr_of(&p.name);
            let step_size = (lr / bc1) as f32;
            let decay = (1.0 - lr * cfg.weight_decay) as f32;
            let zeros = || vec![0.0; g.len()];
            let m = self.m.entry(p.name.clone()).or_insert_with(zeros);
            let v = self.v.entry(p.name.clone()).or_insert_with(zeros);
            for (((w, &gi), mi), vi) in p.data.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
            {
                *w *= decay;
                *mi = b1 * *mi + (1.0 - b1) * gi;
                *vi = b2 * *vi + (1.0 - b2) * gi * gi;
                *w -= step_size * *mi / (vi.sqrt() / bc2_sqrt + eps);
            }
        }
    }

    /// The moments as weights (flat tensors named like the parameters), for checkpoints.
    pub fn moments(&self) -> (Weights, Weights) {
        let flat = |m: &BTreeMap<String, Vec<f32>>| {
            m.iter()
                .map(|(k, v)| HostTensor {
                    name: k.clone(),
                    shape: vec![v.len()],
                    data: v.clone(),
                })
                .collect()
        };
        (flat(&self.m), flat(&self.v))
    }

    /// The state [`AdamState::moments`] and `step` describe.
    pub fn from_moments(m: Weights, v: Weights, step: u64) -> Self {
        let flat = |w: Weights| w.tensors.into_iter().map(|t| (t.name, t.data)).collect();
        Self {
            step,
            m: flat(m),
            v: flat(v),
        }
    }
}

/// Finishes a step: FedProx's proximal gradient `mu * (w - w_global)` (when `prox` is given),
/// then one AdamW update of the model's host parameters, loaded back into the model.
pub fn apply_update<M: Module>(
    model: M,
    grads: &mut Grads,
    lr: f64,
    prox: Option<(&Weights, f32)>,
    opt: &mut AdamState,
    cfg: &TrainConfig,
) -> Result<M, TrainError> {
    let mut params = collect_tensors(&model);
    if let Some((global, mu)) = prox
        && mu > 0.0
    {
        let w0: BTreeMap<&str, &Vec<f32>> = global
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), &t.data))
            .collect();
        for p in &params.tensors {
            if let (Some(g), Some(w0)) = (grads.get_mut(&p.name), w0.get(p.name.as_str())) {
                g.iter_mut()
                    .zip(p.data.iter().zip(w0.iter()))
                    .for_each(|(g, (w, w0))| *g += mu * (w - w0));
            }
        }
    }
    opt.update(&mut params, grads, lr, cfg);
    Ok(load_tensors(model, params)?)
}

/// How one optimizer update treats its gradients and draws its randomness.
pub struct Update<'a> {
    pub lr: f64,
    /// The step's seed: crops and masks come from it, dropout from `mix(seed, [dropout_tag])`.
    pub seed: u64,
    pub dropout_tag: u64,
    /// Parameters whose name starts with this get no update (a frozen front-end).
    pub frozen_prefix: Option<&'a str>,
    /// FedProx: the global weights and mu.
    pub prox: Option<(&'a Weights, f32)>,
}

/// One optimizer update of `model` on `micro` batches: `loss(model, batch, rng)` gives each
/// micro-batch's loss tensor (its metrics are the closure's to keep); the gradients are averaged
/// over the micro-batches, the frozen ones dropped, clipped by [`clip_grad_norm`], and applied by
/// [`apply_update`]. The engine RNG is held throughout. Returns the model and the gradient norm
/// before clipping.
pub fn update<M: Module, E: From<TrainError>>(
    model: M,
    micro: &[Vec<&Utt>],
    device: &Device,
    upd: &Update<'_>,
    opt: &mut AdamState,
    cfg: &TrainConfig,
    mut loss: impl FnMut(&M, &[&Utt], &mut ChaCha8Rng) -> Result<Tensor<1>, E>,
) -> Result<(M, f64), E> {
    let _rng = engine_rng(device, mix(upd.seed, &[upd.dropout_tag]));
    let mut rng = ChaCha8Rng::seed_from_u64(upd.seed);
    let mut grads = Grads::new();
    for utts in micro {
        let l = loss(&model, utts, &mut rng)?;
        accumulate(&mut grads, backward(l, &model));
    }
    if let Some(prefix) = upd.frozen_prefix {
        grads.retain(|k, _| !k.starts_with(prefix));
    }
    let norm = clip_grad_norm(&mut grads, micro.len(), cfg.clip_norm);
    let model = apply_update(model, &mut grads, upd.lr, upd.prox, opt, cfg)?;
    Ok((model, norm))
}

/// The batches of a local training, epoch by epoch (length-bucketed, reshuffled every epoch from
/// the training seed), and which of them make update k (`update_freq` micro-batches).
pub struct StepPlan<'a> {
    utts: &'a [Utt],
    batch: BatchConfig,
    update_freq: usize,
    seed: u64,
    /// Updates per epoch.
    per_epoch: u64,
    epoch: (u64, Vec<Vec<usize>>),
}

impl<'a> StepPlan<'a> {
    pub fn new(
        utts: &'a [Utt],
        batch: &BatchConfig,
        update_freq: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let first = Self::epoch_plan(utts, batch, seed, 0);
        if first.is_empty() {
            return Err(TrainError::Data(format!(
                "no utterance is at least min_sample_size = {} samples long",
                batch.min_sample_size
            )));
        }
        Ok(Self {
            utts,
            batch: batch.clone(),
            update_freq,
            seed,
            per_epoch: (first.len() / update_freq).max(1) as u64,
            epoch: (0, first),
        })
    }

    fn epoch_plan(utts: &[Utt], batch: &BatchConfig, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &[seeds::EPOCH_PLAN, epoch]));
        epoch_batches(utts, batch, &mut rng)
    }

    pub fn updates_per_epoch(&self) -> u64 {
        self.per_epoch
    }

    /// The micro-batches of update `k`.
    pub fn micro(&mut self, k: u64) -> Vec<Vec<&'a Utt>> {
        let epoch = k / self.per_epoch;
        if self.epoch.0 != epoch {
            self.epoch = (
                epoch,
                Self::epoch_plan(self.utts, &self.batch, self.seed, epoch),
            );
        }
        let batches = &self.epoch.1;
        let j = (k % self.per_epoch) as usize * self.update_freq;
        let utts = self.utts;
        (0..self.update_freq)
            .map(|u| {
                batches[(j + u) % batches.len()]
                    .iter()
                    .map(|&i| &utts[i])
                    .collect()
            })
            .collect()
    }
}

/// Metrics a client reports: named numbers (Flower's metrics record) and the utterances they
/// are over (the example count the server weights by).
pub trait Reported: serde::Serialize {
    fn utterances(&self) -> u64;

    fn to_map(&self) -> BTreeMap<String, f64> {
        let v = serde_json::to_value(self).unwrap_or_default();
        v.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Step metrics that average over a run of steps.
pub trait StepMetrics: Default {
    /// Folds step `n` (1-based) into the running means.
    fn running_mean(&mut self, step: &Self, n: f64);
}

/// The step loop: updates `start..start + steps` of `plan`, each `step(k, micro_batches, seed)`
/// with step k's seed `mix(seed, [STEP, k])`; returns the mean metrics, `on_step` sees each step's.
pub fn run_steps<M: StepMetrics, E>(
    plan: &mut StepPlan<'_>,
    start: u64,
    steps: u64,
    mut step: impl FnMut(u64, &[Vec<&Utt>], u64) -> Result<M, E>,
    mut on_step: impl FnMut(u64, &M),
) -> Result<M, E> {
    let mut total = M::default();
    for k in start..start + steps {
        let micro = plan.micro(k);
        let m = step(k, &micro, mix(plan.seed, &[seeds::STEP, k]))?;
        on_step(k, &m);
        total.running_mean(&m, (k - start + 1) as f64);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_norm_clipping() {
        let make = || {
            Grads::from([
                ("a".to_string(), vec![1.0f32, 2.0, 2.0, 0.0, 0.0, 0.0]),
                ("b".to_string(), vec![0.0f32, 0.0, 4.0, 0.0]),
            ])
        };
        let norm = |g: &Grads| {
            g.values()
                .flatten()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        // Norm = sqrt(1 + 4 + 4 + 16) = 5.
        let mut g = make();
        assert!((clip_grad_norm(&mut g, 1, 10.0) - 5.0).abs() < 1e-12);
        assert_eq!(g, make(), "no clipping under the threshold");
        let mut g = make();
        assert!((clip_grad_norm(&mut g, 1, 1.0) - 5.0).abs() < 1e-12);
        assert!((norm(&g) - 1.0).abs() < 1e-6, "clipped to max_norm");
        assert!(
            (g["b"][2] - 4.0 / (5.0 + 1e-6) as f32).abs() < 1e-6,
            "uniform scaling: {g:?}"
        );
        // Two micro-batches: the mean gradient, norm 2.5, unclipped at 10.
        let mut g = make();
        assert!((clip_grad_norm(&mut g, 2, 10.0) - 2.5).abs() < 1e-12);
        assert_eq!(g["b"][2], 2.0);
        let mut g = make();
        assert!((clip_grad_norm(&mut g, 1, 0.0) - 5.0).abs() < 1e-12);
        assert_eq!(g, make(), "clip_norm 0 disables clipping");
    }
}
