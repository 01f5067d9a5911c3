//! Federated rounds in the spirit of Flower.
//!
//! - [`engine`]: the one round engine, a state machine without I/O that every runner drives.
//! - [`strategy`]: strategies as an aggregator times a server optimizer (FedAvg, FedAvgM,
//!   FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum), wrappers around any of them.
//! - [`instructions`]: the typed instructions a client gets, and its side of the upload;
//!   [`schedule`]: the learning-rate schedule over the run's global updates.
//! - [`privacy`]: client-level differential privacy (DP-FedAvg, adaptive clipping) and its RDP
//!   accountant, a wrapper the engine puts around any mean-based strategy.
//! - [`rounds`]: the native runner over a [`ClientPool`]; [`store`]: checkpoints and metrics.
//!
//! The crate knows nothing about HuBERT (nor burn): clients are a `ClientPool` or messages, and
//! weights are named f32 host tensors, so the same engine drives simulation, distillation and
//! the Flower bridge.

pub mod compress;
pub mod engine;
pub mod instructions;
pub mod lock;
pub mod privacy;
pub mod rounds;
pub mod schedule;
pub mod store;
pub mod strategy;
pub mod weights;

use std::path::Path;

pub use fedhubert_io::TensorError;

pub use compress::Compression;
pub use engine::{
    EvalRes, Exchange, ExchangeKind, Failure, Progress, Reply, RoundEngine, RoundRecord,
};
pub use instructions::{
    ClientInstructions, ClientSettings, LocalOptimizerState, LocalWork, MESSAGE_FORMAT, Upload,
    UploadPlan, prepare_reply, prepare_upload,
};
pub use lock::FolderLock;
pub use privacy::{PrivacyConfig, PrivacyMode, PrivacyRecord};
pub use rounds::{ClientPool, RunConfig, RunResult, run};
pub use schedule::{LrSchedule, UpdateWindow};
pub use strategy::{FitRes, Strategy, StrategyConfig, StrategySpec};
pub use weights::{Tensor, Weights};

#[derive(Debug, thiserror::Error)]
pub enum FlError {
    /// A file, or the layout of a set of weights: see [`TensorError`].
    #[error(transparent)]
    Tensor(#[from] TensorError),
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

impl FlError {
    /// The weights do not have the layout (names, shapes) they must have.
    pub fn layout(why: impl Into<String>) -> Self {
        FlError::Tensor(TensorError::Layout(why.into()))
    }

    /// `path` holds something other than what was expected.
    pub fn format(path: &Path, why: impl std::fmt::Display) -> Self {
        FlError::Tensor(TensorError::Format {
            path: path.to_path_buf(),
            why: why.to_string(),
        })
    }
}

/// Temp file in the same folder, fsync, rename: readers never see half a file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), FlError> {
    fedhubert_io::atomic_write(path, bytes).map_err(|e| {
        FlError::Tensor(TensorError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    })
}
