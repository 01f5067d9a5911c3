//! The local HuBERT trainer and the federated client built on it.
//!
//! - [`data`]: a client's audio and labels in memory; fairseq-style batches with random crops.
//! - [`core`]: the trainer core every trainer shares (engine RNG lock, gradient collection,
//!   the one clipping function, FedProx, host AdamW, the epoch plan and the step loop).
//! - [`trainer`]: masked-prediction training steps on it, warm-up + linear decay, gradient
//!   accumulation, a frozen front-end, checkpoints.
//! - [`client`]: a [`fedhubert_fl::ClientPool`] whose clients train on their own folders.

pub mod card;
pub mod client;
pub mod config;
pub mod core;
pub mod data;
pub mod trainer;

pub use card::{CardData, ModelCard, write_source_card};
pub use client::{ClientCache, Heldout, HubertClients, SimConfig};
pub use config::{FederatedRun, FederatedSection, Preset, RunFile};
pub use core::{AdamState, Grads, StepMetrics, StepPlan};
pub use data::{
    BatchConfig, ClientData, LabelSpec, Utt, check_partition_labels, load_client_dir,
    pin_run_labels,
};
pub use trainer::{FEATURE_EXTRACTOR, LocalTrainer, Metrics, TrainConfig, evaluate_model};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Audio(#[from] fedhubert_audio::AudioError),
    #[error(transparent)]
    Features(#[from] fedhubert_features::FeatureError),
    #[error(transparent)]
    Model(#[from] fedhubert_model::ModelError),
    #[error(transparent)]
    Fl(#[from] fedhubert_fl::FlError),
    #[error(transparent)]
    Tensor(#[from] fedhubert_io::TensorError),
    #[error(transparent)]
    Provenance(#[from] fedhubert_io::provenance::ProvenanceError),
    #[error("data: {0}")]
    Data(String),
    #[error("config: {0}")]
    Config(String),
    #[error("training diverged: {0}")]
    Diverged(String),
}
