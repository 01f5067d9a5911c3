//! The run configuration file: YAML whose sections and keys follow the seeds (`federated:`,
//! `pretraining:`), every key overridable from the command line with `--set section.key=value`,
//! unknown keys rejected with the key named.

use std::path::Path;

use fedhubert_fl::{Compression, RunConfig, StrategyConfig};
use fedhubert_model::{HeadKind, HubertConfig, PretrainConfig};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::client::SimConfig;
use crate::data::BatchConfig;
use crate::trainer::{FEATURE_EXTRACTOR, TrainConfig};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FederatedSection {
    /// Use the first `num_clients` client folders of the partition (0 = all).
    pub num_clients: usize,
    pub num_rounds: u64,
    /// Flower's `fraction_fit`.
    pub client_fraction: f64,
    pub min_fit_clients: usize,
    pub fraction_evaluate: f64,
    pub eval_every: u64,
    /// fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox, fedmedian, fedtrimmedavg, krum.
    pub strategy: String,
    pub eta: Option<f32>,
    pub tau: Option<f32>,
    pub beta1: Option<f32>,
    pub beta2: Option<f32>,
    pub server_learning_rate: Option<f32>,
    pub server_momentum: Option<f32>,
    pub proximal_mu: Option<f32>,
    pub trim_beta: Option<f32>,
    pub num_malicious_clients: Option<usize>,
    pub num_clients_to_keep: Option<usize>,
    pub round_timeout_s: Option<f64>,
    pub accept_failures: bool,
    pub max_round_retries: u32,
    /// none, f16 or int8 (update compression on the uplink).
    pub compression: String,
    pub seed: u64,
}

impl Default for FederatedSection {
    fn default() -> Self {
        Self {
            num_clients: 0,
            num_rounds: 10,
            client_fraction: 1.0,
            min_fit_clients: 2,
            fraction_evaluate: 1.0,
            eval_every: 1,
            strategy: "fedavg".into(),
            eta: None,
            tau: None,
            beta1: None,
            beta2: None,
            server_learning_rate: None,
            server_momentum: None,
            proximal_mu: None,
            trim_beta: None,
            num_malicious_clients: None,
            num_clients_to_keep: None,
            round_timeout_s: None,
            accept_failures: true,
            max_round_retries: 2,
            compression: "none".into(),
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainingSection {
    /// Model size preset: tiny, student, base, large.
    pub preset: String,
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub intermediate_size: Option<usize>,
    /// Conv front-end channels (one value for all 7 layers); 512 in every published HuBERT.
    pub conv_channels: Option<usize>,
    /// Number of k-means classes (the seeds' `vocab_size`).
    pub vocab_size: usize,
    pub final_dim: Option<usize>,
    pub logit_temp: f64,
    /// cosine (fairseq) or linear (icefall hubert_ce).
    pub head: String,
    pub label_rate: f64,
    /// fairseq semantics: the fraction of frames that start a span (0.8 => about half masked).
    pub mask_prob: f64,
    pub mask_length: usize,
    pub feature_grad_mult: f64,
    pub dropout: Option<f64>,
    pub batch_size: usize,
    pub max_tokens: usize,
    /// Random crop length in samples (fairseq max_sample_size).
    pub max_audio_length: usize,
    pub min_audio_length: usize,
    /// Local steps per round; when 0, `local_epochs` passes over the client's data.
    pub local_steps: u64,
    pub local_epochs: u64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_rounds: u64,
    pub clip_norm: f64,
    pub update_freq: usize,
    pub freeze_feature_extractor: bool,
    pub label_stem: String,
    pub cache_clients: bool,
}

impl Default for PretrainingSection {
    fn default() -> Self {
        Self {
            preset: "base".into(),
            hidden_size: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            intermediate_size: None,
            conv_channels: None,
            vocab_size: 100,
            final_dim: None,
            logit_temp: 0.1,
            head: "cosine".into(),
            label_rate: 100.0,
            mask_prob: 0.8,
            mask_length: 10,
            feature_grad_mult: 0.1,
            dropout: None,
            batch_size: 8,
            max_tokens: 1_400_000,
            max_audio_length: 250_000,
            min_audio_length: 32_000,
            local_steps: 0,
            local_epochs: 1,
            learning_rate: 5e-4,
            weight_decay: 0.01,
            warmup_rounds: 0,
            clip_norm: 10.0,
            update_freq: 1,
            freeze_feature_extractor: false,
            label_stem: "km".into(),
            cache_clients: true,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunFile {
    pub federated: FederatedSection,
    pub pretraining: PretrainingSection,
}

fn cfg_err(why: impl std::fmt::Display) -> TrainError {
    TrainError::Config(why.to_string())
}

impl RunFile {
    /// Reads a YAML file, applies `section.key=value` overrides, and validates.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, TrainError> {
        let mut tree: serde_yaml::Value = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| cfg_err(format!("{}: {e}", p.display())))?;
                serde_yaml::from_str(&text).map_err(|e| cfg_err(format!("{}: {e}", p.display())))?
            }
            None => serde_yaml::Value::Mapping(Default::default()),
        };
        if tree.is_null() {
            tree = serde_yaml::Value::Mapping(Default::default());
        }
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| cfg_err(format!("override {o:?}: expected section.key=value")))?;
            let (section, field) = key.split_once('.').ok_or_else(|| {
                cfg_err(format!(
                    "override {o:?}: expected section.key=value (e.g. federated.num_rounds=20)"
                ))
            })?;
            let v: serde_yaml::Value =
                serde_yaml::from_str(value).map_err(|e| cfg_err(format!("override {o:?}: {e}")))?;
            let map = tree
                .as_mapping_mut()
                .ok_or_else(|| cfg_err("config root must be a mapping"))?;
            let sec = map
                .entry(serde_yaml::Value::String(section.to_string()))
                .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
            sec.as_mapping_mut()
                .ok_or_else(|| cfg_err(format!("config section {section} must be a mapping")))?
                .insert(serde_yaml::Value::String(field.to_string()), v);
        }
        let where_ = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        let rf: RunFile =
            serde_yaml::from_value(tree).map_err(|e| cfg_err(format!("{where_}: {e}")))?;
        rf.validate()?;
        Ok(rf)
    }

    /// Every derived config builds and validates (model, strategy, trainer): what a run file
    /// read from a file, or received over the wire, must pass before use.
    pub fn validate(&self) -> Result<(), TrainError> {
        self.model_config()?;
        self.strategy()?;
        self.train_config()?.validate()
    }

    pub fn model_config(&self) -> Result<HubertConfig, TrainError> {
        let p = &self.pretraining;
        let mut c = match p.preset.as_str() {
            "tiny" => HubertConfig::tiny(),
            "student" => HubertConfig::student(),
            "base" => HubertConfig::base(),
            "large" => HubertConfig::large(),
            other => {
                return Err(cfg_err(format!(
                    "pretraining.preset {other:?}: expected tiny, student, base or large"
                )));
            }
        };
        if let Some(v) = p.hidden_size {
            c.hidden_size = v;
        }
        if let Some(v) = p.num_hidden_layers {
            c.num_hidden_layers = v;
        }
        if let Some(v) = p.num_attention_heads {
            c.num_attention_heads = v;
        }
        if let Some(v) = p.intermediate_size {
            c.intermediate_size = v;
        }
        if let Some(ch) = p.conv_channels {
            c.conv_dim = vec![ch; c.conv_dim.len()];
        }
        if let Some(d) = p.dropout {
            c.hidden_dropout = d;
            c.attention_dropout = d;
            c.feat_proj_dropout = d;
        }
        c.mask_time_prob = p.mask_prob;
        c.mask_time_length = p.mask_length;
        c.validate()
            .map_err(|e| cfg_err(format!("pretraining: {e}")))?;
        Ok(c)
    }

    pub fn pretrain_config(&self) -> Result<PretrainConfig, TrainError> {
        let p = &self.pretraining;
        let head = match p.head.as_str() {
            "cosine" => HeadKind::Cosine,
            "linear" => HeadKind::Linear,
            o => {
                return Err(cfg_err(format!(
                    "pretraining.head {o:?}: expected cosine or linear"
                )));
            }
        };
        let hidden = self.model_config()?.hidden_size;
        let c = PretrainConfig {
            num_classes: p.vocab_size,
            final_dim: p
                .final_dim
                .unwrap_or(if hidden >= 768 { 256 } else { hidden.min(256) }),
            head,
            logit_temp: p.logit_temp,
            label_rate: p.label_rate,
            feature_grad_mult: if p.freeze_feature_extractor {
                0.0
            } else {
                p.feature_grad_mult
            },
            ..Default::default()
        };
        c.validate()
            .map_err(|e| cfg_err(format!("pretraining: {e}")))?;
        Ok(c)
    }

    pub fn train_config(&self) -> Result<TrainConfig, TrainError> {
        let p = &self.pretraining;
        Ok(TrainConfig {
            learning_rate: p.learning_rate,
            weight_decay: p.weight_decay,
            warmup_steps: 0,
            max_steps: u64::MAX,
            clip_norm: p.clip_norm,
            update_freq: p.update_freq,
            freeze_feature_extractor: p.freeze_feature_extractor,
            batch: BatchConfig {
                batch_size: p.batch_size,
                max_tokens: p.max_tokens,
                max_sample_size: p.max_audio_length,
                min_sample_size: p.min_audio_length,
            },
            seed: self.federated.seed,
            ..Default::default()
        })
    }

    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            local_steps: self.pretraining.local_steps,
            label_stem: self.pretraining.label_stem.clone(),
            cache_clients: self.pretraining.cache_clients,
        }
    }

    pub fn strategy(&self) -> Result<StrategyConfig, TrainError> {
        let f = &self.federated;
        let mut s = StrategyConfig::from_name(&f.strategy)
            .map_err(|e| cfg_err(format!("federated.strategy: {e}")))?;
        match &mut s {
            StrategyConfig::FedAdam {
                eta,
                beta_1,
                beta_2,
                tau,
            }
            | StrategyConfig::FedYogi {
                eta,
                beta_1,
                beta_2,
                tau,
            } => {
                *eta = f.eta.unwrap_or(*eta);
                *beta_1 = f.beta1.unwrap_or(*beta_1);
                *beta_2 = f.beta2.unwrap_or(*beta_2);
                *tau = f.tau.unwrap_or(*tau);
            }
            StrategyConfig::FedAdagrad { eta, tau } => {
                *eta = f.eta.unwrap_or(*eta);
                *tau = f.tau.unwrap_or(*tau);
            }
            StrategyConfig::FedAvgM {
                server_learning_rate,
                server_momentum,
            } => {
                *server_learning_rate = f.server_learning_rate.unwrap_or(*server_learning_rate);
                *server_momentum = f.server_momentum.unwrap_or(*server_momentum);
            }
            StrategyConfig::FedProx { proximal_mu } => {
                *proximal_mu = f.proximal_mu.unwrap_or(*proximal_mu)
            }
            StrategyConfig::FedTrimmedAvg { beta } => *beta = f.trim_beta.unwrap_or(*beta),
            StrategyConfig::Krum {
                num_malicious_clients,
                num_clients_to_keep,
            } => {
                *num_malicious_clients = f.num_malicious_clients.unwrap_or(*num_malicious_clients);
                *num_clients_to_keep = f.num_clients_to_keep.unwrap_or(*num_clients_to_keep);
            }
            StrategyConfig::FedAvg | StrategyConfig::FedMedian => {}
        }
        s.validate()
            .map_err(|e| cfg_err(format!("federated: {e}")))?;
        Ok(s)
    }

    /// The engine's run configuration; `learning_rate`, `local_steps`/`local_epochs` and
    /// `warmup_rounds` travel to clients in the round config.
    pub fn run_config(&self) -> Result<RunConfig, TrainError> {
        let f = &self.federated;
        let p = &self.pretraining;
        let compression: Compression = f
            .compression
            .parse()
            .map_err(|e| cfg_err(format!("federated.compression: {e}")))?;
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("learning_rate".into(), p.learning_rate);
        if p.local_steps > 0 {
            extra.insert("local_steps".into(), p.local_steps as f64);
        } else {
            extra.insert("local_epochs".into(), p.local_epochs as f64);
        }
        Ok(RunConfig {
            num_rounds: f.num_rounds,
            fraction_fit: f.client_fraction,
            min_fit_clients: f.min_fit_clients,
            fraction_evaluate: f.fraction_evaluate,
            min_evaluate_clients: 1,
            eval_every: f.eval_every,
            seed: f.seed,
            round_timeout_s: f.round_timeout_s,
            accept_failures: f.accept_failures,
            max_round_retries: f.max_round_retries,
            compression,
            frozen_prefixes: if p.freeze_feature_extractor {
                vec![FEATURE_EXTRACTOR.to_string()]
            } else {
                vec![]
            },
            client_extra: extra,
        })
    }
}
