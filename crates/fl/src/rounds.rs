//! Round orchestration: sample clients, send the global weights, collect replies (streaming into the
//! strategy), count failures, stragglers and bytes, evaluate, checkpoint.
//!
//! Every random choice is derived from (seed, round, attempt, client), never from a generator
//! threaded through the run, so a run resumed from round k's checkpoint makes exactly the choices
//! an uninterrupted run makes.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::compress::{Compression, decode, encode};
use crate::strategy::{FitRes, Strategy, weighted_metrics};
use crate::weights::{load_safetensors, order_metadata, save_safetensors};
use crate::{FlError, Weights};

/// The per-round instructions a client receives (Flower's `config` dict).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FitConfig {
    pub round: u64,
    /// Seed for the client's local randomness this round (crops, masks, dropout).
    pub seed: u64,
    pub proximal_mu: f32,
    /// Free-form numbers from the run configuration (local_steps, learning_rate, ...).
    pub extra: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRes {
    pub client: usize,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// The clients of a simulation (or proxies to remote ones). Errors are strings: a failed client is
/// recorded, not fatal.
pub trait ClientPool {
    fn num_clients(&self) -> usize;
    fn fit(&mut self, client: usize, global: &Weights, cfg: &FitConfig) -> Result<FitRes, String>;
    fn evaluate(
        &mut self,
        client: usize,
        global: &Weights,
        cfg: &FitConfig,
    ) -> Result<EvalRes, String>;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub num_rounds: u64,
    pub fraction_fit: f64,
    pub min_fit_clients: usize,
    pub fraction_evaluate: f64,
    pub min_evaluate_clients: usize,
    /// Evaluate on the clients' validation sets every this many rounds (0 = never; the last round always).
    pub eval_every: u64,
    pub seed: u64,
    /// A client slower than this (seconds) missed the round deadline and counts as a failure.
    pub round_timeout_s: Option<f64>,
    /// Aggregate whatever replies arrived if at least `min_fit_clients` did (Flower's accept_failures).
    pub accept_failures: bool,
    /// Retries of a round that did not get enough replies, with a fresh sample, before stopping.
    pub max_round_retries: u32,
    pub compression: Compression,
    /// Tensors whose name starts with one of these are neither sent nor aggregated (frozen front-end).
    pub frozen_prefixes: Vec<String>,
    /// Numbers forwarded to clients in `FitConfig::extra`.
    pub client_extra: BTreeMap<String, f64>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            num_rounds: 1,
            fraction_fit: 1.0,
            min_fit_clients: 1,
            fraction_evaluate: 1.0,
            min_evaluate_clients: 1,
            eval_every: 1,
            seed: 0,
            round_timeout_s: None,
            accept_failures: true,
            max_round_retries: 2,
            compression: Compression::None,
            frozen_prefixes: vec![],
            client_extra: BTreeMap::new(),
        }
    }
}

impl RunConfig {
    pub fn validate(&self, num_clients: usize) -> Result<(), FlError> {
        let bad = |s: String| Err(FlError::Config(s));
        if num_clients == 0 {
            return bad("no clients".into());
        }
        if !(self.fraction_fit > 0.0 && self.fraction_fit <= 1.0) {
            return bad(format!(
                "fraction_fit {} must be in (0, 1]",
                self.fraction_fit
            ));
        }
        if !(0.0..=1.0).contains(&self.fraction_evaluate) {
            return bad(format!(
                "fraction_evaluate {} must be in [0, 1]",
                self.fraction_evaluate
            ));
        }
        if self.min_fit_clients == 0 || self.min_fit_clients > num_clients {
            return bad(format!(
                "min_fit_clients {} must be in 1..={num_clients} (the number of clients)",
                self.min_fit_clients
            ));
        }
        if self.num_rounds == 0 {
            return bad("num_rounds must be at least 1".into());
        }
        Ok(())
    }
}

/// Flower's rule: `max(int(n * fraction), min)` clients, sampled without replacement.
pub fn sample_clients(
    n: usize,
    fraction: f64,
    min: usize,
    seed: u64,
    round: u64,
    attempt: u32,
) -> Vec<usize> {
    let k = ((n as f64 * fraction) as usize).max(min).min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &[0x5A4D, round, attempt as u64]));
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut rng);
    let mut s = all[..k].to_vec();
    s.sort_unstable();
    s
}

/// SplitMix64-style mixing of a seed with stream identifiers.
pub fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut z = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        z = z.wrapping_add(p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub client: usize,
    pub attempt: u32,
    pub why: String,
}

/// Everything measured in one round: one line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    pub round: u64,
    pub sampled: Vec<usize>,
    pub participated: Vec<usize>,
    pub failures: Vec<Failure>,
    pub attempts: u32,
    /// Training metrics, weighted by examples.
    pub train: BTreeMap<String, f64>,
    /// Validation metrics, weighted by examples (empty when not evaluated this round).
    pub eval: BTreeMap<String, f64>,
    pub num_examples: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// Per client: (bytes received, bytes sent).
    pub client_bytes: BTreeMap<usize, (u64, u64)>,
    pub round_time_s: f64,
}

pub struct RunResult {
    pub weights: Weights,
    pub history: Vec<RoundRecord>,
}

const CKPT: &str = "checkpoint.safetensors";

fn is_frozen(name: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| name.starts_with(p.as_str()))
}

/// Runs (or resumes) a federated training. With `out_dir`, every round's checkpoint is written
/// there atomically (global weights, server optimizer moments, round, seed, history) along with
/// `metrics.jsonl`; `resume` continues from that checkpoint.
pub fn run(
    pool: &mut dyn ClientPool,
    strategy: &mut dyn Strategy,
    initial: Weights,
    cfg: &RunConfig,
    out_dir: Option<&Path>,
    resume: bool,
    mut on_round: impl FnMut(&RoundRecord),
) -> Result<RunResult, FlError> {
    let n = pool.num_clients();
    cfg.validate(n)?;
    let mut global = initial;
    let mut history: Vec<RoundRecord> = Vec::new();
    let mut synced: BTreeSet<usize> = BTreeSet::new();
    let mut start = 1;
    if resume {
        let dir =
            out_dir.ok_or_else(|| FlError::Config("--resume needs an output folder".into()))?;
        let ck = load_checkpoint(&dir.join(CKPT))?;
        global.check_layout(&ck.global, "checkpoint global weights")?;
        if ck.strategy != serde_json::to_string(strategy.config()).unwrap_or_default() {
            return Err(FlError::Config(format!(
                "{}: the checkpoint was made with strategy {} but this run uses {}",
                dir.join(CKPT).display(),
                ck.strategy,
                serde_json::to_string(strategy.config()).unwrap_or_default()
            )));
        }
        if ck.seed != cfg.seed {
            return Err(FlError::Config(format!(
                "checkpoint seed {} differs from --seed {}",
                ck.seed, cfg.seed
            )));
        }
        global = ck.global;
        strategy.load_state(ck.state)?;
        history = ck.history;
        synced = ck.synced;
        start = ck.round + 1;
        tracing::info!("resuming after round {} from {}", ck.round, dir.display());
    }
    let trainable_bytes = global
        .filter(|n| !is_frozen(n, &cfg.frozen_prefixes))
        .nbytes() as u64;
    let frozen_bytes = global.nbytes() as u64 - trainable_bytes;
    for round in start..=cfg.num_rounds {
        let t0 = Instant::now();
        let mut failures = Vec::new();
        let mut attempt = 0u32;
        let (new_global, record) = loop {
            let sampled = sample_clients(
                n,
                cfg.fraction_fit,
                cfg.min_fit_clients,
                cfg.seed,
                round,
                attempt,
            );
            let current = global.filter(|n| !is_frozen(n, &cfg.frozen_prefixes));
            strategy.begin_round(round, &current)?;
            let mut participated = Vec::new();
            let mut metrics = Vec::new();
            let mut client_bytes = BTreeMap::new();
            let mut attempt_failures = Vec::new();
            for &c in &sampled {
                let down = trainable_bytes + if synced.contains(&c) { 0 } else { frozen_bytes };
                let fit_cfg = FitConfig {
                    round,
                    seed: mix(cfg.seed, &[0xC11E, round, attempt as u64, c as u64]),
                    proximal_mu: strategy.config().proximal_mu(),
                    extra: cfg.client_extra.clone(),
                };
                let tc = Instant::now();
                let reply = catch_unwind(AssertUnwindSafe(|| pool.fit(c, &global, &fit_cfg)))
                    .unwrap_or_else(|p| Err(format!("client panicked: {}", panic_text(&p))));
                let elapsed = tc.elapsed().as_secs_f64();
                let mut fail = |why: String| {
                    attempt_failures.push(Failure {
                        client: c,
                        attempt,
                        why,
                    })
                };
                let res = match reply {
                    Err(e) => {
                        fail(e);
                        client_bytes.insert(c, (down, 0));
                        continue;
                    }
                    Ok(r) => r,
                };
                if let Some(limit) = cfg.round_timeout_s
                    && elapsed > limit
                {
                    fail(format!(
                        "missed the round deadline ({elapsed:.2} s > {limit:.2} s)"
                    ));
                    client_bytes.insert(c, (down, 0));
                    continue;
                }
                let sent = res.weights.filter(|n| !is_frozen(n, &cfg.frozen_prefixes));
                let payload = match encode(&sent, &current, cfg.compression) {
                    Ok(p) => p,
                    Err(e) => {
                        fail(e.to_string());
                        continue;
                    }
                };
                let received = decode(&payload, &current, cfg.compression)?;
                client_bytes.insert(c, (down, payload.len() as u64));
                metrics.push((res.num_examples, res.metrics.clone()));
                let r = FitRes {
                    client: c,
                    weights: received,
                    num_examples: res.num_examples,
                    metrics: res.metrics,
                };
                if let Err(e) = strategy.accumulate(r) {
                    fail(e.to_string());
                    continue;
                }
                synced.insert(c);
                participated.push(c);
            }
            let enough = participated.len() >= cfg.min_fit_clients
                && (cfg.accept_failures || attempt_failures.is_empty());
            failures.extend(attempt_failures);
            if enough {
                let new_trainable = strategy.end_round()?;
                let mut g = global.clone();
                g.update_from(&new_trainable)?;
                let rec = RoundRecord {
                    round,
                    sampled,
                    num_examples: metrics.iter().map(|(n, _)| *n).sum(),
                    train: weighted_metrics(metrics.iter().map(|(n, m)| (*n, m))),
                    participated,
                    failures: failures.clone(),
                    attempts: attempt + 1,
                    eval: BTreeMap::new(),
                    bytes_down: client_bytes.values().map(|b| b.0).sum(),
                    bytes_up: client_bytes.values().map(|b| b.1).sum(),
                    client_bytes,
                    round_time_s: 0.0,
                };
                break (g, rec);
            }
            tracing::warn!(
                "round {round} attempt {}: {} of {} sampled clients replied (min_fit_clients {}): {}",
                attempt + 1,
                participated.len(),
                sampled.len(),
                cfg.min_fit_clients,
                failures
                    .iter()
                    .map(|f| format!("client {}: {}", f.client, f.why))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if attempt >= cfg.max_round_retries {
                return Err(FlError::RoundFailed {
                    round,
                    attempts: attempt + 1,
                    got: participated.len(),
                    needed: cfg.min_fit_clients,
                    why: failures
                        .iter()
                        .map(|f| format!("client {}: {}", f.client, f.why))
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
            attempt += 1;
        };
        global = new_global;
        let mut record = record;
        if cfg.fraction_evaluate > 0.0
            && ((cfg.eval_every > 0 && round % cfg.eval_every == 0) || round == cfg.num_rounds)
        {
            let chosen = sample_clients(
                n,
                cfg.fraction_evaluate,
                cfg.min_evaluate_clients.min(n),
                cfg.seed ^ 0xE7A1,
                round,
                0,
            );
            let mut evals = Vec::new();
            for c in chosen {
                let ecfg = FitConfig {
                    round,
                    seed: mix(cfg.seed, &[0xE7A1, round, c as u64]),
                    proximal_mu: 0.0,
                    extra: cfg.client_extra.clone(),
                };
                match catch_unwind(AssertUnwindSafe(|| pool.evaluate(c, &global, &ecfg)))
                    .unwrap_or_else(|p| Err(panic_text(&p)))
                {
                    Ok(r) if r.num_examples > 0 => evals.push(r),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("round {round}: evaluation on client {c} failed: {e}"),
                }
            }
            record.eval = weighted_metrics(evals.iter().map(|r| (r.num_examples, &r.metrics)));
        }
        record.round_time_s = t0.elapsed().as_secs_f64();
        history.push(record);
        if let Some(dir) = out_dir {
            let ck = Checkpoint {
                round,
                seed: cfg.seed,
                strategy: serde_json::to_string(strategy.config()).unwrap_or_default(),
                global: global.clone(),
                state: strategy.state(),
                history: history.clone(),
                synced: synced.clone(),
            };
            save_checkpoint(&dir.join(CKPT), &ck)?;
            write_jsonl(&dir.join("metrics.jsonl"), &history)?;
        }
        on_round(history.last().unwrap());
    }
    Ok(RunResult {
        weights: global,
        history,
    })
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

pub fn write_jsonl(path: &Path, history: &[RoundRecord]) -> Result<(), FlError> {
    let mut s = String::new();
    for r in history {
        s.push_str(&serde_json::to_string(r).map_err(|e| FlError::Format {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?);
        s.push('\n');
    }
    crate::atomic_write(path, s.as_bytes())
}

/// A round checkpoint: what `--resume` needs to continue exactly.
pub struct Checkpoint {
    pub round: u64,
    pub seed: u64,
    pub strategy: String,
    pub global: Weights,
    pub state: BTreeMap<String, Weights>,
    pub history: Vec<RoundRecord>,
    pub synced: BTreeSet<usize>,
}

pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join(CKPT)
}

pub fn save_checkpoint(path: &Path, ck: &Checkpoint) -> Result<(), FlError> {
    let mut groups: Vec<(String, &Weights)> = vec![("global/".into(), &ck.global)];
    for (k, w) in &ck.state {
        groups.push((format!("state.{k}/"), w));
    }
    let gref: Vec<(&str, &Weights)> = groups.iter().map(|(p, w)| (p.as_str(), *w)).collect();
    let fmt = |e: serde_json::Error| FlError::Format {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), "fedhubert-round-checkpoint-v1".into());
    meta.insert("round".into(), ck.round.to_string());
    meta.insert("seed".into(), ck.seed.to_string());
    meta.insert("strategy".into(), ck.strategy.clone());
    meta.insert(
        "history".into(),
        serde_json::to_string(&ck.history).map_err(fmt)?,
    );
    meta.insert(
        "synced".into(),
        serde_json::to_string(&ck.synced).map_err(fmt)?,
    );
    meta.insert("order".into(), order_metadata(&gref));
    save_safetensors(path, &gref, meta)
}

pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, FlError> {
    let (mut groups, meta) = load_safetensors(path)?;
    let bad = |why: String| FlError::Format {
        path: path.to_path_buf(),
        why,
    };
    if meta.get("format").map(String::as_str) != Some("fedhubert-round-checkpoint-v1") {
        return Err(bad(
            "not a fedhubert round checkpoint (metadata `format` missing)".into(),
        ));
    }
    let field = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("metadata `{k}` missing")))
    };
    let round = field("round")?
        .parse()
        .map_err(|_| bad("bad round".into()))?;
    let seed = field("seed")?.parse().map_err(|_| bad("bad seed".into()))?;
    let history =
        serde_json::from_str(&field("history")?).map_err(|e| bad(format!("history: {e}")))?;
    let synced =
        serde_json::from_str(&field("synced")?).map_err(|e| bad(format!("synced: {e}")))?;
    let global = groups
        .remove("global")
        .ok_or_else(|| bad("no global weights".into()))?;
    let state = groups
        .into_iter()
        .filter_map(|(k, w)| k.strip_prefix("state.").map(|s| (s.to_string(), w)))
        .collect();
    Ok(Checkpoint {
        round,
        seed,
        strategy: field("strategy")?,
        global,
        state,
        history,
        synced,
    })
}
