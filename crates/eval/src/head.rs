//! The probe head on host: softmax-weighted layer sum of the (standardised) pooled layers, then
//! a linear classifier or a one-hidden-layer ReLU MLP; cross-entropy, hand-written backward,
//! AdamW (torch semantics), model selection on validation accuracy with early stopping.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{EvalError, PooledFeatures};

/// Classifier after the weighted layer sum and pooling.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    Linear,
    /// Linear(dim, hidden) -> ReLU -> Linear(hidden, classes).
    Mlp {
        hidden: usize,
    },
}

/// Optimiser and selection settings of the probe head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadConfig {
    pub kind: HeadKind,
    pub learning_rate: f64,
    /// Decoupled (AdamW) decay on the classifier weights (not on biases / layer weights).
    pub weight_decay: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Stop after this many epochs without a better validation score (0 = never).
    pub patience: usize,
    /// Standardise every layer's pooled features with train-split mean / std before the sum.
    pub standardize: bool,
    pub seed: u64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            kind: HeadKind::Linear,
            learning_rate: 2e-3,
            weight_decay: 1e-2,
            epochs: 200,
            batch_size: 32,
            patience: 50,
            standardize: true,
            seed: 0,
        }
    }
}

impl HeadConfig {
    pub fn validate(&self) -> Result<(), EvalError> {
        let bad = |m: String| Err(EvalError::Config(m));
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!(
                "learning_rate must be > 0, got {}",
                self.learning_rate
            ));
        }
        if self.weight_decay < 0.0 {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs and batch_size must be >= 1".into());
        }
        if let HeadKind::Mlp { hidden: 0 } = self.kind {
            return bad("MLP hidden size must be >= 1".into());
        }
        Ok(())
    }
}

/// Indices of the parameter groups in [`ProbeHead::params`].
const LOGITS: usize = 0;
const W1: usize = 1;
const B1: usize = 2;
const W2: usize = 3;
const B2: usize = 4;

/// A trained (or initial) probe head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeHead {
    pub kind: HeadKind,
    pub layers: usize,
    pub dim: usize,
    pub classes: usize,
    /// Per (layer, dim) standardisation: `z = (x - mean) * inv_std`.
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// `[layer logits [L], w1 [dim, hidden], b1 [hidden], w2 [in2, classes], b2 [classes]]`
    /// (w1 / b1 empty for a linear head; in2 = hidden or dim). Row-major, input-major.
    pub params: Vec<Vec<f32>>,
}

/// Scratch of one forward pass, kept for the backward.
struct Fwd {
    s: Vec<f32>,
    x: Vec<f32>,
    u: Vec<f32>,
    logits: Vec<f32>,
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|&x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

impl ProbeHead {
    /// Fresh head: layer logits 0 (uniform weights), torch-style uniform(+-1/sqrt(fan_in))
    /// linear layers, identity standardisation.
    pub fn new(kind: HeadKind, layers: usize, dim: usize, classes: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4EAD);
        let mut uni = |n: usize, fan_in: usize| -> Vec<f32> {
            let b = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        };
        let (w1, b1, in2) = match kind {
            HeadKind::Linear => (vec![], vec![], dim),
            HeadKind::Mlp { hidden } => (uni(dim * hidden, dim), uni(hidden, dim), hidden),
        };
        let w2 = uni(in2 * classes, in2);
        let b2 = uni(classes, in2);
        Self {
            kind,
            layers,
            dim,
            classes,
            mean: vec![0.0; layers * dim],
            inv_std: vec![1.0; layers * dim],
            params: vec![vec![0.0; layers], w1, b1, w2, b2],
        }
    }

    /// The learned layer weights, softmax of the logits (sum to 1).
    pub fn layer_weights(&self) -> Vec<f32> {
        softmax(&self.params[LOGITS])
    }

    fn hidden(&self) -> usize {
        match self.kind {
            HeadKind::Linear => 0,
            HeadKind::Mlp { hidden } => hidden,
        }
    }

    /// Standardised copy of one clip's pooled layers `[layers * dim]`.
    fn standardize(&self, clip: &[f32]) -> Vec<f32> {
        clip.iter()
            .zip(&self.mean)
            .zip(&self.inv_std)
            .map(|((&x, &m), &s)| (x - m) * s)
            .collect()
    }

    fn forward(&self, z: &[f32]) -> Fwd {
        let (l_n, d, c, h) = (self.layers, self.dim, self.classes, self.hidden());
        let s = self.layer_weights();
        let mut x = vec![0f32; d];
        for l in 0..l_n {
            let zl = &z[l * d..(l + 1) * d];
            x.iter_mut().zip(zl).for_each(|(xi, &zi)| *xi += s[l] * zi);
        }
        let p = &self.params;
        let (u, in2): (Vec<f32>, Vec<f32>) = if h > 0 {
            let mut u = p[B1].clone();
            for (k, &xk) in x.iter().enumerate() {
                let row = &p[W1][k * h..(k + 1) * h];
                u.iter_mut().zip(row).for_each(|(ui, &w)| *ui += xk * w);
            }
            let r = u.iter().map(|&v| v.max(0.0)).collect();
            (u, r)
        } else {
            (vec![], x.clone())
        };
        let mut logits = p[B2].clone();
        for (k, &ik) in in2.iter().enumerate() {
            let row = &p[W2][k * c..(k + 1) * c];
            logits.iter_mut().zip(row).for_each(|(o, &w)| *o += ik * w);
        }
        Fwd { s, x, u, logits }
    }

    /// Class logits of one clip's raw pooled layers (`PooledFeatures::clip`).
    pub fn logits(&self, clip: &[f32]) -> Vec<f32> {
        self.forward(&self.standardize(clip)).logits
    }

    /// Arg-max class of one clip.
    pub fn predict(&self, clip: &[f32]) -> usize {
        argmax(&self.logits(clip))
    }

    /// Mean cross-entropy over standardised clips `zs[i]` with labels `ys[i]`, and its gradient
    /// for every parameter group (same layout as `params`).
    fn loss_and_grad(&self, zs: &[&[f32]], ys: &[usize]) -> (f64, Vec<Vec<f32>>) {
        let (l_n, d, c, h) = (self.layers, self.dim, self.classes, self.hidden());
        let mut g: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        let inv_b = 1.0 / zs.len() as f32;
        let mut loss = 0f64;
        for (z, &y) in zs.iter().zip(ys) {
            let f = self.forward(z);
            let p = softmax(&f.logits);
            loss -= (p[y].max(1e-30) as f64).ln();
            let mut dl = p;
            dl[y] -= 1.0;
            dl.iter_mut().for_each(|v| *v *= inv_b);
            let in2: Vec<f32> = if h > 0 {
                f.u.iter().map(|&v| v.max(0.0)).collect()
            } else {
                f.x.clone()
            };
            // logits = in2 . W2 + b2
            let mut d_in2 = vec![0f32; in2.len()];
            for (k, &ik) in in2.iter().enumerate() {
                let w = &self.params[W2][k * c..(k + 1) * c];
                let gw = &mut g[W2][k * c..(k + 1) * c];
                let mut acc = 0f32;
                for j in 0..c {
                    gw[j] += ik * dl[j];
                    acc += w[j] * dl[j];
                }
                d_in2[k] = acc;
            }
            g[B2].iter_mut().zip(&dl).for_each(|(a, &b)| *a += b);
            let dx = if h > 0 {
                let du: Vec<f32> = d_in2
                    .iter()
                    .zip(&f.u)
                    .map(|(&g, &u)| if u > 0.0 { g } else { 0.0 })
                    .collect();
                let mut dx = vec![0f32; d];
                for (k, &xk) in f.x.iter().enumerate() {
                    let w = &self.params[W1][k * h..(k + 1) * h];
                    let gw = &mut g[W1][k * h..(k + 1) * h];
                    let mut acc = 0f32;
                    for j in 0..h {
                        gw[j] += xk * du[j];
                        acc += w[j] * du[j];
                    }
                    dx[k] = acc;
                }
                g[B1].iter_mut().zip(&du).for_each(|(a, &b)| *a += b);
                dx
            } else {
                d_in2
            };
            // x = sum_l s_l z_l, s = softmax(a): da_l = s_l (ds_l - sum_k s_k ds_k)
            let ds: Vec<f32> = (0..l_n)
                .map(|l| {
                    z[l * d..(l + 1) * d]
                        .iter()
                        .zip(&dx)
                        .map(|(&a, &b)| a * b)
                        .sum()
                })
                .collect();
            let dot: f32 = ds.iter().zip(&f.s).map(|(a, b)| a * b).sum();
            for l in 0..l_n {
                g[LOGITS][l] += f.s[l] * (ds[l] - dot);
            }
        }
        (loss / zs.len() as f64, g)
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Host AdamW (torch `AdamW`: decoupled decay, bias-corrected moments).
struct AdamW {
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: i32,
}

impl AdamW {
    fn new(params: &[Vec<f32>]) -> Self {
        let z = |p: &Vec<f32>| vec![0f32; p.len()];
        Self {
            m: params.iter().map(z).collect(),
            v: params.iter().map(z).collect(),
            t: 0,
        }
    }

    fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64, decay: &[f64]) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f32);
        self.t += 1;
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = (1.0 - b2.powi(self.t)).sqrt() as f32;
        let step = (lr / bc1) as f32;
        let (b1, b2) = (b1 as f32, b2 as f32);
        for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let keep = (1.0 - lr * decay[k]) as f32;
            for (((w, &gi), m), v) in p.iter_mut().zip(g).zip(&mut self.m[k]).zip(&mut self.v[k]) {
                *w *= keep;
                *m = b1 * *m + (1.0 - b1) * gi;
                *v = b2 * *v + (1.0 - b2) * gi * gi;
                *w -= step * *m / (v.sqrt() / bc2 + eps);
            }
        }
    }
}

/// What [`train_probe`] returns.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The head of the best validation epoch.
    pub head: ProbeHead,
    /// 1-based epoch of `head`.
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub train_accuracy: f64,
    pub valid_accuracy: f64,
    pub valid_loss: f64,
    /// Per epoch: (mean train loss, validation accuracy).
    pub history: Vec<(f64, f64)>,
}

/// Accuracy and mean cross-entropy of `head` on clips `idx` of `feats`.
pub fn evaluate_head(
    head: &ProbeHead,
    feats: &PooledFeatures,
    labels: &[usize],
    idx: &[usize],
) -> (f64, f64) {
    if idx.is_empty() {
        return (0.0, 0.0);
    }
    let (mut ok, mut loss) = (0usize, 0f64);
    for &i in idx {
        let lg = head.logits(feats.clip(i));
        let p = softmax(&lg);
        loss -= (p[labels[i]].max(1e-30) as f64).ln();
        ok += usize::from(argmax(&lg) == labels[i]);
    }
    (ok as f64 / idx.len() as f64, loss / idx.len() as f64)
}

/// Trains a probe head on clips `train` (labels `labels[i]` in `0..classes`), selecting the epoch
/// with the best validation accuracy (ties: lower validation loss), stopping after `patience`
/// epochs without improvement.
pub fn train_probe(
    feats: &PooledFeatures,
    labels: &[usize],
    classes: usize,
    train: &[usize],
    valid: &[usize],
    cfg: &HeadConfig,
) -> Result<TrainOutcome, EvalError> {
    cfg.validate()?;
    if train.is_empty() || valid.is_empty() {
        return Err(EvalError::Config(
            "train and validation splits must be non-empty".into(),
        ));
    }
    if labels.len() != feats.n {
        return Err(EvalError::Config(format!(
            "{} labels for {} clips",
            labels.len(),
            feats.n
        )));
    }
    if let Some(&y) = labels.iter().find(|&&y| y >= classes) {
        return Err(EvalError::Config(format!(
            "label {y} out of range for {classes} classes"
        )));
    }
    let (l_n, d) = (feats.layers, feats.dim);
    let mut head = ProbeHead::new(cfg.kind, l_n, d, classes, cfg.seed);
    if cfg.standardize {
        let mut mean = vec![0f64; l_n * d];
        let mut sq = vec![0f64; l_n * d];
        for &i in train {
            for (k, &x) in feats.clip(i).iter().enumerate() {
                mean[k] += x as f64;
                sq[k] += (x as f64) * (x as f64);
            }
        }
        let n = train.len() as f64;
        for k in 0..l_n * d {
            let m = mean[k] / n;
            let var = (sq[k] / n - m * m).max(0.0);
            head.mean[k] = m as f32;
            head.inv_std[k] = (1.0 / (var + 1e-5).sqrt()) as f32;
        }
    }
    let z: Vec<Vec<f32>> = train
        .iter()
        .map(|&i| head.standardize(feats.clip(i)))
        .collect();
    let ys: Vec<usize> = train.iter().map(|&i| labels[i]).collect();
    let decay = [0.0, cfg.weight_decay, 0.0, cfg.weight_decay, 0.0];
    let mut opt = AdamW::new(&head.params);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x0E9C);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut best, mut best_key, mut best_epoch) =
        (head.clone(), (f64::NEG_INFINITY, f64::INFINITY), 0);
    let mut history = Vec::new();
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let mut total = 0f64;
        for chunk in order.chunks(cfg.batch_size) {
            let zb: Vec<&[f32]> = chunk.iter().map(|&k| z[k].as_slice()).collect();
            let yb: Vec<usize> = chunk.iter().map(|&k| ys[k]).collect();
            let (loss, g) = head.loss_and_grad(&zb, &yb);
            if !loss.is_finite() {
                return Err(EvalError::Diverged(format!("loss {loss} at epoch {epoch}")));
            }
            total += loss * chunk.len() as f64;
            opt.step(&mut head.params, &g, cfg.learning_rate, &decay);
        }
        let (va, vl) = evaluate_head(&head, feats, labels, valid);
        history.push((total / train.len() as f64, va));
        if va > best_key.0 || (va == best_key.0 && vl < best_key.1) {
            (best, best_key, best_epoch) = (head.clone(), (va, vl), epoch);
        } else if cfg.patience > 0 && epoch - best_epoch >= cfg.patience {
            break;
        }
    }
    let (train_accuracy, _) = evaluate_head(&best, feats, labels, train);
    Ok(TrainOutcome {
        head: best,
        best_epoch,
        epochs_run: history.len(),
        train_accuracy,
        valid_accuracy: best_key.0,
        valid_loss: best_key.1,
        history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[allow(clippy::needless_range_loop)]
    /// The hand-written backward matches central finite differences for both head kinds.
    #[test]
    fn gradient_matches_finite_differences() {
        for kind in [HeadKind::Linear, HeadKind::Mlp { hidden: 5 }] {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let (l_n, d, c) = (3, 4, 3);
            let mut head = ProbeHead::new(kind, l_n, d, c, 1);
            head.params[LOGITS] = rand_vec(&mut rng, l_n);
            let zs: Vec<Vec<f32>> = (0..4).map(|_| rand_vec(&mut rng, l_n * d)).collect();
            let zr: Vec<&[f32]> = zs.iter().map(|v| v.as_slice()).collect();
            let ys = [0, 2, 1, 2];
            let (_, g) = head.loss_and_grad(&zr, &ys);
            let eps = 1e-2f32;
            let mut checked = 0;
            for k in 0..head.params.len() {
                for j in 0..head.params[k].len() {
                    let mut hp = head.clone();
                    hp.params[k][j] += eps;
                    let mut hm = head.clone();
                    hm.params[k][j] -= eps;
                    let num = (hp.loss_and_grad(&zr, &ys).0 - hm.loss_and_grad(&zr, &ys).0)
                        / (2.0 * eps as f64);
                    let ana = g[k][j] as f64;
                    assert!(
                        (num - ana).abs() < 2e-3 + 2e-2 * num.abs(),
                        "{kind:?} group {k}[{j}]: numeric {num} vs analytic {ana}"
                    );
                    checked += 1;
                }
            }
            assert!(checked >= 18, "only {checked} parameters checked");
        }
    }

    /// Two Gaussian blobs whose class signal sits in layer 2 only: the head learns them and
    /// puts most weight on that layer.
    #[test]
    fn learns_separable_data_and_weights_the_informative_layer() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (n, l_n, d) = (120, 3, 6);
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let y = i % 2;
            labels.push(y);
            for l in 0..l_n {
                for k in 0..d {
                    let noise = rng.random_range(-1.0f32..1.0);
                    let signal = if l == 2 && k < 2 {
                        if y == 1 { 1.5 } else { -1.5 }
                    } else {
                        0.0
                    };
                    data.push(noise + signal);
                }
            }
        }
        let feats = PooledFeatures {
            n,
            layers: l_n,
            dim: d,
            data,
        };
        let train: Vec<usize> = (0..80).collect();
        let valid: Vec<usize> = (80..100).collect();
        let test: Vec<usize> = (100..120).collect();
        let cfg = HeadConfig {
            learning_rate: 1e-2,
            epochs: 60,
            ..Default::default()
        };
        let out = train_probe(&feats, &labels, 2, &train, &valid, &cfg).unwrap();
        let (acc, _) = evaluate_head(&out.head, &feats, &labels, &test);
        assert!(acc >= 0.9, "test accuracy {acc}");
        let w = out.head.layer_weights();
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(w[2] > w[0] && w[2] > w[1], "layer weights {w:?}");
    }
}
