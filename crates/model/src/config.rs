//! [`HubertConfig`]: the model hyper-parameters, with HuggingFace `HubertConfig` field names.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Normalisation used inside the convolutional feature extractor (`feat_extract_norm`).
///
/// HF `feat_extract_norm` (transformers v5.23.0,
/// src/transformers/models/hubert/configuration_hubert.py:L139), dispatched in
/// `HubertFeatureEncoder.__init__` (src/transformers/models/hubert/modeling_hubert.py:L187-L196);
/// fairseq `extractor_mode` "default" / "layer_norm" (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:L40).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatExtractNorm {
    /// GroupNorm(C groups, C channels) on the first conv layer only (HuBERT Base).
    Group,
    /// LayerNorm over channels after every conv layer (HuBERT Large / X-Large).
    Layer,
}

/// HuBERT hyper-parameters. Field names and defaults are those of HuggingFace
/// `transformers.HubertConfig`, so a HF `config.json` deserialises directly (unknown keys are
/// ignored, missing keys take HF's defaults) and [`HubertConfig::to_json`] writes a file that
/// `HubertModel.from_pretrained` accepts.
///
/// Mirrors `HubertConfig` (transformers v5.23.0,
/// src/transformers/models/hubert/configuration_hubert.py:L27; fields and defaults L124-L162).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HubertConfig {
    /// Always `"hubert"`.
    pub model_type: String,
    /// `["HubertModel"]` for exported checkpoints.
    pub architectures: Vec<String>,
    /// Transformer width.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Feed-forward inner size.
    pub intermediate_size: usize,
    /// Feed-forward activation (only `"gelu"`, the exact erf form, is supported).
    pub hidden_act: String,
    /// Activation of the conv front-end and positional conv (only `"gelu"`).
    pub feat_extract_activation: String,
    /// Output channels of each conv layer.
    pub conv_dim: Vec<usize>,
    /// Kernel size of each conv layer.
    pub conv_kernel: Vec<usize>,
    /// Stride of each conv layer.
    pub conv_stride: Vec<usize>,
    /// Whether the conv layers have a bias.
    pub conv_bias: bool,
    /// `"group"` or `"layer"`.
    pub feat_extract_norm: FeatExtractNorm,
    /// Number of conv layers (HF writes it; must equal `conv_dim.len()`).
    pub num_feat_extract_layers: usize,
    /// LayerNorm on the conv features before the projection.
    pub feat_proj_layer_norm: bool,
    /// Positional conv kernel size.
    pub num_conv_pos_embeddings: usize,
    /// Positional conv groups.
    pub num_conv_pos_embedding_groups: usize,
    /// BatchNorm in the positional conv (newer transformers); only `false` is supported.
    pub conv_pos_batch_norm: bool,
    /// `false`: post-LN (Base); `true`: pre-LN with the encoder LayerNorm at the end (Large).
    pub do_stable_layer_norm: bool,
    /// LayerNorm epsilon of the projection / encoder LayerNorms.
    pub layer_norm_eps: f64,
    /// Dropout on residual branches and after the positional embedding.
    pub hidden_dropout: f64,
    /// Dropout on the attention probabilities.
    pub attention_dropout: f64,
    /// Dropout after the feed-forward activation.
    pub activation_dropout: f64,
    /// Dropout after the feature projection (fairseq `dropout_input`).
    pub feat_proj_dropout: f64,
    /// HF fine-tuning head dropout (unused here, kept for round-trips).
    pub final_dropout: f64,
    /// Probability of skipping each transformer layer in training.
    pub layerdrop: f64,
    /// HF: whether masking is applied at all.
    pub apply_spec_augment: bool,
    /// Time-masking probability (fairseq `mask_prob`).
    pub mask_time_prob: f64,
    /// Time-masking span length.
    pub mask_time_length: usize,
    /// Minimum number of spans per utterance.
    pub mask_time_min_masks: usize,
    /// Feature-axis masking (unused here, kept for round-trips).
    pub mask_feature_prob: f64,
    /// Feature-axis masking span (unused here).
    pub mask_feature_length: usize,
    /// Feature-axis minimum masks (unused here).
    pub mask_feature_min_masks: usize,
    /// Std of the normal initialisation of linear layers.
    pub initializer_range: f64,
    /// HF CTC vocabulary size (unused by `HubertModel`).
    pub vocab_size: usize,
    /// HF token ids (unused by `HubertModel`).
    pub pad_token_id: i64,
    /// HF token ids (unused by `HubertModel`).
    pub bos_token_id: i64,
    /// HF token ids (unused by `HubertModel`).
    pub eos_token_id: i64,
}

impl Default for HubertConfig {
    /// HuggingFace `HubertConfig()` defaults (the Base architecture): transformers v5.23.0,
    /// src/transformers/models/hubert/configuration_hubert.py:L124-L162.
    fn default() -> Self {
        Self {
            model_type: "hubert".into(),
            architectures: vec!["HubertModel".into()],
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            feat_extract_activation: "gelu".into(),
            conv_dim: vec![512; 7],
            conv_kernel: vec![10, 3, 3, 3, 3, 2, 2],
            conv_stride: vec![5, 2, 2, 2, 2, 2, 2],
            conv_bias: false,
            feat_extract_norm: FeatExtractNorm::Group,
            num_feat_extract_layers: 7,
            feat_proj_layer_norm: true,
            num_conv_pos_embeddings: 128,
            num_conv_pos_embedding_groups: 16,
            conv_pos_batch_norm: false,
            do_stable_layer_norm: false,
            layer_norm_eps: 1e-5,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            activation_dropout: 0.1,
            feat_proj_dropout: 0.0,
            final_dropout: 0.1,
            layerdrop: 0.1,
            apply_spec_augment: true,
            mask_time_prob: 0.05,
            mask_time_length: 10,
            mask_time_min_masks: 2,
            mask_feature_prob: 0.0,
            mask_feature_length: 10,
            mask_feature_min_masks: 0,
            initializer_range: 0.02,
            vocab_size: 32,
            pad_token_id: 0,
            bos_token_id: 1,
            eos_token_id: 2,
        }
    }
}

impl HubertConfig {
    /// HuBERT Base (768/12/12/3072, group-norm extractor, post-LN) with the fairseq
    /// `hubert_base_librispeech` pretraining regularisation: dropout 0.1, attention 0.1,
    /// activation 0.0, input (feat_proj) 0.1, layerdrop 0.05, mask_prob 0.80, span 10, 2 min spans.
    ///
    /// fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
    /// examples/hubert/config/pretrain/hubert_base_librispeech.yaml:L65-L81 (span 10: default
    /// `mask_length`, fairseq/models/hubert/hubert.py:L131; 2 min spans: `apply_mask`, L354).
    pub fn base() -> Self {
        Self {
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            activation_dropout: 0.0,
            feat_proj_dropout: 0.1,
            layerdrop: 0.05,
            mask_time_prob: 0.8,
            mask_time_length: 10,
            mask_time_min_masks: 2,
            ..Self::default()
        }
    }

    /// Federated student: Base front-end and layout, 384 hidden, 3 layers, 6 heads, FFN 1536.
    pub fn student() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 3,
            num_attention_heads: 6,
            intermediate_size: 1536,
            ..Self::base()
        }
    }

    /// HuBERT Large (1024/24/16/4096, layer-norm extractor with conv bias, pre-LN).
    pub fn large() -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            feat_extract_norm: FeatExtractNorm::Layer,
            conv_bias: true,
            do_stable_layer_norm: true,
            ..Self::base()
        }
    }

    /// A tiny model for tests: 7 conv layers of 32 channels (same strides, 320x downsampling),
    /// hidden 48, 2 layers, 4 heads, FFN 96, positional conv kernel 16 / 4 groups, no dropout.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 96,
            conv_dim: vec![32; 7],
            num_conv_pos_embeddings: 16,
            num_conv_pos_embedding_groups: 4,
            hidden_dropout: 0.0,
            attention_dropout: 0.0,
            activation_dropout: 0.0,
            feat_proj_dropout: 0.0,
            final_dropout: 0.0,
            layerdrop: 0.0,
            ..Self::base()
        }
    }

    /// Parse a HF `config.json` string and validate it.
    pub fn from_json_str(json: &str) -> Result<Self, ModelError> {
        let mut cfg: Self = serde_json::from_str(json)?;
        // HF derives this from conv_dim; older files may omit it.
        if !json.contains("\"num_feat_extract_layers\"") {
            cfg.num_feat_extract_layers = cfg.conv_dim.len();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and validate a HF `config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| ModelError::File {
            path: path.to_path_buf(),
            why: format!("not a usable HuBERT config.json: {e}"),
        })
    }

    /// Serialise as a HF `config.json` (with `model_type` "hubert" and `architectures`
    /// ["HubertModel"]).
    pub fn to_json(&self) -> Result<String, ModelError> {
        let mut cfg = self.clone();
        cfg.model_type = "hubert".into();
        cfg.architectures = vec!["HubertModel".into()];
        cfg.num_feat_extract_layers = cfg.conv_dim.len();
        Ok(serde_json::to_string_pretty(&cfg)?)
    }

    /// Check the configuration for consistency; the error names the offending field.
    ///
    /// A superset of `HubertConfig.validate_architecture` (transformers v5.23.0,
    /// src/transformers/models/hubert/configuration_hubert.py:L168).
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad =
            |field: &'static str, reason: String| Err(ModelError::InvalidConfig { field, reason });
        if self.model_type != "hubert" {
            return bad(
                "model_type",
                format!("expected \"hubert\", got {:?}", self.model_type),
            );
        }
        if self.hidden_size == 0 {
            return bad("hidden_size", "must be > 0".into());
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        if self.intermediate_size == 0 {
            return bad("intermediate_size", "must be > 0".into());
        }
        if self.hidden_act != "gelu" {
            return bad(
                "hidden_act",
                format!("only \"gelu\" is supported, got {:?}", self.hidden_act),
            );
        }
        if self.feat_extract_activation != "gelu" {
            return bad(
                "feat_extract_activation",
                format!(
                    "only \"gelu\" is supported, got {:?}",
                    self.feat_extract_activation
                ),
            );
        }
        if self.conv_dim.is_empty() {
            return bad("conv_dim", "must have at least one layer".into());
        }
        if self.conv_kernel.len() != self.conv_dim.len() {
            return bad(
                "conv_kernel",
                format!(
                    "conv_kernel has {} entries but conv_dim has {}",
                    self.conv_kernel.len(),
                    self.conv_dim.len()
                ),
            );
        }
        if self.conv_stride.len() != self.conv_dim.len() {
            return bad(
                "conv_stride",
                format!(
                    "conv_stride has {} entries but conv_dim has {}",
                    self.conv_stride.len(),
                    self.conv_dim.len()
                ),
            );
        }
        if self.num_feat_extract_layers != self.conv_dim.len() {
            return bad(
                "num_feat_extract_layers",
                format!(
                    "is {} but conv_dim has {} entries",
                    self.num_feat_extract_layers,
                    self.conv_dim.len()
                ),
            );
        }
        if let Some(i) = self.conv_dim.iter().position(|&d| d == 0) {
            return bad("conv_dim", format!("entry {i} is 0"));
        }
        if let Some(i) = self.conv_kernel.iter().position(|&d| d == 0) {
            return bad("conv_kernel", format!("entry {i} is 0"));
        }
        if let Some(i) = self.conv_stride.iter().position(|&d| d == 0) {
            return bad("conv_stride", format!("entry {i} is 0"));
        }
        if self.num_conv_pos_embeddings == 0 {
            return bad("num_conv_pos_embeddings", "must be > 0".into());
        }
        if self.num_conv_pos_embedding_groups == 0
            || !self
                .hidden_size
                .is_multiple_of(self.num_conv_pos_embedding_groups)
        {
            return bad(
                "num_conv_pos_embedding_groups",
                format!(
                    "hidden_size {} is not divisible by num_conv_pos_embedding_groups {}",
                    self.hidden_size, self.num_conv_pos_embedding_groups
                ),
            );
        }
        if self.conv_pos_batch_norm {
            return bad(
                "conv_pos_batch_norm",
                "batch-norm positional conv is not supported".into(),
            );
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return bad(
                "layer_norm_eps",
                format!("must be > 0, got {}", self.layer_norm_eps),
            );
        }
        for (field, p) in [
            ("hidden_dropout", self.hidden_dropout),
            ("attention_dropout", self.attention_dropout),
            ("activation_dropout", self.activation_dropout),
            ("feat_proj_dropout", self.feat_proj_dropout),
            ("final_dropout", self.final_dropout),
            ("layerdrop", self.layerdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(field, format!("must be in [0, 1), got {p}"));
            }
        }
        if !(0.0..=1.0).contains(&self.mask_time_prob) {
            return bad(
                "mask_time_prob",
                format!("must be in [0, 1], got {}", self.mask_time_prob),
            );
        }
        if self.mask_time_length == 0 {
            return bad("mask_time_length", "must be > 0".into());
        }
        Ok(())
    }

    /// Number of output channels of the conv front-end (`conv_dim[-1]`).
    pub fn conv_out_dim(&self) -> usize {
        *self
            .conv_dim
            .last()
            .expect("validated: conv_dim is non-empty")
    }

    /// Total downsampling factor of the conv front-end (320 for HuBERT).
    ///
    /// HF `HubertConfig.inputs_to_logits_ratio` (transformers v5.23.0,
    /// src/transformers/models/hubert/configuration_hubert.py:L183).
    pub fn total_stride(&self) -> usize {
        self.conv_stride.iter().product()
    }

    /// The fewest input samples that give one frame: 400 (25 ms at 16 kHz) in every
    /// published HuBERT. Shorter audio has no frame at all, so every command refuses it.
    pub fn receptive_field(&self) -> usize {
        self.conv_kernel
            .iter()
            .zip(&self.conv_stride)
            .rev()
            .fold(1, |len, (&k, &s)| (len - 1) * s + k)
    }

    /// Number of frames the conv front-end produces for `num_samples` input samples
    /// (HF `_get_feat_extract_output_lengths`); 0 if the input is too short.
    ///
    /// `HubertPreTrainedModel._get_feat_extract_output_lengths` (transformers v5.23.0,
    /// src/transformers/models/hubert/modeling_hubert.py:L612).
    pub fn num_frames(&self, num_samples: usize) -> usize {
        let mut len = num_samples;
        for (&k, &s) in self.conv_kernel.iter().zip(&self.conv_stride) {
            if len < k {
                return 0;
            }
            len = (len - k) / s + 1;
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receptive_field_is_the_shortest_input_with_a_frame() {
        let c = HubertConfig::base();
        assert_eq!(c.receptive_field(), 400);
        assert_eq!(c.num_frames(399), 0);
        assert_eq!(c.num_frames(400), 1);
    }

    fn field_of(err: ModelError) -> &'static str {
        match err {
            ModelError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other}"),
        }
    }

    #[test]
    fn presets_validate() {
        for cfg in [
            HubertConfig::default(),
            HubertConfig::base(),
            HubertConfig::student(),
            HubertConfig::large(),
            HubertConfig::tiny(),
        ] {
            cfg.validate().unwrap();
        }
        let l = HubertConfig::large();
        assert_eq!(
            (
                l.hidden_size,
                l.num_hidden_layers,
                l.num_attention_heads,
                l.intermediate_size
            ),
            (1024, 24, 16, 4096)
        );
        assert!(l.do_stable_layer_norm);
        assert_eq!(l.feat_extract_norm, FeatExtractNorm::Layer);
        let s = HubertConfig::student();
        assert_eq!(
            (
                s.hidden_size,
                s.num_hidden_layers,
                s.num_attention_heads,
                s.intermediate_size
            ),
            (384, 3, 6, 1536)
        );
        assert_eq!(s.conv_dim, HubertConfig::base().conv_dim);
        assert_eq!(HubertConfig::base().total_stride(), 320);
    }

    #[test]
    fn default_matches_hf_base_config_json() {
        let text = include_str!("../../../assets/fixtures/hf_hubert_base_config.json");
        let cfg = HubertConfig::from_json_str(text).unwrap();
        assert_eq!(cfg, HubertConfig::default());
    }

    #[test]
    fn reads_tiny_fixture_configs() {
        let post = HubertConfig::from_json_str(include_str!(
            "../../../assets/fixtures/hf_hubert_tiny_postnorm/config.json"
        ))
        .unwrap();
        assert_eq!(post.hidden_size, 48);
        assert_eq!(post.feat_extract_norm, FeatExtractNorm::Group);
        assert!(!post.do_stable_layer_norm);
        let pre = HubertConfig::from_json_str(include_str!(
            "../../../assets/fixtures/hf_hubert_tiny_prenorm/config.json"
        ))
        .unwrap();
        assert_eq!(pre.feat_extract_norm, FeatExtractNorm::Layer);
        assert!(pre.do_stable_layer_norm && pre.conv_bias);
    }

    #[test]
    fn json_round_trip_and_hf_identity() {
        let cfg = HubertConfig::student();
        let json = cfg.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["model_type"], "hubert");
        assert_eq!(v["architectures"][0], "HubertModel");
        assert_eq!(v["feat_extract_norm"], "group");
        assert_eq!(v["num_feat_extract_layers"], 7);
        assert_eq!(HubertConfig::from_json_str(&json).unwrap(), cfg);
    }

    #[test]
    fn unknown_keys_ignored_missing_keys_default() {
        let cfg = HubertConfig::from_json_str(r#"{"model_type":"hubert","hidden_size":96,"num_attention_heads":4,"num_conv_pos_embedding_groups":4,"foo":[1,2]}"#).unwrap();
        assert_eq!(cfg.hidden_size, 96);
        assert_eq!(cfg.num_hidden_layers, 12);
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = HubertConfig::tiny();
        c.num_attention_heads = 5;
        assert_eq!(field_of(c.validate().unwrap_err()), "num_attention_heads");

        let mut c = HubertConfig::tiny();
        c.conv_kernel.pop();
        assert_eq!(field_of(c.validate().unwrap_err()), "conv_kernel");

        let mut c = HubertConfig::tiny();
        c.conv_stride.push(2);
        assert_eq!(field_of(c.validate().unwrap_err()), "conv_stride");

        let mut c = HubertConfig::tiny();
        c.num_conv_pos_embedding_groups = 5;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "num_conv_pos_embedding_groups"
        );

        let mut c = HubertConfig::tiny();
        c.layerdrop = 1.5;
        assert_eq!(field_of(c.validate().unwrap_err()), "layerdrop");

        let err = HubertConfig::from_json_str(r#"{"feat_extract_norm":"batch"}"#).unwrap_err();
        assert!(matches!(err, ModelError::Json(_)), "{err}");
        let err = HubertConfig::from_json_str(r#"{"model_type":"wav2vec2"}"#).unwrap_err();
        assert_eq!(field_of(err), "model_type");
    }

    #[test]
    fn frame_count_matches_hf_formula() {
        let c = HubertConfig::base();
        assert_eq!(c.num_frames(16000), 49);
        assert_eq!(c.num_frames(400), 1);
        assert_eq!(c.num_frames(399), 0);
        assert_eq!(c.num_frames(32000), 99);
    }
}
