//! # fedhubert-distill
//!
//! Knowledge distillation of a frozen HuBERT teacher into a small student, on the same federated
//! engine as pretraining.
//!
//! Losses ([`losses`]), each weighted by [`DistillConfig`]:
//! - output distillation: `KL(softmax(t/T) || softmax(s/T)) * T^2` between the teacher's and the
//!   student's predicted-cluster distributions (both have the pretraining head over the same
//!   k-means classes), on every frame;
//! - feature distillation: MSE between mapped hidden states (student layer `s` -> teacher layer
//!   `t`, `hidden_states[layer + 1]`), through a learned Linear projection when widths differ;
//! - DistilHuBERT prediction heads: one Linear head per chosen teacher layer on the student's last
//!   hidden state, `L1 mean + cos_weight * mean(-log sigmoid(cos(pred, target)))`;
//! - MVQ-KD: one cross-entropy per codebook of a multi-codebook vector quantizer ([`quantizer`])
//!   trained on teacher embeddings.
//!
//! Every step blends them with the masked-prediction loss: `alpha * distill + (1 - alpha) * mlm`.
//!
//! Three federated methods ([`Mode`]):
//! - [`server::ServerDistill`]: a `Strategy` wrapper; clients pretrain students on their own data,
//!   the server distils the teacher into the aggregate on a server-side audio set;
//! - [`client::DistillClients`] with [`Mode::Client`]: each client holds the frozen teacher and
//!   distils on its own audio; the server aggregates students only;
//! - [`client::DistillClients`] with [`Mode::Mvq`]: clients predict codebook indexes of the teacher's
//!   embeddings, computed where the audio lives with a quantizer trained on the server-side set.

pub mod client;
pub mod codes;
pub mod config;
pub mod data;
pub mod losses;
pub mod quantizer;
pub mod server;
pub mod setup;
pub mod student;
pub mod teacher;
pub mod trainer;

pub use client::DistillClients;
pub use codes::CodeTable;
pub use config::{DistillConfig, DistillRunFile, LayerPlan, Mode, MvqConfig, StudentInit};
pub use quantizer::{Quantizer, QuantizerReport};
pub use server::{ServerDistill, ServerRoundLog};
pub use setup::DistillSetup;
pub use student::{DistillStudent, hubert_param_count, init_from_teacher};
pub use teacher::Teacher;
pub use trainer::{DistillMetrics, DistillParts, DistillTrainer};

#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error(transparent)]
    Model(#[from] fedhubert_model::ModelError),
    #[error(transparent)]
    Train(#[from] fedhubert_train::TrainError),
    #[error(transparent)]
    Fl(#[from] fedhubert_fl::FlError),
    #[error(transparent)]
    Audio(#[from] fedhubert_audio::AudioError),
    #[error(transparent)]
    Features(#[from] fedhubert_features::FeatureError),
    #[error(transparent)]
    Provenance(#[from] fedhubert_io::provenance::ProvenanceError),
    /// A configuration field is invalid; the message starts with the field's name.
    #[error("config: {0}")]
    Config(String),
    /// A file is missing or malformed; the message names it.
    #[error("{0}")]
    Data(String),
    #[error("training diverged: {0}")]
    Diverged(String),
}

pub type Result<T, E = DistillError> = std::result::Result<T, E>;

pub(crate) fn cfg_err(why: impl std::fmt::Display) -> DistillError {
    DistillError::Config(why.to_string())
}
