//! Optional fine-tuning of the upstream together with the probe head, through burn autodiff:
//! the frozen-probe head is the starting point, the conv front-end stays fixed (its output is
//! detached), the transformer and head are updated with host AdamW (small lr for the upstream),
//! and the epoch with the best validation accuracy is kept.

use std::time::Instant;

use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, relu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use fedhubert_model::{HostTensor, HubertModel, Weights, collect_tensors, load_tensors};
use fedhubert_train::TrainConfig;
use fedhubert_train::core::{AdamState, backward, engine_rng};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::features::normalize_wave;
use crate::head::evaluate_head;
use crate::report::{ConfusionMatrix, FinetuneSummary};
use crate::{DataSplit, EvalError, HeadKind, LabelledClips, ProbeHead, extract_pooled};

/// Fine-tuning settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// AdamW lr of the upstream transformer (the conv front-end is frozen).
    pub upstream_lr: f64,
    /// AdamW lr of the head (layer weights + classifier).
    pub head_lr: f64,
    pub seed: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 5,
            batch_size: 8,
            upstream_lr: 5e-5,
            head_lr: 1e-3,
            seed: 0,
        }
    }
}

#[derive(Module, Debug)]
struct FtHead {
    layer_logits: Param<Tensor<1>>,
    w1: Option<Param<Tensor<2>>>,
    b1: Option<Param<Tensor<1>>>,
    w2: Param<Tensor<2>>,
    b2: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
struct FtModel {
    hubert: HubertModel,
    head: FtHead,
}

fn param1(v: &[f32], device: &Device) -> Param<Tensor<1>> {
    Param::from_tensor(Tensor::<1>::from_data(
        TensorData::new(v.to_vec(), [v.len()]),
        device,
    ))
}

fn param2(v: &[f32], rows: usize, device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::<2>::from_data(
        TensorData::new(v.to_vec(), [rows, v.len() / rows]),
        device,
    ))
}

impl FtHead {
    fn from_probe(h: &ProbeHead, device: &Device) -> Self {
        let p = &h.params;
        let (w1, b1, in2) = match h.kind {
            HeadKind::Linear => (None, None, h.dim),
            HeadKind::Mlp { hidden } => (
                Some(param2(&p[1], h.dim, device)),
                Some(param1(&p[2], device)),
                hidden,
            ),
        };
        Self {
            layer_logits: param1(&p[0], device),
            w1,
            b1,
            w2: param2(&p[3], in2, device),
            b2: param1(&p[4], device),
        }
    }
}

/// Copies the head parameters of `tensors` (names `head.*`) into a clone of `template`.
fn to_probe(template: &ProbeHead, tensors: &Weights) -> ProbeHead {
    let mut h = template.clone();
    for t in &tensors.tensors {
        let k = match t.name.as_str() {
            "head.layer_logits" => 0,
            "head.w1" => 1,
            "head.b1" => 2,
            "head.w2" => 3,
            "head.b2" => 4,
            _ => continue,
        };
        h.params[k] = t.data.clone();
    }
    h
}

impl FtModel {
    /// Mean cross-entropy of a batch of equal-length waveforms.
    fn loss(
        &self,
        wav: Tensor<2>,
        labels: &[usize],
        mean: &Tensor<2>,
        inv: &Tensor<2>,
        classes: usize,
    ) -> Result<Tensor<1>, EvalError> {
        let device = wav.device();
        let b = labels.len();
        let feats = self
            .hubert
            .extract_conv_features(wav)
            .swap_dims(1, 2)
            .detach();
        let out = self.hubert.forward_from_features(feats, None, None)?;
        let s = softmax(self.head.layer_logits.val(), 0);
        let d = self.hubert.config.hidden_size;
        let mut x: Option<Tensor<2>> = None;
        for (l, h) in out.hidden_states.into_iter().enumerate() {
            let pooled = h.mean_dim(1).reshape([b, d]);
            let z = (pooled - mean.clone().narrow(0, l, 1)) * inv.clone().narrow(0, l, 1);
            let term = z * s.clone().narrow(0, l, 1).reshape([1, 1]);
            x = Some(match x {
                None => term,
                Some(a) => a + term,
            });
        }
        let mut x =
            x.ok_or_else(|| EvalError::Config("upstream returned no hidden states".into()))?;
        if let (Some(w1), Some(b1)) = (&self.head.w1, &self.head.b1) {
            x = relu(x.matmul(w1.val()) + b1.val().unsqueeze::<2>());
        }
        let logits = x.matmul(self.head.w2.val()) + self.head.b2.val().unsqueeze::<2>();
        let mut oh = vec![0f32; b * classes];
        labels
            .iter()
            .enumerate()
            .for_each(|(i, &y)| oh[i * classes + y] = 1.0);
        let oh = Tensor::<2>::from_data(TensorData::new(oh, [b, classes]), &device);
        Ok((log_softmax(logits, 1) * oh)
            .sum()
            .div_scalar(b as f64)
            .neg())
    }
}

/// Result of [`finetune`]: the fine-tuned upstream (inference mode, on the input's device), the
/// fine-tuned head and the measured numbers.
pub struct FinetuneOutcome {
    pub upstream: HubertModel,
    pub head: ProbeHead,
    pub summary: FinetuneSummary,
}

fn accuracy_and_confusion(
    upstream: &HubertModel,
    head: &ProbeHead,
    data: &LabelledClips,
    idx: &[usize],
) -> Result<(f64, f64, ConfusionMatrix), EvalError> {
    let waves: Vec<&[f32]> = idx
        .iter()
        .map(|&i| data.clips[i].samples.as_slice())
        .collect();
    let feats = extract_pooled(upstream, &waves, 8)?;
    let labels: Vec<usize> = idx.iter().map(|&i| data.clips[i].label).collect();
    let all: Vec<usize> = (0..idx.len()).collect();
    let (acc, loss) = evaluate_head(head, &feats, &labels, &all);
    let cm = ConfusionMatrix::from_pairs(
        data.classes.clone(),
        all.iter()
            .map(|&k| (labels[k], head.predict(feats.clip(k)))),
    );
    Ok((acc, loss, cm))
}

/// Fine-tunes `upstream` + `head` (from the frozen probe) on the train split; keeps the epoch
/// with the best validation accuracy (epoch 0 = the frozen probe itself), reports test accuracy.
pub fn finetune(
    upstream: &HubertModel,
    head: &ProbeHead,
    data: &LabelledClips,
    split: &DataSplit,
    cfg: &FinetuneConfig,
) -> Result<FinetuneOutcome, EvalError> {
    if cfg.epochs == 0
        || cfg.batch_size == 0
        || cfg.upstream_lr.is_nan()
        || cfg.upstream_lr < 0.0
        || cfg.head_lr.is_nan()
        || cfg.head_lr < 0.0
    {
        return Err(EvalError::Config(format!(
            "fine-tuning needs epochs, batch_size >= 1 and lrs >= 0, got {cfg:?}"
        )));
    }
    let t0 = Instant::now();
    let base = upstream.masked_spec_embed.device();
    let ad = base.clone().autodiff();
    let classes = data.classes.len();
    let (l_n, d) = (head.layers, head.dim);
    let mean = Tensor::<2>::from_data(TensorData::new(head.mean.clone(), [l_n, d]), &ad);
    let inv = Tensor::<2>::from_data(TensorData::new(head.inv_std.clone(), [l_n, d]), &ad);
    let mut model = FtModel {
        hubert: upstream.clone(),
        head: FtHead::from_probe(head, &base),
    }
    .to_device(&ad)
    .train();
    let normalize = upstream.config.feat_extract_norm == fedhubert_model::FeatExtractNorm::Layer;
    let (va0, vl0, _) = accuracy_and_confusion(upstream, head, data, &split.valid)?;
    let mut best = (va0, vl0, collect_tensors(&model));
    let mut opt = AdamState::default();
    let adam = TrainConfig {
        adam_betas: (0.9, 0.999),
        adam_eps: 1e-8,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xF17E);
    let mut steps = 0usize;
    let mut epoch_train_loss = Vec::with_capacity(cfg.epochs);
    for epoch in 0..cfg.epochs {
        // Equal-length batches (no padding), shuffled within and across lengths.
        let mut order = split.train.clone();
        order.shuffle(&mut rng);
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for i in order {
            by_len
                .entry(data.clips[i].samples.len())
                .or_default()
                .push(i);
        }
        let mut batches: Vec<Vec<usize>> = by_len
            .into_values()
            .flat_map(|ix| {
                ix.chunks(cfg.batch_size)
                    .map(<[usize]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect();
        batches.shuffle(&mut rng);
        let (mut sum, mut count) = (0f64, 0usize);
        for batch in batches {
            let _rng = engine_rng(
                &ad,
                cfg.seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((epoch * 100_000 + steps) as u64),
            );
            let len = data.clips[batch[0]].samples.len();
            let mut flat = Vec::with_capacity(batch.len() * len);
            for &i in &batch {
                let s = &data.clips[i].samples;
                if normalize {
                    flat.extend(normalize_wave(s))
                } else {
                    flat.extend_from_slice(s)
                }
            }
            let wav = Tensor::<2>::from_data(TensorData::new(flat, [batch.len(), len]), &ad);
            let labels: Vec<usize> = batch.iter().map(|&i| data.clips[i].label).collect();
            let loss = model.loss(wav, &labels, &mean, &inv, classes)?;
            let lv = loss
                .clone()
                .into_data()
                .convert::<f64>()
                .try_to_vec::<f64>()
                .map_err(|e| EvalError::Diverged(format!("{e:?}")))?[0];
            if !lv.is_finite() {
                return Err(EvalError::Diverged(format!(
                    "fine-tuning loss {lv} at step {steps}"
                )));
            }
            sum += lv * batch.len() as f64;
            count += batch.len();
            // The trainer core's gradients and Adam (torch's defaults, no weight decay), with
            // one learning rate for the head and another for the upstream.
            let grads = backward(loss, &model);
            let mut params = collect_tensors(&model);
            let lr_of = |name: &str| {
                if name.starts_with("head.") {
                    cfg.head_lr
                } else {
                    cfg.upstream_lr
                }
            };
            opt.update_groups(&mut params, &grads, lr_of, &adam);
            model = load_tensors(model, params)?;
            steps += 1;
        }
        epoch_train_loss.push(sum / count.max(1) as f64);
        let tensors = collect_tensors(&model);
        let (va, vl, _) = accuracy_and_confusion(
            &model.hubert.valid(),
            &to_probe(head, &tensors),
            data,
            &split.valid,
        )?;
        tracing::info!(
            "fine-tune epoch {}: valid accuracy {va:.3} (loss {vl:.3})",
            epoch + 1
        );
        if va > best.0 || (va == best.0 && vl < best.1) {
            best = (va, vl, tensors);
        }
    }
    let (valid_accuracy, _, tensors) = best;
    let head_ft = to_probe(head, &tensors);
    let hubert_tensors: Weights = tensors
        .tensors
        .into_iter()
        .filter_map(|t| {
            let name = t.name.strip_prefix("hubert.")?.to_string();
            Some(HostTensor { name, ..t })
        })
        .collect();
    let upstream_ft = load_tensors(upstream.clone(), hubert_tensors)?;
    let (test_accuracy, _, confusion) =
        accuracy_and_confusion(&upstream_ft, &head_ft, data, &split.test)?;
    Ok(FinetuneOutcome {
        upstream: upstream_ft,
        head: head_ft,
        summary: FinetuneSummary {
            steps,
            learning_rate: cfg.upstream_lr,
            valid_accuracy,
            test_accuracy,
            seconds: t0.elapsed().as_secs_f64(),
            epoch_train_loss,
            confusion,
        },
    })
}
