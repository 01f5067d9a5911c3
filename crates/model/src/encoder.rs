//! Transformer encoder: weight-normed positional convolution, attention blocks (post-LN and
//! pre-LN "stable" layouts), LayerDrop.

use burn::module::{Flag, Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::module::conv1d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Bool, Distribution, Tensor};

use crate::config::HubertConfig;
use crate::nn::{Dropout, Init, LayerNorm, Linear, gelu, is_training};

/// Weight-norm parameters: `original0` = g `[1, 1, K]`, `original1` = v `[H, H/G, K]`.
///
/// Mirrors torch's `ParametrizationList` at `conv.parametrizations.weight`, which
/// `torch.nn.utils.parametrizations.weight_norm(dim=2)` adds to `HubertPositionalConvEmbedding`'s
/// conv (transformers v5.23.0, src/transformers/models/hubert/modeling_hubert.py:L81); a torch
/// container, no HuBERT class.
#[derive(Module, Debug)]
pub struct WeightNormParams {
    /// Magnitude g, one per kernel position.
    pub original0: Param<Tensor<3>>,
    /// Direction v.
    pub original1: Param<Tensor<3>>,
}

/// Holder so the module path reads `conv.parametrizations.weight.original{0,1}`.
///
/// Mirrors torch's `parametrizations` attribute (a `ModuleDict` of `ParametrizationList`s) that
/// weight norm adds to the positional conv (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L81); a torch container, no HuBERT class.
#[derive(Module, Debug)]
pub struct Parametrizations {
    /// The parametrised `weight`.
    pub weight: WeightNormParams,
}

/// Grouped 1-D conv whose weight is `g * v / ||v||`, the norm taken over dims 0 and 1 for each
/// kernel position (torch `weight_norm(dim=2)`).
///
/// Mirrors `torch.nn.Conv1d` wrapped by `weight_norm(name="weight", dim=2)`: HF
/// `HubertPositionalConvEmbedding.conv` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L51, weight norm at L81); fairseq
/// `make_conv_pos` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/models/wav2vec/wav2vec2.py:L925).
#[derive(Module, Debug)]
pub struct WeightNormConv1d {
    /// `[H]`.
    pub bias: Param<Tensor<1>>,
    /// g and v.
    pub parametrizations: Parametrizations,
    /// Conv groups.
    pub groups: usize,
    /// Symmetric padding (K / 2).
    pub padding: usize,
}

impl WeightNormConv1d {
    /// The effective weight `g * v / ||v||_{dims 0,1}`.
    pub fn weight(&self) -> Tensor<3> {
        let g = self.parametrizations.weight.original0.val();
        let v = self.parametrizations.weight.original1.val();
        let norm = v.clone().square().sum_dim(0).sum_dim(1).sqrt();
        v * (g / norm)
    }

    /// `[B, H, T] -> [B, H, T + 1 - (K mod 2)]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        conv1d(
            x,
            self.weight(),
            Some(self.bias.val()),
            ConvOptions::new([1], [self.padding], [1], self.groups),
        )
    }
}

/// Convolutional relative positional embedding: conv, drop the last frame for even kernels, GELU.
///
/// Mirrors `HubertPositionalConvEmbedding` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L48) with its `HubertSamePadLayer`
/// (same file:L98) folded into `num_pad_remove`; the `conv_pos_batch_norm` branch is not
/// supported. fairseq: `TransformerEncoder.pos_conv` built by `make_conv_pos` (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/wav2vec/wav2vec2.py:L925) with
/// `SamePad` (fairseq/modules/same_pad.py:L10).
#[derive(Module, Debug)]
pub struct HubertPositionalConvEmbedding {
    /// The weight-normed grouped conv.
    pub conv: WeightNormConv1d,
    /// Number of frames removed after the conv (1 for even kernels).
    pub num_pad_remove: usize,
}

impl HubertPositionalConvEmbedding {
    /// Init as HF / fairseq: v ~ N(0, 2 / sqrt(K * H)), g = ||v|| (so the initial weight is v),
    /// zero bias.
    ///
    /// fairseq `make_conv_pos` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
    /// fairseq/models/wav2vec/wav2vec2.py:L934: `std = sqrt(4 / (k * e))`).
    pub fn new(cfg: &HubertConfig, init: &mut Init) -> Self {
        let h = cfg.hidden_size;
        let k = cfg.num_conv_pos_embeddings;
        let groups = cfg.num_conv_pos_embedding_groups;
        let std = 2.0 * (1.0 / (k * h) as f64).sqrt();
        let v = init.normal([h, h / groups, k], std);
        let g = v.clone().square().sum_dim(0).sum_dim(1).sqrt();
        Self {
            conv: WeightNormConv1d {
                bias: Param::from_tensor(init.constant([h], 0.0)),
                parametrizations: Parametrizations {
                    weight: WeightNormParams {
                        original0: Param::from_tensor(g),
                        original1: Param::from_tensor(v),
                    },
                },
                groups,
                padding: k / 2,
            },
            num_pad_remove: usize::from(k.is_multiple_of(2)),
        }
    }

    /// `[B, T, H] -> [B, T, H]` positional embedding (to be added to the input).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [_, t, _] = x.dims();
        let y = self.conv.forward(x.swap_dims(1, 2));
        let y = if self.num_pad_remove > 0 {
            y.narrow(2, 0, t)
        } else {
            y
        };
        gelu(y).swap_dims(1, 2)
    }
}

/// Multi-head self-attention with a key padding mask.
///
/// Mirrors `HubertAttention` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L265) with the eager kernel
/// `eager_attention_forward` (same file:L237); fairseq `MultiheadAttention`, self-attention only
/// (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/modules/multihead_attention.py:L63).
#[derive(Module, Debug)]
pub struct HubertAttention {
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Query projection.
    pub q_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    /// Dropout on attention probabilities.
    pub dropout: Dropout,
    /// Number of heads.
    pub num_heads: usize,
}

impl HubertAttention {
    fn new(cfg: &HubertConfig, init: &mut Init) -> Self {
        let h = cfg.hidden_size;
        let std = cfg.initializer_range;
        Self {
            k_proj: Linear::new(init, h, h, true, std),
            v_proj: Linear::new(init, h, h, true, std),
            q_proj: Linear::new(init, h, h, true, std),
            out_proj: Linear::new(init, h, h, true, std),
            dropout: Dropout::new(cfg.attention_dropout),
            num_heads: cfg.num_attention_heads,
        }
    }

    /// `x [B, T, H]`, `key_padding [B, T]` (true = padded key, never attended to).
    pub fn forward(&self, x: Tensor<3>, key_padding: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        let [b, t, h] = x.dims();
        let nh = self.num_heads;
        let d = h / nh;
        let split = |y: Tensor<3>| y.reshape([b, t, nh, d]).swap_dims(1, 2);
        let scaling = (d as f64).powf(-0.5);
        let q = split(self.q_proj.forward(x.clone()) * scaling);
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let mut scores = q.matmul(k.swap_dims(2, 3)); // [B, nh, T, T]
        if let Some(mask) = key_padding {
            let m = mask.clone().reshape([b, 1, 1, t]).expand([b, nh, t, t]);
            scores = scores.mask_fill(m, -1.0e9);
        }
        let probs = self.dropout.forward(softmax(scores, 3));
        let ctx = probs.matmul(v).swap_dims(1, 2).reshape([b, t, h]);
        self.out_proj.forward(ctx)
    }
}

/// Position-wise feed-forward: Linear, GELU, dropout, Linear, dropout.
///
/// Mirrors `HubertFeedForward` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L350); fairseq `fc1` / `fc2` of
/// `TransformerSentenceEncoderLayer` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/models/wav2vec/wav2vec2.py:L1309-L1310).
#[derive(Module, Debug)]
pub struct HubertFeedForward {
    /// `activation_dropout`.
    pub intermediate_dropout: Dropout,
    /// Linear(H -> I).
    pub intermediate_dense: Linear,
    /// Linear(I -> H).
    pub output_dense: Linear,
    /// `hidden_dropout`.
    pub output_dropout: Dropout,
}

impl HubertFeedForward {
    fn new(cfg: &HubertConfig, init: &mut Init) -> Self {
        let std = cfg.initializer_range;
        Self {
            intermediate_dropout: Dropout::new(cfg.activation_dropout),
            intermediate_dense: Linear::new(
                init,
                cfg.hidden_size,
                cfg.intermediate_size,
                true,
                std,
            ),
            output_dense: Linear::new(init, cfg.intermediate_size, cfg.hidden_size, true, std),
            output_dropout: Dropout::new(cfg.hidden_dropout),
        }
    }

    /// `[B, T, H] -> [B, T, H]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self
            .intermediate_dropout
            .forward(gelu(self.intermediate_dense.forward(x)));
        self.output_dropout.forward(self.output_dense.forward(x))
    }
}

/// One transformer block, post-LN or pre-LN.
///
/// No single reference class: one struct for two HF classes, chosen by `stable`:
/// - `stable = false`: mirrors `HubertEncoderLayer` (transformers v5.23.0,
///   src/transformers/models/hubert/modeling_hubert.py:L374);
/// - `stable = true`: mirrors `HubertEncoderLayerStableLayerNorm` (transformers v5.23.0,
///   src/transformers/models/hubert/modeling_hubert.py:L480), without its optional
///   `adapter_layer`.
///
/// fairseq: `TransformerSentenceEncoderLayer` with `layer_norm_first = stable` (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/models/wav2vec/wav2vec2.py:L1268).
#[derive(Module, Debug)]
pub struct HubertEncoderLayer {
    /// Self-attention.
    pub attention: HubertAttention,
    /// `hidden_dropout` after attention.
    pub dropout: Dropout,
    /// Attention LayerNorm (after the residual in post-LN, before attention in pre-LN).
    pub layer_norm: LayerNorm,
    /// Feed-forward.
    pub feed_forward: HubertFeedForward,
    /// Feed-forward LayerNorm.
    pub final_layer_norm: LayerNorm,
    /// Pre-LN layout.
    pub stable: bool,
}

impl HubertEncoderLayer {
    fn new(cfg: &HubertConfig, init: &mut Init) -> Self {
        Self {
            attention: HubertAttention::new(cfg, init),
            dropout: Dropout::new(cfg.hidden_dropout),
            layer_norm: LayerNorm::new(init, cfg.hidden_size, cfg.layer_norm_eps),
            feed_forward: HubertFeedForward::new(cfg, init),
            final_layer_norm: LayerNorm::new(init, cfg.hidden_size, cfg.layer_norm_eps),
            stable: cfg.do_stable_layer_norm,
        }
    }

    /// `[B, T, H] -> [B, T, H]`.
    pub fn forward(&self, x: Tensor<3>, key_padding: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        if self.stable {
            let a = self
                .attention
                .forward(self.layer_norm.forward(x.clone()), key_padding);
            let x = x + self.dropout.forward(a);
            x.clone() + self.feed_forward.forward(self.final_layer_norm.forward(x))
        } else {
            let a = self.attention.forward(x.clone(), key_padding);
            let x = self.layer_norm.forward(x + self.dropout.forward(a));
            self.final_layer_norm
                .forward(x.clone() + self.feed_forward.forward(x))
        }
    }
}

/// Encoder outputs.
///
/// Corresponds to the `BaseModelOutput` (transformers v5.23.0,
/// src/transformers/modeling_outputs.py:L24) of `HubertEncoder` / `HubertEncoderStableLayerNorm`,
/// whose `hidden_states` HF records through `_can_record_outputs` (transformers v5.23.0,
/// src/transformers/models/hubert/modeling_hubert.py:L581).
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// HF `hidden_states`: the input of each layer, then the last layer's output (before the
    /// final LayerNorm in the stable layout), `num_hidden_layers + 1` entries.
    pub hidden_states: Vec<Tensor<3>>,
    /// HF `last_hidden_state` (after the final LayerNorm in the stable layout).
    pub last_hidden_state: Tensor<3>,
}

/// Positional conv, LayerNorm (before the layers in post-LN, after them in pre-LN), layers.
///
/// No single reference class: one struct for two HF classes, chosen by `stable`:
/// - `stable = false`: mirrors `HubertEncoder` (transformers v5.23.0,
///   src/transformers/models/hubert/modeling_hubert.py:L408);
/// - `stable = true`: mirrors `HubertEncoderStableLayerNorm` (transformers v5.23.0,
///   src/transformers/models/hubert/modeling_hubert.py:L519).
///
/// fairseq: `TransformerEncoder` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/models/wav2vec/wav2vec2.py:L948), forward pass in `extract_features` (L1084).
#[derive(Module, Debug)]
pub struct HubertEncoder {
    /// Positional embedding.
    pub pos_conv_embed: HubertPositionalConvEmbedding,
    /// Encoder LayerNorm.
    pub layer_norm: LayerNorm,
    /// `hidden_dropout` after adding positions.
    pub dropout: Dropout,
    /// The transformer blocks.
    pub layers: Vec<HubertEncoderLayer>,
    /// LayerDrop probability.
    pub layerdrop: f64,
    /// Pre-LN layout.
    pub stable: bool,
    /// Training flag for LayerDrop (disabled by `valid()`).
    pub training: Param<Flag>,
}

impl HubertEncoder {
    /// Build from the config.
    pub fn new(cfg: &HubertConfig, init: &mut Init) -> Self {
        Self {
            pos_conv_embed: HubertPositionalConvEmbedding::new(cfg, init),
            layer_norm: LayerNorm::new(init, cfg.hidden_size, cfg.layer_norm_eps),
            dropout: Dropout::new(cfg.hidden_dropout),
            layers: (0..cfg.num_hidden_layers)
                .map(|_| HubertEncoderLayer::new(cfg, init))
                .collect(),
            layerdrop: cfg.layerdrop,
            stable: cfg.do_stable_layer_norm,
            training: Param::from_bool(true),
        }
    }

    /// `x [B, T, H]` (projected, possibly masked features); `padding [B, T]` true = padded frame.
    pub fn forward(&self, x: Tensor<3>, padding: Option<&Tensor<2, Bool>>) -> EncoderOutput {
        let [b, t, h] = x.dims();
        let x = match padding {
            Some(p) => x.mask_fill(p.clone().unsqueeze_dim::<3>(2).expand([b, t, h]), 0.0),
            None => x,
        };
        let x = x.clone() + self.pos_conv_embed.forward(x);
        let x = if self.stable {
            x
        } else {
            self.layer_norm.forward(x)
        };
        let mut x = self.dropout.forward(x);

        let n = self.layers.len();
        let skip: Vec<bool> =
            if self.layerdrop > 0.0 && n > 0 && is_training(&self.training, &x.device()) {
                let u = Tensor::<1>::random(
                    [n],
                    Distribution::Uniform(0.0, 1.0),
                    &x.device().without_autodiff(),
                );
                let u: Vec<f32> = u.into_data().try_into_vec_as::<f32>().expect("f32 data");
                u.into_iter().map(|r| (r as f64) < self.layerdrop).collect()
            } else {
                vec![false; n]
            };

        let mut hidden_states = Vec::with_capacity(n + 1);
        for (layer, skip) in self.layers.iter().zip(skip) {
            hidden_states.push(x.clone());
            if !skip {
                x = layer.forward(x, padding);
            }
        }
        hidden_states.push(x.clone());
        let last_hidden_state = if self.stable {
            self.layer_norm.forward(x)
        } else {
            x
        };
        EncoderOutput {
            hidden_states,
            last_hidden_state,
        }
    }
}
