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
    Agreement, Codebook, CodebookMeta, ConcatSource, FederatedConfig, FrameSource, InProcessClient,
    KmClient, MiniBatchConfig, ServerUpdate, ShardSource, fit_federated, fit_minibatch,
    label_client, with_threads,
};
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
    #[arg(long, default_value = "mfcc")]
    pub feature: String,
    /// Label shard stem written next to each client's manifest.
    #[arg(long, default_value = "km")]
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
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
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
    skipped: &mut Vec<serde_json::Value>,
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
            skipped.push(
                json!({"client": name, "reason": format!("{} has no frames", npy.display())}),
            );
            continue;
        }
        out.push(Client {
            name,
            dir: path,
            source,
        });
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

fn fed_clients(clients: &[Client], feature: &str) -> Result<Vec<Box<dyn KmClient>>> {
    clients
        .iter()
        .map(|c| {
            let src = ShardSource::open(&c.dir, feature)
                .with_context(|| format!("cannot open {}", c.source.path().display()))?;
            Ok(Box::new(InProcessClient::new(c.name.clone(), Box::new(src))) as Box<dyn KmClient>)
        })
        .collect()
}

fn central_source(clients: &[Client], feature: &str) -> Result<ConcatSource> {
    let parts = clients
        .iter()
        .map(|c| Ok(Box::new(ShardSource::open(&c.dir, feature)?) as Box<dyn FrameSource>))
        .collect::<Result<Vec<_>>>()?;
    Ok(ConcatSource::new(parts)?)
}

pub fn run(args: Args) -> Result<()> {
    let threads = (args.threads > 0).then_some(args.threads);
    with_threads(threads, || run_inner(&args))?
}

fn run_inner(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    if args.k == 0 || args.k > u16::MAX as usize + 1 {
        bail!(
            "--k {}: must be between 1 and 65536 (labels are u16)",
            args.k
        );
    }
    let mut skipped = Vec::new();
    let clients = find_clients(&args.clients, &args.feature, &mut skipped)?;
    let total: usize = clients.iter().map(|c| c.source.n_frames()).sum();
    let dim = clients[0].source.dim();
    if args.k > total {
        bail!(
            "--k {} is larger than the {total} frames of all clients together",
            args.k
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create", args.out.display()))?;
    let mb = MiniBatchConfig {
        k: args.k,
        batch_size: args.batch_size,
        max_iter: args.max_iter,
        n_init: args.n_init,
        seed: args.seed,
        ..Default::default()
    };
    let fcfg = FederatedConfig {
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
    };
    let mode = match args.mode {
        ModeArg::Local => "local",
        ModeArg::Federated => "federated",
        ModeArg::Central => "central",
    };
    tracing::info!(
        "{mode} k-means: k={} over {} clients, {total} frames x {dim}",
        args.k,
        clients.len()
    );

    // Fit.
    let mut fit_info = json!({});
    let (global, locals): (Option<Codebook>, Vec<Codebook>) = match args.mode {
        ModeArg::Central => {
            let f = fit_minibatch(&central_source(&clients, &args.feature)?, &mb)?;
            fit_info = json!({"n_steps": f.n_steps, "n_iter": f.n_iter, "init_inertia_validation": f.init_inertia});
            (Some(f.codebook), vec![])
        }
        ModeArg::Federated => {
            let f = fit_federated(&fed_clients(&clients, &args.feature)?, &fcfg)?;
            fit_info = json!({"rounds": f.rounds, "dropouts": f.dropouts, "history": f.history});
            (Some(f.codebook), vec![])
        }
        ModeArg::Local => {
            let mut v = Vec::new();
            for c in &clients {
                if c.source.n_frames() < args.k {
                    bail!(
                        "{}: {} frames, fewer than --k {} (local mode fits k clusters per client)",
                        c.source.path().display(),
                        c.source.n_frames(),
                        args.k
                    );
                }
                let f = fit_minibatch(&c.source, &mb)
                    .with_context(|| format!("local k-means of {}", c.name))?;
                v.push(f.codebook);
            }
            (None, v)
        }
    };
    let fit_s = t0.elapsed().as_secs_f64();

    // Reference codebook for label agreement (local mode only).
    let reference = match (args.mode, args.reference) {
        (ModeArg::Local, ReferenceArg::Federated) => {
            Some(fit_federated(&fed_clients(&clients, &args.feature)?, &fcfg)?.codebook)
        }
        (ModeArg::Local, ReferenceArg::Central) => {
            Some(fit_minibatch(&central_source(&clients, &args.feature)?, &mb)?.codebook)
        }
        _ => None,
    };

    // Codebooks and labels.
    let mut per_client = Vec::new();
    let mut usage = vec![0u64; args.k];
    let mut inertia = 0.0;
    let mut agreements = Vec::new();
    let mut local_paths = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let cb = global.as_ref().unwrap_or_else(|| &locals[i]);
        let rep = label_client(
            &c.dir,
            &args.feature,
            cb,
            Some(&args.labels),
            reference.as_ref(),
        )
        .with_context(|| format!("labelling {}", c.dir.display()))?;
        if let Some(ct) = &rep.contingency {
            agreements.push((c.name.clone(), ct.agreement()));
        }
        if global.is_none() {
            let p = args.out.join(format!("{}.codebook.safetensors", c.name));
            let meta = CodebookMeta {
                mode: mode.into(),
                seed: args.seed,
                inertia: rep.inertia,
                n_frames: rep.frames,
            };
            cb.save(&p, &meta)?;
            local_paths.push(p);
        }
        for (u, r) in usage.iter_mut().zip(&rep.usage) {
            *u += r;
        }
        inertia += rep.inertia;
        per_client.push(json!({
            "client": c.name,
            "frames": rep.frames,
            "utterances": rep.utterances,
            "inertia": rep.inertia,
            "mean_inertia": rep.inertia / rep.frames.max(1) as f64,
            "empty_clusters": rep.usage.iter().filter(|&&u| u == 0).count(),
            "labels": c.dir.join(format!("{}.npy", args.labels)),
        }));
    }
    let codebook_path = args.out.join("codebook.safetensors");
    if let Some(cb) = &global {
        let meta = CodebookMeta {
            mode: mode.into(),
            seed: args.seed,
            inertia,
            n_frames: total as u64,
        };
        cb.save(&codebook_path, &meta)?;
    }
    let agreement = match args.mode {
        ModeArg::Local if reference.is_some() => {
            let a = Agreement::pool(agreements);
            json!({
                "reference": format!("{:?}", args.reference).to_lowercase(),
                "purity": a.purity,
                "identity_agreement": a.identity_agreement,
                "raw_agreement": a.raw_agreement,
                "clients": a.clients.iter().map(|(n, c)| json!({"client": n, "purity": c.purity, "identity_agreement": c.identity_agreement, "raw_agreement": c.raw_agreement})).collect::<Vec<_>>(),
                "explanation": AGREEMENT_DOC,
            })
        }
        ModeArg::Local => json!(null),
        _ => json!({
            "purity": 1.0, "identity_agreement": 1.0, "raw_agreement": 1.0,
            "explanation": "all clients label with the same codebook, so cluster ids agree by construction",
        }),
    };
    let empty = usage.iter().filter(|&&u| u == 0).count();
    let summary = json!({
        "mode": mode,
        "k": args.k,
        "dim": dim,
        "seed": args.seed,
        "feature": args.feature,
        "clients_dir": args.clients,
        "n_clients": clients.len(),
        "frames": total,
        "inertia": inertia,
        "mean_inertia": inertia / total as f64,
        "empty_clusters": if global.is_some() { json!(empty) } else { json!(null) },
        "cluster_usage": if global.is_some() { json!(usage) } else { json!(null) },
        "clients": per_client,
        "skipped_clients": skipped,
        "label_agreement": agreement,
        "codebook": if global.is_some() { json!(codebook_path) } else { json!(local_paths) },
        "fit": fit_info,
        "config": {"minibatch": mb, "federated": fcfg},
        "fit_time_s": fit_s,
        "time_s": t0.elapsed().as_secs_f64(),
    });
    let sp = args.out.join("summary.json");
    fedhubert_io::atomic_write(&sp, serde_json::to_string_pretty(&summary)?.as_bytes())
        .with_context(|| format!("cannot write {}", sp.display()))?;

    println!(
        "{mode} k-means: k={} dim={dim}, {} clients, {total} frames",
        args.k,
        clients.len()
    );
    println!(
        "  inertia {inertia:.6e} (mean {:.4} per frame){}",
        inertia / total as f64,
        if global.is_some() {
            format!(", {empty} empty clusters")
        } else {
            String::new()
        }
    );
    if let Some(a) = summary["label_agreement"].as_object() {
        if let (Some(p), Some(i)) = (a.get("purity"), a.get("identity_agreement")) {
            println!("  label agreement: purity {p}, identity {i}");
        }
    }
    for s in &skipped {
        println!("  skipped {}", s["client"]);
    }
    println!(
        "  labels: CLIENT/{}.npy, summary: {} ({:.1}s)",
        args.labels,
        sp.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

const AGREEMENT_DOC: &str = "Per client, every local cluster id i is mapped to the reference (shared) cluster m(i) that most of its frames fall in. purity = share of frames whose reference cluster is m(their local id): how well the local codebook is a relabelling of the shared one. identity_agreement = share of frames whose local id i has m(i) == i: whether id i denotes the same cluster everywhere, which a shared prediction head needs (about 1/k for independent local codebooks, 1.0 for a shared one). raw_agreement = share of frames with local id == reference id. Pooled values weight clients by frames.";
