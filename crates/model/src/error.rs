//! Error type of the model crate.

use std::path::{Path, PathBuf};

/// Errors of configuration, weight import/export and checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration field has an invalid value.
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// The HF field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// JSON (de)serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// File-system error on a path.
    #[error("io error on {path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The safetensors container could not be parsed or written.
    #[error("safetensors: {0}")]
    SafeTensors(String),
    /// Parameters expected by the model are absent from the weights.
    #[error("missing keys in weights: {0:?}")]
    MissingKeys(Vec<String>),
    /// Weights contain parameters the model does not have.
    #[error("unexpected keys in weights: {0:?}")]
    UnexpectedKeys(Vec<String>),
    /// A parameter has the wrong shape.
    #[error("shape mismatch for `{key}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Parameter name.
        key: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype we cannot read.
    #[error("unsupported dtype {dtype} for `{key}` (expected F32, F16, BF16 or F64)")]
    UnsupportedDtype {
        /// Parameter name.
        key: String,
        /// The dtype found.
        dtype: String,
    },
    /// Inputs of a forward call are inconsistent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file could not be used (its content, not its reading, is at fault).
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
