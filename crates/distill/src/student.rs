//! The student and its distillation-only modules, the DistilHuBERT-style initialisation from the
//! teacher, and the closed-form parameter count of a HuBERT configuration.

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::tensor::Device;
use fedhubert_model::nn::{Init, Linear};
use fedhubert_model::{
    FeatExtractNorm, HostTensor, HubertConfig, HubertForPretraining, Weights, collect_tensors,
    load_tensors,
};

use crate::config::LayerPlan;
use crate::{Result, cfg_err};

/// The student plus the modules that only distillation uses: the feature projections (one per
/// feature pair, `Linear(H_s -> H_t)`, only when the widths differ), the DistilHuBERT prediction
/// heads (`Linear(H_s -> H_t)` per teacher layer) and the MVQ head (`Linear(H_s -> B * 256)`).
/// Parameter names: `student.*` (the exported model's own names behind the prefix), `feat_proj.N.*`,
/// `pred_heads.N.*`, `mvq_head.*`.
#[derive(Module, Debug)]
pub struct DistillStudent {
    pub student: HubertForPretraining,
    pub feat_proj: Vec<Linear>,
    pub pred_heads: Vec<Linear>,
    pub mvq_head: Option<Linear>,
}

/// Prefix of the student's own parameters inside [`DistillStudent`].
pub const STUDENT_PREFIX: &str = "student.";

fn torch_linear(init: &mut Init, d_in: usize, d_out: usize) -> Linear {
    let bound = 1.0 / (d_in as f64).sqrt();
    Linear {
        weight: Param::from_tensor(init.uniform([d_out, d_in], -bound, bound)),
        bias: Some(Param::from_tensor(init.uniform([d_out], -bound, bound))),
    }
}

impl DistillStudent {
    /// Adds the distillation modules the plan needs: projections when `h_s != h_t` and
    /// `with_features`, prediction heads when `with_pred`, an MVQ head of `mvq_codebooks * 256`
    /// outputs when given.
    pub fn new(
        student: HubertForPretraining,
        teacher_hidden: usize,
        plan: &LayerPlan,
        with_features: bool,
        with_pred: bool,
        mvq_codebooks: Option<usize>,
        seed: u64,
    ) -> Self {
        let device = student.hubert.masked_spec_embed.device();
        let mut init = Init::new(seed ^ 0x0D15_7111, &device);
        let h = student.hubert.config.hidden_size;
        let feat_proj = if with_features && h != teacher_hidden {
            plan.feature
                .iter()
                .map(|_| torch_linear(&mut init, h, teacher_hidden))
                .collect()
        } else {
            vec![]
        };
        let pred_heads = if with_pred {
            plan.pred
                .iter()
                .map(|_| torch_linear(&mut init, h, teacher_hidden))
                .collect()
        } else {
            vec![]
        };
        let mvq_head = mvq_codebooks.map(|b| torch_linear(&mut init, h, b * 256));
        Self {
            student,
            feat_proj,
            pred_heads,
            mvq_head,
        }
    }

    /// Every parameter by name (`student.*`, heads).
    pub fn weights(&self) -> fedhubert_fl::Weights {
        collect_tensors(self)
    }

    /// The student's own parameters, with its own names (what the exported model holds).
    pub fn student_weights(&self) -> fedhubert_fl::Weights {
        collect_tensors(&self.student)
    }

    /// The distillation-only parameters.
    pub fn aux_weights(&self) -> fedhubert_fl::Weights {
        self.weights().filter(|n| !n.starts_with(STUDENT_PREFIX))
    }

    /// Replaces every parameter (strict).
    pub fn set_weights(self, w: &fedhubert_fl::Weights) -> Result<Self> {
        Ok(load_tensors(self, w.clone())?)
    }

    /// Replaces the student's parameters (its own names) and, when given, the auxiliary ones.
    pub fn set_parts(
        self,
        student: &fedhubert_fl::Weights,
        aux: Option<&fedhubert_fl::Weights>,
    ) -> Result<Self> {
        let mut all: Weights = student
            .tensors
            .iter()
            .map(|t| HostTensor {
                name: format!("{STUDENT_PREFIX}{}", t.name),
                ..t.clone()
            })
            .collect();
        match aux {
            Some(a) => all.tensors.extend(a.tensors.iter().cloned()),
            None => all.tensors.extend(self.aux_weights().tensors),
        }
        Ok(load_tensors(self, all)?)
    }

    pub fn num_student_params(&self) -> usize {
        self.student_weights().num_params()
    }
}

/// Which parameter groups [`init_from_teacher`] copied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InitReport {
    pub copied: Vec<String>,
    pub skipped_shape: Vec<String>,
}

/// DistilHuBERT initialisation: copy the teacher's conv front-end, feature projection, masked
/// embedding, positional conv, encoder LayerNorm and its first `layers` transformer layers into
/// the student, tensor by tensor where the shapes match (a width mismatch skips that tensor and is
/// reported). Errors when nothing at all could be copied.
pub fn init_from_teacher(
    student: HubertForPretraining,
    teacher: &HubertForPretraining,
    layers: usize,
) -> Result<(HubertForPretraining, InitReport)> {
    let n_s = student.hubert.config.num_hidden_layers;
    let n_t = teacher.hubert.config.num_hidden_layers;
    if layers > n_s.min(n_t) {
        return Err(cfg_err(format!(
            "distillation.init_layers: {layers} exceeds min(student layers {n_s}, teacher layers {n_t})"
        )));
    }
    let by_name = |w: Weights| -> HashMap<String, HostTensor> {
        w.tensors.into_iter().map(|t| (t.name.clone(), t)).collect()
    };
    let theirs = by_name(collect_tensors(&teacher.hubert));
    let mut mine = by_name(collect_tensors(&student));
    let mut rep = InitReport::default();
    let wanted = |name: &str| -> bool {
        let shared = [
            "feature_extractor.",
            "feature_projection.",
            "masked_spec_embed",
            "encoder.pos_conv_embed.",
            "encoder.layer_norm.",
        ];
        if shared.iter().any(|p| name.starts_with(p)) {
            return true;
        }
        if let Some(rest) = name.strip_prefix("encoder.layers.")
            && let Some(idx) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok())
        {
            return idx < layers;
        }
        false
    };
    for (name, t) in &theirs {
        if !wanted(name) {
            continue;
        }
        let key = format!("hubert.{name}");
        match mine.get_mut(&key) {
            Some(m) if m.shape == t.shape => {
                m.data.clone_from(&t.data);
                rep.copied.push(name.clone());
            }
            _ => rep.skipped_shape.push(name.clone()),
        }
    }
    if rep.copied.is_empty() {
        return Err(cfg_err(
            "distillation.student_init: teacher and student share no tensor shape (conv front-end differs); use student_init: random",
        ));
    }
    rep.copied.sort();
    rep.skipped_shape.sort();
    Ok((load_tensors(student, mine.into_values().collect())?, rep))
}

/// Parameters of a `HubertModel` with this configuration, from the architecture alone:
/// conv front-end, feature projection, masked embedding, positional conv (weight-norm g and v),
/// encoder LayerNorm and `L` transformer layers (4 attention projections, 2 LayerNorms, FFN).
pub fn hubert_param_count(c: &HubertConfig) -> usize {
    let mut n = 0;
    let mut c_in = 1;
    for i in 0..c.conv_dim.len() {
        let c_out = c.conv_dim[i];
        n += c_out * c_in * c.conv_kernel[i] + if c.conv_bias { c_out } else { 0 };
        let has_norm = match c.feat_extract_norm {
            FeatExtractNorm::Group => i == 0,
            FeatExtractNorm::Layer => true,
        };
        if has_norm {
            n += 2 * c_out;
        }
        c_in = c_out;
    }
    let (h, f) = (c.hidden_size, c.intermediate_size);
    if c.feat_proj_layer_norm {
        n += 2 * c_in;
    }
    n += c_in * h + h; // projection
    n += h; // masked_spec_embed
    let k = c.num_conv_pos_embeddings;
    n += h + k + h * (h / c.num_conv_pos_embedding_groups) * k; // bias, g [1,1,K], v [H, H/G, K]
    n += 2 * h; // encoder LayerNorm
    let layer = 4 * (h * h + h) + 2 * (2 * h) + (h * f + f) + (f * h + h);
    n + c.num_hidden_layers * layer
}

/// Builds a student `HubertForPretraining` on `device`.
pub fn new_student(
    cfg: &HubertConfig,
    pre: &fedhubert_model::PretrainConfig,
    seed: u64,
    device: &Device,
) -> Result<HubertForPretraining> {
    Ok(HubertForPretraining::new(cfg, pre, seed, device)?)
}
