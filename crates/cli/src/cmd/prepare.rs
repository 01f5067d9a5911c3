//! `fedhubert prepare`: corpus → client partitions with train/validation manifests.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::ValueEnum;
use fedhubert_audio::ManifestOptions;
use fedhubert_audio::partition::{
    Method, PartitionConfig, PartitionSummary, partition, write_partition,
};
use fedhubert_audio::scan::{scan_dir, scan_manifest_with};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PartitionKind {
    /// Whole speakers per client, balanced by audio duration (non-IID).
    Speaker,
    /// Utterances shuffled and dealt evenly.
    Iid,
    /// Speaker-label skew drawn from Dir(alpha) per speaker (Flower Datasets' DirichletPartitioner).
    Dirichlet,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A LibriSpeech-layout folder, a plain folder of .flac/.wav files, or a manifest CSV.
    #[arg(long)]
    pub data: PathBuf,
    /// For a manifest CSV input: the folder its paths are relative to (default: from partition.json).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Output folder: OUT/client_K/manifest.csv and OUT/partition.json.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub num_clients: usize,
    #[arg(long, value_enum, default_value = "speaker")]
    pub partition: PartitionKind,
    /// Dirichlet concentration (smaller = more skew).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Fraction of each client's utterances held out for validation.
    #[arg(long, default_value_t = DEFAULT_VALID_FRACTION)]
    pub valid_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dirichlet: redraw until every client has at least this many utterances.
    #[arg(long, default_value_t = DEFAULT_MIN_CLIENT_UTTERANCES)]
    pub min_client_utterances: usize,
    /// Leave out unreadable, corrupt, truncated or empty files (listed in the summary and partition.json)
    /// instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad: bool,
    /// Accept manifest paths that leave the audio root (absolute, or `..` above it); refused
    /// otherwise, since a manifest is then reading files nobody declared.
    #[arg(long)]
    pub allow_outside_root: bool,
}

/// The fraction of each client's utterances held out for validation, unless told otherwise.
pub const DEFAULT_VALID_FRACTION: f64 = 0.2;
/// Dirichlet's least utterances per client, unless told otherwise.
pub const DEFAULT_MIN_CLIENT_UTTERANCES: usize = 2;

/// What to partition and how.
#[derive(Clone, Debug)]
pub struct PrepareRequest {
    /// A corpus folder or a manifest CSV.
    pub data: PathBuf,
    /// A manifest CSV's audio root (default: from partition.json).
    pub root: Option<PathBuf>,
    pub out: PathBuf,
    pub config: PartitionConfig,
    /// Leave out unreadable files instead of stopping at the first one.
    pub skip_bad: bool,
    /// How strictly a manifest CSV input is read.
    pub manifest_options: ManifestOptions,
}

impl From<&Args> for PrepareRequest {
    fn from(args: &Args) -> Self {
        let method = match args.partition {
            PartitionKind::Speaker => Method::Speaker,
            PartitionKind::Iid => Method::Iid,
            PartitionKind::Dirichlet => Method::Dirichlet { alpha: args.alpha },
        };
        Self {
            data: args.data.clone(),
            root: args.root.clone(),
            out: args.out.clone(),
            config: PartitionConfig {
                method,
                num_clients: args.num_clients,
                seed: args.seed,
                valid_fraction: args.valid_fraction,
                min_client_utterances: args.min_client_utterances,
            },
            skip_bad: args.skip_bad,
            manifest_options: ManifestOptions {
                allow_outside_root: args.allow_outside_root,
            },
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let req = PrepareRequest::from(&args);
    let s = prepare(&req)?;
    print_summary(&s, &req.out);
    Ok(())
}

/// Scans the corpus, partitions it and writes the client folders; returns `partition.json`'s
/// content.
pub fn prepare(req: &PrepareRequest) -> anyhow::Result<PartitionSummary> {
    let cfg = &req.config;
    cfg.validate()?;
    let _lock = crate::common::FolderLock::acquire(&req.out, "prepare")?;
    tracing::info!("scanning {}", req.data.display());
    let corpus = if req.data.is_file() {
        scan_manifest_with(
            &req.data,
            req.root.clone(),
            req.skip_bad,
            req.manifest_options,
        )?
    } else if req.data.is_dir() {
        scan_dir(&req.data, req.skip_bad)?
    } else {
        bail!(
            "--data {}: no such file or folder (expected a corpus folder or a manifest CSV)",
            req.data.display()
        );
    };
    for s in &corpus.skipped {
        tracing::warn!("skipped {}: {}", s.path, s.reason);
    }
    let clients = partition(&corpus, cfg)?;
    let summary = write_partition(&req.out, &corpus, &clients, cfg)
        .with_context(|| format!("writing the partition to {}", req.out.display()))?;
    Ok(summary)
}

pub fn print_summary(s: &PartitionSummary, out: &Path) {
    println!(
        "partition {:?} seed {}: {} utterances, {:.2} h of audio, {} clients -> {}",
        s.config.method,
        s.config.seed,
        s.total_utterances,
        s.total_hours,
        s.clients.len(),
        out.display()
    );
    println!(
        "{:>7} {:>8} {:>6} {:>6} {:>8}",
        "client", "speakers", "train", "valid", "minutes"
    );
    for c in &s.clients {
        println!(
            "{:>7} {:>8} {:>6} {:>6} {:>8.2}",
            c.client,
            c.speakers.len(),
            c.train_utterances,
            c.valid_utterances,
            c.hours * 60.0
        );
    }
    if !s.skipped.is_empty() {
        println!("skipped {} bad files:", s.skipped.len());
        for k in &s.skipped {
            println!("  {}: {}", k.path, k.reason);
        }
    }
}
