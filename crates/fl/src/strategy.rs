//! Aggregation strategies with Flower's semantics and defaults.
//!
//! A strategy is an aggregation rule (how client weights combine) plus an optional server
//! optimizer (how the combined weights move the global model: FedAvgM's momentum, FedOpt's
//! adaptive steps). FedAvg-family rules aggregate as results stream in, so a round holds one
//! running sum whatever the number of clients; the robust rules (median, trimmed mean, Krum) need
//! every reply of the round by definition and buffer them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{FlError, Weights};

/// What a client sends back after local training.
#[derive(Debug, Clone)]
pub struct FitRes {
    pub client: usize,
    pub weights: Weights,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// Strategy configuration; names and defaults follow Flower's strategies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "lowercase", deny_unknown_fields)]
pub enum StrategyConfig {
    FedAvg,
    FedAvgM {
        #[serde(default = "one")]
        server_learning_rate: f32,
        #[serde(default)]
        server_momentum: f32,
    },
    FedAdam {
        #[serde(default = "eta_adam")]
        eta: f32,
        #[serde(default = "beta1")]
        beta_1: f32,
        #[serde(default = "beta2")]
        beta_2: f32,
        #[serde(default = "tau")]
        tau: f32,
    },
    FedYogi {
        #[serde(default = "eta_yogi")]
        eta: f32,
        #[serde(default = "beta1")]
        beta_1: f32,
        #[serde(default = "beta2")]
        beta_2: f32,
        #[serde(default = "tau")]
        tau: f32,
    },
    FedAdagrad {
        #[serde(default = "eta_adam")]
        eta: f32,
        #[serde(default = "tau")]
        tau: f32,
    },
    /// FedAvg on the server; clients add `proximal_mu/2 * ||w - w_global||^2` to their loss.
    FedProx {
        proximal_mu: f32,
    },
    FedMedian,
    FedTrimmedAvg {
        #[serde(default = "trim_beta")]
        beta: f32,
    },
    /// Krum (num_clients_to_keep 0) or Multi-Krum (average of the best `num_clients_to_keep`).
    Krum {
        #[serde(default)]
        num_malicious_clients: usize,
        #[serde(default)]
        num_clients_to_keep: usize,
    },
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

impl StrategyConfig {
    /// Flower's defaults for a strategy named on the command line or in YAML.
    pub fn from_name(name: &str) -> Result<Self, FlError> {
        let json = format!("{{\"strategy\": \"{}\"}}", name.to_ascii_lowercase());
        if name.eq_ignore_ascii_case("fedprox") {
            return Ok(StrategyConfig::FedProx { proximal_mu: 0.01 });
        }
        serde_json::from_str(&json).map_err(|_| {
            FlError::Config(format!(
                "strategy {name:?}: expected one of fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox, fedmedian, fedtrimmedavg, krum"
            ))
        })
    }

    pub fn validate(&self) -> Result<(), FlError> {
        let bad = |s: &str| Err(FlError::Config(s.to_string()));
        match *self {
            StrategyConfig::FedAdam {
                beta_1,
                beta_2,
                tau,
                eta,
            }
            | StrategyConfig::FedYogi {
                beta_1,
                beta_2,
                tau,
                eta,
            } => {
                if !(0.0..1.0).contains(&beta_1) || !(0.0..1.0).contains(&beta_2) {
                    return bad("beta_1 and beta_2 must be in [0, 1)");
                }
                if tau <= 0.0 || eta <= 0.0 {
                    return bad("eta and tau must be positive");
                }
            }
            StrategyConfig::FedTrimmedAvg { beta } if !(0.0..0.5).contains(&beta) => {
                return bad("fedtrimmedavg beta must be in [0, 0.5)");
            }
            StrategyConfig::FedProx { proximal_mu } if proximal_mu < 0.0 => {
                return bad("proximal_mu must be >= 0");
            }
            _ => {}
        }
        Ok(())
    }

    /// The proximal term clients must apply (FedProx), else 0.
    pub fn proximal_mu(&self) -> f32 {
        match *self {
            StrategyConfig::FedProx { proximal_mu } => proximal_mu,
            _ => 0.0,
        }
    }

    pub fn build(&self) -> Result<Box<dyn Strategy>, FlError> {
        self.validate()?;
        Ok(Box::new(Composite::new(self.clone())))
    }
}

/// Flower's `Strategy` for the training side: a round's replies in, new global weights out.
/// `state`/`load_state` carry the server optimizer's moments through checkpoints.
pub trait Strategy: Send {
    fn config(&self) -> &StrategyConfig;
    /// Starts a round whose global weights are `current`.
    fn begin_round(&mut self, round: u64, current: &Weights) -> Result<(), FlError>;
    /// Adds one client's reply (in arrival order).
    fn accumulate(&mut self, res: FitRes) -> Result<(), FlError>;
    /// Number of replies accumulated this round.
    fn num_results(&self) -> usize;
    /// Finishes the round: the new global weights.
    fn end_round(&mut self) -> Result<Weights, FlError>;
    /// Server optimizer state for checkpoints (name → tensors).
    fn state(&self) -> BTreeMap<String, Weights>;
    fn load_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), FlError>;
}

enum Acc {
    /// Running sum of `w * num_examples` in f32, then divided by the total: numpy's order of
    /// operations in Flower's `aggregate`, so results agree with Flower bit for bit.
    Mean {
        sum: Weights,
        total: u64,
    },
    Buffer(Vec<FitRes>),
}

pub struct Composite {
    cfg: StrategyConfig,
    round: u64,
    current: Option<Weights>,
    acc: Option<Acc>,
    n: usize,
    m: Option<Weights>,
    v: Option<Weights>,
}

impl Composite {
    pub fn new(cfg: StrategyConfig) -> Self {
        Self {
            cfg,
            round: 0,
            current: None,
            acc: None,
            n: 0,
            m: None,
            v: None,
        }
    }

    fn buffered(&self) -> bool {
        matches!(
            self.cfg,
            StrategyConfig::FedMedian
                | StrategyConfig::FedTrimmedAvg { .. }
                | StrategyConfig::Krum { .. }
        )
    }
}

fn weighted_mean(results: &[&FitRes]) -> Weights {
    let mut sum = results[0].weights.zeros_like();
    let mut total = 0u64;
    for r in results {
        add_weighted(&mut sum, &r.weights, r.num_examples);
        total += r.num_examples;
    }
    divide(&mut sum, total);
    sum
}

fn add_weighted(sum: &mut Weights, w: &Weights, n: u64) {
    let nf = n as f32;
    for (s, x) in sum.iter_data_mut().zip(w.iter_data()) {
        *s += *x * nf;
    }
}

fn divide(sum: &mut Weights, total: u64) {
    let t = total as f32;
    sum.iter_data_mut().for_each(|s| *s /= t);
}

/// Coordinate-wise median (mean of the two middle values for an even count), as numpy's median.
fn median(results: &[FitRes]) -> Weights {
    let mut out = results[0].weights.clone();
    let mut col = vec![0f32; results.len()];
    for (ti, t) in out.tensors.iter_mut().enumerate() {
        for (j, v) in t.data.iter_mut().enumerate() {
            for (k, r) in results.iter().enumerate() {
                col[k] = r.weights.tensors[ti].data[j];
            }
            col.sort_by(f32::total_cmp);
            let n = col.len();
            *v = if n % 2 == 1 {
                col[n / 2]
            } else {
                (col[n / 2 - 1] + col[n / 2]) / 2.0
            };
        }
    }
    out
}

/// Coordinate-wise trimmed mean cutting `floor(beta * n)` values from each end (scipy's trim_mean).
fn trimmed_mean(results: &[FitRes], beta: f32) -> Weights {
    let n = results.len();
    let cut = (beta as f64 * n as f64).floor() as usize;
    let mut out = results[0].weights.clone();
    let mut col = vec![0f32; n];
    for (ti, t) in out.tensors.iter_mut().enumerate() {
        for (j, v) in t.data.iter_mut().enumerate() {
            for (k, r) in results.iter().enumerate() {
                col[k] = r.weights.tensors[ti].data[j];
            }
            col.sort_by(f32::total_cmp);
            let kept = &col[cut..n - cut];
            *v = kept.iter().sum::<f32>() / kept.len() as f32;
        }
    }
    out
}

/// Krum: the reply whose `n - f - 2` nearest neighbours are closest (sum of squared distances);
/// Multi-Krum averages the best `keep` by examples.
fn krum(results: &[FitRes], f: usize, keep: usize) -> Weights {
    let n = results.len();
    let mut d = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let x = results[i].weights.dist2(&results[j].weights);
            d[i][j] = x;
            d[j][i] = x;
        }
    }
    let closest = n.saturating_sub(f + 2).max(1);
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
            row.sort_by(f64::total_cmp);
            row.iter().take(closest).sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    if keep > 0 {
        let best: Vec<&FitRes> = order
            .iter()
            .take(keep.min(n))
            .map(|&i| &results[i])
            .collect();
        weighted_mean(&best)
    } else {
        results[order[0]].weights.clone()
    }
}

impl Strategy for Composite {
    fn config(&self) -> &StrategyConfig {
        &self.cfg
    }

    fn begin_round(&mut self, round: u64, current: &Weights) -> Result<(), FlError> {
        self.round = round;
        self.current = Some(current.clone());
        self.n = 0;
        self.acc = Some(if self.buffered() {
            Acc::Buffer(Vec::new())
        } else {
            Acc::Mean {
                sum: current.zeros_like(),
                total: 0,
            }
        });
        Ok(())
    }

    fn accumulate(&mut self, res: FitRes) -> Result<(), FlError> {
        let current = self
            .current
            .as_ref()
            .ok_or_else(|| FlError::Config("accumulate before begin_round".into()))?;
        current.check_layout(&res.weights, &format!("client {} reply", res.client))?;
        if res.weights.iter_data().any(|v| !v.is_finite()) {
            return Err(FlError::Client {
                client: res.client,
                why: "reply contains NaN or infinite weights".into(),
            });
        }
        match self.acc.as_mut() {
            Some(Acc::Mean { sum, total }) => {
                add_weighted(sum, &res.weights, res.num_examples);
                *total += res.num_examples;
            }
            Some(Acc::Buffer(b)) => b.push(res),
            None => return Err(FlError::Config("accumulate before begin_round".into())),
        }
        self.n += 1;
        Ok(())
    }

    fn num_results(&self) -> usize {
        self.n
    }

    fn end_round(&mut self) -> Result<Weights, FlError> {
        let current = self
            .current
            .take()
            .ok_or_else(|| FlError::Config("end_round before begin_round".into()))?;
        let aggregated = match self.acc.take() {
            Some(Acc::Mean { mut sum, total }) => {
                if total == 0 {
                    return Err(FlError::NoResults(self.round));
                }
                divide(&mut sum, total);
                sum
            }
            Some(Acc::Buffer(b)) => {
                if b.is_empty() {
                    return Err(FlError::NoResults(self.round));
                }
                match self.cfg {
                    StrategyConfig::FedMedian => median(&b),
                    StrategyConfig::FedTrimmedAvg { beta } => trimmed_mean(&b, beta),
                    StrategyConfig::Krum {
                        num_malicious_clients,
                        num_clients_to_keep,
                    } => krum(&b, num_malicious_clients, num_clients_to_keep),
                    _ => unreachable!("only robust rules buffer"),
                }
            }
            None => return Err(FlError::Config("end_round before begin_round".into())),
        };
        self.server_step(current, aggregated)
    }

    fn state(&self) -> BTreeMap<String, Weights> {
        let mut s = BTreeMap::new();
        if let Some(m) = &self.m {
            s.insert("m".into(), m.clone());
        }
        if let Some(v) = &self.v {
            s.insert("v".into(), v.clone());
        }
        s
    }

    fn load_state(&mut self, mut state: BTreeMap<String, Weights>) -> Result<(), FlError> {
        self.m = state.remove("m");
        self.v = state.remove("v");
        if let Some(k) = state.keys().next() {
            return Err(FlError::Config(format!("unexpected strategy state {k:?}")));
        }
        Ok(())
    }
}

impl Composite {
    /// Applies the server optimizer with delta = aggregated - current (Flower's FedOpt family;
    /// FedAvgM's pseudo-gradient is its negative).
    fn server_step(&mut self, current: Weights, aggregated: Weights) -> Result<Weights, FlError> {
        let mut new = current.clone();
        match self.cfg {
            StrategyConfig::FedAvgM {
                server_learning_rate,
                server_momentum,
            } => {
                if server_learning_rate == 1.0 && server_momentum == 0.0 {
                    return Ok(aggregated);
                }
                let m = self.m.get_or_insert_with(|| current.zeros_like());
                for ((x, a), v) in new
                    .iter_data_mut()
                    .zip(aggregated.iter_data())
                    .zip(m.iter_data_mut())
                {
                    let g = *x - *a;
                    *v = if server_momentum > 0.0 {
                        server_momentum * *v + g
                    } else {
                        g
                    };
                    *x -= server_learning_rate * *v;
                }
                Ok(new)
            }
            StrategyConfig::FedAdam {
                eta,
                beta_1,
                beta_2,
                tau,
            } => {
                let m = self.m.get_or_insert_with(|| current.zeros_like());
                let v = self.v.get_or_insert_with(|| current.zeros_like());
                // Flower's bias-corrected step size (Kingma & Ba's alpha_t), with t = round + 1.
                let t = self.round as f64 + 1.0;
                let eta_norm = (eta as f64 * (1.0 - (beta_2 as f64).powf(t)).sqrt()
                    / (1.0 - (beta_1 as f64).powf(t))) as f32;
                for (((x, a), mi), vi) in new
                    .iter_data_mut()
                    .zip(aggregated.iter_data())
                    .zip(m.iter_data_mut())
                    .zip(v.iter_data_mut())
                {
                    let d = *a - *x;
                    *mi = beta_1 * *mi + (1.0 - beta_1) * d;
                    *vi = beta_2 * *vi + (1.0 - beta_2) * d * d;
                    *x += eta_norm * *mi / (vi.sqrt() + tau);
                }
                Ok(new)
            }
            StrategyConfig::FedYogi {
                eta,
                beta_1,
                beta_2,
                tau,
            } => {
                let m = self.m.get_or_insert_with(|| current.zeros_like());
                let v = self.v.get_or_insert_with(|| current.zeros_like());
                for (((x, a), mi), vi) in new
                    .iter_data_mut()
                    .zip(aggregated.iter_data())
                    .zip(m.iter_data_mut())
                    .zip(v.iter_data_mut())
                {
                    let d = *a - *x;
                    let d2 = d * d;
                    *mi = beta_1 * *mi + (1.0 - beta_1) * d;
                    *vi -= (1.0 - beta_2) * d2 * sign(*vi - d2);
                    *x += eta * *mi / (vi.sqrt() + tau);
                }
                Ok(new)
            }
            StrategyConfig::FedAdagrad { eta, tau } => {
                let v = self.v.get_or_insert_with(|| current.zeros_like());
                for ((x, a), vi) in new
                    .iter_data_mut()
                    .zip(aggregated.iter_data())
                    .zip(v.iter_data_mut())
                {
                    let d = *a - *x;
                    *vi += d * d;
                    *x += eta * d / (vi.sqrt() + tau);
                }
                Ok(new)
            }
            _ => Ok(aggregated),
        }
    }
}

/// numpy's sign: 0 at 0.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
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
