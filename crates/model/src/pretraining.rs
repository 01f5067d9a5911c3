//! fairseq-style HuBERT masked-prediction pretraining: projection head, label embeddings,
//! cosine (or linear) logits, masked / unmasked cross-entropy, feature penalty,
//! `feature_grad_mult`, label-rate alignment.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::HubertConfig;
use crate::error::ModelError;
use crate::hf::{load_checkpoint, save_checkpoint, write_atomic};
use crate::hubert::{HubertModel, HubertOutput};
use crate::masking::{MaskConfig, compute_mask_indices, mask_to_tensor};
use crate::nn::{Init, Linear};

/// How logits are computed from the final projection.
///
/// `Cosine` is fairseq `HubertModel`'s `compute_pred` / `compute_nce` (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:L482, L384);
/// `Linear` has no fairseq or transformers counterpart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// fairseq HuBERT: `cos(final_proj(x), label_embs_concat[c]) / logit_temp`.
    Cosine,
    /// icefall `hubert_ce`: `final_proj(x)[c] / logit_temp` with `final_proj: H -> num_classes`.
    Linear,
}

/// Pretraining-head hyper-parameters (fairseq `HubertConfig` / `HubertCriterion` names).
///
/// No single reference struct; the fields come from (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99): `HubertConfig` (fairseq/models/hubert/hubert.py:
/// L37; `final_dim` L93, `logit_temp` L119, `feature_grad_mult` L125), `HubertPretrainingConfig`
/// (fairseq/tasks/hubert_pretraining.py:L38; `label_rate` L58, `sample_rate` L62),
/// `HubertCriterionConfig` (fairseq/criterions/hubert_criterion.py:L20; `pred_masked_weight`
/// L21, `pred_nomask_weight` L25, `loss_weights` L29 = `feature_pen_weight`) and
/// `compute_mask_indices`'s `require_same_masks` (fairseq/data/data_utils.py:L399).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PretrainConfig {
    /// Number of k-means classes.
    pub num_classes: usize,
    /// Projection size of the cosine head (256 for Base); ignored by the linear head.
    pub final_dim: usize,
    /// Head type.
    pub head: HeadKind,
    /// Logit temperature (0.1).
    pub logit_temp: f64,
    /// Weight of the masked-frame cross-entropy (1.0).
    pub pred_masked_weight: f64,
    /// Weight of the unmasked-frame cross-entropy (0.0).
    pub pred_nomask_weight: f64,
    /// Weight of the conv-feature L2 penalty (10).
    pub feature_pen_weight: f64,
    /// Gradient scale on the conv front-end output (0.1); 0 freezes the front-end.
    pub feature_grad_mult: f64,
    /// Label frame rate in Hz (100 for MFCC targets, 50 for HuBERT-feature targets).
    pub label_rate: f64,
    /// Audio sample rate (16000).
    pub sample_rate: f64,
    /// fairseq `require_same_masks`.
    pub require_same_masks: bool,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            num_classes: 100,
            final_dim: 256,
            head: HeadKind::Cosine,
            logit_temp: 0.1,
            pred_masked_weight: 1.0,
            pred_nomask_weight: 0.0,
            feature_pen_weight: 10.0,
            feature_grad_mult: 0.1,
            label_rate: 100.0,
            sample_rate: 16000.0,
            require_same_masks: true,
        }
    }
}

impl PretrainConfig {
    /// Check the values; errors name the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad =
            |field: &'static str, reason: String| Err(ModelError::InvalidConfig { field, reason });
        if self.num_classes < 2 {
            return bad(
                "num_classes",
                format!("must be >= 2, got {}", self.num_classes),
            );
        }
        if self.head == HeadKind::Cosine && self.final_dim == 0 {
            return bad("final_dim", "must be > 0".into());
        }
        if self.logit_temp.is_nan() || self.logit_temp <= 0.0 {
            return bad(
                "logit_temp",
                format!("must be > 0, got {}", self.logit_temp),
            );
        }
        if self.label_rate.is_nan() || self.label_rate <= 0.0 {
            return bad(
                "label_rate",
                format!("must be > 0, got {}", self.label_rate),
            );
        }
        if self.sample_rate.is_nan() || self.sample_rate <= 0.0 {
            return bad(
                "sample_rate",
                format!("must be > 0, got {}", self.sample_rate),
            );
        }
        if self.pred_masked_weight < 0.0 || self.pred_nomask_weight < 0.0 {
            return bad("pred_masked_weight", "loss weights must be >= 0".into());
        }
        if self.feature_grad_mult < 0.0 {
            return bad("feature_grad_mult", "must be >= 0".into());
        }
        Ok(())
    }
}

/// fairseq `HubertModel.forward_targets`: with `ratio = label_rate * total_stride /
/// sample_rate`, trim the frame count so that `ratio * frames <= label_frames`, then frame `i`
/// takes label `floor(i * ratio)`. Returns (kept frames, label index of each kept frame).
///
/// Mirrors fairseq `HubertModel.forward_targets` (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:L406).
pub fn align_labels(num_frames: usize, num_label_frames: usize, ratio: f64) -> (usize, Vec<usize>) {
    let mut frames = num_frames;
    if ratio * frames as f64 > num_label_frames as f64 {
        frames = (num_label_frames as f64 / ratio) as usize;
    }
    // fairseq: (arange(frames).float() * ratio).long(), in float32.
    let idx = (0..frames)
        .map(|i| ((i as f32) * (ratio as f32)) as usize)
        .collect();
    (frames, idx)
}

/// A training batch.
#[derive(Debug, Clone)]
pub struct PretrainBatch {
    /// Waveforms `[B, S]` (zero-padded on the right).
    pub waveform: Tensor<2>,
    /// Valid samples per utterance; `None` = no padding.
    pub sample_lengths: Option<Vec<usize>>,
    /// Cluster labels per utterance at `label_rate` (lengths may differ).
    pub labels: Vec<Vec<u32>>,
}

/// Loss and statistics of one pretraining forward.
///
/// Corresponds to fairseq `HubertCriterion.forward`'s loss and logging output (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/criterions/hubert_criterion.py:L55).
#[derive(Debug, Clone)]
pub struct PretrainOutput {
    /// Scalar `[1]` total loss, normalised by `sample_size` (fairseq's loss / sample_size):
    /// `(w_m * sum CE_masked + w_u * sum CE_unmasked) / sample_size + pen_w * features_pen`.
    pub loss: Tensor<1>,
    /// Mean cross-entropy over masked frames.
    pub loss_masked: f64,
    /// Mean cross-entropy over unmasked frames.
    pub loss_unmasked: f64,
    /// `mean(conv_features^2)` (before weighting).
    pub features_pen: f64,
    /// Frames counted in the normaliser (masked, plus unmasked when `pred_nomask_weight > 0`).
    pub sample_size: usize,
    /// Masked frames whose argmax equals the label.
    pub correct_masked: usize,
    /// Masked frames scored.
    pub count_masked: usize,
    /// Unmasked frames whose argmax equals the label.
    pub correct_unmasked: usize,
    /// Unmasked (non-padded) frames scored.
    pub count_unmasked: usize,
}

impl PretrainOutput {
    /// Masked accuracy (0 when no masked frame).
    pub fn acc_masked(&self) -> f64 {
        self.correct_masked as f64 / self.count_masked.max(1) as f64
    }
    /// Unmasked accuracy (0 when no unmasked frame).
    pub fn acc_unmasked(&self) -> f64 {
        self.correct_unmasked as f64 / self.count_unmasked.max(1) as f64
    }
}

/// fairseq `GradMultiply`: forward identity, gradient scaled by `m` (`x*m + x.detach()*(1-m)`).
///
/// Mirrors `GradMultiply` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/modules/grad_multiply.py:L9) as `HubertModel.forward_features` applies it with
/// `feature_grad_mult` (fairseq/models/hubert/hubert.py:L396).
pub fn grad_multiply<const D: usize>(x: Tensor<D>, m: f64) -> Tensor<D> {
    if m == 1.0 {
        x
    } else if m == 0.0 {
        x.detach()
    } else {
        x.clone() * m + x.detach() * (1.0 - m)
    }
}

/// HuBERT with the masked-prediction head: `final_proj` and `label_embs_concat` (cosine head)
/// or a linear classifier `final_proj` (linear head).
///
/// Mirrors fairseq `HubertModel` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/models/hubert/hubert.py:L248), with its encoder held as HF `HubertModel`
/// (transformers v5.23.0, src/transformers/models/hubert/modeling_hubert.py:L760) under
/// `hubert`.
#[derive(Module, Debug)]
pub struct HubertForPretraining {
    /// The encoder (exported to HF as is).
    pub hubert: HubertModel,
    /// Cosine head: Linear(H -> final_dim); linear head: Linear(H -> num_classes).
    pub final_proj: Linear,
    /// Cosine head: `[num_classes, final_dim]` label embeddings.
    pub label_embs_concat: Option<Param<Tensor<2>>>,
    /// Head configuration.
    #[module(skip)]
    pub pretrain: PretrainConfig,
}

impl HubertForPretraining {
    /// Fresh model; fairseq init for the head (torch Linear default, label embeddings U(0,1)).
    ///
    /// fairseq `HubertModel.__init__` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
    /// fairseq/models/hubert/hubert.py:L313-L329).
    pub fn new(
        config: &HubertConfig,
        pretrain: &PretrainConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        pretrain.validate()?;
        let hubert = HubertModel::new(config, seed, device)?;
        Self::with_encoder(hubert, pretrain, seed.wrapping_add(0x9e37_79b9_7f4a_7c15))
    }

    /// Add a freshly initialised head (seeded) to an existing encoder, e.g. one loaded from HF.
    pub fn with_encoder(
        hubert: HubertModel,
        pretrain: &PretrainConfig,
        seed: u64,
    ) -> Result<Self, ModelError> {
        pretrain.validate()?;
        let device = hubert.masked_spec_embed.device();
        let mut init = Init::new(seed, &device);
        let h = hubert.config.hidden_size;
        let out = match pretrain.head {
            HeadKind::Cosine => pretrain.final_dim,
            HeadKind::Linear => pretrain.num_classes,
        };
        let bound = 1.0 / (h as f64).sqrt();
        let final_proj = Linear {
            weight: Param::from_tensor(init.uniform([out, h], -bound, bound)),
            bias: Some(Param::from_tensor(init.uniform([out], -bound, bound))),
        };
        let label_embs_concat = match pretrain.head {
            HeadKind::Cosine => Some(Param::from_tensor(init.uniform(
                [pretrain.num_classes, pretrain.final_dim],
                0.0,
                1.0,
            ))),
            HeadKind::Linear => None,
        };
        Ok(Self {
            hubert,
            final_proj,
            label_embs_concat,
            pretrain: pretrain.clone(),
        })
    }

    /// `feat2tar_ratio = label_rate * total_stride / sample_rate` (2 for 100 Hz labels).
    ///
    /// As fairseq (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
    /// fairseq/models/hubert/hubert.py:L268).
    pub fn feat2tar_ratio(&self) -> f64 {
        self.pretrain.label_rate * self.hubert.config.total_stride() as f64
            / self.pretrain.sample_rate
    }

    /// Class logits `[N, num_classes]` for encoder outputs `x [N, H]`.
    ///
    /// Cosine head: fairseq `compute_pred` / `compute_nce` (fairseq
    /// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:L482, L384),
    /// indexed by class instead of fairseq's (positive, all classes) layout with the duplicate
    /// positive set to -inf (L391-L392), which gives the same cross-entropy.
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        let proj = self.final_proj.forward(x);
        let temp = self.pretrain.logit_temp;
        match &self.label_embs_concat {
            None => proj / temp,
            Some(embs) => {
                // torch.cosine_similarity(x, y, eps=1e-8).
                let e = embs.val();
                let pn = proj.clone().square().sum_dim(1).sqrt(); // [N, 1]
                let en = e.clone().square().sum_dim(1).sqrt(); // [K, 1]
                let denom = pn.matmul(en.transpose()).clamp_min(1e-8);
                proj.matmul(e.transpose()) / denom / temp
            }
        }
    }

    /// Masked-prediction forward: conv front-end (gradient scaled by `feature_grad_mult`),
    /// label alignment and trimming, feature penalty, fairseq span masking drawn from `rng`
    /// (using the encoder config's `mask_time_*`), encoder, head, losses and accuracies.
    ///
    /// fairseq `HubertModel.forward` then `HubertCriterion.forward` (fairseq
    /// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:L433,
    /// fairseq/criterions/hubert_criterion.py:L55).
    pub fn forward_pretrain<R: Rng + ?Sized>(
        &self,
        batch: &PretrainBatch,
        rng: &mut R,
    ) -> Result<PretrainOutput, ModelError> {
        let mask_cfg = self.mask_config();
        self.forward_pretrain_with(batch, |b, t, lens| {
            compute_mask_indices(b, t, lens, &mask_cfg, rng)
        })
    }

    /// The span masking [`Self::forward_pretrain`] draws (the encoder config's `mask_time_*`).
    pub fn mask_config(&self) -> MaskConfig {
        MaskConfig {
            require_same_masks: self.pretrain.require_same_masks,
            ..MaskConfig::from_config(&self.hubert.config)
        }
    }

    /// As [`Self::forward_pretrain`] with a caller-supplied mask function
    /// `(batch, frames, valid frames per utterance) -> B x T mask`.
    pub fn forward_pretrain_with<F>(
        &self,
        batch: &PretrainBatch,
        make_mask: F,
    ) -> Result<PretrainOutput, ModelError>
    where
        F: FnOnce(usize, usize, Option<&[usize]>) -> Vec<Vec<bool>>,
    {
        self.forward_pretrain_full(batch, make_mask).map(|(o, _)| o)
    }

    /// As [`Self::forward_pretrain_with`], also returning the encoder's output (every hidden
    /// state, over the label-aligned frames) for losses built on top of masked prediction, such
    /// as distillation.
    pub fn forward_pretrain_full<F>(
        &self,
        batch: &PretrainBatch,
        make_mask: F,
    ) -> Result<(PretrainOutput, HubertOutput), ModelError>
    where
        F: FnOnce(usize, usize, Option<&[usize]>) -> Vec<Vec<bool>>,
    {
        let cfg = &self.hubert.config;
        let p = &self.pretrain;
        let [b, _] = batch.waveform.dims();
        if batch.labels.len() != b {
            return Err(ModelError::InvalidInput(format!(
                "{} label sequences for a batch of {b}",
                batch.labels.len()
            )));
        }
        if let Some(l) = &batch.sample_lengths
            && l.len() != b
        {
            return Err(ModelError::InvalidInput(format!(
                "{} sample lengths for a batch of {b}",
                l.len()
            )));
        }
        let device = batch.waveform.device();

        // Conv features [B, C, T], gradient-scaled.
        let features = grad_multiply(
            self.hubert.extract_conv_features(batch.waveform.clone()),
            p.feature_grad_mult,
        );
        let [_, c, t_full] = features.dims();
        let max_label_len = batch.labels.iter().map(Vec::len).max().unwrap_or(0);
        let (t, label_idx) = align_labels(t_full, max_label_len, self.feat2tar_ratio());
        if t == 0 {
            return Err(ModelError::InvalidInput(
                "no frame left after label alignment".into(),
            ));
        }
        let features = if t < t_full {
            features.narrow(2, 0, t)
        } else {
            features
        };
        let features_pen = features.clone().square().mean();
        let features = features.swap_dims(1, 2); // [B, T, C]
        debug_assert_eq!(features.dims(), [b, t, c]);

        // Valid frames per utterance: not padded and with a label.
        let frame_lens: Option<Vec<usize>> = batch
            .sample_lengths
            .as_ref()
            .map(|l| l.iter().map(|&s| cfg.num_frames(s).min(t)).collect());
        let padding = frame_lens.as_ref().map(|l| {
            let data: Vec<bool> = l
                .iter()
                .flat_map(|&v| (0..t).map(move |i| i >= v))
                .collect();
            Tensor::<2, Bool>::from_data(TensorData::new(data, [b, t]), &device)
        });
        let mask = make_mask(b, t, frame_lens.as_deref());
        if mask.len() != b || mask.iter().any(|r| r.len() != t) {
            return Err(ModelError::InvalidInput(format!(
                "mask function must return {b} rows of {t} frames"
            )));
        }

        // Host-side targets and selection weights.
        let mut targets = vec![0i64; b * t];
        let mut sel_m = vec![0f32; b * t];
        let mut sel_u = vec![0f32; b * t];
        for bi in 0..b {
            let valid = frame_lens.as_ref().map_or(t, |l| l[bi]);
            for ti in 0..t {
                let li = label_idx[ti];
                if ti >= valid || li >= batch.labels[bi].len() {
                    continue;
                }
                let lab = batch.labels[bi][li] as usize;
                if lab >= p.num_classes {
                    return Err(ModelError::InvalidInput(format!(
                        "label {lab} of utterance {bi} is >= num_classes {} (pretraining.vocab_size must be at least the k-means k)",
                        p.num_classes
                    )));
                }
                targets[bi * t + ti] = lab as i64;
                if mask[bi][ti] {
                    sel_m[bi * t + ti] = 1.0;
                } else {
                    sel_u[bi * t + ti] = 1.0;
                }
            }
        }
        let count_masked = sel_m.iter().filter(|&&v| v > 0.0).count();
        let count_unmasked = sel_u.iter().filter(|&&v| v > 0.0).count();

        let out: HubertOutput = self.hubert.forward_from_features(
            features,
            padding,
            Some(mask_to_tensor(&mask, &device)),
        )?;
        let h = cfg.hidden_size;
        let logits = self.logits(out.last_hidden_state.clone().reshape([b * t, h])); // [N, K]
        let target_t =
            Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [b * t]), &device);
        let ce = -log_softmax(logits.clone(), 1)
            .gather(1, target_t.reshape([b * t, 1]))
            .reshape([b * t]);
        let sel_m_t = Tensor::<1>::from_data(TensorData::new(sel_m.clone(), [b * t]), &device);
        let sel_u_t = Tensor::<1>::from_data(TensorData::new(sel_u.clone(), [b * t]), &device);
        let loss_m_sum = (ce.clone() * sel_m_t).sum();
        let loss_u_sum = (ce * sel_u_t).sum();

        let mut sample_size = 0;
        if p.pred_masked_weight > 0.0 {
            sample_size += count_masked;
        }
        if p.pred_nomask_weight > 0.0 {
            sample_size += count_unmasked;
        }
        let norm = sample_size.max(1) as f64;
        let loss = (loss_m_sum.clone() * p.pred_masked_weight
            + loss_u_sum.clone() * p.pred_nomask_weight)
            / norm
            + features_pen.clone() * p.feature_pen_weight;

        // Statistics (host).
        let scalar = |x: Tensor<1>| -> f64 {
            x.detach()
                .into_data()
                .try_into_vec_as::<f64>()
                .expect("f64 data")[0]
        };
        let pred: Vec<i64> = logits
            .detach()
            .argmax(1)
            .reshape([b * t])
            .into_data()
            .try_into_vec_as::<i64>()
            .expect("int data");
        let (mut correct_masked, mut correct_unmasked) = (0, 0);
        for i in 0..b * t {
            let ok = pred[i] == targets[i];
            if sel_m[i] > 0.0 && ok {
                correct_masked += 1;
            }
            if sel_u[i] > 0.0 && ok {
                correct_unmasked += 1;
            }
        }
        let stats = PretrainOutput {
            loss,
            loss_masked: scalar(loss_m_sum) / count_masked.max(1) as f64,
            loss_unmasked: scalar(loss_u_sum) / count_unmasked.max(1) as f64,
            features_pen: scalar(features_pen),
            sample_size,
            correct_masked,
            count_masked,
            correct_unmasked,
            count_unmasked,
        };
        Ok((stats, out))
    }

    /// Export the encoder as a HF `HubertModel` directory (see [`HubertModel::save_hf`]) and the
    /// head separately as `pretraining_head.safetensors` + `pretraining_config.json`, which
    /// `from_pretrained` ignores.
    pub fn save_hf(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        self.hubert.save_hf(dir)?;
        let head = HeadOnly {
            final_proj: self.final_proj.clone(),
            label_embs_concat: self.label_embs_concat.clone(),
        };
        save_checkpoint(
            &head,
            dir.join("pretraining_head.safetensors"),
            Default::default(),
        )?;
        write_atomic(
            &dir.join("pretraining_config.json"),
            serde_json::to_string_pretty(&self.pretrain)?.as_bytes(),
        )
    }

    /// Load a directory written by [`Self::save_hf`].
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let hubert = HubertModel::from_hf_dir(dir, device)?;
        let path = dir.join("pretraining_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let pretrain: PretrainConfig = serde_json::from_str(&text)?;
        let model = Self::with_encoder(hubert, &pretrain, 0)?;
        let head = HeadOnly {
            final_proj: model.final_proj,
            label_embs_concat: model.label_embs_concat,
        };
        let (head, _) = load_checkpoint(head, dir.join("pretraining_head.safetensors"))?;
        Ok(Self {
            hubert: model.hubert,
            final_proj: head.final_proj,
            label_embs_concat: head.label_embs_concat,
            pretrain,
        })
    }

    /// Save every parameter (encoder and head, by module path, e.g. `hubert.encoder...`,
    /// `final_proj.weight`) to one safetensors file; the encoder and head configs are stored in
    /// its metadata (`hubert_config`, `pretrain_config`).
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let meta = [
            ("format".to_string(), "fedhubert".to_string()),
            ("hubert_config".to_string(), self.hubert.config.to_json()?),
            (
                "pretrain_config".to_string(),
                serde_json::to_string(&self.pretrain)?,
            ),
        ]
        .into_iter()
        .collect();
        save_checkpoint(self, path, meta)
    }

    /// Rebuild a model from a file written by [`Self::save_checkpoint`].
    pub fn load_checkpoint(path: impl AsRef<Path>, device: &Device) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let (_, meta) = crate::hf::read_safetensors(path)?;
        let get = |k: &str| {
            meta.get(k).ok_or_else(|| {
                ModelError::InvalidInput(format!("{}: no `{k}` in metadata", path.display()))
            })
        };
        let cfg = HubertConfig::from_json_str(get("hubert_config")?)?;
        let pretrain: PretrainConfig = serde_json::from_str(get("pretrain_config")?)?;
        let model = Self::new(&cfg, &pretrain, 0, device)?;
        Ok(load_checkpoint(model, path)?.0)
    }
}

/// The head half of fairseq `HubertModel`, for export: no single reference class, its
/// `final_proj` and `label_embs_concat` fields (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/models/hubert/hubert.py:L313-L319, L326).
#[derive(Module, Debug)]
struct HeadOnly {
    final_proj: Linear,
    label_embs_concat: Option<Param<Tensor<2>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_alignment_matches_fairseq() {
        // 100 Hz labels, 50 Hz frames: ratio 2, every other label.
        let (t, idx) = align_labels(49, 100, 2.0);
        assert_eq!(t, 49);
        assert_eq!(&idx[..4], &[0, 2, 4, 6]);
        assert_eq!(idx[48], 96);
        // Too few labels: trim frames to int(98 / 2) = 49 -> with 97 labels, 48 frames.
        let (t, idx) = align_labels(49, 97, 2.0);
        assert_eq!(t, 48);
        assert_eq!(*idx.last().unwrap(), 94);
        // 50 Hz labels: identity, trimmed to the label count.
        let (t, idx) = align_labels(49, 47, 1.0);
        assert_eq!(t, 47);
        assert_eq!(idx, (0..47).collect::<Vec<_>>());
        // No trimming when labels are longer.
        assert_eq!(align_labels(10, 50, 1.0).0, 10);
    }

    #[test]
    fn pretrain_config_validation() {
        PretrainConfig::default().validate().unwrap();
        let c = PretrainConfig {
            logit_temp: 0.0,
            ..Default::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ModelError::InvalidConfig {
                field: "logit_temp",
                ..
            })
        ));
    }
}
