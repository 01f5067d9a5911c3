//! # fedhubert-model
//!
//! HuBERT (fairseq / HuggingFace layout) on burn 0.22. burn 0.22 tensors are not generic over
//! a backend: a [`Device`] (here [`cpu_device`] = `Device::flex()`, or `Device::cuda(0)` with
//! the `cuda` feature) picks the backend at run time, and `device.autodiff()` enables gradients.
//!
//! Every module field is named after the HF module, so a parameter's module path *is* its HF
//! state-dict key (`encoder.layers.3.attention.q_proj.weight`, ...) and weights keep torch
//! layouts (`Linear.weight` is `[out, in]`).
//!
//! ## API
//! - [`HubertConfig`]: HF `config.json` fields; presets [`HubertConfig::base`],
//!   [`HubertConfig::student`], [`HubertConfig::large`], [`HubertConfig::tiny`];
//!   `from_json_file`, `to_json`, `validate`.
//! - [`HubertModel`]: `HubertModel::new(&cfg, seed, &device)`,
//!   `forward(waveform [B,S], Option<&[usize]> sample lengths, Option<mask [B,T]>) ->`
//!   [`HubertOutput`] (`extract_features`, `hidden_states`, `last_hidden_state`),
//!   `from_hf_dir(dir, &device)`, `save_hf(dir)`.
//! - [`HubertForPretraining`]: fairseq masked prediction (cosine or linear head):
//!   `new(&cfg, &PretrainConfig, seed, &device)`, `forward_pretrain(&PretrainBatch, &mut rng) ->`
//!   [`PretrainOutput`] (loss tensor + components + accuracies), `save_checkpoint(path)` /
//!   `load_checkpoint(path, &device)` (all params by name, configs in metadata), `save_hf(dir)`.
//! - [`compute_mask_indices`] (fairseq semantics), [`align_labels`] (fairseq `forward_targets`).
//! - [`collect_grads`]: gradients copied to the host by parameter name, in name order.
//! - Generic helpers: [`param_shapes`], [`collect_tensors`], [`load_tensors`],
//!   [`save_checkpoint`], [`load_checkpoint`].
//!
//! Training mode: dropout and LayerDrop act only when the module has not been put in
//! validation mode (`Module::valid`) *and* its tensors are on an autodiff device.

pub mod config;
pub mod encoder;
pub mod error;
pub mod feature_extractor;
pub mod grad;
pub mod hf;
pub mod hubert;
pub mod kernels;
pub mod masking;
pub mod nn;
pub mod pretraining;
pub mod published;

pub use burn::tensor::Device;
pub use config::{FeatExtractNorm, HubertConfig};
pub use error::ModelError;
pub use grad::collect_grads;
pub use hf::{
    HostTensor, Weights, collect_tensors, load_checkpoint, load_tensors, param_shapes,
    preprocessor_config_json, read_safetensors, save_checkpoint, write_safetensors,
};
pub use hubert::{HubertModel, HubertOutput};
pub use masking::{MaskConfig, compute_mask_indices, mask_to_tensor};
pub use pretraining::{
    HeadKind, HubertForPretraining, PretrainBatch, PretrainConfig, PretrainOutput, align_labels,
    grad_multiply,
};

/// The default CPU device (burn's `flex` backend).
pub fn cpu_device() -> Device {
    Device::flex()
}

/// CUDA device `index` (needs the `cuda` feature).
#[cfg(feature = "cuda")]
pub fn cuda_device(index: usize) -> Device {
    Device::cuda(index)
}
