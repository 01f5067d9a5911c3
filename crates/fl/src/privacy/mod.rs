//! Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning Differentially
//! Private Recurrent Language Models", arXiv 1710.06963) as a wrapper around any mean-based
//! strategy, with adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
//! Adaptive Clipping", arXiv 1905.03871) and an RDP accountant ([`accountant`]).
//!
//! The mechanism, in order:
//! 1. the server tells each sampled client the round's clipping norm C ([`ClientPrivacy`] in its
//!    instructions);
//! 2. the client clips its update (trained minus global weights, all trainable tensors as one
//!    vector) to L2 norm C before any compression ([`clip_update`]), and sends no training
//!    metrics and no example count: only the weights and, for adaptive clipping, whether its
//!    update was within C;
//! 3. the server re-clips what it decoded (compression may move the norm), sums the updates,
//!    divides by the *planned* number of clients m (never by how many replied), and adds
//!    Gaussian noise of standard deviation z C / m (`mode: central`); with `mode: local` each
//!    client adds noise of z C to its own update instead;
//! 4. the inner strategy's server optimizer (FedAvg's replacement, FedAdam, FedAvgM, ...) runs on
//!    the noised average: post-processing, which costs no privacy.
//!
//! Every training attempt (a retried round too) is composed in the ledger before it starts, so
//! the reported epsilon covers every release. The trust model of `central`: the server sees the
//! clipped updates and is trusted to add the noise; what it publishes (the models, metrics.jsonl)
//! is what the guarantee covers.

pub mod accountant;

use std::collections::BTreeMap;

use fedhubert_io::seeds::{self, mix};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

pub use accountant::{Ledger, Sampling};

use crate::strategy::{FitRes, Strategy, check_reply};
use crate::{FlError, StrategyConfig, Weights};

/// The metric a client's reply carries under DP: 1 when its update was within the clipping norm.
pub const UNCLIPPED: &str = "dp_unclipped";

/// Where the privacy noise comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSource {
    /// The operating system's random generator: nobody can reproduce (and subtract) the noise.
    #[default]
    Os,
    /// Derived from `federated.seed`: reproducible runs (tests, native-against-Flower parity).
    /// Anyone who knows the seed can remove the noise, so this voids the guarantee against them.
    Seeded,
}

/// Who adds the noise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyMode {
    #[default]
    None,
    /// The server adds noise to the average of the clipped updates (trusted server).
    Central,
    /// Each client adds noise to its own clipped update (Flower's `LocalDpMod`): no trust in the
    /// server, at the cost of m times the noise variance in the average.
    Local,
}

/// Andrew et al.'s geometric update of the clipping norm toward a quantile of the update norms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveClipping {
    /// The fraction of updates that should be within the norm (gamma; 0.5: the median).
    pub target_quantile: f64,
    /// eta_C: C <- C exp(-eta_C (b - gamma)), b the noised fraction of unclipped updates.
    pub learning_rate: f64,
    /// Standard deviation sigma_b of the noise on the count of unclipped updates; default m / 20
    /// (the paper's choice), m the planned clients per round.
    pub count_stddev: Option<f64>,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_stddev: None,
        }
    }
}

/// The run file's `privacy:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    pub mode: PrivacyMode,
    /// C, the L2 bound of each client's update (the initial one with adaptive clipping).
    pub clipping_norm: f64,
    /// z: noise standard deviation over the sensitivity. Give this or `target_epsilon`.
    pub noise_multiplier: Option<f64>,
    /// The epsilon the planned `num_rounds` should spend; z is solved for it.
    pub target_epsilon: Option<f64>,
    pub delta: f64,
    pub sampling: Sampling,
    pub adaptive_clipping: Option<AdaptiveClipping>,
    /// The run stops before a round that would take epsilon past this, keeping its checkpoint.
    pub max_epsilon: Option<f64>,
    pub noise: NoiseSource,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            mode: PrivacyMode::None,
            clipping_norm: 1.0,
            noise_multiplier: None,
            target_epsilon: None,
            delta: 1e-5,
            sampling: Sampling::Poisson,
            adaptive_clipping: None,
            max_epsilon: None,
            noise: NoiseSource::Os,
        }
    }
}

/// What one client is told about DP in its instructions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPrivacy {
    /// Clip the update to this L2 norm.
    pub clipping_norm: f64,
    /// `mode: local`: add Gaussian noise of this standard deviation to the clipped update.
    pub local_noise_std: Option<f64>,
    pub noise: NoiseSource,
}

/// What a DP round records in `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRecord {
    /// Epsilon spent after this round, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    /// Total noise multiplier accounted per attempt.
    pub noise_multiplier: f64,
    /// The clipping norm this round's clients used, and the one the next round uses.
    pub clipping_norm: f64,
    pub next_clipping_norm: f64,
    /// The fixed denominator m (planned clients) and how many replied.
    pub denominator: f64,
    pub replied: usize,
    /// Attempts composed in the ledger so far (a retried round counts each attempt).
    pub attempts_accounted: u64,
    /// The noised fraction of unclipped updates (adaptive clipping only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclipped_fraction: Option<f64>,
}

impl PrivacyRecord {
    /// The part of a round's console line: " | epsilon E (delta D), clipping norm C".
    pub fn console(record: Option<&PrivacyRecord>) -> String {
        match record {
            Some(p) => format!(
                " | epsilon {:.3} (delta {:e}), clipping norm {:.4}",
                p.epsilon, p.delta, p.clipping_norm
            ),
            None => String::new(),
        }
    }
}

impl PrivacyConfig {
    pub fn is_on(&self) -> bool {
        self.mode != PrivacyMode::None
    }

    /// Key-level checks that need no run context.
    pub fn validate(&self) -> Result<(), String> {
        if !self.is_on() {
            return Ok(());
        }
        if !(self.clipping_norm > 0.0 && self.clipping_norm.is_finite()) {
            return Err(format!(
                "privacy.clipping_norm {} must be a positive number",
                self.clipping_norm
            ));
        }
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(_), Some(_)) => {
                return Err("privacy.noise_multiplier and privacy.target_epsilon: give one".into());
            }
            (None, None) => {
                return Err("privacy: give noise_multiplier or target_epsilon".into());
            }
            (Some(z), None) if !(z > 0.0 && z.is_finite()) => {
                return Err(format!(
                    "privacy.noise_multiplier {z} must be a positive number"
                ));
            }
            (None, Some(e)) if !(e > 0.0 && e.is_finite()) => {
                return Err(format!(
                    "privacy.target_epsilon {e} must be a positive number"
                ));
            }
            _ => {}
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!("privacy.delta {} must be in (0, 1)", self.delta));
        }
        if let Some(m) = self.max_epsilon
            && !(m > 0.0)
        {
            return Err(format!("privacy.max_epsilon {m} must be positive"));
        }
        if let Some(a) = &self.adaptive_clipping {
            if self.mode == PrivacyMode::Local {
                return Err("privacy.adaptive_clipping: with mode local each client noises its own update, and the count of unclipped updates would leave the clients in the clear; use a fixed clipping_norm".into());
            }
            if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                return Err(format!(
                    "privacy.adaptive_clipping.target_quantile {} must be in (0, 1)",
                    a.target_quantile
                ));
            }
            if !(a.learning_rate > 0.0 && a.learning_rate.is_finite()) {
                return Err(format!(
                    "privacy.adaptive_clipping.learning_rate {} must be positive",
                    a.learning_rate
                ));
            }
            if let Some(s) = a.count_stddev
                && !(s > 0.0)
            {
                return Err(format!(
                    "privacy.adaptive_clipping.count_stddev {s} must be positive"
                ));
            }
        }
        Ok(())
    }
}

/// The round plan of a DP run: who is sampled, how, and how much noise.
#[derive(Debug, Clone, PartialEq)]
pub struct DpPlan {
    pub sampling: Sampling,
    /// Sampling rate (Poisson) or fraction m/n (fixed).
    pub q: f64,
    /// The fixed denominator: the expected (Poisson) or exact (fixed) clients per round.
    pub denominator: f64,
    /// The total noise multiplier z that the ledger accounts.
    pub noise_multiplier: f64,
    /// The multiplier of the update's own noise (z itself, or less with adaptive clipping,
    /// whose count query takes the rest of the budget).
    pub update_noise_multiplier: f64,
    pub count_stddev: f64,
}

impl DpPlan {
    /// Checks `cfg` against the run (n clients, `rounds` planned, the sampling keys) and solves
    /// the noise for `target_epsilon` when given.
    pub fn new(
        cfg: &PrivacyConfig,
        n: usize,
        fraction: f64,
        min_fit_clients: usize,
        rounds: u64,
    ) -> Result<Self, String> {
        cfg.validate()?;
        if cfg.delta >= 1.0 / n as f64 {
            return Err(format!(
                "privacy.delta {} must be below 1 / number of clients = {:.3e}: a delta of 1/n allows one client's data to be published outright",
                cfg.delta,
                1.0 / n as f64
            ));
        }
        let (q, denominator) = match cfg.sampling {
            Sampling::Poisson => (fraction, fraction * n as f64),
            Sampling::Fixed => {
                let k = crate::rounds::sample_size(n, fraction, min_fit_clients);
                (k as f64 / n as f64, k as f64)
            }
        };
        let (acc_sampling, acc_q) = accounted(cfg.mode, cfg.sampling, q);
        let z = match (cfg.noise_multiplier, cfg.target_epsilon) {
            (Some(z), _) => z,
            (None, Some(eps)) => {
                accountant::noise_for_epsilon(eps, acc_sampling, acc_q, rounds, cfg.delta)
                    .map_err(|e| format!("privacy.target_epsilon: {e}"))?
            }
            (None, None) => unreachable!("validate requires one"),
        };
        let mut plan = Self {
            sampling: cfg.sampling,
            q,
            denominator,
            noise_multiplier: z,
            update_noise_multiplier: z,
            count_stddev: 0.0,
        };
        if let Some(a) = &cfg.adaptive_clipping {
            let sb = a.count_stddev.unwrap_or(denominator / 20.0);
            // Andrew et al., Theorem 1: the update and the count together are one Gaussian
            // mechanism of multiplier z when z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2).
            let rest = z.powi(-2) - (2.0 * sb).powi(-2);
            if rest <= 0.0 {
                return Err(format!(
                    "privacy.adaptive_clipping.count_stddev {sb}: the count's noise must exceed noise_multiplier / 2 = {} (raise count_stddev or the clients per round)",
                    z / 2.0
                ));
            }
            plan.count_stddev = sb;
            plan.update_noise_multiplier = rest.powf(-0.5);
        }
        Ok(plan)
    }

    /// (sampling, q) as the ledger composes one attempt.
    fn accounted(&self, mode: PrivacyMode) -> (Sampling, f64) {
        accounted(mode, self.sampling, self.q)
    }
}

/// (sampling, q) as the ledger composes one attempt. Local noise protects a client against the
/// server, which sees who sent: no amplification by sampling, every round counts for everyone.
fn accounted(mode: PrivacyMode, sampling: Sampling, q: f64) -> (Sampling, f64) {
    match mode {
        PrivacyMode::Local => (Sampling::Poisson, 1.0),
        _ => (sampling, q),
    }
}

/// DP-FedAvg's noise covers a mean of the updates: the robust rules, which need every client's
/// own update, are refused with the reason.
pub fn check_strategy(s: &StrategyConfig) -> Result<(), String> {
    match s {
        StrategyConfig::FedMedian(_)
        | StrategyConfig::FedTrimmedAvg(_)
        | StrategyConfig::Krum(_) => Err(format!(
            "privacy: strategy {} needs every client's own update, which DP-FedAvg never shows it (it sees only the noised mean, and its noise covers only a mean); use fedavg, fedavgm, fedadam, fedyogi or fedadagrad",
            s.name()
        )),
        _ => Ok(()),
    }
}

/// The L2 norm of `a - b` over all tensors together, in f64.
fn delta_norm(a: &Weights, b: &Weights) -> f64 {
    a.dist2(b).sqrt()
}

/// Scales `w - reference` to norm at most `c` in place; returns whether it already was.
fn clip_to(w: &mut Weights, reference: &Weights, c: f64) -> bool {
    let norm = delta_norm(w, reference);
    // The norms are what a clipping norm is chosen from (their median, as adaptive clipping
    // targets): visible in the log that stays on the machine that computed them.
    tracing::debug!("update norm {norm:.5} (clipping norm {c:.5})");
    if norm <= c {
        return true;
    }
    let f = (c / norm) as f32;
    for (x, r) in w.iter_data_mut().zip(reference.iter_data()) {
        *x = *r + (*x - *r) * f;
    }
    false
}

/// The noise generator of one release: the OS's, or the run seed's stream `parts`.
fn noise_rng(source: NoiseSource, seed: u64, parts: &[u64]) -> ChaCha20Rng {
    match source {
        NoiseSource::Os => ChaCha20Rng::from_os_rng(),
        NoiseSource::Seeded => ChaCha20Rng::seed_from_u64(mix(seed, parts)),
    }
}

fn add_gaussian(w: &mut Weights, std: f64, rng: &mut ChaCha20Rng) {
    for x in w.iter_data_mut() {
        let n: f64 = StandardNormal.sample(rng);
        *x += (n * std) as f32;
    }
}

/// The client's side: clips the trainable weights `sent` against the global ones it received,
/// adds local noise when told to, and returns the reply's metrics (whether it was within C).
/// `seed` is the client's exchange seed (used only by [`NoiseSource::Seeded`]).
pub fn clip_update(
    sent: &mut Weights,
    global: &Weights,
    p: &ClientPrivacy,
    seed: u64,
) -> BTreeMap<String, f64> {
    let unclipped = clip_to(sent, global, p.clipping_norm);
    if let Some(std) = p.local_noise_std {
        add_gaussian(sent, std, &mut noise_rng(p.noise, seed, &[seeds::DP_NOISE]));
    }
    BTreeMap::from([(UNCLIPPED.to_string(), f64::from(u8::from(unclipped)))])
}

/// DP-FedAvg around a mean-based strategy: see the module documentation.
pub struct DpFedAvg {
    inner: Box<dyn Strategy>,
    cfg: PrivacyConfig,
    plan: DpPlan,
    seed: u64,
    clipping_norm: f64,
    ledger: Ledger,
    attempts: u64,
    round: u64,
    current: Option<Weights>,
    sum: Option<Weights>,
    unclipped: f64,
    replied: usize,
    last: Option<PrivacyRecord>,
}

/// What a DP run's checkpoint keeps beside the tensors: the ledger, the clipping norm, and the
/// settings they were made under (a resume under other settings is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SavedLedger {
    config: PrivacyConfig,
    ledger: Ledger,
    clipping_norm: f64,
    attempts: u64,
}

impl DpFedAvg {
    pub fn new(
        inner: Box<dyn Strategy>,
        cfg: PrivacyConfig,
        plan: DpPlan,
        seed: u64,
    ) -> Result<Self, FlError> {
        check_strategy(inner.config()).map_err(FlError::Config)?;
        Ok(Self {
            inner,
            clipping_norm: cfg.clipping_norm,
            cfg,
            plan,
            seed,
            ledger: Ledger::default(),
            attempts: 0,
            round: 0,
            current: None,
            sum: None,
            unclipped: 0.0,
            replied: 0,
            last: None,
        })
    }

    pub fn epsilon(&self) -> f64 {
        self.ledger.epsilon(self.cfg.delta)
    }

    /// The average of the round's clipped updates over the fixed denominator, with the
    /// central noise, as weights (current + noised mean update).
    fn noised_mean(&mut self, current: &Weights, sum: Weights) -> Weights {
        let m = self.plan.denominator;
        let mut avg = sum;
        if self.cfg.mode == PrivacyMode::Central {
            let std = self.plan.update_noise_multiplier * self.clipping_norm;
            let mut rng = noise_rng(self.cfg.noise, self.seed, &self.stream(0));
            add_gaussian(&mut avg, std, &mut rng);
        }
        let mf = m as f32;
        for (a, c) in avg.iter_data_mut().zip(current.iter_data()) {
            *a = *c + *a / mf;
        }
        avg
    }

    fn stream(&self, what: u64) -> [u64; 4] {
        [seeds::DP_NOISE, self.round, self.attempts, what]
    }

    /// Andrew et al.'s update of C from the noised fraction of unclipped updates.
    fn adapt_clipping_norm(&mut self) -> Option<f64> {
        let a = self.cfg.adaptive_clipping.as_ref()?;
        let mut rng = noise_rng(self.cfg.noise, self.seed, &self.stream(1));
        let n: f64 = StandardNormal.sample(&mut rng);
        let b = (self.unclipped + n * self.plan.count_stddev) / self.plan.denominator;
        // Too few updates within C (b < gamma) raises C; too many lowers it.
        self.clipping_norm *= (-a.learning_rate * (b - a.target_quantile)).exp();
        Some(b)
    }
}

impl Strategy for DpFedAvg {
    fn config(&self) -> &StrategyConfig {
        self.inner.config()
    }

    fn begin_round(&mut self, round: u64, current: &Weights) -> Result<(), FlError> {
        // Every attempt is a release as far as the ledger knows, accounted before it starts.
        let (s, q) = self.plan.accounted(self.cfg.mode);
        self.ledger.compose(s, q, self.plan.noise_multiplier, 1);
        self.attempts += 1;
        self.round = round;
        self.current = Some(current.clone());
        self.sum = Some(current.zeros_like());
        self.unclipped = 0.0;
        self.replied = 0;
        self.inner.begin_round(round, current)
    }

    fn accumulate(&mut self, mut res: FitRes) -> Result<(), FlError> {
        let (Some(current), Some(sum)) = (self.current.as_ref(), self.sum.as_mut()) else {
            return Err(FlError::Config("accumulate before begin_round".into()));
        };
        check_reply(current, &res)?;
        // The sensitivity bound must hold for what is summed, whatever the client did and
        // whatever compression did to the norm; local noise is outside it by design.
        if self.cfg.mode == PrivacyMode::Central {
            clip_to(&mut res.weights, current, self.clipping_norm);
        }
        for ((s, w), c) in sum
            .iter_data_mut()
            .zip(res.weights.iter_data())
            .zip(current.iter_data())
        {
            *s += *w - *c;
        }
        let b = res.metrics.get(UNCLIPPED).copied().unwrap_or(0.0);
        self.unclipped += if b >= 0.5 { 1.0 } else { 0.0 };
        self.replied += 1;
        Ok(())
    }

    fn end_round(&mut self) -> Result<Weights, FlError> {
        let (Some(current), Some(sum)) = (self.current.take(), self.sum.take()) else {
            return Err(FlError::Config("end_round before begin_round".into()));
        };
        if self.replied == 0 {
            return Err(FlError::NoResults(self.round));
        }
        let used = self.clipping_norm;
        let noised = self.noised_mean(&current, sum);
        let unclipped_fraction = self.adapt_clipping_norm();
        self.inner.accumulate(FitRes {
            client: usize::MAX,
            weights: noised,
            num_examples: 1,
            metrics: BTreeMap::new(),
        })?;
        self.last = Some(PrivacyRecord {
            epsilon: self.epsilon(),
            delta: self.cfg.delta,
            noise_multiplier: self.plan.noise_multiplier,
            clipping_norm: used,
            next_clipping_norm: self.clipping_norm,
            denominator: self.plan.denominator,
            replied: self.replied,
            attempts_accounted: self.attempts,
            unclipped_fraction,
        });
        self.inner.end_round()
    }

    fn state(&self) -> BTreeMap<String, Weights> {
        self.inner.state()
    }

    fn load_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), FlError> {
        self.inner.load_state(state)
    }

    fn client_privacy(&self) -> Option<ClientPrivacy> {
        let local = self.cfg.mode == PrivacyMode::Local;
        Some(ClientPrivacy {
            clipping_norm: self.clipping_norm,
            local_noise_std: local.then_some(self.plan.noise_multiplier * self.clipping_norm),
            noise: self.cfg.noise,
        })
    }

    fn privacy_record(&self) -> Option<PrivacyRecord> {
        self.last.clone()
    }

    fn round_allowed(&self) -> Result<(), String> {
        let Some(max) = self.cfg.max_epsilon else {
            return Ok(());
        };
        let (s, q) = self.plan.accounted(self.cfg.mode);
        let next = (self.ledger).epsilon_after(s, q, self.plan.noise_multiplier, 1, self.cfg.delta);
        if next > max {
            return Err(format!(
                "privacy.max_epsilon {max}: another round would spend epsilon {next:.4} (spent so far {:.4} at delta {})",
                self.epsilon(),
                self.cfg.delta
            ));
        }
        Ok(())
    }

    fn ledger(&self) -> Option<String> {
        serde_json::to_string(&SavedLedger {
            config: self.cfg.clone(),
            ledger: self.ledger.clone(),
            clipping_norm: self.clipping_norm,
            attempts: self.attempts,
        })
        .ok()
    }

    fn load_ledger(&mut self, saved: Option<&str>) -> Result<(), FlError> {
        let Some(json) = saved else {
            return Err(FlError::Config(
                "the checkpoint has no privacy ledger (it was made without privacy): a run cannot turn DP on midway, since the rounds before were not accounted".into(),
            ));
        };
        let s: SavedLedger = serde_json::from_str(json)
            .map_err(|e| FlError::Config(format!("the checkpoint's privacy ledger: {e}")))?;
        if s.config != self.cfg {
            return Err(FlError::Config(format!(
                "the checkpoint was made with privacy {} but this run uses {}",
                serde_json::to_string(&s.config).unwrap_or_default(),
                serde_json::to_string(&self.cfg).unwrap_or_default()
            )));
        }
        self.ledger = s.ledger;
        self.clipping_norm = s.clipping_norm;
        self.attempts = s.attempts;
        Ok(())
    }
}
