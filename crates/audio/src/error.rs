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
    /// A header that declares more data than the file can hold: truncated or crafted, refused
    /// before anything is allocated from it.
    #[error(
        "{path}: header declares a {what} of {declared} bytes, but the whole file is {file_bytes} bytes (truncated file or corrupt header)"
    )]
    HeaderExceedsFile {
        path: PathBuf,
        what: String,
        declared: u64,
        file_bytes: u64,
    },
    #[error(
        "{path}: longer than {max} samples, the most one file may decode to (about 18.6 h of 16 kHz mono); split the file"
    )]
    TooLong { path: PathBuf, max: u64 },
    /// The manifest's `num_samples` and the decoded audio disagree: the file changed since the
    /// manifest was written, or the manifest is wrong; either way frames would not line up.
    #[error(
        "{path}: utterance {id}: the manifest says num_samples {manifest}, the audio decodes to {decoded} samples at 16 kHz (re-run prepare on the current audio)"
    )]
    NumSamplesMismatch {
        path: PathBuf,
        id: String,
        manifest: u64,
        decoded: u64,
    },
    /// A manifest path that is absolute or climbs out of the declared root with `..`.
    #[error(
        "{manifest}: line {line}: path {entry:?} leaves the audio root {root} (absolute, or `..` above the root); paths outside the root are refused unless explicitly allowed (--allow-outside-root)"
    )]
    OutsideRoot {
        manifest: PathBuf,
        line: usize,
        entry: String,
        root: PathBuf,
    },
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
