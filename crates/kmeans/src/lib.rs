//! fedhubert-kmeans: the k-means that produces HuBERT's pseudo-labels.
//!
//! * [`minibatch`]: sklearn-compatible `MiniBatchKMeans` (fairseq's `learn_kmeans.py` recipe):
//!   greedy k-means++ on an init sample, `n_init` restarts, counts-based per-centre learning rate,
//!   EWA-inertia early stopping. Streaming over a [`FrameSource`], memory bounded by the batch.
//! * [`federated`]: one global codebook learned from per-cluster sums/counts only (no frame leaves a
//!   client), with privacy-preserving initialisation, empty-cluster splitting and client dropout.
//! * [`modes`]: `local` / `federated` / `central` over client feature shards, label writing and the
//!   label-agreement metric.

// Numeric kernels index several parallel arrays by the same loop variable.
#![allow(clippy::needless_range_loop)]

pub mod codebook;
pub mod federated;
mod kernel;
pub mod kmeanspp;
pub mod metrics;
pub mod minibatch;
pub mod modes;
pub mod source;

use std::path::PathBuf;

pub use codebook::{Codebook, CodebookMeta};
pub use federated::{
    ClientStats, FederatedConfig, FederatedFit, InProcessClient, KmClient, KmeansServer,
    LocalSummary, RoundLog, ServerUpdate, client_stats, fit_federated, fit_federated_from,
    server_init, split_empty, weighted_lloyd,
};
pub use kmeanspp::kmeans_plusplus;
pub use metrics::{Agreement, ClientAgreement, Contingency};
pub use minibatch::{Evaluation, MiniBatchConfig, MiniBatchFit, evaluate, fit_minibatch};
pub use modes::{LabelReport, Mode, label_client};
pub use source::{
    ConcatSource, FrameSource, InMemorySource, SampledSource, ShardSource, sample_utterances,
};

#[derive(Debug, thiserror::Error)]
pub enum KmError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Features(#[from] fedhubert_features::FeatureError),
    #[error(transparent)]
    Provenance(#[from] fedhubert_io::provenance::ProvenanceError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {why}")]
    Codebook { path: PathBuf, why: String },
    #[error("client {client}: {why}")]
    Client { client: String, why: String },
}

pub type Result<T, E = KmError> = std::result::Result<T, E>;

/// Runs `f` in a rayon pool of `threads` threads (`None`: the global pool, one thread per core).
pub fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T> {
    match threads {
        None => Ok(f()),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .build()
                .map_err(|e| KmError::Invalid(format!("cannot build a {n}-thread pool: {e}")))?;
            Ok(pool.install(f))
        }
    }
}
