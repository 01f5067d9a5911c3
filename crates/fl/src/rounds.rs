//! The native runner: [`run`] drives the [`RoundEngine`] over a [`ClientPool`] in this process,
//! one client after another, writing the round checkpoint after every round.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use fedhubert_io::seeds::{self, mix};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::engine::{EvalRes, ExchangeKind, Progress, Reply, RoundEngine, RoundRecord};
use crate::instructions::{ClientInstructions, ClientSettings, UploadPlan, prepare_reply};
use crate::privacy::{PrivacyConfig, Sampling};
use crate::store::{checkpoint_path, load_checkpoint, save_round};
use crate::strategy::{FitRes, Strategy};
use crate::{FlError, Weights};

/// The clients of a simulation (or proxies to remote ones). Errors are strings: a failed client is
/// recorded, not fatal.
pub trait ClientPool {
    fn num_clients(&self) -> usize;
    fn fit(
        &mut self,
        client: usize,
        global: &Weights,
        instructions: &ClientInstructions,
    ) -> Result<FitRes, String>;
    fn evaluate(
        &mut self,
        client: usize,
        global: &Weights,
        instructions: &ClientInstructions,
    ) -> Result<EvalRes, String>;
    /// Flower's centralized evaluation (a strategy's `evaluate_fn`): the new global model on
    /// data the server holds (e.g. held-out speakers), after every round; None when there is
    /// none. Its metrics go into the round's record as `server_eval`.
    fn evaluate_global(
        &mut self,
        _round: u64,
        _global: &Weights,
    ) -> Option<Result<BTreeMap<String, f64>, String>> {
        None
    }
    /// What the simulated clients keep between rounds (e.g. `local_optimizer_state: keep`), by
    /// client, saved in each round checkpoint so a resume is exact.
    fn client_state(&self) -> BTreeMap<String, Weights> {
        BTreeMap::new()
    }
    /// Restores [`Self::client_state`] from the checkpoint a run resumes from.
    fn restore_client_state(&mut self, _state: BTreeMap<String, Weights>) -> Result<(), String> {
        Ok(())
    }
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
    /// What clients send back: frozen tensors left out, update compression.
    pub upload: UploadPlan,
    /// What clients are told to do locally.
    pub client: ClientSettings,
    /// Client-level differential privacy (off by default).
    #[serde(default)]
    pub privacy: PrivacyConfig,
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
            upload: UploadPlan::default(),
            client: ClientSettings::default(),
            privacy: PrivacyConfig::default(),
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
                "federated.client_fraction {} must be in (0, 1]",
                self.fraction_fit
            ));
        }
        if !(0.0..=1.0).contains(&self.fraction_evaluate) {
            return bad(format!(
                "federated.fraction_evaluate {} must be in [0, 1]",
                self.fraction_evaluate
            ));
        }
        if self.min_fit_clients == 0 || self.min_fit_clients > num_clients {
            return bad(format!(
                "federated.min_fit_clients {} must be in 1..={num_clients} (the number of clients)",
                self.min_fit_clients
            ));
        }
        if self.num_rounds == 0 {
            return bad("federated.num_rounds must be at least 1".into());
        }
        let mu = self.client.proximal_mu;
        if !(mu >= 0.0 && mu.is_finite()) {
            return bad(format!(
                "federated.proximal_mu {mu} must be a finite number >= 0"
            ));
        }
        Ok(())
    }
}

/// Flower's sample size: `max(int(n * fraction), min)`, at most n.
pub fn sample_size(n: usize, fraction: f64, min: usize) -> usize {
    ((n as f64 * fraction) as usize).max(min).min(n)
}

/// Flower's rule: [`sample_size`] clients, sampled without replacement.
pub fn sample_clients(
    n: usize,
    fraction: f64,
    min: usize,
    seed: u64,
    round: u64,
    attempt: u32,
) -> Vec<usize> {
    let k = sample_size(n, fraction, min);
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &[seeds::SAMPLE_FIT, round, attempt as u64]));
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut rng);
    let mut s = all[..k].to_vec();
    s.sort_unstable();
    s
}

/// Poisson sampling as the DP accountant assumes it: each client independently with probability
/// `q`, not conditioned on any minimum (the draw may be empty).
pub fn sample_poisson(n: usize, q: f64, seed: u64, round: u64, attempt: u32) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &[seeds::SAMPLE_FIT, round, attempt as u64]));
    (0..n).filter(|_| rng.random::<f64>() < q).collect()
}

/// The clients of a training attempt: Poisson when a DP run says so, else Flower's rule.
pub fn sample_fit(cfg: &RunConfig, n: usize, round: u64, attempt: u32) -> Vec<usize> {
    if cfg.privacy.is_on() && cfg.privacy.sampling == Sampling::Poisson {
        return sample_poisson(n, cfg.fraction_fit, cfg.seed, round, attempt);
    }
    sample_clients(
        n,
        cfg.fraction_fit,
        cfg.min_fit_clients,
        cfg.seed,
        round,
        attempt,
    )
}

pub struct RunResult {
    pub weights: Weights,
    pub history: Vec<RoundRecord>,
    /// Why the run ended before `num_rounds` (`privacy.max_epsilon`), if it did.
    pub stopped: Option<String>,
}

/// Runs (or resumes) a federated training. With `out_dir`, every round's checkpoint is written
/// there atomically (global weights, server optimizer moments, round, seed, history) along with
/// `metrics.jsonl`; `resume` continues from that checkpoint.
pub fn run(
    pool: &mut dyn ClientPool,
    strategy: Box<dyn Strategy>,
    initial: Weights,
    cfg: &RunConfig,
    out_dir: Option<&Path>,
    resume: bool,
    mut on_round: impl FnMut(&RoundRecord),
) -> Result<RunResult, FlError> {
    let n = pool.num_clients();
    let mut engine = if resume {
        let dir =
            out_dir.ok_or_else(|| FlError::Config("--resume needs an output folder".into()))?;
        let path = checkpoint_path(dir);
        let mut ck = load_checkpoint(&path)?;
        pool.restore_client_state(std::mem::take(&mut ck.client_state))
            .map_err(|why| FlError::Config(format!("{}: client state: {why}", path.display())))?;
        let e =
            RoundEngine::resume(cfg.clone(), strategy, initial, n, ck).map_err(|e| match e {
                FlError::Config(why) => FlError::Config(format!("{}: {why}", path.display())),
                e => e,
            })?;
        tracing::info!(
            "resuming after round {} from {}",
            e.history().len(),
            dir.display()
        );
        e
    } else {
        if let Some(dir) = out_dir {
            crate::store::refuse_fresh_start(dir)?;
        }
        RoundEngine::new(cfg.clone(), strategy, initial, n)?
    };
    while let Some(ex) = engine.next_exchange()? {
        for (c, instructions) in &ex.clients {
            let reply = call_client(pool, ex.kind, *c, engine.global(), instructions, cfg);
            engine.deliver(*c, reply)?;
        }
        if let Progress::RoundDone(mut rec) = engine.close_exchange()? {
            if let Some(m) = pool.evaluate_global(rec.round, engine.global()) {
                let m = m.map_err(|why| {
                    FlError::Config(format!(
                        "round {}: server-side evaluation: {why}",
                        rec.round
                    ))
                })?;
                rec = engine.record_server_eval(m);
            }
            if let Some(dir) = out_dir {
                let mut ck = engine.checkpoint()?;
                ck.client_state = pool.client_state();
                save_round(dir, &ck)?;
            }
            on_round(&rec);
        }
    }
    let history = engine.history().to_vec();
    let stopped = engine.stopped().map(str::to_string);
    Ok(RunResult {
        weights: engine.into_global(),
        history,
        stopped,
    })
}

/// One client's work in this process: a panic or a missed deadline is that client's failure.
fn call_client(
    pool: &mut dyn ClientPool,
    kind: ExchangeKind,
    c: usize,
    global: &Weights,
    instructions: &ClientInstructions,
    cfg: &RunConfig,
) -> Reply {
    let mut elapsed = 0.0;
    let reply = catch_unwind(AssertUnwindSafe(|| match kind {
        ExchangeKind::Fit => {
            let t0 = Instant::now();
            let res = pool.fit(c, global, instructions);
            // The deadline is for local training, as it was before uploads were prepared here.
            elapsed = t0.elapsed().as_secs_f64();
            res.and_then(|res| prepare_reply(res, global, instructions).map_err(|e| e.to_string()))
        }
        ExchangeKind::Evaluate => pool.evaluate(c, global, instructions).map(Reply::Evaluate),
    }))
    .unwrap_or_else(|p| Err(format!("client panicked: {}", panic_text(&p))));
    match reply {
        Err(e) => Reply::Failed(e),
        Ok(_) if kind == ExchangeKind::Fit && cfg.round_timeout_s.is_some_and(|l| elapsed > l) => {
            Reply::Failed(format!(
                "missed the round deadline ({elapsed:.2} s > {:.2} s)",
                cfg.round_timeout_s.unwrap_or_default()
            ))
        }
        Ok(r) => r,
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
