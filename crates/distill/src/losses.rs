//! Distillation losses and the student forward that feeds them and the masked-prediction loss
//! from one pass.

use burn::tensor::activation::{log_sigmoid, log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedhubert_model::{
    HubertForPretraining, MaskConfig, align_labels, compute_mask_indices, grad_multiply,
    mask_to_tensor,
};
use rand::Rng;

use crate::{DistillError, Result};

/// Output distillation: `KL(softmax(t/T) || softmax(s/T)) * T^2`, mean over frames.
/// `teacher`, `student`: logits `[N, K]`.
pub fn kl_loss(teacher: Tensor<2>, student: Tensor<2>, temperature: f64) -> Tensor<1> {
    let t = teacher / temperature;
    let p = softmax(t.clone(), 1);
    let logp = log_softmax(t, 1);
    let logq = log_softmax(student / temperature, 1);
    (p * (logp - logq)).sum_dim(1).mean() * (temperature * temperature)
}

/// Feature distillation: mean squared error.
pub fn mse_loss(pred: Tensor<3>, target: Tensor<3>) -> Tensor<1> {
    (pred - target).square().mean()
}

/// DistilHuBERT: `(L1 mean, mean(-log sigmoid(cos(pred, target))))` over frames, `[B, T, H]`.
pub fn distilhubert_loss(pred: Tensor<3>, target: Tensor<3>) -> (Tensor<1>, Tensor<1>) {
    let l1 = (pred.clone() - target.clone()).abs().mean();
    let dot = (pred.clone() * target.clone()).sum_dim(2);
    let np = pred.square().sum_dim(2).sqrt();
    let nt = target.square().sum_dim(2).sqrt();
    let cos = dot / (np * nt).clamp_min(1e-8);
    let sim = -log_sigmoid(cos).mean();
    (l1, sim)
}

/// Codebook prediction: mean over frames and codebooks of the cross-entropy of `logits
/// [N, B * 256]` against `codes` (`N * B` bytes, frame-major). Returns (loss, correct, count).
pub fn codebook_ce(
    logits: Tensor<2>,
    codes: &[u8],
    num_codebooks: usize,
) -> Result<(Tensor<1>, usize, usize)> {
    let [n, k] = logits.dims();
    if k != num_codebooks * 256 || codes.len() != n * num_codebooks {
        return Err(DistillError::Data(format!(
            "codebook loss: logits [{n}, {k}] do not match {} codes of {num_codebooks} codebooks",
            codes.len()
        )));
    }
    let device = logits.device();
    let m = n * num_codebooks;
    let l = logits.reshape([m, 256]);
    let target: Vec<i64> = codes.iter().map(|&c| c as i64).collect();
    let tt = Tensor::<2, Int>::from_data(TensorData::new(target.clone(), [m, 1]), &device);
    let ce = -log_softmax(l.clone(), 1).gather(1, tt).mean();
    let pred: Vec<i64> = l
        .detach()
        .argmax(1)
        .reshape([m])
        .into_data()
        .try_into_vec_as::<i64>()
        .expect("int data");
    let correct = pred.iter().zip(&target).filter(|(a, b)| a == b).count();
    Ok((ce, correct, m))
}

/// What one student pass produced.
pub struct StudentPass {
    /// `hidden_states[0..=L]`, `[B, T, H]`.
    pub hidden_states: Vec<Tensor<3>>,
    pub last_hidden_state: Tensor<3>,
    /// Frames kept (label-aligned when masked prediction runs).
    pub frames: usize,
    /// Masked-prediction loss (normalised as fairseq, plus the feature penalty) when labels were used.
    pub mlm: Option<Tensor<1>>,
    pub correct_masked: usize,
    pub count_masked: usize,
}

/// One student forward on equal-length crops `[B, S]`. With `mlm`, fairseq span masking is drawn
/// from `rng`, frames are trimmed to the labels (as `forward_pretrain`) and the masked-prediction
/// loss is computed; without it the input is unmasked and every frame is kept. Distillation
/// losses use the same pass (so with `alpha < 1` the student sees masked input and predicts the
/// teacher's view of the clean audio).
pub fn student_pass<R: Rng + ?Sized>(
    model: &HubertForPretraining,
    wav: Tensor<2>,
    labels: &[Vec<u32>],
    mlm: bool,
    rng: &mut R,
) -> Result<StudentPass> {
    let cfg = &model.hubert.config;
    let p = &model.pretrain;
    let [b, _] = wav.dims();
    let device: Device = wav.device();
    let features = grad_multiply(model.hubert.extract_conv_features(wav), p.feature_grad_mult);
    let [_, _, t_full] = features.dims();
    if !mlm {
        let out = model
            .hubert
            .forward_from_features(features.swap_dims(1, 2), None, None)?;
        return Ok(StudentPass {
            hidden_states: out.hidden_states,
            last_hidden_state: out.last_hidden_state,
            frames: t_full,
            mlm: None,
            correct_masked: 0,
            count_masked: 0,
        });
    }
    if labels.len() != b || labels.iter().any(|l| l.is_empty()) {
        return Err(DistillError::Data("masked prediction needs labels for every utterance (alpha < 1): the data folder has no label shard; set distillation.alpha=1 or run `fedhubert kmeans` on it".into()));
    }
    let max_label_len = labels.iter().map(Vec::len).max().unwrap_or(0);
    let (t, label_idx) = align_labels(t_full, max_label_len, model.feat2tar_ratio());
    if t == 0 {
        return Err(DistillError::Data(
            "no frame left after label alignment".into(),
        ));
    }
    let features = if t < t_full {
        features.narrow(2, 0, t)
    } else {
        features
    };
    let features_pen = features.clone().square().mean();
    let mask_cfg = MaskConfig {
        require_same_masks: p.require_same_masks,
        ..MaskConfig::from_config(cfg)
    };
    let mask = compute_mask_indices(b, t, None, &mask_cfg, rng);
    let mut targets = vec![0i64; b * t];
    let mut sel_m = vec![0f32; b * t];
    let mut sel_u = vec![0f32; b * t];
    for bi in 0..b {
        for ti in 0..t {
            let li = label_idx[ti];
            if li >= labels[bi].len() {
                continue;
            }
            let lab = labels[bi][li] as usize;
            if lab >= p.num_classes {
                return Err(DistillError::Data(format!(
                    "label {lab} is >= the student's num_classes {} (pretraining.vocab_size)",
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
    let out = model.hubert.forward_from_features(
        features.swap_dims(1, 2),
        None,
        Some(mask_to_tensor(&mask, &device)),
    )?;
    let h = cfg.hidden_size;
    let logits = model.logits(out.last_hidden_state.clone().reshape([b * t, h]));
    let tt = Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [b * t, 1]), &device);
    let ce = -log_softmax(logits.clone(), 1)
        .gather(1, tt)
        .reshape([b * t]);
    let sm = Tensor::<1>::from_data(TensorData::new(sel_m.clone(), [b * t]), &device);
    let su = Tensor::<1>::from_data(TensorData::new(sel_u, [b * t]), &device);
    let mut sample_size = 0;
    if p.pred_masked_weight > 0.0 {
        sample_size += count_masked;
    }
    if p.pred_nomask_weight > 0.0 {
        sample_size += count_unmasked;
    }
    let loss = ((ce.clone() * sm).sum() * p.pred_masked_weight
        + (ce * su).sum() * p.pred_nomask_weight)
        / sample_size.max(1) as f64
        + features_pen * p.feature_pen_weight;
    let pred: Vec<i64> = logits
        .detach()
        .argmax(1)
        .reshape([b * t])
        .into_data()
        .try_into_vec_as::<i64>()
        .expect("int data");
    let correct_masked = (0..b * t)
        .filter(|&i| sel_m[i] > 0.0 && pred[i] == targets[i])
        .count();
    Ok(StudentPass {
        hidden_states: out.hidden_states,
        last_hidden_state: out.last_hidden_state,
        frames: t,
        mlm: Some(loss),
        correct_masked,
        count_masked,
    })
}
