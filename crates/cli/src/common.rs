//! Helpers the subcommands share: device names, partition folders, the run-file overrides of
//! `pretrain` and `distill`, the bundled sample data, the quantizer training of `mvq` and
//! `distill`, and JSON output. Every `cmd` module may use this one; it uses none of them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use fedhubert_distill::data::load_audio_dir;
use fedhubert_distill::{DistillRunFile, Quantizer, QuantizerReport, Teacher};
use fedhubert_model::Device;

/// `cpu`, or `cuda[:N]` when built with the `cuda` feature (`--device`).
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(fedhubert_model::cpu_device()),
        #[cfg(feature = "cuda")]
        s if s.starts_with("cuda") => {
            let idx = s
                .strip_prefix("cuda:")
                .map(|i| i.parse())
                .transpose()
                .context("--device cuda:N")?
                .unwrap_or(0);
            Ok(fedhubert_model::cuda_device(idx))
        }
        other => bail!(
            "--device {other}: expected cpu{}",
            if cfg!(feature = "cuda") {
                " or cuda[:N]"
            } else {
                " (this build has no `cuda` feature)"
            }
        ),
    }
}

/// The client folders of a partition, or `root` itself when it is one client folder (a single
/// manifest with labels: what `--centralized` trains on).
pub fn client_dirs(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if root.join("manifest.csv").is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut dirs = Vec::new();
    for k in 0.. {
        let d = root.join(format!("client_{k}"));
        if !d.join("manifest.csv").is_file() {
            break;
        }
        dirs.push(d);
    }
    if dirs.is_empty() {
        bail!(
            "{}: no client_0/manifest.csv; run `fedhubert prepare --out {}` first",
            root.display(),
            root.display()
        );
    }
    Ok(dirs)
}

/// The first `num_clients` client folders of `clients` (all of them for 0): the clients a
/// federated run trains.
pub fn federated_clients(clients: &Path, num_clients: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = client_dirs(clients)?;
    if num_clients > 0 {
        if num_clients > dirs.len() {
            bail!(
                "federated.num_clients = {} but {} has only {} client folders",
                num_clients,
                clients.display(),
                dirs.len()
            );
        }
        dirs.truncate(num_clients);
    }
    Ok(dirs)
}

/// Prints the machine's cores, available memory and whether an NVIDIA GPU is present.
pub fn resources() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB available", kb as f64 / 1048576.0))
        .unwrap_or_else(|| "memory unknown".into());
    let gpu = if Path::new("/dev/nvidia0").exists() {
        "NVIDIA GPU present"
    } else {
        "no GPU"
    };
    println!("resources: {cores} CPU cores, {mem}, {gpu}");
}

// Every command that writes a folder holds a `FolderLock` on it (`open_run_folder` for runs
// with checkpoints), so two runs never mix their files in it.
pub use fedhubert_fl::FolderLock;
pub use fedhubert_fl::store::{Start, open_run_folder};

/// `--resume` / `--overwrite`, for every command that checkpoints a run.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StartArgs {
    /// Continue from the checkpoint in --out.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Discard the earlier run's checkpoint and metrics in --out and start again.
    #[arg(long)]
    pub overwrite: bool,
}

impl StartArgs {
    pub fn start(&self) -> Start {
        match (self.resume, self.overwrite) {
            (true, _) => Start::Resume,
            (false, true) => Start::Overwrite,
            (false, false) => Start::Fresh,
        }
    }
}

/// Most threads `--threads` accepts: a pool of millions of threads would exhaust the machine
/// before it did any work.
const MAX_THREADS: usize = 1024;

/// `--threads N`: 0 (one per core) up to [`MAX_THREADS`].
pub fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of threads (0: one per core)"))?;
    if n > MAX_THREADS {
        return Err(format!(
            "{n}: at most {MAX_THREADS} threads (0: one per core, {} here)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ));
    }
    Ok(n)
}

/// Whether two paths name one existing folder.
pub fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Prints the run's resolved configuration (every key, defaults included) and writes it to
/// `out/config.yaml`, beside the checkpoint, so the run's settings are never a guess.
pub fn write_resolved_config(out: &Path, yaml: &str) -> anyhow::Result<()> {
    let path = out.join("config.yaml");
    fedhubert_fl::atomic_write(&path, yaml.as_bytes())?;
    println!(
        "resolved configuration (also in {}):\n{}",
        path.display(),
        yaml.trim_end()
    );
    Ok(())
}

/// The run-file overrides `pretrain` and `distill` share: shortcuts for `federated.*` keys and
/// free `--set section.key=value` pairs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Overrides {
    #[arg(long)]
    pub num_clients: Option<usize>,
    #[arg(long)]
    pub num_rounds: Option<u64>,
    #[arg(long)]
    pub strategy: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// `section.key=value` overrides, e.g. `--set pretraining.learning_rate=1e-3`.
    #[arg(long = "set")]
    pub set: Vec<String>,
}

impl Overrides {
    /// `--set` pairs, then one `federated.KEY=VALUE` per shortcut given.
    pub fn pairs(&self) -> Vec<String> {
        let mut set = self.set.clone();
        if let Some(n) = self.num_clients {
            set.push(format!("federated.num_clients={n}"));
        }
        if let Some(n) = self.num_rounds {
            set.push(format!("federated.num_rounds={n}"));
        }
        if let Some(s) = &self.strategy {
            set.push(format!("federated.strategy={s}"));
        }
        if let Some(s) = self.seed {
            set.push(format!("federated.seed={s}"));
        }
        set
    }
}

/// The bundled sample, found next to the binary's source tree or the working directory.
pub fn bundled(rel: &str) -> anyhow::Result<PathBuf> {
    let candidates = [
        PathBuf::from(rel),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| format!("bundled data {rel} not found (run from the repository root)"))
}

/// Trains a quantizer on teacher layer `layer` of the server-side set.
pub fn train_quantizer(
    teacher: &Teacher,
    set: &Path,
    rf: &DistillRunFile,
    layer: usize,
    seed: u64,
) -> anyhow::Result<(Quantizer, QuantizerReport)> {
    let d = &rf.distillation;
    let data = load_audio_dir(set, &rf.run_file().label_spec(), d.server_max_utterances)?;
    let (x, dim) = teacher.layer_frames(
        &data.train,
        layer,
        rf.pretraining.max_audio_length.max(250_000),
        d.mvq.max_frames,
        seed,
    )?;
    let t0 = Instant::now();
    let (q, rep) = Quantizer::train(&x, dim, &d.mvq, layer, seed)?;
    println!(
        "quantizer: teacher layer {layer}, {} frames of dim {dim}, {} codebooks x 256 -> {} bytes/frame ({:.0}x smaller than f32), relative reconstruction error {:.4} (init {:.4}, phase 1 {:.4}), {:.1} s",
        rep.frames,
        rep.num_codebooks,
        rep.bytes_per_frame,
        rep.compression_ratio,
        rep.rel_error,
        rep.rel_error_init,
        rep.rel_error_phase1,
        t0.elapsed().as_secs_f64()
    );
    Ok((q, rep))
}

/// Pretty JSON with every object's keys sorted, as all of the CLI's JSON files and printouts
/// have them (typed outcomes serialise in field order otherwise).
pub fn json_pretty<T: serde::Serialize>(x: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&serde_json::to_value(x)?)?)
}

/// Writes `x` to `path` atomically as [`json_pretty`] JSON.
pub fn write_json<T: serde::Serialize>(path: &Path, x: &T) -> anyhow::Result<()> {
    fedhubert_fl::atomic_write(path, json_pretty(x)?.as_bytes())?;
    Ok(())
}

/// Parses `argv` (without the program name) into a subcommand's `Args`, as the command line would.
#[cfg(test)]
pub fn parse_args<A: clap::Args>(argv: &[&str]) -> A {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        a: A,
    }
    Wrap::<A>::try_parse_from(std::iter::once("fedhubert").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .a
}
