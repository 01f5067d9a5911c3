//! Federated rounds in the spirit of Flower: a `Strategy` (FedAvg, FedAvgM, FedAdam, FedYogi,
//! FedAdagrad, FedProx, FedMedian, FedTrimmedAvg, Krum), client sampling, failures and stragglers,
//! traffic accounting with optional update compression, and round checkpoints with exact resume.
//!
//! The crate knows nothing about HuBERT: clients are a `ClientPool` and weights are named f32
//! tensors, so the same engine drives simulation, distillation and the Flower bridge.

pub mod compress;
pub mod rounds;
pub mod strategy;
pub mod weights;

use std::path::{Path, PathBuf};

pub use compress::Compression;
pub use rounds::{ClientPool, EvalRes, FitConfig, RoundRecord, RunConfig, RunResult, run};
pub use strategy::{FitRes, Strategy, StrategyConfig};
pub use weights::{Tensor, Weights};

#[derive(Debug, thiserror::Error)]
pub enum FlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
    #[error("weights layout mismatch: {0}")]
    Layout(String),
    #[error("config: {0}")]
    Config(String),
    #[error("client {client}: {why}")]
    Client { client: usize, why: String },
    #[error("round {0}: no client results to aggregate")]
    NoResults(u64),
    #[error(
        "round {round}: only {got} clients replied in {attempts} attempts, min_fit_clients is {needed} ({why}); the checkpoint of the last completed round is kept: fix the cause and rerun with --resume"
    )]
    RoundFailed {
        round: u64,
        attempts: u32,
        got: usize,
        needed: usize,
        why: String,
    },
}

/// Temp file in the same folder, fsync, rename: readers never see half a file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), FlError> {
    fedhubert_io::atomic_write(path, bytes).map_err(|e| FlError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}
