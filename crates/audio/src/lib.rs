//! Audio in, client partitions out: decoding (FLAC, WAV), resampling to 16 kHz, LibriSpeech-layout
//! scanning, manifests, and partitioning into federated clients with train/validation splits.

pub mod decode;
mod error;
pub mod manifest;
pub mod partition;
pub mod scan;

use std::path::Path;

pub use decode::{Audio, MODEL_SAMPLE_RATE, decode_audio_bytes, is_audio_file, load_audio};
pub use error::AudioError;
pub use manifest::{Entry, Manifest, ManifestOptions, Split};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a reader
/// never sees a half-written file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), AudioError> {
    fedhubert_io::atomic_write(path, bytes).map_err(|e| AudioError::io(path, e))
}
