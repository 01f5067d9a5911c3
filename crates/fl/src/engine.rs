//! The round engine: one federated run as a state machine with no I/O of its own. Every runner
//! drives it the same way — the native simulation over a [`crate::ClientPool`], the Python
//! bridge for Flower's ServerApp — so they make the same decisions by construction:
//!
//! ```text
//! loop {
//!     let ex = engine.next_exchange()?;      // None: the run is complete
//!     send ex.clients their instructions, then for each reply, in any order:
//!         engine.deliver(client, reply)?;
//!     engine.close_exchange()?;              // RoundDone(record): write the checkpoint
//! }
//! ```
//!
//! A round is one or more exchanges with clients: training (retried with a fresh sample while
//! too few replies arrive), then evaluation when due. More stages (secure aggregation's key,
//! share and unmasking exchanges) are further [`ExchangeKind`]s of the same loop.
//!
//! Every random choice is derived from (seed, round, attempt, client) through
//! [`fedhubert_io::seeds`], never from a generator threaded through the run, so a run resumed
//! from round k's checkpoint makes exactly the choices an uninterrupted run makes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use fedhubert_io::seeds::{self, mix};
use serde::{Deserialize, Serialize};

use crate::compress::{Compression, decode};
use crate::instructions::{ClientInstructions, MESSAGE_FORMAT, Upload};
use crate::privacy::{DpFedAvg, DpPlan, PrivacyRecord};
use crate::rounds::{RunConfig, sample_clients, sample_fit};
use crate::schedule::UpdateWindow;
use crate::store::Checkpoint;
use crate::strategy::{FitRes, Strategy, weighted_metrics};
use crate::{FlError, Weights};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRes {
    pub client: usize,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub client: usize,
    pub attempt: u32,
    pub why: String,
}

/// Everything measured in one round: one line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// Learning rate of the round's first and last planned update (the schedule's range).
    #[serde(default)]
    pub lr: (f64, f64),
    /// The server's own evaluation of the new global model (see
    /// [`crate::ClientPool::evaluate_global`]); empty when the server holds no data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub server_eval: BTreeMap<String, f64>,
    /// Differential privacy: epsilon spent so far, the noise, the clipping norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyRecord>,
}

/// What the clients of an exchange are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Train the global model locally and send the update.
    Fit,
    /// Evaluate the global model on the local validation split.
    Evaluate,
}

/// One exchange: the global weights go to each listed client with its instructions.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub kind: ExchangeKind,
    pub round: u64,
    pub attempt: u32,
    pub clients: Vec<(usize, ClientInstructions)>,
}

/// A client's answer to its instructions.
#[derive(Debug, Clone)]
pub enum Reply {
    Fit {
        upload: Upload,
        num_examples: u64,
        metrics: BTreeMap<String, f64>,
    },
    Evaluate(EvalRes),
    /// Error reply, missed deadline, lost node, panic.
    Failed(String),
}

/// What closing an exchange did.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Too few training replies: the next exchange retries the round with a fresh sample.
    Retry,
    /// Training aggregated; the next exchange evaluates the new global model.
    Aggregated,
    /// The round is complete (the caller writes the checkpoint now).
    RoundDone(RoundRecord),
}

/// A training attempt in progress. Replies may arrive in any order; they are aggregated in
/// client order (a reorder buffer), the order whose f32 sums match numpy's in Flower bit for bit.
struct FitAttempt {
    ex: Exchange,
    /// The trainable part of the global weights the attempt started from.
    current: Weights,
    pending: BTreeMap<usize, Reply>,
    /// Index into `ex.clients` of the next client to aggregate.
    next: usize,
    participated: Vec<usize>,
    metrics: Vec<(u64, BTreeMap<String, f64>)>,
    client_bytes: BTreeMap<usize, (u64, u64)>,
    failures: Vec<Failure>,
}

struct EvalPass {
    ex: Exchange,
    record: RoundRecord,
    replies: BTreeMap<usize, Reply>,
}

enum Open {
    Nothing,
    Fit(Box<FitAttempt>),
    Evaluate(Box<EvalPass>),
}

pub struct RoundEngine {
    cfg: RunConfig,
    strategy: Box<dyn Strategy>,
    num_clients: usize,
    global: Weights,
    history: Vec<RoundRecord>,
    /// Clients that hold the frozen tensors already (sent once, then only trainable ones).
    synced: BTreeSet<usize>,
    round: u64,
    attempt: u32,
    round_failures: Vec<Failure>,
    round_t0: Instant,
    open: Open,
    /// Why the run ended before `num_rounds` (the privacy budget), once it has.
    stopped: Option<String>,
}

impl RoundEngine {
    /// A fresh run from `initial` over clients 0..num_clients.
    pub fn new(
        cfg: RunConfig,
        strategy: Box<dyn Strategy>,
        initial: Weights,
        num_clients: usize,
    ) -> Result<Self, FlError> {
        cfg.validate(num_clients)?;
        let strategy = with_privacy(&cfg, strategy, num_clients)?;
        Ok(Self {
            cfg,
            strategy,
            num_clients,
            global: initial,
            history: Vec::new(),
            synced: BTreeSet::new(),
            round: 1,
            attempt: 0,
            round_failures: Vec::new(),
            round_t0: Instant::now(),
            open: Open::Nothing,
            stopped: None,
        })
    }

    /// Continues the run `ck` was written by; `initial` fixes the layout the checkpoint must have.
    pub fn resume(
        cfg: RunConfig,
        strategy: Box<dyn Strategy>,
        initial: Weights,
        num_clients: usize,
        ck: Checkpoint,
    ) -> Result<Self, FlError> {
        initial.check_layout(&ck.global, "checkpoint global weights")?;
        let here = serde_json::to_string(strategy.config()).unwrap_or_default();
        if ck.strategy != here {
            return Err(FlError::Config(format!(
                "the checkpoint was made with strategy {} but this run uses {here}",
                ck.strategy
            )));
        }
        let here = told(&cfg);
        if let Some(theirs) = ck.clients.as_ref().filter(|c| **c != here) {
            return Err(FlError::Config(format!(
                "the checkpoint's clients were told {theirs} but this run tells them {here} (learning rate and its schedule, local work, proximal_mu, frozen tensors, compression; a polynomial_decay schedule spans num_rounds, so a resume with another num_rounds changes it: keep num_rounds, or use lr_schedule: fixed)"
            )));
        }
        if ck.seed != cfg.seed {
            return Err(FlError::Config(format!(
                "the checkpoint's seed {} differs from federated.seed {} (--seed)",
                ck.seed, cfg.seed
            )));
        }
        let mut e = Self::new(cfg, strategy, ck.global, num_clients)?;
        e.strategy.load_state(ck.state)?;
        e.strategy.load_ledger(ck.privacy.as_deref())?;
        e.history = ck.history;
        e.synced = ck.synced;
        e.round = ck.round + 1;
        Ok(e)
    }

    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    pub fn strategy(&self) -> &dyn Strategy {
        self.strategy.as_ref()
    }

    pub fn num_clients(&self) -> usize {
        self.num_clients
    }

    /// The global model (all tensors, frozen ones included).
    pub fn global(&self) -> &Weights {
        &self.global
    }

    pub fn into_global(self) -> Weights {
        self.global
    }

    pub fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    /// Attaches the server's own evaluation of the global model to the last completed round
    /// (before its checkpoint is taken); returns that round's record.
    pub fn record_server_eval(&mut self, metrics: BTreeMap<String, f64>) -> RoundRecord {
        match self.history.last_mut() {
            Some(rec) => {
                rec.server_eval = metrics;
                rec.clone()
            }
            None => RoundRecord::default(),
        }
    }

    /// The round in progress (or next), None when the run is complete.
    pub fn next_round(&self) -> Option<u64> {
        (self.round <= self.cfg.num_rounds && self.stopped.is_none()).then_some(self.round)
    }

    /// Why the run stopped before `num_rounds` (`privacy.max_epsilon`), if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// What `--resume` needs to continue from here exactly; between rounds only (after
    /// `RoundDone`, before the next exchange opens).
    pub fn checkpoint(&self) -> Result<Checkpoint, FlError> {
        if !matches!(self.open, Open::Nothing) || self.attempt > 0 {
            return Err(FlError::Config(format!(
                "round {} is in progress: a checkpoint is taken between rounds",
                self.round
            )));
        }
        Ok(Checkpoint {
            round: self.round - 1,
            seed: self.cfg.seed,
            strategy: serde_json::to_string(self.strategy.config()).unwrap_or_default(),
            global: self.global.clone(),
            state: self.strategy.state(),
            history: self.history.clone(),
            synced: self.synced.clone(),
            clients: Some(told(&self.cfg)),
            client_state: BTreeMap::new(),
            privacy: self.strategy.ledger(),
        })
    }

    /// The open exchange, opening the next one when none is: a training attempt of the next
    /// round, or None when the run is complete.
    pub fn next_exchange(&mut self) -> Result<Option<Exchange>, FlError> {
        match &self.open {
            Open::Fit(a) => return Ok(Some(a.ex.clone())),
            Open::Evaluate(p) => return Ok(Some(p.ex.clone())),
            Open::Nothing => {}
        }
        let Some(round) = self.next_round() else {
            return Ok(None);
        };
        if let Err(why) = self.strategy.round_allowed() {
            tracing::warn!("stopping before round {round}: {why}");
            self.stopped = Some(why);
            return Ok(None);
        }
        if self.attempt == 0 {
            self.round_t0 = Instant::now();
            self.round_failures.clear();
        }
        let sampled = sample_fit(&self.cfg, self.num_clients, round, self.attempt);
        let current = self.cfg.upload.trainable(&self.global);
        self.strategy.begin_round(round, &current)?;
        let attempt = self.attempt as u64;
        let clients = sampled
            .iter()
            .map(|&c| {
                let seed = mix(
                    self.cfg.seed,
                    &[seeds::CLIENT_FIT, round, attempt, c as u64],
                );
                (
                    c,
                    self.instructions(round, seed, self.cfg.client.proximal_mu),
                )
            })
            .collect();
        let ex = Exchange {
            kind: ExchangeKind::Fit,
            round,
            attempt: self.attempt,
            clients,
        };
        self.open = Open::Fit(Box::new(FitAttempt {
            ex: ex.clone(),
            current,
            pending: BTreeMap::new(),
            next: 0,
            participated: vec![],
            metrics: vec![],
            client_bytes: BTreeMap::new(),
            failures: vec![],
        }));
        Ok(Some(ex))
    }

    fn instructions(&self, round: u64, seed: u64, proximal_mu: f32) -> ClientInstructions {
        let mut settings = self.cfg.client.clone();
        settings.proximal_mu = proximal_mu;
        ClientInstructions {
            format: MESSAGE_FORMAT,
            round,
            seed,
            updates: UpdateWindow::of_round(round, settings.updates_per_round()),
            settings,
            upload: self.cfg.upload.clone(),
            privacy: self.strategy.client_privacy(),
        }
    }

    /// Bytes client `c` receives with the global model: trainable tensors, plus the frozen ones
    /// until it has them.
    fn down_bytes(&self, c: usize) -> u64 {
        let frozen: usize = (self.global.tensors.iter())
            .filter(|t| self.cfg.upload.is_frozen(&t.name))
            .map(|t| t.data.len() * 4)
            .sum();
        let trainable = (self.global.nbytes() - frozen) as u64;
        trainable
            + if self.synced.contains(&c) {
                0
            } else {
                frozen as u64
            }
    }

    /// A reply of a client of the open exchange, in any order; each client replies once, with
    /// the kind of reply the exchange asked for.
    pub fn deliver(&mut self, client: usize, reply: Reply) -> Result<(), FlError> {
        // Replies already aggregated have left the buffer: the clients before `next`.
        let (ex, pending, done) = match &mut self.open {
            Open::Fit(a) => (&a.ex, &mut a.pending, &a.ex.clients[..a.next]),
            Open::Evaluate(p) => (&p.ex, &mut p.replies, &p.ex.clients[..0]),
            Open::Nothing => return Err(FlError::Config("no exchange is open".into())),
        };
        if !ex.clients.iter().any(|(c, _)| *c == client) {
            return Err(FlError::Config(format!(
                "client {client} was not sampled for round {}'s {:?} exchange (sampled: {:?})",
                ex.round,
                ex.kind,
                ex.clients.iter().map(|c| c.0).collect::<Vec<_>>()
            )));
        }
        let wrong_kind = match (&reply, ex.kind) {
            (Reply::Fit { .. }, ExchangeKind::Evaluate) => {
                Some("a training reply to an evaluation")
            }
            (Reply::Evaluate(_), ExchangeKind::Fit) => Some("an evaluation reply to a training"),
            _ => None,
        };
        if let Some(what) = wrong_kind {
            return Err(FlError::Config(format!(
                "client {client}: {what} exchange (round {})",
                ex.round
            )));
        }
        if done.iter().any(|(c, _)| *c == client) || pending.contains_key(&client) {
            return Err(FlError::Config(format!("client {client} replied twice")));
        }
        pending.insert(client, reply);
        self.drain_fit(false)
    }

    /// Aggregates the buffered training replies that are next in client order; with `all`, every
    /// client still missing counts as failed.
    fn drain_fit(&mut self, all: bool) -> Result<(), FlError> {
        if !matches!(self.open, Open::Fit(_)) {
            return Ok(());
        }
        let Open::Fit(mut a) = std::mem::replace(&mut self.open, Open::Nothing) else {
            unreachable!("checked above")
        };
        let result = (|| {
            while let Some(&(c, _)) = a.ex.clients.get(a.next) {
                let reply = match a.pending.remove(&c) {
                    Some(r) => r,
                    None if all => Reply::Failed("no reply before the exchange closed".into()),
                    None => break,
                };
                a.next += 1;
                self.aggregate_one(&mut a, c, reply)?;
            }
            Ok(())
        })();
        self.open = Open::Fit(a);
        result
    }

    fn aggregate_one(&mut self, a: &mut FitAttempt, c: usize, reply: Reply) -> Result<(), FlError> {
        let down = self.down_bytes(c);
        let attempt = self.attempt;
        let fail = |a: &mut FitAttempt, why: String| {
            a.failures.push(Failure {
                client: c,
                attempt,
                why,
            });
        };
        let (upload, num_examples, metrics) = match reply {
            Reply::Fit {
                upload,
                num_examples,
                metrics,
            } => (upload, num_examples, metrics),
            Reply::Failed(why) => {
                fail(a, why);
                a.client_bytes.insert(c, (down, 0));
                return Ok(());
            }
            Reply::Evaluate(_) => {
                return Err(FlError::Config(format!(
                    "client {c}: an evaluation reply to a training exchange"
                )));
            }
        };
        let received = match upload {
            Upload::Payload(p) => {
                decode(&p, &a.current, self.cfg.upload.compression).map(|w| (w, p.len() as u64))
            }
            // Uncompressed, the wire carries exactly the f32 values of the trainable tensors
            // (a runner that hands over the whole model has its frozen tensors dropped here).
            Upload::Weights(_) if self.cfg.upload.compression != Compression::None => {
                Err(FlError::Config(format!(
                    "uncompressed weights, but the run sends {:?} updates",
                    self.cfg.upload.compression
                )))
            }
            Upload::Weights(mut w) => {
                // Owned: drop any frozen tensors in place rather than copying the rest.
                w.tensors.retain(|t| !self.cfg.upload.is_frozen(&t.name));
                a.current
                    .check_layout(&w, "client update")
                    .map_err(FlError::from)
                    .map(|_| {
                        let n = w.nbytes() as u64;
                        (w, n)
                    })
            }
        };
        let (weights, up) = match received {
            Ok(x) => x,
            Err(e) => {
                fail(a, e.to_string());
                a.client_bytes.insert(c, (down, 0));
                return Ok(());
            }
        };
        a.client_bytes.insert(c, (down, up));
        let res = FitRes {
            client: c,
            weights,
            num_examples,
            metrics: metrics.clone(),
        };
        // A reply the strategy refuses (NaN weights, a wrong layout) counts as a failure, and
        // its metrics and examples stay out of the round's record as its weights stay out of
        // the aggregate.
        match self.strategy.accumulate(res) {
            Err(e) => fail(a, e.to_string()),
            Ok(()) => {
                a.metrics.push((num_examples, metrics));
                a.participated.push(c);
                self.synced.insert(c);
            }
        }
        Ok(())
    }

    /// Closes the open exchange (clients that did not reply count as failed) and moves the run
    /// on. Errors once a round has used up `max_round_retries`, keeping the last checkpoint.
    pub fn close_exchange(&mut self) -> Result<Progress, FlError> {
        self.drain_fit(true)?;
        match std::mem::replace(&mut self.open, Open::Nothing) {
            Open::Nothing => Err(FlError::Config("no exchange is open".into())),
            Open::Fit(a) => self.close_fit(*a),
            Open::Evaluate(p) => Ok(Progress::RoundDone(self.finish_round(*p))),
        }
    }

    fn close_fit(&mut self, a: FitAttempt) -> Result<Progress, FlError> {
        let cfg = &self.cfg;
        let enough = a.participated.len() >= cfg.min_fit_clients
            && (cfg.accept_failures || a.failures.is_empty());
        self.round_failures.extend(a.failures);
        if !enough {
            return self.retry(a.participated.len(), a.ex.clients.len());
        }
        let new_trainable = self.strategy.end_round()?;
        self.global.update_from(&new_trainable)?;
        let privacy = self.strategy.privacy_record();
        // Under DP the clients' own metrics are not published: they are outside the guarantee.
        let train = match privacy {
            None => weighted_metrics(a.metrics.iter().map(|(n, m)| (*n, m))),
            Some(_) => BTreeMap::new(),
        };
        let record = RoundRecord {
            round: self.round,
            sampled: a.ex.clients.iter().map(|c| c.0).collect(),
            num_examples: a.metrics.iter().map(|(n, _)| *n).sum(),
            train,
            participated: a.participated,
            failures: self.round_failures.clone(),
            attempts: self.attempt + 1,
            eval: BTreeMap::new(),
            bytes_down: a.client_bytes.values().map(|b| b.0).sum(),
            bytes_up: a.client_bytes.values().map(|b| b.1).sum(),
            client_bytes: a.client_bytes,
            round_time_s: 0.0,
            lr: self.cfg.client.lr_range(self.round),
            server_eval: BTreeMap::new(),
            privacy,
        };
        let pass = EvalPass {
            ex: self.eval_exchange(self.eval_plan()),
            record,
            replies: BTreeMap::new(),
        };
        if pass.ex.clients.is_empty() {
            return Ok(Progress::RoundDone(self.finish_round(pass)));
        }
        self.open = Open::Evaluate(Box::new(pass));
        Ok(Progress::Aggregated)
    }

    fn retry(&mut self, got: usize, sampled: usize) -> Result<Progress, FlError> {
        // Each distinct failure once, with the attempts it happened in: the message used to
        // repeat every earlier attempt's failures and grew with each retry.
        let mut seen: Vec<(usize, &str, Vec<u32>)> = Vec::new();
        for f in &self.round_failures {
            match seen
                .iter_mut()
                .find(|(c, w, _)| *c == f.client && *w == f.why)
            {
                Some((_, _, attempts)) => attempts.push(f.attempt + 1),
                None => seen.push((f.client, &f.why, vec![f.attempt + 1])),
            }
        }
        let why = seen
            .iter()
            .map(|(c, w, a)| match a.len() {
                1 => format!("client {c}: {w}"),
                _ => format!("client {c} (attempts {a:?}): {w}"),
            })
            .collect::<Vec<_>>()
            .join("; ");
        tracing::warn!(
            "round {} attempt {}: {got} of {sampled} sampled clients replied (min_fit_clients {}): {why}",
            self.round,
            self.attempt + 1,
            self.cfg.min_fit_clients,
        );
        if self.attempt >= self.cfg.max_round_retries {
            return Err(FlError::RoundFailed {
                round: self.round,
                attempts: self.attempt + 1,
                got,
                needed: self.cfg.min_fit_clients,
                why,
            });
        }
        self.attempt += 1;
        Ok(Progress::Retry)
    }

    /// The clients that evaluate this round's new global model (none when not an eval round).
    fn eval_plan(&self) -> Vec<(usize, ClientInstructions)> {
        let (cfg, round) = (&self.cfg, self.round);
        let due = (cfg.eval_every > 0 && round % cfg.eval_every == 0) || round == cfg.num_rounds;
        if !(cfg.fraction_evaluate > 0.0 && due) {
            return vec![];
        }
        let chosen = sample_clients(
            self.num_clients,
            cfg.fraction_evaluate,
            cfg.min_evaluate_clients.min(self.num_clients),
            cfg.seed ^ seeds::EVAL,
            round,
            0,
        );
        chosen
            .into_iter()
            .map(|c| {
                let seed = mix(cfg.seed, &[seeds::EVAL, round, c as u64]);
                (c, self.instructions(round, seed, 0.0))
            })
            .collect()
    }

    fn eval_exchange(&self, clients: Vec<(usize, ClientInstructions)>) -> Exchange {
        Exchange {
            kind: ExchangeKind::Evaluate,
            round: self.round,
            attempt: 0,
            clients,
        }
    }

    /// Records the evaluation (in client order; failed clients are reported, not fatal) and
    /// closes the round.
    fn finish_round(&mut self, p: EvalPass) -> RoundRecord {
        let mut rec = p.record;
        let mut evals = Vec::new();
        for (c, _) in &p.ex.clients {
            match p.replies.get(c) {
                Some(Reply::Evaluate(r)) if r.num_examples > 0 => evals.push(r),
                Some(Reply::Evaluate(_)) => {}
                Some(Reply::Failed(e)) => {
                    tracing::warn!("round {}: evaluation on client {c} failed: {e}", rec.round)
                }
                Some(Reply::Fit { .. }) => tracing::warn!(
                    "round {}: client {c} sent a training reply to an evaluation",
                    rec.round
                ),
                None => tracing::warn!("round {}: no evaluation reply from client {c}", rec.round),
            }
        }
        rec.eval = weighted_metrics(evals.iter().map(|r| (r.num_examples, &r.metrics)));
        rec.round_time_s = self.round_t0.elapsed().as_secs_f64();
        self.history.push(rec.clone());
        self.round += 1;
        self.attempt = 0;
        rec
    }
}

/// `strategy` wrapped in DP-FedAvg when the run asks for privacy (the one place it is: every
/// runner builds its engine here).
fn with_privacy(
    cfg: &RunConfig,
    strategy: Box<dyn Strategy>,
    n: usize,
) -> Result<Box<dyn Strategy>, FlError> {
    let p = &cfg.privacy;
    if !p.is_on() {
        return Ok(strategy);
    }
    let plan = DpPlan::new(p, n, cfg.fraction_fit, cfg.min_fit_clients, cfg.num_rounds)
        .map_err(FlError::Config)?;
    tracing::info!(
        "privacy: {:?} DP, {:?} sampling q = {:.4}, noise multiplier {:.4}, denominator {:.2}, clipping norm {}",
        p.mode,
        plan.sampling,
        plan.q,
        plan.noise_multiplier,
        plan.denominator,
        p.clipping_norm
    );
    if plan.sampling == crate::privacy::Sampling::Poisson && plan.q < 1.0 && cfg.min_fit_clients > 1
    {
        tracing::warn!(
            "privacy.sampling poisson draws each client independently, so a round can draw fewer than federated.min_fit_clients = {}: it is then retried, and every attempt is paid for in epsilon (set min_fit_clients: 1, or sampling: fixed)",
            cfg.min_fit_clients
        );
    }
    Ok(Box::new(DpFedAvg::new(
        strategy,
        p.clone(),
        plan,
        cfg.seed,
    )?))
}

/// What the clients of a run are told (settings and upload plan) as JSON: a resumed run must
/// tell them the same.
fn told(cfg: &RunConfig) -> String {
    serde_json::json!({"client": cfg.client, "upload": cfg.upload}).to_string()
}
