//! Convolutional waveform front-end and feature projection.

use burn::module::Module;
use burn::tensor::Tensor;

use crate::config::{FeatExtractNorm, HubertConfig};
use crate::nn::{Conv1d, Dropout, Init, LayerNorm, Linear, gelu};

/// Epsilon of the conv-layer norms: torch's default for GroupNorm / LayerNorm (HF does not pass
/// `layer_norm_eps` to them).
const CONV_NORM_EPS: f64 = 1e-5;

/// One conv block: conv, optional norm (GroupNorm(C, C) or channel LayerNorm), GELU.
///
/// No single reference class: one struct for HF's three conv-layer classes, told apart by
/// `layer_norm` / `group_norm` (HF's group layout is one `HubertGroupNormConvLayer` followed by
/// `HubertNoLayerNormConvLayer`s):
/// - no norm: mirrors `HubertNoLayerNormConvLayer` (transformers v5.23.0,
///   src/transformers/models/hubert/modeling_hubert.py:L109);
/// - channel LayerNorm: mirrors `HubertLayerNormConvLayer` (transformers v5.23.0,
///   src/transformers/models/hubert/modeling_hubert.py:L130);
/// - GroupNorm(C, C): mirrors `HubertGroupNormConvLayer` (transformers v5.23.0,
///   src/transformers/models/hubert/modeling_hubert.py:L157).
///
/// In fairseq, one `block` of `ConvFeatureExtractionModel` (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/wav2vec/wav2vec2.py:L856).
#[derive(Module, Debug)]
pub struct HubertConvLayer {
    /// The convolution.
    pub conv: Conv1d,
    /// The norm's affine parameters, if this layer has a norm.
    pub layer_norm: Option<LayerNorm>,
    /// `true`: GroupNorm(C groups) over time; `false`: LayerNorm over channels.
    pub group_norm: bool,
}

impl HubertConvLayer {
    /// `[B, C_in, T] -> [B, C_out, T']`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self.conv.forward(x);
        match &self.layer_norm {
            None => gelu(x),
            // One fused pass on the CPU backend (see `kernels::group_norm_gelu`).
            Some(norm) if self.group_norm => {
                crate::kernels::group_norm_gelu(x, norm.weight.val(), norm.bias.val(), norm.eps)
            }
            Some(norm) => gelu(norm.forward(x.swap_dims(1, 2)).swap_dims(1, 2)),
        }
    }
}

/// The stack of conv blocks: raw waveform `[B, S]` to features `[B, C, T]`.
///
/// Mirrors `HubertFeatureEncoder` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L181); fairseq `ConvFeatureExtractionModel`
/// (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/wav2vec/wav2vec2.py:L844).
#[derive(Module, Debug)]
pub struct HubertFeatureEncoder {
    /// The conv blocks.
    pub conv_layers: Vec<HubertConvLayer>,
}

impl HubertFeatureEncoder {
    /// Build from the config (kaiming-normal conv weights, unit / zero norms).
    ///
    /// Init as `HubertPreTrainedModel._init_weights` (transformers v5.23.0,
    /// src/transformers/models/hubert/modeling_hubert.py:L587) and fairseq's `make_conv`
    /// (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/wav2vec/wav2vec2.py:L865).
    pub fn new(cfg: &HubertConfig, init: &mut Init) -> Self {
        let mut conv_layers = Vec::with_capacity(cfg.conv_dim.len());
        let mut c_in = 1;
        for i in 0..cfg.conv_dim.len() {
            let c_out = cfg.conv_dim[i];
            let conv = Conv1d::new_kaiming(
                init,
                c_in,
                c_out,
                cfg.conv_kernel[i],
                cfg.conv_stride[i],
                cfg.conv_bias,
            );
            let (layer_norm, group_norm) = match cfg.feat_extract_norm {
                FeatExtractNorm::Group if i == 0 => {
                    (Some(LayerNorm::new(init, c_out, CONV_NORM_EPS)), true)
                }
                FeatExtractNorm::Group => (None, true),
                FeatExtractNorm::Layer => (Some(LayerNorm::new(init, c_out, CONV_NORM_EPS)), false),
            };
            conv_layers.push(HubertConvLayer {
                conv,
                layer_norm,
                group_norm,
            });
            c_in = c_out;
        }
        Self { conv_layers }
    }

    /// `[B, S]` waveform to `[B, C, T]` features.
    pub fn forward(&self, wav: Tensor<2>) -> Tensor<3> {
        let mut x = wav.unsqueeze_dim::<3>(1);
        for layer in &self.conv_layers {
            x = layer.forward(x);
        }
        x
    }
}

/// LayerNorm over conv channels, Linear to the hidden size, dropout.
///
/// Mirrors `HubertFeatureProjection` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L219). In fairseq these are three fields of
/// `HubertModel`, `layer_norm`, `post_extract_proj` and `dropout_input` (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/hubert/hubert.py:L305, L270, L290).
#[derive(Module, Debug)]
pub struct HubertFeatureProjection {
    /// LayerNorm(conv_dim[-1]) if `feat_proj_layer_norm`.
    pub layer_norm: Option<LayerNorm>,
    /// Linear(conv_dim[-1] -> hidden_size).
    pub projection: Linear,
    /// `feat_proj_dropout`.
    pub dropout: Dropout,
}

impl HubertFeatureProjection {
    /// Build from the config.
    pub fn new(cfg: &HubertConfig, init: &mut Init) -> Self {
        let c = cfg.conv_out_dim();
        Self {
            layer_norm: cfg
                .feat_proj_layer_norm
                .then(|| LayerNorm::new(init, c, cfg.layer_norm_eps)),
            projection: Linear::new(init, c, cfg.hidden_size, true, cfg.initializer_range),
            dropout: Dropout::new(cfg.feat_proj_dropout),
        }
    }

    /// `[B, T, C]` to `[B, T, H]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = match &self.layer_norm {
            Some(ln) => ln.forward(x),
            None => x,
        };
        self.dropout.forward(self.projection.forward(x))
    }
}
