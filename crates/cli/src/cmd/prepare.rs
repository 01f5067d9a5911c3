//! `fedhubert prepare`: corpus → client partitions with train/validation manifests.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::ValueEnum;
use fedhubert_audio::partition::{
    Method, PartitionConfig, PartitionSummary, partition, write_partition,
};
use fedhubert_audio::scan::{scan_dir, scan_manifest};

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
    #[arg(long, default_value_t = 0.2)]
    pub valid_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dirichlet: redraw until every client has at least this many utterances.
    #[arg(long, default_value_t = 2)]
    pub min_client_utterances: usize,
    /// Leave out unreadable, corrupt, truncated or empty files (listed in the summary and partition.json)
    /// instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let s = prepare(&args)?;
    print_summary(&s, &args.out);
    Ok(())
}

pub fn prepare(args: &Args) -> anyhow::Result<PartitionSummary> {
    let method = match args.partition {
        PartitionKind::Speaker => Method::Speaker,
        PartitionKind::Iid => Method::Iid,
        PartitionKind::Dirichlet => Method::Dirichlet { alpha: args.alpha },
    };
    let cfg = PartitionConfig {
        method,
        num_clients: args.num_clients,
        seed: args.seed,
        valid_fraction: args.valid_fraction,
        min_client_utterances: args.min_client_utterances,
    };
    cfg.validate()?;
    tracing::info!("scanning {}", args.data.display());
    let corpus = if args.data.is_file() {
        scan_manifest(&args.data, args.root.clone(), args.skip_bad)?
    } else if args.data.is_dir() {
        scan_dir(&args.data, args.skip_bad)?
    } else {
        bail!(
            "--data {}: no such file or folder (expected a corpus folder or a manifest CSV)",
            args.data.display()
        );
    };
    for s in &corpus.skipped {
        tracing::warn!("skipped {}: {}", s.path, s.reason);
    }
    let clients = partition(&corpus, &cfg)?;
    let summary = write_partition(&args.out, &corpus, &clients, &cfg)
        .with_context(|| format!("writing the partition to {}", args.out.display()))?;
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
