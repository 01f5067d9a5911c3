//! Audio in, client partitions out: decoding (FLAC, WAV), resampling to 16 kHz, LibriSpeech-layout
//! scanning, manifests, and partitioning into federated clients with train/validation splits.

pub mod decode;
mod error;
pub mod manifest;
pub mod partition;
pub mod scan;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use decode::{Audio, MODEL_SAMPLE_RATE, is_audio_file, load_audio};
pub use error::AudioError;
pub use manifest::{Entry, Manifest, Split};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a reader
/// never sees a half-written file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), AudioError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| AudioError::io(dir, e))?;
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    let tmp: PathBuf = dir.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        AudioError::io(path, e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| AudioError::io(path, e))
}
