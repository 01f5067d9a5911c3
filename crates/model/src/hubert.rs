//! [`HubertModel`]: the HuggingFace `HubertModel` (no heads), whose parameter paths are exactly
//! HF's state-dict keys.

use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::config::HubertConfig;
use crate::encoder::HubertEncoder;
use crate::error::ModelError;
use crate::feature_extractor::{HubertFeatureEncoder, HubertFeatureProjection};
use crate::nn::Init;

/// Outputs of [`HubertModel::forward`].
///
/// Corresponds to the `BaseModelOutput` that `HubertModel.forward` returns (transformers
/// v5.23.0, src/transformers/models/hubert/modeling_hubert.py:L893), plus its local
/// `extract_features` (L870) and the frame mask of `_get_feature_vector_attention_mask` (L627).
#[derive(Debug, Clone)]
pub struct HubertOutput {
    /// Conv front-end output, `[B, T, C]` (C = `conv_dim[-1]`, 512 for Base).
    pub extract_features: Tensor<3>,
    /// HF `hidden_states` (`num_hidden_layers + 1` entries of `[B, T, H]`): entry 0 is the
    /// input of the first layer; the last is the last layer's output (before the final
    /// LayerNorm in the stable / pre-LN layout).
    pub hidden_states: Vec<Tensor<3>>,
    /// HF `last_hidden_state` `[B, T, H]`.
    pub last_hidden_state: Tensor<3>,
    /// Frame padding mask `[B, T]` (true = padded), when sample lengths were given.
    pub padding_mask: Option<Tensor<2, Bool>>,
}

/// HuBERT encoder: conv front-end, feature projection, optional masking with
/// `masked_spec_embed`, transformer encoder.
///
/// Mirrors `HubertModel` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L760); fairseq `HubertModel` without
/// `final_proj` / `label_embs_concat` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/models/hubert/hubert.py:L248).
#[derive(Module, Debug)]
pub struct HubertModel {
    /// HF `masked_spec_embed` `[H]` (fairseq `mask_emb`).
    pub masked_spec_embed: Param<Tensor<1>>,
    /// Conv front-end.
    pub feature_extractor: HubertFeatureEncoder,
    /// LayerNorm + projection + dropout.
    pub feature_projection: HubertFeatureProjection,
    /// Transformer.
    pub encoder: HubertEncoder,
    /// The configuration this model was built from.
    #[module(skip)]
    pub config: HubertConfig,
}

impl HubertModel {
    /// A freshly initialised model (HF-style init, deterministic in `seed`) on `device`.
    ///
    /// HF init: `HubertPreTrainedModel._init_weights` (transformers v5.23.0,
    /// src/transformers/models/hubert/modeling_hubert.py:L587); `masked_spec_embed` U(0, 1)
    /// as at L769.
    pub fn new(config: &HubertConfig, seed: u64, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let mut init = Init::new(seed, device);
        let feature_extractor = HubertFeatureEncoder::new(config, &mut init);
        let feature_projection = HubertFeatureProjection::new(config, &mut init);
        let encoder = HubertEncoder::new(config, &mut init);
        let masked_spec_embed = Param::from_tensor(init.uniform([config.hidden_size], 0.0, 1.0));
        Ok(Self {
            masked_spec_embed,
            feature_extractor,
            feature_projection,
            encoder,
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HubertConfig {
        &self.config
    }

    /// Frame padding mask `[B, T]` (true = padded) for per-utterance sample lengths, using HF's
    /// conv output-length formula.
    ///
    /// The negation of `HubertPreTrainedModel._get_feature_vector_attention_mask` (transformers
    /// v5.23.0, src/transformers/models/hubert/modeling_hubert.py:L627).
    pub fn frame_padding_mask(
        &self,
        sample_lengths: &[usize],
        num_frames: usize,
        device: &Device,
    ) -> Tensor<2, Bool> {
        let b = sample_lengths.len();
        let mut data = Vec::with_capacity(b * num_frames);
        for &len in sample_lengths {
            let valid = self.config.num_frames(len).min(num_frames);
            data.extend((0..num_frames).map(|t| t >= valid));
        }
        Tensor::from_data(TensorData::new(data, [b, num_frames]), device)
    }

    /// Conv front-end: waveform `[B, S]` to `[B, C, T]` (channels first, as fairseq).
    ///
    /// fairseq `HubertModel.forward_features` without the gradient scaling (fairseq
    /// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:L396).
    pub fn extract_conv_features(&self, waveform: Tensor<2>) -> Tensor<3> {
        self.feature_extractor.forward(waveform)
    }

    /// Everything after the conv front-end: `features [B, T, C]` to encoder outputs.
    /// `mask [B, T]` (true = replace by `masked_spec_embed`) and `padding [B, T]` (true = padded
    /// frame) are optional.
    ///
    /// `HubertModel.forward` after `feature_extractor`, with `_mask_hidden_states` given
    /// `mask_time_indices` (transformers v5.23.0,
    /// src/transformers/models/hubert/modeling_hubert.py:L828, L779).
    pub fn forward_from_features(
        &self,
        features: Tensor<3>,
        padding: Option<Tensor<2, Bool>>,
        mask: Option<Tensor<2, Bool>>,
    ) -> Result<HubertOutput, ModelError> {
        let [b, t, _] = features.dims();
        let h = self.config.hidden_size;
        for (name, m) in [("mask", &mask), ("padding", &padding)] {
            if let Some(m) = m
                && m.dims() != [b, t]
            {
                return Err(ModelError::InvalidInput(format!(
                    "{name} has shape {:?}, expected [{b}, {t}]",
                    m.dims()
                )));
            }
        }
        let x = self.feature_projection.forward(features.clone());
        let x = match mask {
            Some(m) => {
                let m = m.unsqueeze_dim::<3>(2).expand([b, t, h]);
                let emb = self
                    .masked_spec_embed
                    .val()
                    .reshape([1, 1, h])
                    .expand([b, t, h]);
                x.mask_where(m, emb)
            }
            None => x,
        };
        let enc = self.encoder.forward(x, padding.as_ref());
        Ok(HubertOutput {
            extract_features: features,
            hidden_states: enc.hidden_states,
            last_hidden_state: enc.last_hidden_state,
            padding_mask: padding,
        })
    }

    /// Full forward pass on a waveform batch `[B, S]`.
    ///
    /// `sample_lengths` (one per utterance, in samples) builds a frame padding mask used as
    /// attention key mask (HF `attention_mask`); `mask [B, T]` replaces the projected features
    /// of the true frames by `masked_spec_embed`. Dropout and LayerDrop act only in training
    /// (module not `valid()` and tensors on an autodiff device).
    ///
    /// Mirrors `HubertModel.forward` (transformers v5.23.0,
    /// src/transformers/models/hubert/modeling_hubert.py:L828).
    pub fn forward(
        &self,
        waveform: Tensor<2>,
        sample_lengths: Option<&[usize]>,
        mask: Option<Tensor<2, Bool>>,
    ) -> Result<HubertOutput, ModelError> {
        let [b, _] = waveform.dims();
        if let Some(l) = sample_lengths
            && l.len() != b
        {
            return Err(ModelError::InvalidInput(format!(
                "{} sample lengths for a batch of {b}",
                l.len()
            )));
        }
        let device = waveform.device();
        let features = self.extract_conv_features(waveform).swap_dims(1, 2);
        let t = features.dims()[1];
        let padding = sample_lengths.map(|l| self.frame_padding_mask(l, t, &device));
        self.forward_from_features(features, padding, mask)
    }
}
