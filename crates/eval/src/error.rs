//! Error type of the evaluation crate: every variant names the file, folder or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{dir}: no class folders with audio found (expected LABEL/*.wav or LABEL/*.flac)")]
    EmptyDataset { dir: PathBuf },
    #[error("{dir}: class `{class}` has no audio clips (.wav / .flac)")]
    EmptyClass { dir: PathBuf, class: String },
    #[error("bad audio: {0}")]
    Audio(#[from] fedhubert_audio::AudioError),
    #[error(
        "{path}: clip too short ({samples} samples at 16 kHz; the conv front-end needs at least {min})"
    )]
    TooShort {
        path: PathBuf,
        samples: usize,
        min: usize,
    },
    #[error("split: {0}")]
    Split(String),
    #[error("upstream {spec}: {why}")]
    Upstream { spec: String, why: String },
    #[error("model: {0}")]
    Model(#[from] fedhubert_model::ModelError),
    #[error("invalid probe config: {0}")]
    Config(String),
    #[error("{path}: cannot encode PNG: {why}")]
    Png { path: PathBuf, why: String },
    #[error("probe training diverged: {0}")]
    Diverged(String),
}

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            err,
        }
    }
}
