//! `fedhubert kmeans`: fit the pseudo-label codebook over client feature shards and label every
//! client's frames (`DIR/client_K/km.npy` + `km.len`, aligned with `mfcc.npy`/`mfcc.len`).
//!
//! Modes: `local` (one codebook per client, the prototype's behaviour: ids disagree across clients),
//! `federated` (one global codebook from per-cluster sums/counts; no frame leaves a client),
//! `central` (one mini-batch fit over all frames pooled; the upper bound).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use fedhubert_kmeans::{
    Agreement, ClientAgreement, Codebook, CodebookMeta, ConcatSource, FederatedConfig, FrameSource,
    InProcessClient, KmClient, MiniBatchConfig, SampledSource, ServerUpdate, ShardSource,
    fit_federated, fit_minibatch, label_client, with_threads,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// One codebook per client (baseline; cluster ids differ between clients).
    Local,
    /// One global codebook learned from per-cluster sums and counts only.
    Federated,
    /// One fit over all clients' frames pooled (upper bound, not private).
    Central,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UpdateArg {
    /// Centre = aggregated mean of its frames each round (full Lloyd step).
    Lloyd,
    /// sklearn-style counts-based learning rate (for partial participation).
    MiniBatch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReferenceArg {
    Federated,
    Central,
    None,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Partition folder with DIR/client_K/FEATURE.npy + FEATURE.len (from `fedhubert features`).
    #[arg(long, value_name = "DIR")]
    pub clients: PathBuf,
    #[arg(long, value_enum, default_value = "federated")]
    pub mode: ModeArg,
    /// Number of clusters.
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Output folder: codebook.safetensors (local: client_K.codebook.safetensors) and summary.json.
    #[arg(long, value_name = "OUTDIR")]
    pub out: PathBuf,
    /// Feature shard stem in each client folder.
    #[arg(long, default_value = DEFAULT_FEATURE)]
    pub feature: String,
    /// Label shard stem written next to each client's manifest.
    #[arg(long, default_value = DEFAULT_LABELS)]
    pub labels: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Federated: maximum rounds (each round is one pass over the participating clients' frames).
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    /// Federated: relative inertia improvement below which the rounds stop.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// Federated: server update rule.
    #[arg(long, value_enum, default_value = "lloyd")]
    pub update: UpdateArg,
    /// Federated: clients sampled per round (default: all).
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    /// Mini-batch size (local and central).
    #[arg(long, default_value_t = 10000)]
    pub batch_size: usize,
    /// k-means++ restarts (local and central; fairseq uses 20).
    #[arg(long, default_value_t = 20)]
    pub n_init: usize,
    /// Passes over the data (local and central; sklearn semantics).
    #[arg(long, default_value_t = 100)]
    pub max_iter: usize,
    /// Local mode: the shared codebook that label agreement is measured against.
    #[arg(long, value_enum, default_value = "federated")]
    pub reference: ReferenceArg,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::common::parse_threads)]
    pub threads: usize,
    /// Label with this shared codebook instead of fitting one (clients that join later,
    /// held-out speakers); --mode, --k and the fit settings are then unused.
    #[arg(long, value_name = "FILE")]
    pub codebook: Option<PathBuf>,
    /// Fit on this fraction of each client's utterances, drawn at --seed (fairseq
    /// `learn_kmeans.py --percent`, 0.1 for HuBERT Base's layer features); every utterance is
    /// still labelled.
    #[arg(long, default_value_t = 1.0, value_parser = parse_percent)]
    pub percent: f64,
}

pub(crate) fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("expected a fraction in (0, 1], got `{s}`")),
    }
}

/// The feature shard stem k-means reads unless told otherwise.
pub const DEFAULT_FEATURE: &str = "mfcc";
/// The label shard stem k-means writes unless told otherwise.
pub const DEFAULT_LABELS: &str = "km";

/// One k-means run: which clients, which mode, the fit settings of every mode.
#[derive(Clone, Debug)]
pub struct KmeansRequest {
    pub clients: PathBuf,
    pub mode: ModeArg,
    pub out: PathBuf,
    pub feature: String,
    pub labels: String,
    /// Local and central fits (and the central reference); its `k` and `seed` are the run's.
    pub minibatch: MiniBatchConfig,
    /// Federated fit (and the federated reference); same `k` and `seed` as `minibatch`.
    pub federated: FederatedConfig,
    /// Local mode: the shared codebook label agreement is measured against.
    pub reference: ReferenceArg,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// Label with this codebook instead of fitting one.
    pub codebook: Option<PathBuf>,
    /// Fraction of each client's utterances the fit sees (1: all).
    pub percent: f64,
}

impl KmeansRequest {
    /// `k` clusters in `mode` with the command line's defaults for everything else.
    pub fn new(clients: PathBuf, mode: ModeArg, k: usize, out: PathBuf, seed: u64) -> Self {
        Self {
            clients,
            mode,
            out,
            feature: DEFAULT_FEATURE.into(),
            labels: DEFAULT_LABELS.into(),
            minibatch: MiniBatchConfig {
                k,
                seed,
                ..Default::default()
            },
            federated: FederatedConfig {
                k,
                seed,
                ..Default::default()
            },
            reference: ReferenceArg::Federated,
            threads: 0,
            codebook: None,
            percent: 1.0,
        }
    }

    pub fn k(&self) -> usize {
        self.minibatch.k
    }

    pub fn seed(&self) -> u64 {
        self.minibatch.seed
    }
}

impl From<&Args> for KmeansRequest {
    fn from(args: &Args) -> Self {
        Self {
            clients: args.clients.clone(),
            mode: args.mode,
            out: args.out.clone(),
            feature: args.feature.clone(),
            labels: args.labels.clone(),
            minibatch: MiniBatchConfig {
                k: args.k,
                batch_size: args.batch_size,
                max_iter: args.max_iter,
                n_init: args.n_init,
                seed: args.seed,
                ..Default::default()
            },
            federated: FederatedConfig {
                k: args.k,
                rounds: args.rounds,
                tol: args.tol,
                update: match args.update {
                    UpdateArg::Lloyd => ServerUpdate::Lloyd,
                    UpdateArg::MiniBatch => ServerUpdate::MiniBatch,
                },
                clients_per_round: args.clients_per_round,
                seed: args.seed,
                ..Default::default()
            },
            reference: args.reference,
            threads: args.threads,
            codebook: args.codebook.clone(),
            percent: args.percent,
        }
    }
}

fn all_utterances() -> f64 {
    1.0
}

/// `summary.json`: what was fitted and how every client's frames were labelled.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KmeansSummary {
    pub mode: String,
    pub k: usize,
    pub dim: usize,
    pub seed: u64,
    pub feature: String,
    /// Fraction of each client's utterances the fit saw (`--percent`).
    #[serde(default = "all_utterances")]
    pub percent: f64,
    pub clients_dir: PathBuf,
    pub n_clients: usize,
    pub frames: usize,
    pub inertia: f64,
    pub mean_inertia: f64,
    /// Shared codebook only.
    pub empty_clusters: Option<usize>,
    /// Shared codebook only: frames per cluster over all clients.
    pub cluster_usage: Option<Vec<u64>>,
    pub clients: Vec<ClientLabels>,
    pub skipped_clients: Vec<SkippedClient>,
    /// Null for local codebooks without a reference.
    pub label_agreement: Option<LabelAgreement>,
    pub codebook: Codebooks,
    /// The fit's own record (steps, rounds and history, ...; mode-specific).
    pub fit: serde_json::Value,
    pub config: FitConfigs,
    pub fit_time_s: f64,
    pub time_s: f64,
}

/// How one client's frames were labelled.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientLabels {
    pub client: String,
    pub frames: u64,
    pub utterances: usize,
    pub inertia: f64,
    pub mean_inertia: f64,
    pub empty_clusters: usize,
    /// The label shard written.
    pub labels: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SkippedClient {
    pub client: String,
    pub reason: String,
}

/// Label agreement of the clients' codebooks (see [`AGREEMENT_DOC`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabelAgreement {
    /// Local mode: the reference codebook's mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub purity: f64,
    pub identity_agreement: f64,
    pub raw_agreement: f64,
    /// Local mode: per client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<ClientAgreementRow>>,
    pub explanation: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientAgreementRow {
    pub client: String,
    pub purity: f64,
    pub identity_agreement: f64,
    pub raw_agreement: f64,
}

/// The codebook file: one shared, or one per client (local mode).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Codebooks {
    Shared(PathBuf),
    PerClient(Vec<PathBuf>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FitConfigs {
    pub minibatch: MiniBatchConfig,
    pub federated: FederatedConfig,
}

struct Client {
    name: String,
    dir: PathBuf,
    source: ShardSource,
}

/// Every `DIR/client_*` folder, sorted by client number; clients without frames are skipped.
fn find_clients(
    dir: &Path,
    feature: &str,
    skipped: &mut Vec<SkippedClient>,
) -> Result<Vec<Client>> {
    let rd = std::fs::read_dir(dir)
        .with_context(|| format!("--clients {}: cannot read the folder", dir.display()))?;
    let mut found: Vec<(u64, String, PathBuf)> = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("client_") else {
            continue;
        };
        if e.path().is_dir() {
            found.push((rest.parse().unwrap_or(u64::MAX), name, e.path()));
        }
    }
    if found.is_empty() {
        bail!(
            "--clients {}: no client_* folders found (run `fedhubert prepare` and `fedhubert features` first)",
            dir.display()
        );
    }
    found.sort();
    let mut out = Vec::new();
    for (_, name, path) in found {
        if let Some(c) = open_client(dir, name, path, feature, skipped)? {
            out.push(c);
        }
    }
    if out.is_empty() {
        bail!(
            "--clients {}: no client has any {feature} frames",
            dir.display()
        );
    }
    let d = out[0].source.dim();
    for c in &out {
        if c.source.dim() != d {
            bail!(
                "{}: {}-dim frames, but {} has {d}-dim frames (all clients must use the same features)",
                c.source.path().display(),
                c.source.dim(),
                out[0].source.path().display()
            );
        }
    }
    Ok(out)
}

/// A client folder's feature shard; `None` (and a note in `skipped`) when it has no frames.
fn open_client(
    dir: &Path,
    name: String,
    path: PathBuf,
    feature: &str,
    skipped: &mut Vec<SkippedClient>,
) -> Result<Option<Client>> {
    let npy = path.join(format!("{feature}.npy"));
    if !npy.is_file() {
        bail!(
            "{}: missing (run `fedhubert features --clients {}` first, or pass --feature)",
            npy.display(),
            dir.display()
        );
    }
    let source = ShardSource::open(&path, feature)
        .with_context(|| format!("cannot open feature shard {}", npy.display()))?;
    if source.n_frames() == 0 {
        tracing::warn!("{}: no frames, client skipped", npy.display());
        skipped.push(SkippedClient {
            client: name,
            reason: format!("{} has no frames", npy.display()),
        });
        return Ok(None);
    }
    Ok(Some(Client {
        name,
        dir: path,
        source,
    }))
}

/// What client `i` fits on: its whole feature shard, or `req.percent` of its utterances.
fn fit_source(req: &KmeansRequest, i: usize, c: &Client) -> Result<Box<dyn FrameSource>> {
    let src = ShardSource::open(&c.dir, &req.feature)
        .with_context(|| format!("cannot open {}", c.source.path().display()))?;
    if req.percent >= 1.0 {
        return Ok(Box::new(src));
    }
    let seed = req.seed().wrapping_add(i as u64);
    Ok(Box::new(SampledSource::new(src, req.percent, seed)?))
}

fn fed_clients(req: &KmeansRequest, clients: &[Client]) -> Result<Vec<Box<dyn KmClient>>> {
    clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let src = fit_source(req, i, c)?;
            Ok(Box::new(InProcessClient::new(c.name.clone(), src)) as Box<dyn KmClient>)
        })
        .collect()
}

fn central_source(req: &KmeansRequest, clients: &[Client]) -> Result<ConcatSource> {
    let parts = clients
        .iter()
        .enumerate()
        .map(|(i, c)| fit_source(req, i, c))
        .collect::<Result<Vec<_>>>()?;
    Ok(ConcatSource::new(parts)?)
}

pub fn run(args: Args) -> Result<()> {
    let req = KmeansRequest::from(&args);
    kmeans(&req)?.print(&req);
    Ok(())
}

/// Fits the codebook(s), labels every client and writes the codebooks and `summary.json`.
pub fn kmeans(req: &KmeansRequest) -> Result<KmeansSummary> {
    let threads = (req.threads > 0).then_some(req.threads);
    with_threads(threads, || kmeans_in_pool(req))?
}

fn mode_name(mode: ModeArg) -> &'static str {
    match mode {
        ModeArg::Local => "local",
        ModeArg::Federated => "federated",
        ModeArg::Central => "central",
    }
}

/// The fitted codebooks: one shared (central, federated) or one per client (local).
struct Fit {
    global: Option<Codebook>,
    locals: Vec<Codebook>,
    info: serde_json::Value,
}

fn fit(req: &KmeansRequest, clients: &[Client]) -> Result<Fit> {
    let (mb, fcfg) = (&req.minibatch, &req.federated);
    Ok(match req.mode {
        ModeArg::Central => {
            let f = fit_minibatch(&central_source(req, clients)?, mb)?;
            Fit {
                info: json!({"n_steps": f.n_steps, "n_iter": f.n_iter, "init_inertia_validation": f.init_inertia}),
                global: Some(f.codebook),
                locals: vec![],
            }
        }
        ModeArg::Federated => {
            let f = fit_federated(&fed_clients(req, clients)?, fcfg)?;
            Fit {
                info: json!({"rounds": f.rounds, "dropouts": f.dropouts, "history": f.history}),
                global: Some(f.codebook),
                locals: vec![],
            }
        }
        ModeArg::Local => {
            let mut v = Vec::new();
            for (i, c) in clients.iter().enumerate() {
                let source = fit_source(req, i, c)?;
                if source.n_frames() < req.k() {
                    bail!(
                        "{}: {} frames, fewer than --k {} (local mode fits k clusters per client)",
                        c.source.path().display(),
                        source.n_frames(),
                        req.k()
                    );
                }
                let f = fit_minibatch(source.as_ref(), mb)
                    .with_context(|| format!("local k-means of {}", c.name))?;
                v.push(f.codebook);
            }
            Fit {
                global: None,
                locals: v,
                info: json!({}),
            }
        }
    })
}

/// The shared codebook local labels are compared with (local mode only).
fn reference_codebook(req: &KmeansRequest, clients: &[Client]) -> Result<Option<Codebook>> {
    Ok(match (req.mode, req.reference) {
        (ModeArg::Local, ReferenceArg::Federated) => {
            Some(fit_federated(&fed_clients(req, clients)?, &req.federated)?.codebook)
        }
        (ModeArg::Local, ReferenceArg::Central) => {
            Some(fit_minibatch(&central_source(req, clients)?, &req.minibatch)?.codebook)
        }
        _ => None,
    })
}

/// What labelling every client gave.
struct Labelled {
    per_client: Vec<ClientLabels>,
    usage: Vec<u64>,
    inertia: f64,
    agreements: Vec<(String, ClientAgreement)>,
    local_paths: Vec<PathBuf>,
}

/// Labels every client with its codebook (saving local codebooks as it goes).
fn label_all(
    req: &KmeansRequest,
    clients: &[Client],
    fit: &Fit,
    reference: Option<&Codebook>,
) -> Result<Labelled> {
    let mut l = Labelled {
        per_client: Vec::new(),
        usage: vec![0u64; req.k()],
        inertia: 0.0,
        agreements: Vec::new(),
        local_paths: Vec::new(),
    };
    for (i, c) in clients.iter().enumerate() {
        let cb = fit.global.as_ref().unwrap_or_else(|| &fit.locals[i]);
        let rep = label_client(&c.dir, &req.feature, cb, Some(&req.labels), reference)
            .with_context(|| format!("labelling {}", c.dir.display()))?;
        if let Some(ct) = &rep.contingency {
            l.agreements.push((c.name.clone(), ct.agreement()));
        }
        if fit.global.is_none() {
            let p = req.out.join(format!("{}.codebook.safetensors", c.name));
            let meta = CodebookMeta {
                mode: mode_name(req.mode).into(),
                seed: req.seed(),
                inertia: rep.inertia,
                n_frames: rep.frames,
            };
            cb.save(&p, &meta)?;
            l.local_paths.push(p);
        }
        for (u, r) in l.usage.iter_mut().zip(&rep.usage) {
            *u += r;
        }
        l.inertia += rep.inertia;
        l.per_client.push(ClientLabels {
            client: c.name.clone(),
            frames: rep.frames,
            utterances: rep.utterances,
            inertia: rep.inertia,
            mean_inertia: rep.inertia / rep.frames.max(1) as f64,
            empty_clusters: rep.usage.iter().filter(|&&u| u == 0).count(),
            labels: c.dir.join(format!("{}.npy", req.labels)),
        });
    }
    Ok(l)
}

fn label_agreement(
    req: &KmeansRequest,
    has_reference: bool,
    agreements: Vec<(String, ClientAgreement)>,
) -> Option<LabelAgreement> {
    match req.mode {
        ModeArg::Local if has_reference => {
            let a = Agreement::pool(agreements);
            Some(LabelAgreement {
                reference: Some(format!("{:?}", req.reference).to_lowercase()),
                purity: a.purity,
                identity_agreement: a.identity_agreement,
                raw_agreement: a.raw_agreement,
                clients: Some(
                    a.clients
                        .iter()
                        .map(|(n, c)| ClientAgreementRow {
                            client: n.clone(),
                            purity: c.purity,
                            identity_agreement: c.identity_agreement,
                            raw_agreement: c.raw_agreement,
                        })
                        .collect(),
                ),
                explanation: AGREEMENT_DOC.into(),
            })
        }
        ModeArg::Local => None,
        _ => Some(LabelAgreement {
            reference: None,
            purity: 1.0,
            identity_agreement: 1.0,
            raw_agreement: 1.0,
            clients: None,
            explanation:
                "all clients label with the same codebook, so cluster ids agree by construction"
                    .into(),
        }),
    }
}

/// The codebook `--codebook` names, checked against the clients' feature dimension.
fn applied_codebook(path: &Path, dim: usize) -> Result<Codebook> {
    let (cb, _) = Codebook::load(path).with_context(|| format!("--codebook {}", path.display()))?;
    if cb.dim != dim {
        bail!(
            "--codebook {}: {}-dim centroids, but the clients' features are {dim}-dim",
            path.display(),
            cb.dim
        );
    }
    Ok(cb)
}

fn kmeans_in_pool(req: &KmeansRequest) -> Result<KmeansSummary> {
    let t0 = Instant::now();
    let mut skipped = Vec::new();
    let clients = find_clients(&req.clients, &req.feature, &mut skipped)?;
    let total: usize = clients.iter().map(|c| c.source.n_frames()).sum();
    let dim = clients[0].source.dim();
    let applied = match &req.codebook {
        Some(p) => Some(applied_codebook(p, dim)?),
        None => None,
    };
    let mut req = req.clone();
    if let Some(cb) = &applied {
        req.minibatch.k = cb.k;
        req.federated.k = cb.k;
    }
    let req = &req;
    let k = req.k();
    if k == 0 || k > u16::MAX as usize + 1 {
        bail!("--k {k}: must be between 1 and 65536 (labels are u16)");
    }
    if applied.is_none() && k > total {
        bail!("--k {k} is larger than the {total} frames of all clients together");
    }
    // The labels go into the partition's client folders, the codebook into --out.
    let mut _locks = vec![crate::common::FolderLock::acquire(&req.clients, "kmeans")?];
    if !crate::common::same_dir(&req.clients, &req.out) {
        _locks.push(crate::common::FolderLock::acquire(&req.out, "kmeans")?);
    }
    let mode = match req.codebook {
        Some(_) => "applied",
        None => mode_name(req.mode),
    };
    tracing::info!(
        "{mode} k-means: k={k} over {} clients, {total} frames x {dim}",
        clients.len()
    );
    let fit = match applied {
        Some(cb) => Fit {
            global: Some(cb),
            locals: vec![],
            info: json!({"applied": req.codebook}),
        },
        None => fit(req, &clients)?,
    };
    let fit_s = t0.elapsed().as_secs_f64();
    let reference = match req.codebook {
        Some(_) => None,
        None => reference_codebook(req, &clients)?,
    };
    let l = label_all(req, &clients, &fit, reference.as_ref())?;
    let codebook_path =
        (req.codebook.clone()).unwrap_or_else(|| req.out.join("codebook.safetensors"));
    if let (Some(cb), None) = (&fit.global, &req.codebook) {
        let meta = CodebookMeta {
            mode: mode.into(),
            seed: req.seed(),
            inertia: l.inertia,
            n_frames: total as u64,
        };
        cb.save(&codebook_path, &meta)?;
    }
    let shared = fit.global.is_some();
    let empty = l.usage.iter().filter(|&&u| u == 0).count();
    let summary = KmeansSummary {
        mode: mode.into(),
        k,
        dim,
        seed: req.seed(),
        feature: req.feature.clone(),
        percent: req.percent,
        clients_dir: req.clients.clone(),
        n_clients: clients.len(),
        frames: total,
        inertia: l.inertia,
        mean_inertia: l.inertia / total as f64,
        empty_clusters: shared.then_some(empty),
        cluster_usage: shared.then(|| l.usage.clone()),
        clients: l.per_client,
        skipped_clients: skipped,
        label_agreement: label_agreement(req, reference.is_some(), l.agreements),
        codebook: if shared {
            Codebooks::Shared(codebook_path)
        } else {
            Codebooks::PerClient(l.local_paths)
        },
        fit: fit.info,
        config: FitConfigs {
            minibatch: req.minibatch.clone(),
            federated: req.federated.clone(),
        },
        fit_time_s: fit_s,
        time_s: t0.elapsed().as_secs_f64(),
    };
    let sp = req.out.join("summary.json");
    fedhubert_io::atomic_write(&sp, crate::common::json_pretty(&summary)?.as_bytes())
        .with_context(|| format!("cannot write {}", sp.display()))?;
    Ok(summary)
}

/// A number as JSON writes it (`1.0`, not `1`).
fn json_number(x: f64) -> String {
    serde_json::Value::from(x).to_string()
}

impl KmeansSummary {
    /// The lines `fedhubert kmeans` prints.
    pub fn print(&self, req: &KmeansRequest) {
        let (mode, dim, total, inertia) = (&self.mode, self.dim, self.frames, self.inertia);
        println!(
            "{mode} k-means: k={} dim={dim}, {} clients, {total} frames",
            self.k, self.n_clients
        );
        println!(
            "  inertia {inertia:.6e} (mean {:.4} per frame){}",
            inertia / total as f64,
            match self.empty_clusters {
                Some(empty) => format!(", {empty} empty clusters"),
                None => String::new(),
            }
        );
        if let Some(a) = &self.label_agreement {
            println!(
                "  label agreement: purity {}, identity {}",
                json_number(a.purity),
                json_number(a.identity_agreement)
            );
        }
        for s in &self.skipped_clients {
            println!("  skipped {}", serde_json::Value::from(s.client.as_str()));
        }
        println!(
            "  labels: CLIENT/{}.npy, summary: {} ({:.1}s)",
            req.labels,
            req.out.join("summary.json").display(),
            self.time_s
        );
    }
}

const AGREEMENT_DOC: &str = "Per client, every local cluster id i is mapped to the reference (shared) cluster m(i) that most of its frames fall in. purity = share of frames whose reference cluster is m(their local id): how well the local codebook is a relabelling of the shared one. identity_agreement = share of frames whose local id i has m(i) == i: whether id i denotes the same cluster everywhere, which a shared prediction head needs (about 1/k for independent local codebooks, 1.0 for a shared one). raw_agreement = share of frames with local id == reference id. Pooled values weight clients by frames.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_has_the_command_line_defaults() {
        let args: Args = crate::common::parse_args(&[
            "--clients",
            "parts",
            "--k",
            "50",
            "--out",
            "km",
            "--seed",
            "3",
        ]);
        let want = KmeansRequest::new("parts".into(), ModeArg::Federated, 50, "km".into(), 3);
        assert_eq!(
            format!("{:?}", KmeansRequest::from(&args)),
            format!("{want:?}")
        );
    }
}
