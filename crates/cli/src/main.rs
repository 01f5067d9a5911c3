//! `fedhubert`: a thin binary over the library crates. Each subcommand lives in `cmd/NAME.rs`
//! as an `Args` struct (clap derive), a typed request built from it, one library function
//! `NAME(&request) -> anyhow::Result<Outcome>` and a `run(args)` that converts, calls and prints.
//! `demo` calls the other commands' functions; the helpers they share live in `common`.

mod cmd;
mod common;
mod plot;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fedhubert",
    version,
    about = "Federated HuBERT pretraining and distillation"
)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scan a corpus and partition it into clients with train/validation manifests.
    Prepare(cmd::prepare::Args),
    /// Extract 39-dim MFCC (Kaldi-compatible, 100 Hz) for manifests or client folders.
    Features(cmd::features::Args),
    /// Fit a k-means codebook (local, federated or central) and write per-client labels.
    Kmeans(cmd::kmeans::Args),
    /// Per layer of a model: federated k-means inertia (and probe accuracy), to choose the
    /// layer iteration 2 clusters.
    Layers(cmd::layers::Args),
    /// Federated (simulation) or centralized HuBERT masked-prediction pretraining.
    Pretrain(cmd::pretrain::Args),
    /// Run the pipeline on the bundled sample and print a summary.
    Demo(cmd::demo::Args),
    /// Federated knowledge distillation: --mode server | client | mvq.
    Distill(cmd::distill::Args),
    /// MVQ-KD quantizer: train on teacher embeddings, encode client audio into codebook indexes.
    Mvq(cmd::mvq::Args),
    /// SUPERB-style probe of an upstream on a labelled clip folder (Speech Commands).
    Probe(cmd::probe::Args),
    /// Export a checkpoint as a HuggingFace `HubertModel` directory (from_pretrained, s3prl).
    Export(cmd::export::Args),
    /// Convert a published checkpoint (fairseq .pt, torchaudio, s3prl) to a HuggingFace directory.
    Import(cmd::import::Args),
    /// Every hidden state of one audio file, to check a checkpoint against transformers.
    Embed(cmd::embed::Args),
    /// Time forward / training step / MFCC / aggregation and write a JSON report.
    Bench(cmd::bench::Args),
}

/// Colour only on a terminal, and never with `NO_COLOR` set (no-color.org): a log file or a
/// pipe gets plain text.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour_logs())
        .init();
    let result = match cli.command {
        Command::Prepare(a) => cmd::prepare::run(a),
        Command::Features(a) => cmd::features::run(a),
        Command::Kmeans(a) => cmd::kmeans::run(a),
        Command::Layers(a) => cmd::layers::run(a),
        Command::Pretrain(a) => cmd::pretrain::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Distill(a) => cmd::distill::run(a),
        Command::Mvq(a) => cmd::mvq::run(a),
        Command::Probe(a) => cmd::probe::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::Embed(a) => cmd::embed::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
