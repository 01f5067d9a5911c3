//! Federated k-means: one global codebook, no frame ever leaves its client.
//!
//! What a client reveals:
//! * at init, its own k-means codebook (at most k centroids) weighted by cluster sizes, minus
//!   clusters smaller than `min_init_count` (a centroid of a 1-frame cluster *is* a frame);
//! * each round, per-cluster aggregates w.r.t. the server's codebook: sums (k x d), sums of squares
//!   (k x d), counts (k) and its inertia.
//!
//! Server:
//! * init: weighted greedy k-means++ (best of `server_n_init` seeds by weighted inertia) over the
//!   union of the client centroids, then `server_lloyd` weighted Lloyd iterations on that union;
//! * each round: aggregate whatever clients replied (a client that errors is a dropout for that
//!   round) and update: [`ServerUpdate::Lloyd`] (default) sets every hit centre to the aggregated
//!   mean — with all clients replying this is exactly one central Lloyd iteration;
//!   [`ServerUpdate::MiniBatch`] moves hit centres by sklearn's counts-based rate (for partial
//!   participation, where a round sees only a subset of the data);
//! * empty clusters: split the currently largest cluster. From its aggregated sums and sums of
//!   squares the server knows the cluster's per-dimension variance; the donor and the empty centre
//!   are placed at `mean ± sqrt(2/pi) * sigma_f` along the dimension `f` of largest variance (the
//!   two half-means of a Gaussian split through its mean), so the next round divides its frames.
//!   Uses aggregates only; the donor's count is halved for the choice of the next donor;
//! * stops after `rounds` rounds or when a full-participation round improves inertia by less than
//!   `tol` (relative) without splits; a final round evaluates inertia and cluster sizes.

use rand::seq::index::sample as sample_indices;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::codebook::Codebook;
use crate::kernel::{Packed, assign};
use crate::kmeanspp::kmeans_plusplus;
use crate::source::FrameSource;
use crate::{KmError, Result};

/// A client's init message: its local centroids and their weights (cluster sizes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalSummary {
    pub dim: usize,
    pub centroids: Vec<f32>,
    pub weights: Vec<f64>,
}

/// A client's reply to one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientStats {
    /// Per-cluster sum of the client's frames (k x d).
    pub sums: Vec<f64>,
    /// Per-cluster per-dimension sum of squares (k x d), for the empty-cluster split direction.
    pub sumsq: Vec<f64>,
    pub counts: Vec<u64>,
    /// Sum of squared distances of the client's frames to the codebook it was sent.
    pub inertia: f64,
    pub n_frames: u64,
}

impl ClientStats {
    pub fn zeros(k: usize, d: usize) -> Self {
        Self {
            sums: vec![0.0; k * d],
            sumsq: vec![0.0; k * d],
            counts: vec![0; k],
            inertia: 0.0,
            n_frames: 0,
        }
    }
    pub fn add(&mut self, o: &ClientStats) {
        for (a, b) in self.sums.iter_mut().zip(&o.sums) {
            *a += b;
        }
        for (a, b) in self.sumsq.iter_mut().zip(&o.sumsq) {
            *a += b;
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.inertia += o.inertia;
        self.n_frames += o.n_frames;
    }
}

/// A federated k-means participant. In-process here ([`InProcessClient`]); the engine only needs
/// these messages, so a remote client is a transport away.
pub trait KmClient: Send + Sync {
    fn name(&self) -> String;
    fn dim(&self) -> usize;
    fn n_frames(&self) -> usize;
    /// Local k-means over the client's own frames; returns centroids weighted by cluster size.
    fn init_summary(&self, k: usize, seed: u64) -> Result<LocalSummary>;
    /// Assigns every local frame to `codebook` and returns per-cluster aggregates.
    fn stats(&self, round: usize, codebook: &Codebook) -> Result<ClientStats>;
}

/// Client over a local [`FrameSource`].
pub struct InProcessClient {
    pub name: String,
    pub source: Box<dyn FrameSource>,
    /// Rows sampled for the local init k-means (bounded memory).
    pub init_sample: usize,
    /// Lloyd iterations on that sample after k-means++.
    pub init_iters: usize,
    /// Local clusters smaller than this are not sent at init.
    pub min_init_count: u64,
}

impl InProcessClient {
    pub fn new(name: impl Into<String>, source: Box<dyn FrameSource>) -> Self {
        Self {
            name: name.into(),
            source,
            init_sample: 30000,
            init_iters: 10,
            min_init_count: 2,
        }
    }
}

/// Client-side statistics of `src` against `codebook` (one pass).
pub fn client_stats(src: &dyn FrameSource, codebook: &Codebook) -> Result<ClientStats> {
    let (k, d) = (codebook.k, codebook.dim);
    if src.dim() != d {
        return Err(KmError::Invalid(format!(
            "frames are {}-dim, codebook is {d}-dim",
            src.dim()
        )));
    }
    let p = codebook.packed();
    let mut st = ClientStats::zeros(k, d);
    let (mut l, mut dd) = (Vec::new(), Vec::new());
    src.for_each_chunk(&mut |_, x| {
        let m = x.len() / d;
        l.resize(m, 0);
        dd.resize(m, 0.0);
        assign(&p, x, &mut l, &mut dd);
        for i in 0..m {
            let j = l[i] as usize;
            st.counts[j] += 1;
            st.inertia += dd[i] as f64;
            let xr = &x[i * d..(i + 1) * d];
            for f in 0..d {
                let v = xr[f] as f64;
                st.sums[j * d + f] += v;
                st.sumsq[j * d + f] += v * v;
            }
        }
        st.n_frames += m as u64;
        Ok(())
    })?;
    Ok(st)
}

/// Weighted Lloyd (`iters` iterations, in place) on in-memory points (`w = None`: unit weights): returns (weighted cluster sizes, weighted inertia of the
/// final centres). Empty clusters keep their centre.
pub fn weighted_lloyd(
    x: &[f32],
    w: Option<&[f64]>,
    d: usize,
    centers: &mut [f32],
    iters: usize,
) -> (Vec<f64>, f64) {
    let k = centers.len() / d;
    let n = x.len() / d;
    let (mut l, mut dd) = (vec![0u32; n], vec![0f32; n]);
    let mut sums = vec![0f64; k * d];
    let mut cw = vec![0f64; k];
    for it in 0..=iters {
        assign(&Packed::new(centers, k, d), x, &mut l, &mut dd);
        sums.fill(0.0);
        cw.fill(0.0);
        let mut inertia = 0.0;
        for i in 0..n {
            let wi = w.map_or(1.0, |w| w[i]);
            let j = l[i] as usize;
            cw[j] += wi;
            inertia += wi * dd[i] as f64;
            for f in 0..d {
                sums[j * d + f] += wi * x[i * d + f] as f64;
            }
        }
        if it == iters {
            return (cw, inertia);
        }
        for j in 0..k {
            if cw[j] > 0.0 {
                for f in 0..d {
                    centers[j * d + f] = (sums[j * d + f] / cw[j]) as f32;
                }
            }
        }
    }
    unreachable!()
}

impl KmClient for InProcessClient {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn dim(&self) -> usize {
        self.source.dim()
    }
    fn n_frames(&self) -> usize {
        self.source.n_frames()
    }
    fn init_summary(&self, k: usize, seed: u64) -> Result<LocalSummary> {
        let n = self.source.n_frames();
        let d = self.source.dim();
        if n == 0 {
            return Err(KmError::Client {
                client: self.name.clone(),
                why: "no frames".into(),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        if n <= self.init_sample {
            self.source.for_each_chunk(&mut |_, c| {
                x.extend_from_slice(c);
                Ok(())
            })?;
        } else {
            let mut idx: Vec<usize> = (0..self.init_sample)
                .map(|_| rng.random_range(0..n))
                .collect();
            idx.sort_unstable();
            self.source.gather(&idx, &mut x)?;
        }
        let m = x.len() / d;
        let kk = k.min(m);
        let mut c = kmeans_plusplus(&x, None, d, kk, &mut rng);
        let (cw, _) = weighted_lloyd(&x, None, d, &mut c, self.init_iters);
        let scale = n as f64 / m as f64;
        let mut out = LocalSummary {
            dim: d,
            centroids: Vec::new(),
            weights: Vec::new(),
        };
        for j in 0..kk {
            if cw[j] >= self.min_init_count as f64 {
                out.centroids.extend_from_slice(&c[j * d..(j + 1) * d]);
                out.weights.push(cw[j] * scale);
            }
        }
        Ok(out)
    }
    fn stats(&self, _round: usize, codebook: &Codebook) -> Result<ClientStats> {
        client_stats(self.source.as_ref(), codebook)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerUpdate {
    /// Centre = aggregated mean of its frames this round (full Lloyd step).
    Lloyd,
    /// sklearn-style counts-based rate: `c += (mean_round - c) * n_round / n_total_so_far`.
    MiniBatch,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FederatedConfig {
    pub k: usize,
    /// Maximum rounds (each is one pass over every participating client's frames).
    pub rounds: usize,
    /// Stop when a full-participation round improves inertia by less than this (relative).
    pub tol: f64,
    pub update: ServerUpdate,
    /// Clients sampled per round (`None`: all).
    pub clients_per_round: Option<usize>,
    pub seed: u64,
    pub server_n_init: usize,
    pub server_lloyd: usize,
}

impl Default for FederatedConfig {
    fn default() -> Self {
        Self {
            k: 100,
            rounds: 100,
            tol: 1e-4,
            update: ServerUpdate::Lloyd,
            clients_per_round: None,
            seed: 0,
            server_n_init: 10,
            server_lloyd: 20,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundLog {
    pub round: usize,
    pub sampled: usize,
    pub replied: usize,
    /// Inertia of the replying clients' frames w.r.t. the codebook sent this round.
    pub inertia: f64,
    pub frames: u64,
    pub splits: usize,
}

#[derive(Clone, Debug)]
pub struct FederatedFit {
    pub codebook: Codebook,
    /// Final inertia over the frames of the clients that replied to the evaluation round.
    pub inertia: f64,
    pub n_frames: u64,
    pub counts: Vec<u64>,
    pub rounds: usize,
    pub history: Vec<RoundLog>,
    /// Clients that failed to reply at least once (dropouts).
    pub dropouts: Vec<String>,
}

/// Splits empty clusters of `centers` (`k x d`) using only the aggregated statistics `agg` of the
/// round (see the module docs). Returns how many were split.
pub fn split_empty(centers: &mut [f32], agg: &ClientStats, d: usize) -> usize {
    let k = agg.counts.len();
    let mut size: Vec<f64> = agg.counts.iter().map(|&c| c as f64).collect();
    let mut splits = 0;
    for e in 0..k {
        if agg.counts[e] > 0 {
            continue;
        }
        let donor = (0..k)
            .max_by(|&a, &b| size[a].total_cmp(&size[b]).then(b.cmp(&a)))
            .unwrap();
        if size[donor] < 2.0 {
            break;
        }
        let nd = agg.counts[donor] as f64;
        let (mut best_f, mut best_var) = (0, -1.0);
        for f in 0..d {
            let mean = agg.sums[donor * d + f] / nd;
            let var = (agg.sumsq[donor * d + f] / nd - mean * mean).max(0.0);
            if var > best_var {
                best_var = var;
                best_f = f;
            }
        }
        let delta = (2.0 / std::f64::consts::PI).sqrt() * best_var.sqrt();
        let (dc, ec) = if donor < e {
            let (a, b) = centers.split_at_mut(e * d);
            (&mut a[donor * d..(donor + 1) * d], &mut b[..d])
        } else {
            let (a, b) = centers.split_at_mut(donor * d);
            (&mut b[..d], &mut a[e * d..(e + 1) * d])
        };
        ec.copy_from_slice(dc);
        dc[best_f] -= delta as f32;
        ec[best_f] += delta as f32;
        size[donor] /= 2.0;
        size[e] = size[donor];
        splits += 1;
    }
    splits
}

/// Server-side init from the clients' weighted local centroids (no frame is revealed).
pub fn server_init(
    summaries: &[LocalSummary],
    k: usize,
    cfg: &FederatedConfig,
) -> Result<Vec<f32>> {
    let d = summaries
        .first()
        .map(|s| s.dim)
        .ok_or_else(|| KmError::Invalid("no client sent an init summary".into()))?;
    let mut x = Vec::new();
    let mut w = Vec::new();
    for s in summaries {
        x.extend_from_slice(&s.centroids);
        w.extend_from_slice(&s.weights);
    }
    if w.len() < k {
        return Err(KmError::Invalid(format!(
            "clients sent {} init centroids in total, fewer than k = {k}: too little data per client for this k",
            w.len()
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_5e4e_4e4e);
    let mut best: Option<(f64, Vec<f32>)> = None;
    for _ in 0..cfg.server_n_init.max(1) {
        let mut c = kmeans_plusplus(&x, Some(&w), d, k, &mut rng);
        let (_, inertia) = weighted_lloyd(&x, Some(&w), d, &mut c, cfg.server_lloyd);
        if best.as_ref().is_none_or(|b| inertia < b.0) {
            best = Some((inertia, c));
        }
    }
    Ok(best.unwrap().1)
}

fn round_stats(
    clients: &[Box<dyn KmClient>],
    chosen: &[usize],
    round: usize,
    codebook: &Codebook,
    dropouts: &mut Vec<String>,
) -> (ClientStats, usize) {
    let mut agg = ClientStats::zeros(codebook.k, codebook.dim);
    let mut replied = 0;
    for &i in chosen {
        match clients[i].stats(round, codebook) {
            Ok(s) if s.counts.len() == codebook.k && s.sums.len() == codebook.k * codebook.dim => {
                agg.add(&s);
                replied += 1;
            }
            Ok(_) => {
                tracing::warn!(client = clients[i].name(), round, "malformed reply ignored");
                dropouts.push(clients[i].name());
            }
            Err(e) => {
                tracing::warn!(
                    client = clients[i].name(),
                    round,
                    "no reply ({e}); aggregating the others"
                );
                dropouts.push(clients[i].name());
            }
        }
    }
    (agg, replied)
}

pub fn fit_federated(clients: &[Box<dyn KmClient>], cfg: &FederatedConfig) -> Result<FederatedFit> {
    let d = check_clients(clients)?;
    let mut dropouts = Vec::new();
    let mut summaries = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        match c.init_summary(cfg.k, cfg.seed.wrapping_add(1 + i as u64)) {
            Ok(s) => summaries.push(s),
            Err(e) => {
                tracing::warn!(client = c.name(), "no init summary ({e})");
                dropouts.push(c.name());
            }
        }
    }
    let init = Codebook::new(cfg.k, d, server_init(&summaries, cfg.k, cfg)?)?;
    let mut fit = fit_federated_from(clients, cfg, init)?;
    fit.dropouts.extend(dropouts);
    fit.dropouts.sort();
    fit.dropouts.dedup();
    Ok(fit)
}

fn check_clients(clients: &[Box<dyn KmClient>]) -> Result<usize> {
    if clients.is_empty() {
        return Err(KmError::Invalid("no clients".into()));
    }
    let d = clients[0].dim();
    for c in clients {
        if c.dim() != d {
            return Err(KmError::Invalid(format!(
                "client {} has {}-dim frames, client {} has {d}",
                c.name(),
                c.dim(),
                clients[0].name()
            )));
        }
    }
    Ok(d)
}

/// The federated rounds from a given initial codebook (`cfg.k` is taken from `init`).
pub fn fit_federated_from(
    clients: &[Box<dyn KmClient>],
    cfg: &FederatedConfig,
    init: Codebook,
) -> Result<FederatedFit> {
    let d = check_clients(clients)?;
    if init.dim != d {
        return Err(KmError::Invalid(format!(
            "initial codebook is {}-dim, clients have {d}-dim frames",
            init.dim
        )));
    }
    let mut server = KmeansServer::new(cfg, init, clients.len())?;
    let mut dropouts = Vec::new();
    while let Some(chosen) = server.next_round()? {
        let cb = server.codebook()?;
        let (agg, replied) = round_stats(clients, &chosen, server.round(), &cb, &mut dropouts);
        server.apply(&agg, replied)?;
    }
    let codebook = server.codebook()?;
    let all: Vec<usize> = (0..clients.len()).collect();
    let (agg, replied) = round_stats(clients, &all, server.round(), &codebook, &mut dropouts);
    server.finish(&agg, replied, dropouts)
}

/// The server side of federated k-means as a state machine, so that any transport (the in-process
/// loop of [`fit_federated_from`], or Flower's ServerApp through the Python module) runs the same
/// rounds: `next_round` says which clients to ask, `apply` takes their aggregated replies, and
/// `finish` takes the final evaluation round over all clients.
#[derive(Clone)]
pub struct KmeansServer {
    cfg: FederatedConfig,
    k: usize,
    d: usize,
    n_clients: usize,
    centers: Vec<f32>,
    totals: Vec<f64>,
    rng: ChaCha8Rng,
    history: Vec<RoundLog>,
    prev: Option<f64>,
    /// Clients asked in the round that `next_round` opened and `apply` has not closed yet.
    open: Option<usize>,
    converged: bool,
}

impl KmeansServer {
    pub fn new(cfg: &FederatedConfig, init: Codebook, n_clients: usize) -> Result<Self> {
        if n_clients == 0 {
            return Err(KmError::Invalid("no clients".into()));
        }
        Ok(Self {
            cfg: cfg.clone(),
            k: init.k,
            d: init.dim,
            n_clients,
            totals: vec![0f64; init.k],
            centers: init.centroids,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x00c1_1e47),
            history: Vec::new(),
            prev: None,
            open: None,
            converged: false,
        })
    }

    /// The round `next_round` opens next (or the evaluation round once it returns `None`).
    pub fn round(&self) -> usize {
        self.history.len()
    }

    pub fn history(&self) -> &[RoundLog] {
        &self.history
    }

    /// The codebook to send this round.
    pub fn codebook(&self) -> Result<Codebook> {
        Codebook::new(self.k, self.d, self.centers.clone())
    }

    /// Opens the next round and returns the (sorted) clients to ask, or `None` when the rounds
    /// are over (`cfg.rounds` reached, or converged): then evaluate with [`Self::finish`].
    pub fn next_round(&mut self) -> Result<Option<Vec<usize>>> {
        if self.open.is_some() {
            return Err(KmError::Invalid(format!(
                "round {} is still open: apply() its replies first",
                self.history.len()
            )));
        }
        if self.converged || self.history.len() >= self.cfg.rounds {
            return Ok(None);
        }
        let chosen: Vec<usize> = match self.cfg.clients_per_round {
            Some(m) if m < self.n_clients => {
                let mut v = sample_indices(&mut self.rng, self.n_clients, m.max(1)).into_vec();
                v.sort_unstable();
                v
            }
            _ => (0..self.n_clients).collect(),
        };
        self.open = Some(chosen.len());
        Ok(Some(chosen))
    }

    /// Closes the open round with the sum of the replies (`replied` of them) and updates the
    /// codebook.
    pub fn apply(&mut self, agg: &ClientStats, replied: usize) -> Result<()> {
        let (k, d) = (self.k, self.d);
        let sampled = self.open.take().ok_or_else(|| {
            KmError::Invalid("apply() without an open round: call next_round() first".into())
        })?;
        let round = self.history.len();
        if agg.counts.len() != k || agg.sums.len() != k * d || agg.sumsq.len() != k * d {
            return Err(KmError::Invalid(format!(
                "round {round}: aggregated statistics are not for k = {k}, dim = {d}"
            )));
        }
        if replied == 0 {
            tracing::warn!(round, "no client replied; codebook unchanged");
            self.history.push(RoundLog {
                round,
                sampled,
                replied,
                inertia: f64::NAN,
                frames: 0,
                splits: 0,
            });
            return Ok(());
        }
        let centers = &mut self.centers;
        for j in 0..k {
            let n = agg.counts[j] as f64;
            if n == 0.0 {
                continue;
            }
            let row = &mut centers[j * d..(j + 1) * d];
            match self.cfg.update {
                ServerUpdate::Lloyd => {
                    for f in 0..d {
                        row[f] = (agg.sums[j * d + f] / n) as f32;
                    }
                }
                ServerUpdate::MiniBatch => {
                    self.totals[j] += n;
                    let rate = n / self.totals[j];
                    for f in 0..d {
                        let mean = agg.sums[j * d + f] / n;
                        row[f] = (row[f] as f64 + (mean - row[f] as f64) * rate) as f32;
                    }
                }
            }
        }
        let splits = split_empty(centers, agg, d);
        tracing::debug!(
            round,
            replied,
            inertia = agg.inertia,
            splits,
            "federated k-means round"
        );
        self.history.push(RoundLog {
            round,
            sampled,
            replied,
            inertia: agg.inertia,
            frames: agg.n_frames,
            splits,
        });
        let full = replied == self.n_clients;
        if full && splits == 0 {
            if self
                .prev
                .is_some_and(|p| (p - agg.inertia) <= self.cfg.tol * agg.inertia.abs())
            {
                self.converged = true;
            }
            self.prev = Some(agg.inertia);
        } else {
            self.prev = None;
        }
        Ok(())
    }

    /// The result, from the evaluation round's aggregated replies over every client.
    pub fn finish(
        self,
        agg: &ClientStats,
        replied: usize,
        mut dropouts: Vec<String>,
    ) -> Result<FederatedFit> {
        if replied == 0 {
            return Err(KmError::Invalid(
                "no client replied to the evaluation round".into(),
            ));
        }
        dropouts.sort();
        dropouts.dedup();
        Ok(FederatedFit {
            codebook: Codebook::new(self.k, self.d, self.centers)?,
            inertia: agg.inertia,
            n_frames: agg.n_frames,
            counts: agg.counts.clone(),
            rounds: self.history.len(),
            history: self.history,
            dropouts,
        })
    }
}
