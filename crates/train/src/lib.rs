//! The local HuBERT trainer and the federated client built on it.
//!
//! - [`data`]: a client's audio and labels in memory; fairseq-style batches with random crops.
//! - [`trainer`]: masked-prediction training steps with AdamW, warm-up + linear decay,
//!   global-norm clipping, gradient accumulation, FedProx, a frozen front-end, checkpoints.
//! - [`client`]: a [`fedhubert_fl::ClientPool`] whose clients train on their own folders.

pub mod client;
pub mod config;
pub mod data;
pub mod trainer;

pub use client::{ClientCache, HubertClients, SimConfig};
pub use config::RunFile;
pub use data::{BatchConfig, ClientData, Utt, load_client_dir};
pub use trainer::{
    AdamState, FEATURE_EXTRACTOR, LocalTrainer, Metrics, TrainConfig, evaluate_model, from_weights,
    to_weights,
};

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
    #[error("data: {0}")]
    Data(String),
    #[error("config: {0}")]
    Config(String),
    #[error("training diverged: {0}")]
    Diverged(String),
}
