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
    /// A header field that claims more bytes than the file holds, refused before any buffer is
    /// sized from it.
    #[error(
        "{path}: header declares a {what} ({declared} bytes), but the whole file is {file_bytes} bytes (truncated file or corrupt header)"
    )]
    HeaderExceedsFile {
        path: PathBuf,
        what: String,
        declared: u64,
        file_bytes: u64,
    },
    /// The data section is not the size the header's shape gives (`declared` is `None` when that
    /// size overflows u64): truncated, padded, or a corrupt shape.
    #[error(
        "{path}: header shape {shape:?} declares {} bytes of data, but {available} bytes follow the header (truncated file or corrupt header)",
        declared.map_or_else(|| "more than 2^64".to_string(), |d| d.to_string())
    )]
    DataSize {
        path: PathBuf,
        shape: Vec<usize>,
        declared: Option<u64>,
        available: u64,
    },
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
