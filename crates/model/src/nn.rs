//! Torch-layout building blocks (weights stored exactly as PyTorch stores them, so that a
//! parameter's module path and shape equal its HuggingFace / fairseq name and shape), and a
//! host-side seeded initialiser.

use burn::module::{Flag, Module, Param};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Deterministic host-side parameter initialiser (same values on every backend).
pub struct Init {
    rng: ChaCha8Rng,
    device: Device,
}

impl Init {
    /// Initialiser seeded with `seed`, creating tensors on `device`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    /// The target device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            // Box-Muller.
            let u1: f64 = 1.0 - self.rng.random::<f64>();
            let u2: f64 = self.rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            out.push((r * t.cos() * std) as f32);
            if out.len() < n {
                out.push((r * t.sin() * std) as f32);
            }
        }
        out
    }

    /// Tensor with N(0, std^2) entries.
    pub fn normal<const D: usize>(&mut self, shape: [usize; D], std: f64) -> Tensor<D> {
        let n = shape.iter().product();
        let v = self.normal_vec(n, std);
        Tensor::from_data(TensorData::new(v, shape), &self.device)
    }

    /// Tensor with U(lo, hi) entries.
    pub fn uniform<const D: usize>(&mut self, shape: [usize; D], lo: f64, hi: f64) -> Tensor<D> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (lo + (hi - lo) * self.rng.random::<f64>()) as f32)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &self.device)
    }

    /// Constant tensor.
    pub fn constant<const D: usize>(&self, shape: [usize; D], value: f32) -> Tensor<D> {
        let n: usize = shape.iter().product();
        Tensor::from_data(TensorData::new(vec![value; n], shape), &self.device)
    }
}

/// Whether stochastic training behaviour (dropout, LayerDrop) is active: the module's training
/// flag is set (cleared by `Module::valid`) and the tensors live on an autodiff device, the same
/// rule burn's own `Dropout` uses.
pub(crate) fn is_training(flag: &Param<Flag>, x_device: &Device) -> bool {
    flag.is_enabled() && x_device.is_autodiff()
}

/// Inverted dropout, active only in training (see [`is_training`]).
///
/// Mirrors `torch.nn.Dropout`: a PyTorch building block, no HuBERT-specific reference class.
#[derive(Module, Debug)]
pub struct Dropout {
    /// Drop probability.
    pub prob: f64,
    /// Training flag (disabled by `valid()`).
    pub training: Param<Flag>,
}

impl Dropout {
    /// Dropout with probability `prob`.
    pub fn new(prob: f64) -> Self {
        Self {
            prob,
            training: Param::from_bool(true),
        }
    }

    /// Apply dropout.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.prob == 0.0 || !is_training(&self.training, &x.device()) {
            return x;
        }
        let keep = 1.0 - self.prob;
        let mask = x.random_like(Distribution::Bernoulli(keep));
        x * mask / keep
    }
}

/// Linear layer with torch layout: `weight` is `[out, in]`.
///
/// Mirrors `torch.nn.Linear`: a PyTorch building block, no HuBERT-specific reference class.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<2>>,
    /// `[out_features]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// N(0, std) weight, zero bias (HF / fairseq BERT-style init).
    ///
    /// HF: `PreTrainedModel._init_weights` (transformers v5.23.0,
    /// src/transformers/modeling_utils.py:L2295), `std = initializer_range`.
    pub fn new(init: &mut Init, d_in: usize, d_out: usize, bias: bool, std: f64) -> Self {
        Self {
            weight: Param::from_tensor(init.normal([d_out, d_in], std)),
            bias: bias.then(|| Param::from_tensor(init.constant([d_out], 0.0))),
        }
    }

    /// `x @ W^T + b` over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        burn::tensor::module::linear(
            x,
            self.weight.val().transpose(),
            self.bias.as_ref().map(|b| b.val()),
        )
    }
}

/// LayerNorm over the last axis (biased variance, as torch).
///
/// Mirrors `torch.nn.LayerNorm`: a PyTorch building block, no HuBERT-specific reference class.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Param<Tensor<1>>,
    /// Shift.
    pub bias: Param<Tensor<1>>,
    /// Epsilon.
    pub eps: f64,
}

impl LayerNorm {
    /// Unit scale, zero shift.
    pub fn new(init: &Init, dim: usize, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(init.constant([dim], 1.0)),
            bias: Param::from_tensor(init.constant([dim], 0.0)),
            eps,
        }
    }

    /// Normalise the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let x = (x - mean) / (var + self.eps).sqrt();
        x * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }

    /// torch `GroupNorm(C, C)` semantics on `[B, C, T]`: each (batch, channel) row is normalised
    /// over time, then scaled / shifted per channel.
    ///
    /// The norm of `HubertGroupNormConvLayer` (transformers v5.23.0,
    /// src/transformers/models/hubert/modeling_hubert.py:L157); fairseq `Fp32GroupNorm` in
    /// `ConvFeatureExtractionModel` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
    /// fairseq/models/wav2vec/wav2vec2.py:L844).
    pub fn forward_group_per_channel(&self, x: Tensor<3>) -> Tensor<3> {
        let d = x.clone() - blocked_mean_time(x);
        let var = blocked_mean_time(d.clone() * d.clone());
        let x = d / (var + self.eps).sqrt();
        let c = self.weight.dims()[0];
        x * self.weight.val().reshape([1, c, 1]) + self.bias.val().reshape([1, c, 1])
    }
}

/// Mean over the time axis of `[B, C, T]`, summed in blocks of 64 frames and then over the
/// blocks. A plain running f32 sum over the 32k frames that the first conv layer makes of a 10 s
/// clip loses about 1e-5 relative (3e-4 absolute in the hidden states against transformers);
/// blocked sums keep the GroupNorm statistics at torch's accuracy.
fn blocked_mean_time(x: Tensor<3>) -> Tensor<3> {
    const BLOCK: usize = 64;
    let [b, c, t] = x.dims();
    if t <= 2 * BLOCK {
        return x.mean_dim(2);
    }
    let nb = t.div_ceil(BLOCK);
    let pad = nb * BLOCK - t;
    let x = if pad > 0 {
        let device = x.device();
        Tensor::cat(vec![x, Tensor::zeros([b, c, pad], &device)], 2)
    } else {
        x
    };
    x.reshape([b, c, nb, BLOCK])
        .sum_dim(3)
        .sum_dim(2)
        .reshape([b, c, 1])
        / t as f64
}

/// 1-D convolution with torch layout `weight [out, in/groups, k]`.
///
/// Mirrors `torch.nn.Conv1d`: a PyTorch building block, no HuBERT-specific reference class.
#[derive(Module, Debug)]
pub struct Conv1d {
    /// `[out, in / groups, kernel]`.
    pub weight: Param<Tensor<3>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Stride.
    pub stride: usize,
}

impl Conv1d {
    /// Kaiming-normal (fan-in, gain sqrt 2) weight, as torch `kaiming_normal_`; zero bias.
    pub fn new_kaiming(
        init: &mut Init,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        bias: bool,
    ) -> Self {
        let std = (2.0 / (c_in * kernel) as f64).sqrt();
        Self {
            weight: Param::from_tensor(init.normal([c_out, c_in, kernel], std)),
            bias: bias.then(|| Param::from_tensor(init.constant([c_out], 0.0))),
            stride,
        }
    }

    /// `[B, C_in, T] -> [B, C_out, T']` (no padding); our own kernels on the CPU backend.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let y = crate::kernels::conv1d(x, self.weight.val(), self.stride);
        match &self.bias {
            Some(b) => {
                let c = b.dims()[0];
                y + b.val().reshape([1, c, 1])
            }
            None => y,
        }
    }
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu`.
///
/// HF `ACT2FN["gelu"]` = `GELUActivation` (transformers v5.23.0,
/// src/transformers/activations.py:L70).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    crate::kernels::gelu(x)
}
