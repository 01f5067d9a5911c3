//! Strategies with Flower's semantics and defaults, built as Flower's `FedOpt(FedAvg)` family is:
//! a strategy is an [`Aggregator`] (how the replies combine) times a [`ServerOptimizer`] (how the
//! aggregate moves the global model). Wrappers (server-side distillation, differential privacy's
//! [`crate::privacy::DpFedAvg`]) implement [`Strategy`] around any other strategy.
//!
//! Adding a strategy: one small config type implementing [`StrategySpec`] below, and one line in
//! the `strategies!` list.

pub mod aggregate;
pub mod server_opt;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use aggregate::{Aggregator, Buffered, Mean, Median, RobustRule, TrimmedMean};
pub use server_opt::{Adagrad, Adam, AvgM, Moments, Replace, ServerOptimizer, Yogi};

use crate::privacy::{ClientPrivacy, PrivacyRecord};
use crate::{FlError, Weights};

/// What a client sends back after local training.
#[derive(Debug, Clone)]
pub struct FitRes {
    pub client: usize,
    pub weights: Weights,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// A strategy's settings: validation and the aggregator x server optimizer it stands for.
pub trait StrategySpec {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
    fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>);
}

macro_rules! strategies {
    ($($(#[$doc:meta])* $name:ident = $key:literal),* $(,)?) => {
        /// Strategy configuration: the `strategy` key names the variant (case-insensitive in run
        /// files), the other keys are the variant's settings (the seeds' YAML keys).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "strategy")]
        pub enum StrategyConfig {
            $($(#[$doc])* #[serde(rename = $key)] $name($name),)*
        }

        impl StrategyConfig {
            /// The names the `strategy` key accepts (lower case).
            pub const NAMES: &'static [&'static str] = &[$($key),*];

            pub fn spec(&self) -> &dyn StrategySpec {
                match self {
                    $(Self::$name(s) => s,)*
                }
            }

            /// The strategy's name as the `strategy` key spells it.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$name(_) => $key,)*
                }
            }
        }
    };
}

strategies! {
    FedAvg = "fedavg",
    FedAvgM = "fedavgm",
    FedAdam = "fedadam",
    FedYogi = "fedyogi",
    FedAdagrad = "fedadagrad",
    FedMedian = "fedmedian",
    FedTrimmedAvg = "fedtrimmedavg",
    /// Krum (`num_clients_to_keep` 0) or Multi-Krum (average of the best `num_clients_to_keep`).
    Krum = "krum",
}

fn one() -> f32 {
    1.0
}
fn eta_adam() -> f32 {
    0.1
}
fn eta_yogi() -> f32 {
    0.01
}
fn beta1() -> f32 {
    0.9
}
fn beta2() -> f32 {
    0.99
}
fn tau() -> f32 {
    1e-3
}
fn trim_beta() -> f32 {
    0.2
}

fn check_adaptive(eta: f32, beta1: f32, beta2: f32, tau: f32) -> Result<(), String> {
    if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
        return Err("beta1 and beta2 must be in [0, 1)".into());
    }
    if !(tau > 0.0 && eta > 0.0) {
        return Err("eta and tau must be positive".into());
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedAvg {}

impl StrategySpec for FedAvg {
    fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>) {
        (Box::new(Mean::default()), Box::new(Replace))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedAvgM {
    #[serde(default = "one")]
    pub server_learning_rate: f32,
    #[serde(default)]
    pub server_momentum: f32,
}

impl StrategySpec for FedAvgM {
    fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>) {
        let opt = AvgM {
            server_learning_rate: self.server_learning_rate,
            server_momentum: self.server_momentum,
            moments: Moments::default(),
        };
        (Box::new(Mean::default()), Box::new(opt))
    }
}

/// The settings of an adaptive FedOpt strategy (FedAdam, FedYogi): the same keys, their own
/// default `eta`, their own server optimizer.
macro_rules! adaptive_strategy {
    ($(#[$doc:meta])* $name:ident, $eta:literal, $opt:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            #[serde(default = $eta)]
            pub eta: f32,
            #[serde(default = "beta1")]
            pub beta1: f32,
            #[serde(default = "beta2")]
            pub beta2: f32,
            #[serde(default = "tau")]
            pub tau: f32,
        }

        impl StrategySpec for $name {
            fn validate(&self) -> Result<(), String> {
                check_adaptive(self.eta, self.beta1, self.beta2, self.tau)
            }
            fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>) {
                let opt = $opt {
                    eta: self.eta,
                    beta1: self.beta1,
                    beta2: self.beta2,
                    tau: self.tau,
                    moments: Moments::default(),
                };
                (Box::new(Mean::default()), Box::new(opt))
            }
        }
    };
}

adaptive_strategy!(
    /// FedAdam (Reddi et al. 2021), Flower's defaults.
    FedAdam, "eta_adam", Adam
);
adaptive_strategy!(
    /// FedYogi (Reddi et al. 2021), Flower's defaults.
    FedYogi, "eta_yogi", Yogi
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedAdagrad {
    #[serde(default = "eta_adam")]
    pub eta: f32,
    #[serde(default = "tau")]
    pub tau: f32,
}

impl StrategySpec for FedAdagrad {
    fn validate(&self) -> Result<(), String> {
        check_adaptive(self.eta, 0.0, 0.0, self.tau)
    }
    fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>) {
        let opt = Adagrad {
            eta: self.eta,
            tau: self.tau,
            moments: Moments::default(),
        };
        (Box::new(Mean::default()), Box::new(opt))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedMedian {}

impl StrategySpec for FedMedian {
    fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>) {
        (Box::new(Buffered::new(Median)), Box::new(Replace))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedTrimmedAvg {
    /// Fraction cut from each end (Flower's `beta`).
    #[serde(default = "trim_beta")]
    pub trim_beta: f32,
}

impl StrategySpec for FedTrimmedAvg {
    fn validate(&self) -> Result<(), String> {
        if !(0.0..0.5).contains(&self.trim_beta) {
            return Err("fedtrimmedavg trim_beta must be in [0, 0.5)".into());
        }
        Ok(())
    }
    fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>) {
        let rule = TrimmedMean {
            beta: self.trim_beta,
        };
        (Box::new(Buffered::new(rule)), Box::new(Replace))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Krum {
    #[serde(default)]
    pub num_malicious_clients: usize,
    #[serde(default)]
    pub num_clients_to_keep: usize,
}

impl StrategySpec for Krum {
    fn parts(&self) -> (Box<dyn Aggregator>, Box<dyn ServerOptimizer>) {
        let rule = aggregate::Krum {
            num_malicious_clients: self.num_malicious_clients,
            num_clients_to_keep: self.num_clients_to_keep,
        };
        (Box::new(Buffered::new(rule)), Box::new(Replace))
    }
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::FedAvg(FedAvg {})
    }
}

impl StrategyConfig {
    /// A strategy by name with Flower's defaults.
    pub fn from_name(name: &str) -> Result<Self, FlError> {
        Self::from_map(name, serde_json::Map::new())
    }

    /// A strategy by name (case-insensitive) with its settings; unknown or misplaced settings
    /// are errors that name the key.
    pub fn from_map(
        name: &str,
        mut settings: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, FlError> {
        let key = name.to_ascii_lowercase();
        if key == "fedprox" {
            return Err(FlError::Config(format!(
                "strategy {name:?}: FedProx aggregates as fedavg; its proximal_mu is a client setting (federated.proximal_mu) that works with any strategy"
            )));
        }
        if !Self::NAMES.contains(&key.as_str()) {
            return Err(FlError::Config(format!(
                "strategy {name:?}: expected one of {}",
                Self::NAMES.join(", ")
            )));
        }
        settings.insert("strategy".into(), key.into());
        let s: Self = serde_json::from_value(serde_json::Value::Object(settings))
            .map_err(|e| FlError::Config(format!("strategy {name}: {e}")))?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), FlError> {
        self.spec().validate().map_err(FlError::Config)
    }

    pub fn build(&self) -> Result<Box<dyn Strategy>, FlError> {
        self.validate()?;
        Ok(Box::new(FedStrategy::new(self.clone())))
    }
}

/// Flower's `Strategy` for the training side: a round's replies in, new global weights out.
/// `state`/`load_state` carry the server optimizer's moments through checkpoints.
pub trait Strategy: Send {
    fn config(&self) -> &StrategyConfig;
    /// Starts a round whose global weights are `current`.
    fn begin_round(&mut self, round: u64, current: &Weights) -> Result<(), FlError>;
    /// Adds one client's reply.
    fn accumulate(&mut self, res: FitRes) -> Result<(), FlError>;
    /// Finishes the round: the new global weights.
    fn end_round(&mut self) -> Result<Weights, FlError>;
    /// Server optimizer state for checkpoints (name -> tensors).
    fn state(&self) -> BTreeMap<String, Weights>;
    fn load_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), FlError>;

    // Hooks of a privacy wrapper ([`crate::privacy::DpFedAvg`]); a plain strategy has none.

    /// What the next round's clients are told to do to their update (Flower's `configure_fit`
    /// of its DP wrappers): the clipping norm, local noise.
    fn client_privacy(&self) -> Option<ClientPrivacy> {
        None
    }
    /// The privacy of the last aggregated round, for its record.
    fn privacy_record(&self) -> Option<PrivacyRecord> {
        None
    }
    /// Err(why) when another training attempt would exceed the privacy budget.
    fn round_allowed(&self) -> Result<(), String> {
        Ok(())
    }
    /// The privacy ledger (JSON) the round checkpoint keeps.
    fn ledger(&self) -> Option<String> {
        None
    }
    /// Restores [`Self::ledger`] from a checkpoint (None: it had none).
    fn load_ledger(&mut self, saved: Option<&str>) -> Result<(), FlError> {
        match saved {
            None => Ok(()),
            Some(_) => Err(FlError::Config(
                "the checkpoint was made with privacy on (it holds a privacy ledger) but this run has privacy.mode none: resume it with the same privacy section".into(),
            )),
        }
    }
}

/// A reply a strategy may aggregate: the layout of the weights it started the round from, and
/// finite values (every strategy and wrapper checks replies here).
pub fn check_reply(current: &Weights, res: &FitRes) -> Result<(), FlError> {
    current.check_layout(&res.weights, &format!("client {} reply", res.client))?;
    if res.weights.iter_data().any(|v| !v.is_finite()) {
        return Err(FlError::Client {
            client: res.client,
            why: "reply contains NaN or infinite weights".into(),
        });
    }
    Ok(())
}

/// An aggregator times a server optimizer.
pub struct FedStrategy {
    cfg: StrategyConfig,
    aggregator: Box<dyn Aggregator>,
    server: Box<dyn ServerOptimizer>,
    round: u64,
    current: Option<Weights>,
}

impl FedStrategy {
    pub fn new(cfg: StrategyConfig) -> Self {
        let (aggregator, server) = cfg.spec().parts();
        Self {
            cfg,
            aggregator,
            server,
            round: 0,
            current: None,
        }
    }
}

impl Strategy for FedStrategy {
    fn config(&self) -> &StrategyConfig {
        &self.cfg
    }

    fn begin_round(&mut self, round: u64, current: &Weights) -> Result<(), FlError> {
        self.round = round;
        self.aggregator.begin(current);
        self.current = Some(current.clone());
        Ok(())
    }

    fn accumulate(&mut self, res: FitRes) -> Result<(), FlError> {
        let current = self
            .current
            .as_ref()
            .ok_or_else(|| FlError::Config("accumulate before begin_round".into()))?;
        check_reply(current, &res)?;
        self.aggregator.add(res);
        Ok(())
    }

    fn end_round(&mut self) -> Result<Weights, FlError> {
        let current = self
            .current
            .take()
            .ok_or_else(|| FlError::Config("end_round before begin_round".into()))?;
        let aggregated = self
            .aggregator
            .finish()
            .ok_or(FlError::NoResults(self.round))?;
        Ok(self.server.apply(self.round, current, aggregated))
    }

    fn state(&self) -> BTreeMap<String, Weights> {
        self.server.state()
    }

    fn load_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), FlError> {
        self.server.load_state(state)
    }
}

/// Weighted average of client metrics by number of examples (Flower's default metric aggregation).
pub fn weighted_metrics<'a>(
    items: impl IntoIterator<Item = (u64, &'a BTreeMap<String, f64>)>,
) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (n, m) in items {
        for (k, v) in m {
            let e = sums.entry(k.clone()).or_default();
            e.0 += v * n as f64;
            e.1 += n as f64;
        }
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}
