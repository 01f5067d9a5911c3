//! The run configuration file: YAML whose sections and keys follow the seeds (`federated:`,
//! `pretraining:`), every key overridable from the command line with `--set section.key=value`,
//! unknown keys rejected with the key named.

use std::path::Path;

use fedhubert_fl::{
    ClientSettings, Compression, LocalOptimizerState, LocalWork, LrSchedule, PrivacyConfig,
    RunConfig, StrategyConfig, UploadPlan,
};
use fedhubert_model::{HeadKind, HubertConfig, PretrainConfig};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::client::SimConfig;
use crate::data::{BatchConfig, LabelSpec};
use crate::trainer::{FEATURE_EXTRACTOR, TrainConfig};

/// The `federated:` section. The seeds' YAML puts the strategy's settings beside the run's
/// (`strategy: FedAdam`, `eta`, `beta1`, ... next to `num_rounds`); it is parsed in two stages:
/// the keys of [`FederatedRun`] first, then every other key as a setting of the named strategy,
/// so an unknown or misplaced key is an error naming it and the strategy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(
    try_from = "serde_json::Map<String, serde_json::Value>",
    into = "serde_json::Map<String, serde_json::Value>"
)]
pub struct FederatedSection {
    pub run: FederatedRun,
    pub strategy: StrategyConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FederatedRun {
    /// Use the first `num_clients` client folders of the partition (0 = all).
    pub num_clients: usize,
    pub num_rounds: u64,
    /// Flower's `fraction_fit`.
    pub client_fraction: f64,
    pub min_fit_clients: usize,
    pub fraction_evaluate: f64,
    pub eval_every: u64,
    /// FedProx's mu, a client setting usable with any strategy (`strategy: FedProx` is FedAvg
    /// with mu 0.01 unless given).
    pub proximal_mu: f32,
    pub round_timeout_s: Option<f64>,
    pub accept_failures: bool,
    pub max_round_retries: u32,
    /// Update compression on the uplink.
    pub compression: Compression,
    pub seed: u64,
}

impl Default for FederatedRun {
    fn default() -> Self {
        Self {
            num_clients: 0,
            num_rounds: 10,
            client_fraction: 1.0,
            min_fit_clients: 2,
            fraction_evaluate: 1.0,
            eval_every: 1,
            proximal_mu: 0.0,
            round_timeout_s: None,
            accept_failures: true,
            max_round_retries: 2,
            compression: Compression::None,
            seed: 0,
        }
    }
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

impl TryFrom<JsonMap> for FederatedSection {
    type Error = String;

    fn try_from(mut keys: JsonMap) -> Result<Self, String> {
        let name = match keys.remove("strategy") {
            None => "fedavg".to_string(),
            Some(serde_json::Value::String(s)) => s.to_ascii_lowercase(),
            Some(v) => return Err(format!("strategy: expected a name, got {v}")),
        };
        let run_keys = serde_json::to_value(FederatedRun::default()).map_err(|e| e.to_string())?;
        let run_keys = run_keys.as_object().ok_or("run keys")?;
        let (mut run, settings): (JsonMap, JsonMap) = keys
            .into_iter()
            .partition(|(k, _)| run_keys.contains_key(k));
        let name = if name == "fedprox" {
            run.entry("proximal_mu").or_insert(0.01.into());
            "fedavg".to_string()
        } else {
            name
        };
        let run: FederatedRun = serde_json::from_value(run.into()).map_err(|e| e.to_string())?;
        let strategy = StrategyConfig::from_map(&name, settings).map_err(|e| {
            let why = match e {
                fedhubert_fl::FlError::Config(s) => s,
                e => e.to_string(),
            };
            if why.contains("unknown field") {
                let keys: Vec<&str> = run_keys.keys().map(String::as_str).collect();
                format!("{why} (the run's own keys are {})", keys.join(", "))
            } else {
                why
            }
        })?;
        Ok(Self { run, strategy })
    }
}

impl From<FederatedSection> for JsonMap {
    fn from(f: FederatedSection) -> JsonMap {
        let mut m = match serde_json::to_value(f.run) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => JsonMap::new(),
        };
        if let Ok(serde_json::Value::Object(s)) = serde_json::to_value(f.strategy) {
            m.extend(s);
        }
        m
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainingSection {
    /// Model size preset.
    pub preset: Preset,
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
    pub head: HeadKind,
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
    /// Peak learning rate of the schedule.
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// fairseq's `lr_scheduler`: polynomial_decay (warm-up, then linear decay to 0 at the end of
    /// the run) or fixed (warm-up, then the peak), over the run's global updates.
    pub lr_schedule: LrScheduleKind,
    /// Warm-up length in global updates (round r covers updates (r-1)*local_steps .. r*local_steps).
    pub warmup_updates: Option<u64>,
    /// Warm-up length in rounds; give this or `warmup_updates`. Without either, the HuBERT
    /// recipe's share: 8% of the run (32k of 400k updates).
    pub warmup_rounds: Option<u64>,
    /// `reset` (fresh AdamW moments every round, the FedAvg default) or `keep` (each client
    /// continues from its own moments of its previous round; they never leave it).
    pub local_optimizer_state: LocalOptimizerState,
    pub clip_norm: f64,
    pub update_freq: usize,
    pub freeze_feature_extractor: bool,
    pub label_stem: String,
    pub cache_clients: bool,
}

impl Default for PretrainingSection {
    fn default() -> Self {
        Self {
            preset: Preset::Base,
            hidden_size: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            intermediate_size: None,
            conv_channels: None,
            vocab_size: 100,
            final_dim: None,
            logit_temp: 0.1,
            head: HeadKind::Cosine,
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
            lr_schedule: LrScheduleKind::PolynomialDecay,
            warmup_updates: None,
            warmup_rounds: None,
            local_optimizer_state: LocalOptimizerState::Reset,
            clip_norm: 10.0,
            update_freq: 1,
            freeze_feature_extractor: false,
            label_stem: "km".into(),
            cache_clients: true,
        }
    }
}

/// The run file's `lr_schedule` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    #[default]
    PolynomialDecay,
    Fixed,
}

/// The HuBERT recipe's warm-up share of the run (fairseq hubert_base_librispeech.yaml: 32k
/// warm-up updates of 400k), used when the run file gives no warm-up.
const RECIPE_WARMUP_SHARE: f64 = 0.08;

/// Model size presets (the architecture before the run file's own keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Tiny,
    Student,
    Base,
    Large,
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        serde_yaml_ng::from_str(s)
            .map_err(|_| format!("{s:?}: expected a model preset: tiny, student, base or large"))
    }
}

impl Preset {
    /// The preset's name in run files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Student => "student",
            Preset::Base => "base",
            Preset::Large => "large",
        }
    }

    pub fn config(self) -> HubertConfig {
        match self {
            Preset::Tiny => HubertConfig::tiny(),
            Preset::Student => HubertConfig::student(),
            Preset::Base => HubertConfig::base(),
            Preset::Large => HubertConfig::large(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunFile {
    pub federated: FederatedSection,
    pub pretraining: PretrainingSection,
    /// Client-level differential privacy (`fedhubert_fl::privacy`); off unless `mode` says.
    pub privacy: PrivacyConfig,
}

fn cfg_err(why: impl std::fmt::Display) -> TrainError {
    TrainError::Config(why.to_string())
}

/// Largest run file read: a run file is a few kB; this bounds what a wrong path costs.
const MAX_RUN_FILE_BYTES: u64 = 1 << 20;
/// Deepest nesting accepted: run files nest three levels (`distillation.mvq.key`).
const MAX_RUN_FILE_DEPTH: usize = 16;

/// A run file's text, refused when it is too large or nests deeper than a run file can.
pub fn read_run_text(path: &Path) -> Result<String, TrainError> {
    let at = |why: String| cfg_err(format!("{}: {why}", path.display()));
    let len = std::fs::metadata(path)
        .map_err(|e| at(e.to_string()))?
        .len();
    if len > MAX_RUN_FILE_BYTES {
        return Err(at(format!(
            "{len} bytes; a run file is YAML of at most {MAX_RUN_FILE_BYTES} bytes"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
    let depth = nesting_depth(&text);
    if depth > MAX_RUN_FILE_DEPTH {
        return Err(at(format!(
            "nested {depth} levels deep; a run file has sections of keys (at most {MAX_RUN_FILE_DEPTH} levels)"
        )));
    }
    Ok(text)
}

/// An upper bound of a YAML text's nesting: flow brackets plus block indentation levels.
/// Checked before parsing because a hostile file nested thousands deep took the YAML parser
/// tens of seconds to reject.
fn nesting_depth(text: &str) -> usize {
    let (mut flow, mut max_flow) = (0usize, 0usize);
    let mut indents: Vec<usize> = Vec::new();
    let mut max_block = 0;
    for line in text.lines() {
        let body = line.trim_start_matches([' ', '-']);
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        while indents.last().is_some_and(|&i| i >= indent) {
            indents.pop();
        }
        indents.push(indent);
        max_block = max_block.max(indents.len());
        for c in body.chars() {
            match c {
                '[' | '{' => {
                    flow += 1;
                    max_flow = max_flow.max(flow);
                }
                ']' | '}' => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    max_block + max_flow
}

/// The YAML tree of a run file's text: a mapping of sections. An empty file is an error: it
/// used to train HuBERT Base on every default without a word.
pub fn parse_run_tree(path: &Path, text: &str) -> Result<serde_yaml_ng::Value, TrainError> {
    let at = |why: String| cfg_err(format!("{}: {why}", path.display()));
    let tree: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| at(e.to_string()))?;
    match &tree {
        serde_yaml_ng::Value::Null => Err(at(
            "the file is empty: a run file names at least its model (pretraining: preset: tiny|student|base|large); see configs/*.yaml".into(),
        )),
        serde_yaml_ng::Value::Mapping(m) if m.is_empty() => Err(at(
            "the file is an empty mapping: a run file names at least its model (pretraining: preset: ...)".into(),
        )),
        serde_yaml_ng::Value::Mapping(_) => Ok(tree),
        _ => Err(at("expected a mapping of sections (federated:, pretraining:, ...)".into())),
    }
}

/// Applies `a.b.c=value` overrides (the value parsed as YAML) to a run file's tree.
pub fn apply_overrides(
    tree: &mut serde_yaml_ng::Value,
    overrides: &[String],
) -> Result<(), TrainError> {
    type V = serde_yaml_ng::Value;
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| cfg_err(format!("override {o:?}: expected section.key=value")))?;
        let parts: Vec<&str> = key.split('.').collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(cfg_err(format!(
                "override {o:?}: expected section.key=value (e.g. federated.num_rounds=20)"
            )));
        }
        let v: V =
            serde_yaml_ng::from_str(value).map_err(|e| cfg_err(format!("override {o:?}: {e}")))?;
        let mut node = &mut *tree;
        for p in &parts[..parts.len() - 1] {
            let map = node
                .as_mapping_mut()
                .ok_or_else(|| cfg_err(format!("override {o:?}: {p} is not a mapping")))?;
            node = map
                .entry(V::String(p.to_string()))
                .or_insert_with(|| V::Mapping(Default::default()));
        }
        node.as_mapping_mut()
            .ok_or_else(|| cfg_err(format!("override {o:?}: its section is not a mapping")))?
            .insert(V::String(parts[parts.len() - 1].to_string()), v);
    }
    Ok(())
}

/// The typed run file of `tree` (a file's, or the defaults') with `overrides` applied. A type
/// error is reported where it is: the file alone is parsed again from its text, which names the
/// field's line and column, or the overrides are applied one by one to name the one at fault.
pub fn typed_run_file<T: serde::de::DeserializeOwned>(
    tree: serde_yaml_ng::Value,
    path: Option<&Path>,
    text: Option<&str>,
    overrides: &[String],
) -> Result<T, TrainError> {
    let mut merged = tree.clone();
    apply_overrides(&mut merged, overrides)?;
    let why = match serde_yaml_ng::from_value::<T>(merged) {
        Ok(t) => return Ok(t),
        Err(e) => e.to_string(),
    };
    let where_ = path.map(|p| p.display().to_string());
    if let (Some(w), Some(t)) = (&where_, text)
        && let Err(e) = serde_yaml_ng::from_str::<T>(t)
    {
        return Err(cfg_err(format!("{w}: {}", run_file_names(&e.to_string()))));
    }
    let mut partial = tree;
    for o in overrides {
        apply_overrides(&mut partial, std::slice::from_ref(o))?;
        if let Err(e) = serde_yaml_ng::from_value::<T>(partial.clone()) {
            return Err(cfg_err(format!(
                "--set {o}: {}",
                run_file_names(&e.to_string())
            )));
        }
    }
    let w = where_.unwrap_or_else(|| "the defaults".into());
    Err(cfg_err(format!("{w}: {}", run_file_names(&why))))
}

/// Messages in the run file's names: the model and engine configs validate under their HF and
/// Flower names, which a run file never spells.
pub fn run_file_names(why: &str) -> String {
    const NAMES: [(&str, &str); 5] = [
        ("mask_time_prob", "mask_prob"),
        ("mask_time_length", "mask_length"),
        ("num_classes", "vocab_size"),
        ("fraction_fit", "client_fraction"),
        ("min_sample_size", "min_audio_length"),
    ];
    NAMES.iter().fold(why.to_string(), |s, (internal, ours)| {
        s.replace(internal, ours)
    })
}

impl RunFile {
    /// Reads a YAML file, applies `section.key=value` overrides, and validates. Without a file
    /// only the overrides are applied to the defaults (callers that run a model require a file
    /// or a named preset; see `fedhubert pretrain --preset`).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, TrainError> {
        let text = path.map(read_run_text).transpose()?;
        let tree = match (path, &text) {
            (Some(p), Some(t)) => parse_run_tree(p, t)?,
            _ => serde_yaml_ng::Value::Mapping(Default::default()),
        };
        let rf: RunFile = typed_run_file(tree, path, text.as_deref(), overrides)?;
        rf.validate()?;
        Ok(rf)
    }

    /// The resolved configuration as YAML: every key, defaults included (what the run prints
    /// and writes beside its checkpoint).
    pub fn to_yaml(&self) -> Result<String, TrainError> {
        serde_yaml_ng::to_string(self).map_err(|e| cfg_err(format!("writing the run file: {e}")))
    }

    /// Every derived config builds and validates (model, strategy, trainer): what a run file
    /// read from a file, or received over the wire, must pass before use.
    pub fn validate(&self) -> Result<(), TrainError> {
        let model = self.model_config()?;
        let field = model.receptive_field();
        let p = &self.pretraining;
        for (key, v) in [
            ("min_audio_length", p.min_audio_length),
            ("max_audio_length", p.max_audio_length),
        ] {
            if v < field {
                return Err(cfg_err(format!(
                    "pretraining.{key}: {v} samples is shorter than the conv front-end's receptive field of {field} samples (one frame)"
                )));
            }
        }
        let strategy = self.strategy()?;
        if self.privacy.is_on() {
            self.privacy.validate().map_err(cfg_err)?;
            fedhubert_fl::privacy::check_strategy(&strategy).map_err(cfg_err)?;
        }
        // The round settings, before any partition is read (the client count is checked
        // against the partition when the run starts).
        let f = &self.federated.run;
        RunConfig {
            num_rounds: f.num_rounds,
            fraction_fit: f.client_fraction,
            min_fit_clients: f.min_fit_clients,
            fraction_evaluate: f.fraction_evaluate,
            client: ClientSettings {
                proximal_mu: f.proximal_mu,
                ..Default::default()
            },
            ..Default::default()
        }
        .validate(usize::MAX)
        .map_err(|e| match e {
            fedhubert_fl::FlError::Config(why) => cfg_err(why),
            e => e.into(),
        })?;
        // The schedule is checked where a run builds it: a federated run's in `run_config`,
        // a centralized run's (another length) by `lr_schedule(Some(steps))`.
        self.train_config()?.validate()
    }

    /// The schedule of a federated run (`centralized_steps` None) over its `num_rounds` x
    /// planned updates per round, or of a centralized run of that many steps, where
    /// `warmup_rounds` keeps its share of the federated run so both arms of a comparison warm up
    /// alike. Inconsistent keys are errors that name them.
    pub fn lr_schedule(&self, centralized_steps: Option<u64>) -> Result<LrSchedule, TrainError> {
        let p = &self.pretraining;
        let rounds = self.federated.run.num_rounds;
        let per_round = self.local_work().planned_updates();
        let total = centralized_steps.unwrap_or(rounds * per_round);
        let warmup = match (p.warmup_updates, p.warmup_rounds) {
            (Some(_), Some(_)) => {
                return Err(cfg_err(
                    "pretraining.warmup_updates and pretraining.warmup_rounds: give one of them",
                ));
            }
            (Some(_), None) if centralized_steps.is_none() && p.local_steps == 0 => {
                return Err(cfg_err(
                    "pretraining.warmup_updates: with local_epochs only each client knows its number of updates, so the schedule counts rounds: give warmup_rounds",
                ));
            }
            (Some(u), None) => u,
            (None, Some(r)) if r > rounds => {
                return Err(cfg_err(format!(
                    "pretraining.warmup_rounds: {r} is more than federated.num_rounds {rounds}"
                )));
            }
            (None, Some(r)) => (r as f64 / rounds.max(1) as f64 * total as f64).round() as u64,
            (None, None) => (RECIPE_WARMUP_SHARE * total as f64).round() as u64,
        };
        let schedule = match p.lr_schedule {
            LrScheduleKind::Fixed => LrSchedule::Fixed {
                warmup_updates: warmup,
            },
            LrScheduleKind::PolynomialDecay => LrSchedule::PolynomialDecay {
                warmup_updates: warmup,
                total_updates: total,
            },
        };
        schedule
            .validate()
            .map_err(|e| cfg_err(format!("pretraining.warmup_updates: {e}")))?;
        Ok(schedule)
    }

    /// What a round asks of a client locally.
    fn local_work(&self) -> LocalWork {
        let p = &self.pretraining;
        if p.local_steps > 0 {
            LocalWork::Steps(p.local_steps)
        } else {
            LocalWork::Epochs(p.local_epochs as f64)
        }
    }

    pub fn model_config(&self) -> Result<HubertConfig, TrainError> {
        let p = &self.pretraining;
        let mut c = p.preset.config();
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
            .map_err(|e| cfg_err(format!("pretraining: {}", run_file_names(&e.to_string()))))?;
        Ok(c)
    }

    pub fn pretrain_config(&self) -> Result<PretrainConfig, TrainError> {
        self.pretrain_config_for(self.model_config()?.hidden_size)
    }

    /// The head for an encoder `hidden` wide (`pretrain --init` takes the width of the
    /// checkpoint, not of the run file).
    pub fn pretrain_config_for(&self, hidden: usize) -> Result<PretrainConfig, TrainError> {
        let p = &self.pretraining;
        let c = PretrainConfig {
            num_classes: p.vocab_size,
            final_dim: p
                .final_dim
                .unwrap_or(if hidden >= 768 { 256 } else { hidden.min(256) }),
            head: p.head,
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
            .map_err(|e| cfg_err(format!("pretraining: {}", run_file_names(&e.to_string()))))?;
        Ok(c)
    }

    pub fn train_config(&self) -> Result<TrainConfig, TrainError> {
        let p = &self.pretraining;
        Ok(TrainConfig {
            learning_rate: p.learning_rate,
            weight_decay: p.weight_decay,
            // Federated clients follow the schedule in their instructions.
            lr_schedule: LrSchedule::Fixed { warmup_updates: 0 },
            clip_norm: p.clip_norm,
            update_freq: p.update_freq,
            freeze_feature_extractor: p.freeze_feature_extractor,
            batch: BatchConfig {
                batch_size: p.batch_size,
                max_tokens: p.max_tokens,
                max_sample_size: p.max_audio_length,
                min_sample_size: p.min_audio_length,
            },
            seed: self.federated.run.seed,
            ..Default::default()
        })
    }

    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            labels: self.label_spec(),
            cache_clients: self.pretraining.cache_clients,
        }
    }

    /// The label shard clients train on and its rate.
    pub fn label_spec(&self) -> LabelSpec {
        LabelSpec {
            stem: self.pretraining.label_stem.clone(),
            rate: self.pretraining.label_rate,
        }
    }

    pub fn strategy(&self) -> Result<StrategyConfig, TrainError> {
        let s = self.federated.strategy.clone();
        s.validate()
            .map_err(|e| cfg_err(format!("federated: {e}")))?;
        Ok(s)
    }

    /// The engine's run configuration; the client settings (learning rate, local steps or
    /// epochs, FedProx's mu) travel to clients in their instructions.
    pub fn run_config(&self) -> Result<RunConfig, TrainError> {
        let f = &self.federated.run;
        let p = &self.pretraining;
        let local = self.local_work();
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
            upload: UploadPlan {
                compression: f.compression,
                frozen_prefixes: if p.freeze_feature_extractor {
                    vec![FEATURE_EXTRACTOR.to_string()]
                } else {
                    vec![]
                },
            },
            client: ClientSettings {
                learning_rate: p.learning_rate,
                lr_schedule: self.lr_schedule(None)?,
                local,
                proximal_mu: f.proximal_mu,
                local_optimizer_state: p.local_optimizer_state,
            },
            privacy: self.privacy.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<RunFile, TrainError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.yaml");
        std::fs::write(&p, yaml).unwrap();
        RunFile::load(Some(&p), &[])
    }

    #[test]
    fn strategy_keys_sit_beside_the_run_keys() {
        let rf =
            load("federated:\n  strategy: FedAdam\n  eta: 0.05\n  beta1: 0.8\n  num_rounds: 3\n")
                .unwrap();
        assert_eq!(rf.federated.run.num_rounds, 3);
        assert_eq!(
            rf.federated.strategy,
            StrategyConfig::FedAdam(fedhubert_fl::strategy::FedAdam {
                eta: 0.05,
                beta1: 0.8,
                beta2: 0.99,
                tau: 1e-3,
            })
        );
        // Serialized for the clients and read back: the same run file.
        let json = serde_json::to_string(&rf).unwrap();
        assert_eq!(serde_json::from_str::<RunFile>(&json).unwrap(), rf);
    }

    #[test]
    fn fedprox_is_fedavg_with_the_client_setting() {
        let rf = load("federated:\n  strategy: FedProx\n").unwrap();
        assert_eq!(rf.federated.strategy, StrategyConfig::default());
        assert_eq!(rf.run_config().unwrap().client.proximal_mu, 0.01);
        let rf = load("federated:\n  strategy: fedprox\n  proximal_mu: 0.1\n").unwrap();
        assert_eq!(rf.run_config().unwrap().client.proximal_mu, 0.1);
        // mu works with any strategy.
        let rf = load("federated:\n  strategy: fedmedian\n  proximal_mu: 0.2\n").unwrap();
        assert_eq!(rf.federated.strategy.name(), "fedmedian");
        assert_eq!(rf.run_config().unwrap().client.proximal_mu, 0.2);
    }

    #[test]
    fn unknown_and_misplaced_keys_are_named() {
        let e = load("federated:\n  strategy: fedavg\n  eta: 0.1\n").unwrap_err();
        assert!(e.to_string().contains("`eta`"), "{e}");
        let e = load("federated:\n  strategy: fedadam\n  etaa: 0.1\n").unwrap_err();
        assert!(e.to_string().contains("`etaa`"), "{e}");
        let e = load("federated:\n  strategy: fedfoo\n").unwrap_err();
        assert!(e.to_string().contains("fedfoo"), "{e}");
        let e = load("federated:\n  compression: bz2\n").unwrap_err();
        assert!(e.to_string().contains("bz2"), "{e}");
        let e = load("pretraining:\n  preset: huge\n").unwrap_err();
        assert!(e.to_string().contains("huge"), "{e}");
        let e = load("federated:\n  strategy: fedadam\n  beta1: 1.5\n").unwrap_err();
        assert!(e.to_string().contains("beta1"), "{e}");
    }

    #[test]
    fn the_schedule_spans_the_whole_federated_run() {
        let base = "federated:\n  num_rounds: 10\npretraining:\n  local_steps: 5\n";
        let sched = |extra: &str| {
            load(&format!("{base}{extra}")).and_then(|rf| Ok(rf.run_config()?.client.lr_schedule))
        };
        // No warm-up key: the recipe's 8% of the 50 planned updates.
        assert_eq!(
            sched("").unwrap(),
            LrSchedule::PolynomialDecay {
                warmup_updates: 4,
                total_updates: 50
            }
        );
        assert_eq!(
            sched("  warmup_rounds: 2\n").unwrap(),
            LrSchedule::PolynomialDecay {
                warmup_updates: 10,
                total_updates: 50
            }
        );
        assert_eq!(
            sched("  warmup_updates: 3\n  lr_schedule: fixed\n").unwrap(),
            LrSchedule::Fixed { warmup_updates: 3 }
        );
        // A centralized run keeps the warm-up's share of the run.
        let rf = load(&format!("{base}  warmup_rounds: 2\n")).unwrap();
        assert_eq!(
            rf.lr_schedule(Some(1000)).unwrap(),
            LrSchedule::PolynomialDecay {
                warmup_updates: 200,
                total_updates: 1000
            }
        );
        for (extra, key) in [
            (
                "  warmup_rounds: 2\n  warmup_updates: 3\n",
                "give one of them",
            ),
            ("  warmup_rounds: 11\n", "warmup_rounds"),
            ("  warmup_updates: 51\n", "warm-up (51 updates)"),
            ("  lr_schedule: cosine\n", "cosine"),
        ] {
            let e = sched(extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra:?}: {e}");
        }
        let rf = load("pretraining:\n  local_epochs: 1\n  warmup_updates: 3\n").unwrap();
        let e = rf.run_config().unwrap_err();
        assert!(e.to_string().contains("give warmup_rounds"), "{e}");
    }
}
