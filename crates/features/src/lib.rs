//! Kaldi-compatible MFCC + deltas (fairseq HuBERT iteration-1 targets) and feature shards.

pub mod extract;
pub mod mfcc;
pub mod shard;

pub use extract::{ExtractOptions, ExtractSummary, FeaturesInfo, Progress, extract_manifest};
pub use mfcc::{FRAME_RATE, MFCC_DIM, Mfcc, MfccConfig, MfccScratch, RECIPE, compute_deltas};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
    #[error("{0}")]
    Shape(String),
    /// A manifest row whose audio cannot be read: names the manifest, its line, the utterance and
    /// (through `error`) the audio file. The inner error is part of the message, not a `source`,
    /// so `{:#}` chains do not print it twice.
    #[error("{manifest}: line {line} (utterance {id}): {error}")]
    Audio {
        manifest: PathBuf,
        line: usize,
        id: String,
        error: fedhubert_audio::AudioError,
    },
    #[error(transparent)]
    Manifest(#[from] fedhubert_audio::AudioError),
}
