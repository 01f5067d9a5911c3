//! # fedhubert-eval
//!
//! Downstream evaluation of HuBERT upstreams, SUPERB style: the upstream is frozen, every
//! hidden layer is extracted once per clip, a learned softmax-weighted sum of the layers (weights
//! start at 0, i.e. uniform) is mean-pooled over frames and fed to a linear classifier (or a
//! small MLP), trained with AdamW + cross-entropy; the model is selected on the validation split
//! and test accuracy, the learned layer weights and a confusion matrix are reported.
//!
//! Because the weighted layer sum, the per-layer standardisation and mean pooling are all
//! linear (affine) maps, `mean_t(sum_l w_l h_l[t]) = sum_l w_l mean_t(h_l[t])`: the cache keeps
//! the mean-pooled vector of each layer per clip (`[N, L+1, H]`), which makes the probe exact
//! and cheap (the frame-level states are never needed after extraction).
//!
//! ## API
//! - [`load_labelled_dir`] (`LABEL/*.wav|flac` folders, e.g. Speech Commands) -> [`LabelledClips`];
//!   [`speaker_of`] (speaker id from `HASH_nohash_N.wav` names).
//! - [`split_clips`] -> [`DataSplit`]: seeded, speaker-disjoint when every name carries a
//!   speaker id, else stratified per class.
//! - [`load_upstream`] ([`UpstreamSpec`]: checkpoint file, HF directory, or random init);
//!   [`AcousticFeature`]: the MFCC and log-mel baselines, probed the same way.
//! - [`extract_pooled`] -> [`PooledFeatures`] (the cache), [`train_probe`] on it.
//! - [`probe`]: all of the above on one upstream -> [`ProbeReport`]; [`write_report`] writes
//!   `probe.json`, `confusion.{csv,json,png}` atomically.
//! - [`finetune`] (`ProbeConfig::finetune`): optional joint fine-tuning of upstream + head through
//!   burn autodiff after the frozen probe.

pub mod acoustic;
pub mod data;
pub mod error;
pub mod features;
pub mod finetune;
pub mod head;
pub mod layer_features;
pub mod report;
pub mod split;
pub mod upstream;

mod run;

pub use acoustic::AcousticFeature;
pub use data::{Clip, LabelledClips, LoadConfig, load_labelled_dir, speaker_of};
pub use error::EvalError;
pub use features::{
    PooledFeatures, extract_pooled, hidden_states, hidden_states_in_pieces, normalize_wave,
};
pub use finetune::{FinetuneConfig, FinetuneOutcome, finetune};
pub use head::{HeadConfig, HeadKind, ProbeHead, TrainOutcome, evaluate_head, train_probe};
pub use layer_features::{
    DEFAULT_CHUNK_SAMPLES, LayerFeaturesSummary, LayerSource, extract_layer_features,
    extract_layer_features_as, layer_feature_stem, load_feature_model,
};
pub use report::{
    CELL_PX, ConfusionMatrix, CrossValidation, FinetuneSummary, ProbeReport, SplitSummary,
    confusion_png, confusion_png_size, write_report,
};
pub use run::{LayerProbe, ProbeConfig, Upstream, probe};
pub use split::{DataSplit, SplitConfig, kfold_splits, split_clips};
pub use upstream::{UpstreamSpec, arch_config, load_upstream};
