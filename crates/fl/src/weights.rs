//! The host tensor type lives in `fedhubert-io` (shared with the model, the trainers and the
//! Python bridge); re-exported here because it is what crosses the wire.

pub use fedhubert_io::tensor::{
    Tensor, TensorError, Weights, load_safetensors, order_metadata, save_safetensors,
};
