use std::path::PathBuf;

/// Every error names the file (or field) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot decode audio: {why}")]
    Decode { path: PathBuf, why: String },
    #[error("{path}: zero-length audio (no samples)")]
    Empty { path: PathBuf },
    #[error("{path}: unsupported audio file (expected .flac or .wav)")]
    Unsupported { path: PathBuf },
    #[error("{path}: cannot resample from {from} Hz: {why}")]
    Resample {
        path: PathBuf,
        from: u32,
        why: String,
    },
    #[error("{path}: line {line}: {why}")]
    Manifest {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error(
        "{dir}: no audio files found (expected .flac or .wav files, LibriSpeech layout SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac)"
    )]
    NoAudio { dir: PathBuf },
    #[error("partition: {0}")]
    Partition(String),
    #[error("{path}: {why}")]
    Json { path: PathBuf, why: String },
}

impl AudioError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AudioError::Io {
            path: path.into(),
            source,
        }
    }
}
