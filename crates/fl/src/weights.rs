//! The host tensor type lives in `fedhubert-io` (shared with the model, the trainers and the
//! Python bridge); re-exported here because it is what crosses the wire.

pub use fedhubert_io::tensor::{
    Tensor, TensorError, Weights, load_safetensors, order_metadata, save_safetensors,
};

impl From<TensorError> for crate::FlError {
    fn from(e: TensorError) -> Self {
        match e {
            TensorError::Io { path, source } => crate::FlError::Io { path, source },
            TensorError::Format { path, why } => crate::FlError::Format { path, why },
            TensorError::Layout(s) => crate::FlError::Layout(s),
        }
    }
}
