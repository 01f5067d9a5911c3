//! The conv front-end's 1-D convolution as a burn backend extension: `fedhubert-kernels`'
//! im2col + GEMM kernels on the Flex (CPU) backend, with a hand-written backward (input and
//! weight gradients) for `Autodiff<Flex>`.
//!
//! Why: burn's Flex backend runs conv1d through its generic conv3d path and the two backward
//! passes through transposed convolutions; the front-end holds most of a small student's FLOPs,
//! so those paths set the training step time. Other devices (CUDA) keep burn's own conv1d:
//! [`conv1d`] picks the path from the input's device.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    AutodiffBackend, Backend, Dispatch, DispatchDevice, Flex, TensorMetadata, backend_extension,
};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, TensorData};
use fedhubert_kernels::norm::GroupNormShape;
use fedhubert_kernels::{self as k, Conv1dShape};

/// Conv1d (no padding, dilation 1, one group, no bias) and its two gradients.
#[backend_extension(Flex, Autodiff)]
pub trait FrontEndOps: Backend {
    /// `[B, C_in, T] x [C_out, C_in, K] -> [B, C_out, (T - K) / stride + 1]`.
    fn fh_conv1d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
    ) -> FloatTensor<Self>;
    /// Gradient of the input `[B, C_in, t_in]` given the output gradient.
    fn fh_conv1d_x_backward(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        t_in: usize,
    ) -> FloatTensor<Self>;
    /// Gradient of the weight `[C_out, C_in, kernel]` given the input and output gradient.
    fn fh_conv1d_weight_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: usize,
        kernel: usize,
    ) -> FloatTensor<Self>;
    /// Exact (erf) GELU.
    fn fh_gelu(z: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `grad * gelu'(z)`.
    fn fh_gelu_backward(z: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `gelu(GroupNorm(C, C)(z))` on `[B, C, T]` with per-channel `gamma`, `beta` `[C]`.
    fn fh_group_norm_gelu(
        z: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// Gradients `(dz, dgamma, dbeta)` of [`FrontEndOps::fh_group_norm_gelu`].
    fn fh_group_norm_gelu_backward(
        z: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

fn f32_vec_or_view(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous f32")
                .to_vec(),
        ),
    }
}

fn flex_out(v: Vec<f32>, shape: [usize; 3]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

fn opts(stride: usize) -> ConvOptions<1> {
    ConvOptions::new([stride], [0], [1], 1)
}

impl FrontEndOps for Flex {
    fn fh_conv1d(x: FlexTensor, weight: FlexTensor, stride: usize) -> FlexTensor {
        if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
            return Flex::conv1d(x, weight, None, opts(stride));
        }
        let [b, c_in, t_in] = x.shape().dims();
        let [c_out, _, kernel] = weight.shape().dims();
        let s = Conv1dShape {
            batch: b,
            c_in,
            c_out,
            kernel,
            stride,
            t_in,
        };
        let mut y = vec![0f32; b * c_out * s.t_out()];
        k::forward(&f32_vec_or_view(&x), &f32_vec_or_view(&weight), &s, &mut y);
        flex_out(y, [b, c_out, s.t_out()])
    }

    fn fh_conv1d_x_backward(
        grad: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        t_in: usize,
    ) -> FlexTensor {
        let [b, c_out, _] = grad.shape().dims();
        let [_, c_in, kernel] = weight.shape().dims();
        if grad.dtype() != DType::F32 || weight.dtype() != DType::F32 {
            let x = FlexTensor::zeros([b, c_in, t_in].into(), grad.dtype());
            return Flex::conv1d_x_backward(x, weight, grad, opts(stride));
        }
        let s = Conv1dShape {
            batch: b,
            c_in,
            c_out,
            kernel,
            stride,
            t_in,
        };
        let mut dx = vec![0f32; b * c_in * t_in];
        k::backward_input(
            &f32_vec_or_view(&grad),
            &f32_vec_or_view(&weight),
            &s,
            &mut dx,
        );
        flex_out(dx, [b, c_in, t_in])
    }

    fn fh_conv1d_weight_backward(
        x: FlexTensor,
        grad: FlexTensor,
        stride: usize,
        kernel: usize,
    ) -> FlexTensor {
        let [b, c_in, t_in] = x.shape().dims();
        let [_, c_out, _] = grad.shape().dims();
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            let w = FlexTensor::zeros([c_out, c_in, kernel].into(), x.dtype());
            return Flex::conv1d_weight_backward(x, w, grad, opts(stride));
        }
        let s = Conv1dShape {
            batch: b,
            c_in,
            c_out,
            kernel,
            stride,
            t_in,
        };
        let mut dw = vec![0f32; c_out * c_in * kernel];
        k::backward_weight(&f32_vec_or_view(&x), &f32_vec_or_view(&grad), &s, &mut dw);
        flex_out(dw, [c_out, c_in, kernel])
    }

    fn fh_gelu(z: FlexTensor) -> FlexTensor {
        if z.dtype() != DType::F32 {
            return Flex::gelu(z);
        }
        let shape = z.shape();
        let zv = f32_vec_or_view(&z);
        let mut y = vec![0f32; zv.len()];
        k::act::gelu(&zv, &mut y);
        FlexTensor::from_data(TensorData::new(y, shape))
    }

    fn fh_gelu_backward(z: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if z.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return Flex::gelu_backward(z, grad);
        }
        let shape = z.shape();
        let (zv, gv) = (f32_vec_or_view(&z), f32_vec_or_view(&grad));
        let mut dz = vec![0f32; zv.len()];
        k::act::gelu_backward(&zv, &gv, &mut dz);
        FlexTensor::from_data(TensorData::new(dz, shape))
    }

    fn fh_group_norm_gelu(
        z: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        let [b, c, t] = z.shape().dims();
        let s = GroupNormShape {
            batch: b,
            channels: c,
            t,
            eps,
        };
        let zv = f32_vec_or_view(&z);
        let mut y = vec![0f32; zv.len()];
        k::norm::forward(
            &zv,
            &f32_vec_or_view(&gamma),
            &f32_vec_or_view(&beta),
            &s,
            &mut y,
        );
        flex_out(y, [b, c, t])
    }

    fn fh_group_norm_gelu_backward(
        z: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        grad: FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let [b, c, t] = z.shape().dims();
        let s = GroupNormShape {
            batch: b,
            channels: c,
            t,
            eps,
        };
        let zv = f32_vec_or_view(&z);
        let mut dz = vec![0f32; zv.len()];
        let (dg, db) = k::norm::backward(
            &zv,
            &f32_vec_or_view(&gamma),
            &f32_vec_or_view(&beta),
            &f32_vec_or_view(&grad),
            &s,
            &mut dz,
        );
        (
            flex_out(dz, [b, c, t]),
            FlexTensor::from_data(TensorData::new(dg, [c])),
            FlexTensor::from_data(TensorData::new(db, [c])),
        )
    }
}

impl<B: Backend + FrontEndOps, C: CheckpointStrategy> FrontEndOps for Autodiff<B, C> {
    fn fh_conv1d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Conv1dBackward;

        impl<B: Backend + FrontEndOps> Backward<B, 2> for Conv1dBackward {
            // (x, weight, stride, t_in, kernel)
            type State = (NodeId, NodeId, usize, usize, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_w] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, w_state, stride, t_in, kernel) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
                let w = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(w_state);
                if let Some(node) = node_x {
                    let dx = B::fh_conv1d_x_backward(grad.clone(), w, stride, t_in);
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = node_w {
                    let dw = B::fh_conv1d_weight_backward(x, grad, stride, kernel);
                    grads.register::<B>(node.id, dw);
                }
            }
        }

        let t_in = x.primitive().shape()[2];
        let kernel = weight.primitive().shape()[2];
        match Conv1dBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let w_state = prep.checkpoint(&weight);
                prep.finish(
                    (x_state, w_state, stride, t_in, kernel),
                    B::fh_conv1d(x.into_primitive(), weight.into_primitive(), stride),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fh_conv1d(
                x.into_primitive(),
                weight.into_primitive(),
                stride,
            )),
        }
    }

    // The gradients themselves are not differentiated again (no double backward in training).
    fn fh_conv1d_x_backward(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        t_in: usize,
    ) -> FloatTensor<Self> {
        let out =
            B::fh_conv1d_x_backward(grad.into_primitive(), weight.into_primitive(), stride, t_in);
        <Self as AutodiffBackend>::from_inner(out)
    }

    fn fh_conv1d_weight_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: usize,
        kernel: usize,
    ) -> FloatTensor<Self> {
        let out =
            B::fh_conv1d_weight_backward(x.into_primitive(), grad.into_primitive(), stride, kernel);
        <Self as AutodiffBackend>::from_inner(out)
    }

    fn fh_gelu(z: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl<B: Backend + FrontEndOps> Backward<B, 1> for GeluBackward {
            type State = NodeId;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let z = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ops.state);
                if let Some(node) = node {
                    grads.register::<B>(node.id, B::fh_gelu_backward(z, grad));
                }
            }
        }

        match GeluBackward
            .prepare::<C>([z.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let z_state = prep.checkpoint(&z);
                prep.finish(z_state, B::fh_gelu(z.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fh_gelu(z.into_primitive())),
        }
    }

    fn fh_gelu_backward(z: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = B::fh_gelu_backward(z.into_primitive(), grad.into_primitive());
        <Self as AutodiffBackend>::from_inner(out)
    }

    fn fh_group_norm_gelu(
        z: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GroupNormGeluBackward;

        impl<B: Backend + FrontEndOps> Backward<B, 3> for GroupNormGeluBackward {
            type State = (NodeId, NodeId, NodeId, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_z, node_g, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (zs, gs, bs, eps) = ops.state;
                let z = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(zs);
                let g = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gs);
                let b = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(bs);
                let (dz, dg, db) = B::fh_group_norm_gelu_backward(z, g, b, grad, eps);
                if let Some(node) = node_z {
                    grads.register::<B>(node.id, dz);
                }
                if let Some(node) = node_g {
                    grads.register::<B>(node.id, dg);
                }
                if let Some(node) = node_b {
                    grads.register::<B>(node.id, db);
                }
            }
        }

        match GroupNormGeluBackward
            .prepare::<C>([z.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let zs = prep.checkpoint(&z);
                let gs = prep.checkpoint(&gamma);
                let bs = prep.checkpoint(&beta);
                prep.finish(
                    (zs, gs, bs, eps),
                    B::fh_group_norm_gelu(
                        z.into_primitive(),
                        gamma.into_primitive(),
                        beta.into_primitive(),
                        eps,
                    ),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fh_group_norm_gelu(
                z.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }

    fn fh_group_norm_gelu_backward(
        z: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dz, dg, db) = B::fh_group_norm_gelu_backward(
            z.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
            grad.into_primitive(),
            eps,
        );
        (
            <Self as AutodiffBackend>::from_inner(dz),
            <Self as AutodiffBackend>::from_inner(dg),
            <Self as AutodiffBackend>::from_inner(db),
        )
    }
}

/// Whether `device` (or the device under its autodiff wrapper) is burn's Flex CPU backend.
pub fn is_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// `conv1d(x, weight)` without padding or bias: our kernels on Flex, burn's op elsewhere.
pub fn conv1d(x: Tensor<3>, weight: Tensor<3>, stride: usize) -> Tensor<3> {
    if is_flex(&x.device()) {
        Tensor::from_dispatch(<Dispatch as FrontEndOps>::fh_conv1d(
            x.into_dispatch(),
            weight.into_dispatch(),
            stride,
        ))
    } else {
        burn::tensor::module::conv1d(x, weight, None, opts(stride))
    }
}

/// Exact (erf) GELU: our vectorised kernel on Flex, burn's elsewhere.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if is_flex(&x.device()) {
        Tensor::from_dispatch(<Dispatch as FrontEndOps>::fh_gelu(x.into_dispatch()))
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// `gelu(GroupNorm(C, C)(z))` on `[B, C, T]` (torch semantics: each (utterance, channel) row
/// normalised over time with biased variance, then scaled / shifted per channel), fused on Flex
/// for f32, composed from burn ops elsewhere.
pub fn group_norm_gelu(z: Tensor<3>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<3> {
    if is_flex(&z.device()) && z.dtype() == DType::F32 {
        Tensor::from_dispatch(<Dispatch as FrontEndOps>::fh_group_norm_gelu(
            z.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            eps,
        ))
    } else {
        group_norm_gelu_reference(z, gamma, beta, eps)
    }
}

/// [`group_norm_gelu`] from burn ops (the reference for tests, and the non-Flex path).
pub fn group_norm_gelu_reference(
    z: Tensor<3>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<3> {
    let (var, mean) = z.clone().var_mean_bias(2);
    let x = (z - mean) / (var + eps).sqrt();
    let c = gamma.dims()[0];
    burn::tensor::activation::gelu(x * gamma.reshape([1, c, 1]) + beta.reshape([1, c, 1]))
}

/// burn's own conv1d (the reference the kernels are tested against).
pub fn conv1d_reference(x: Tensor<3>, weight: Tensor<3>, stride: usize) -> Tensor<3> {
    burn::tensor::module::conv1d(x, weight, None, opts(stride))
}
