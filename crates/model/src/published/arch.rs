//! The architecture of a published checkpoint: from its fairseq model config when it has one,
//! else from the shapes of its tensors.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::names::parse_conv_layers;
use crate::config::{FeatExtractNorm, HubertConfig};

/// The fields of fairseq's `HubertConfig` that decide the architecture, with fairseq's
/// defaults (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:
/// L37-L160): a checkpoint's `cfg["model"]`, or s3prl's `model_cfg`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FairseqModelCfg {
    #[serde(rename = "_name")]
    pub name: Option<String>,
    pub extractor_mode: String,
    pub encoder_layers: usize,
    pub encoder_embed_dim: usize,
    pub encoder_ffn_embed_dim: usize,
    pub encoder_attention_heads: usize,
    pub activation_fn: String,
    pub layer_norm_first: bool,
    pub conv_feature_layers: String,
    pub conv_bias: bool,
    pub conv_pos: usize,
    pub conv_pos_groups: usize,
    /// Only in later fairseq (data2vec); HuBERT has one positional conv.
    pub pos_conv_depth: usize,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub activation_dropout: f64,
    pub encoder_layerdrop: f64,
    pub dropout_input: f64,
    pub mask_prob: f64,
    pub mask_length: usize,
    pub final_dim: usize,
    pub logit_temp: f64,
    pub feature_grad_mult: f64,
    pub untie_final_proj: bool,
    pub label_rate: Option<f64>,
}

impl Default for FairseqModelCfg {
    fn default() -> Self {
        Self {
            name: None,
            extractor_mode: "default".into(),
            encoder_layers: 12,
            encoder_embed_dim: 768,
            encoder_ffn_embed_dim: 3072,
            encoder_attention_heads: 12,
            activation_fn: "gelu".into(),
            layer_norm_first: false,
            conv_feature_layers: "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2".into(),
            conv_bias: false,
            conv_pos: 128,
            conv_pos_groups: 16,
            pos_conv_depth: 1,
            dropout: 0.1,
            attention_dropout: 0.1,
            activation_dropout: 0.0,
            encoder_layerdrop: 0.0,
            dropout_input: 0.0,
            mask_prob: 0.65,
            mask_length: 10,
            final_dim: 0,
            logit_temp: 0.1,
            feature_grad_mult: 1.0,
            untie_final_proj: false,
            label_rate: None,
        }
    }
}

impl FairseqModelCfg {
    /// The HF config of this model; `key` names where the config came from, for errors.
    pub fn to_hf(&self, key: &str) -> Result<HubertConfig, String> {
        let field = |f: &str, why: String| format!("{key}.{f}: {why}");
        if let Some(name) = self.name.as_deref().filter(|n| *n != "hubert") {
            return Err(field(
                "_name",
                format!(
                    "`{name}`; fedhubert reads pretrained HuBERT encoders (`hubert`), not \
                     fine-tuned or other fairseq models"
                ),
            ));
        }
        if self.activation_fn != "gelu" {
            return Err(field(
                "activation_fn",
                format!("`{}`; only `gelu` is supported", self.activation_fn),
            ));
        }
        if self.pos_conv_depth != 1 {
            return Err(field(
                "pos_conv_depth",
                format!(
                    "{}; HuBERT has one positional convolution",
                    self.pos_conv_depth
                ),
            ));
        }
        let feat_extract_norm = match self.extractor_mode.as_str() {
            "default" => FeatExtractNorm::Group,
            "layer_norm" => FeatExtractNorm::Layer,
            other => {
                return Err(field(
                    "extractor_mode",
                    format!("`{other}`, expected `default` or `layer_norm`"),
                ));
            }
        };
        let conv = parse_conv_layers(&self.conv_feature_layers)
            .map_err(|e| field("conv_feature_layers", e))?;
        Ok(HubertConfig {
            hidden_size: self.encoder_embed_dim,
            num_hidden_layers: self.encoder_layers,
            num_attention_heads: self.encoder_attention_heads,
            intermediate_size: self.encoder_ffn_embed_dim,
            conv_dim: conv.iter().map(|c| c.0).collect(),
            conv_kernel: conv.iter().map(|c| c.1).collect(),
            conv_stride: conv.iter().map(|c| c.2).collect(),
            num_feat_extract_layers: conv.len(),
            conv_bias: self.conv_bias,
            feat_extract_norm,
            num_conv_pos_embeddings: self.conv_pos,
            num_conv_pos_embedding_groups: self.conv_pos_groups,
            do_stable_layer_norm: self.layer_norm_first,
            hidden_dropout: self.dropout,
            attention_dropout: self.attention_dropout,
            activation_dropout: self.activation_dropout,
            feat_proj_dropout: self.dropout_input,
            layerdrop: self.encoder_layerdrop,
            mask_time_prob: self.mask_prob,
            mask_time_length: self.mask_length,
            ..HubertConfig::default()
        })
    }
}

/// Attention heads of the published sizes, by width: Base 768/12, Large 1024/16,
/// X-Large 1280/16 (torchaudio 2.11, torchaudio/models/wav2vec2/model.py `hubert_base`,
/// `hubert_large`, `hubert_xlarge`); other widths take fairseq's 64-wide heads.
fn heads_for(hidden: usize) -> Option<usize> {
    match hidden {
        768 => Some(12),
        1024 | 1280 => Some(16),
        h if h % 64 == 0 => Some(h / 64),
        _ => None,
    }
}

/// The wav2vec 2.0 / HuBERT front-end's kernels and strides (fairseq's default
/// `conv_feature_layers`): a state dict holds the kernels, never the strides.
const STANDARD_KERNELS: [usize; 7] = [10, 3, 3, 3, 3, 2, 2];
const STANDARD_STRIDES: [usize; 7] = [5, 2, 2, 2, 2, 2, 2];

/// The architecture of a state dict that came without a config (torchaudio), from the
/// shapes of its HF-named encoder tensors. What the shapes cannot tell follows the published
/// models, and each such choice is said in `notes`: the number of heads ([`heads_for`]), the
/// conv strides (the standard front-end), and pre-LN exactly when the front-end is
/// layer-normed (Base is group-norm and post-LN, Large and X-Large layer-norm and pre-LN).
pub fn infer_from_shapes(
    shapes: &BTreeMap<String, Vec<usize>>,
    notes: &mut Vec<String>,
) -> Result<HubertConfig, String> {
    let shape = |k: &str| shapes.get(k).ok_or_else(|| format!("no tensor `{k}`"));
    let hidden = shape("encoder.layer_norm.weight")?[0];
    let layers = count_indexed(shapes, "encoder.layers.");
    let convs = count_indexed(shapes, "feature_extractor.conv_layers.");
    if layers == 0 || convs == 0 {
        return Err("no transformer layers or no conv layers".into());
    }
    let intermediate = shape("encoder.layers.0.feed_forward.intermediate_dense.weight")?[0];
    let mut conv_dim = Vec::new();
    let mut conv_kernel = Vec::new();
    for i in 0..convs {
        let w = shape(&format!("feature_extractor.conv_layers.{i}.conv.weight"))?;
        if w.len() != 3 {
            return Err(format!(
                "conv layer {i} weight has shape {w:?}, expected 3 dims"
            ));
        }
        conv_dim.push(w[0]);
        conv_kernel.push(w[2]);
    }
    if conv_kernel != STANDARD_KERNELS {
        return Err(format!(
            "conv kernels {conv_kernel:?} are not the standard {STANDARD_KERNELS:?}, and a state \
             dict does not hold the strides"
        ));
    }
    let heads = heads_for(hidden).ok_or_else(|| {
        format!("cannot tell the attention heads of a {hidden}-wide model from its shapes")
    })?;
    let pos = shape("encoder.pos_conv_embed.conv.parametrizations.weight.original1")?;
    let layer_normed = shapes.contains_key("feature_extractor.conv_layers.1.layer_norm.weight");
    notes.push(format!(
        "no config in the file: architecture from tensor shapes ({heads} heads of {}, strides \
         {STANDARD_STRIDES:?}, {})",
        hidden / heads,
        if layer_normed {
            "layer-norm front-end so pre-LN, as Large"
        } else {
            "group-norm front-end so post-LN, as Base"
        }
    ));
    Ok(HubertConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: intermediate,
        num_feat_extract_layers: convs,
        conv_dim,
        conv_kernel,
        conv_stride: STANDARD_STRIDES.to_vec(),
        conv_bias: shapes.contains_key("feature_extractor.conv_layers.0.conv.bias"),
        feat_extract_norm: if layer_normed {
            FeatExtractNorm::Layer
        } else {
            FeatExtractNorm::Group
        },
        do_stable_layer_norm: layer_normed,
        num_conv_pos_embeddings: pos[2],
        num_conv_pos_embedding_groups: hidden / pos[1].max(1),
        ..HubertConfig::default()
    })
}

/// How many `PREFIX{i}.` indices there are (0, 1, ... without a gap).
fn count_indexed(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> usize {
    (0..)
        .take_while(|i| {
            let p = format!("{prefix}{i}.");
            shapes
                .range(p.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&p))
        })
        .count()
}
