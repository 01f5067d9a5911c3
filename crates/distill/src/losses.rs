//! Distillation losses and the student forward that feeds them and the masked-prediction loss
//! from one pass.

use burn::tensor::activation::{log_sigmoid, log_softmax, softmax};
use burn::tensor::{Int, Tensor, TensorData};
use fedhubert_model::{
    HubertForPretraining, MaskConfig, PretrainBatch, compute_mask_indices, grad_multiply,
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
    let [b, _] = wav.dims();
    if !mlm {
        let features = grad_multiply(
            model.hubert.extract_conv_features(wav),
            model.pretrain.feature_grad_mult,
        );
        let [_, _, t_full] = features.dims();
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
    // The pretraining forward itself, so the student's masked-prediction loss is by construction
    // the one `fedhubert pretrain` optimises.
    let batch = PretrainBatch {
        waveform: wav,
        labels: labels.to_vec(),
        sample_lengths: None,
    };
    let mask_cfg = MaskConfig {
        require_same_masks: model.pretrain.require_same_masks,
        ..MaskConfig::from_config(&model.hubert.config)
    };
    let (stats, out) = model.forward_pretrain_full(&batch, |b, t, lens| {
        compute_mask_indices(b, t, lens, &mask_cfg, rng)
    })?;
    let [_, t, _] = out.last_hidden_state.dims();
    Ok(StudentPass {
        hidden_states: out.hidden_states,
        last_hidden_state: out.last_hidden_state,
        frames: t,
        mlm: Some(stats.loss),
        correct_masked: stats.correct_masked,
        count_masked: stats.count_masked,
    })
}
