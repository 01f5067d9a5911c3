//! `fedhubert pretrain`: federated (simulation) or centralized masked-prediction pretraining.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use fedhubert_fl::RoundRecord;
use fedhubert_model::{Device, HubertForPretraining};
use fedhubert_train::{HubertClients, LocalTrainer, RunFile, load_client_dir};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// YAML run configuration (configs/*.yaml); every key can be overridden below or with --set.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Partition folder written by `fedhubert prepare` (client_K/manifest.csv + labels from `fedhubert kmeans`).
    #[arg(long)]
    pub clients: PathBuf,
    /// Output folder: checkpoint, metrics.jsonl, summary.json and the exported HuggingFace model.
    #[arg(long)]
    pub out: PathBuf,
    /// Run all clients in this process (the only federated mode of the CLI; multi-machine runs go through Flower).
    #[arg(long, conflicts_with = "centralized")]
    pub simulation: bool,
    /// Train one model on the pooled training data of all clients: the non-federated baseline.
    #[arg(long)]
    pub centralized: bool,
    /// Centralized: optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

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

fn resources() {
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

pub fn build_run_file(args: &Args) -> anyhow::Result<RunFile> {
    Ok(RunFile::load(
        args.config.as_deref(),
        &args.overrides.pairs(),
    )?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.simulation && !args.centralized {
        bail!(
            "choose --simulation (federated, all clients in this process) or --centralized (pooled baseline)"
        );
    }
    let rf = build_run_file(&args)?;
    resources();
    let dev = device(&args.device)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.centralized {
        return centralized(&args, &rf, &dev);
    }
    let summary = federated(&args.clients, &args.out, &rf, &dev, args.resume)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Runs the federated simulation and exports the final model; returns the summary it writes.
pub fn federated(
    clients: &Path,
    out: &Path,
    rf: &RunFile,
    dev: &Device,
    resume: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut dirs = client_dirs(clients)?;
    if rf.federated.run.num_clients > 0 {
        if rf.federated.run.num_clients > dirs.len() {
            bail!(
                "federated.num_clients = {} but {} has only {} client folders",
                rf.federated.run.num_clients,
                clients.display(),
                dirs.len()
            );
        }
        dirs.truncate(rf.federated.run.num_clients);
    }
    let model_cfg = rf.model_config()?;
    let pre = rf.pretrain_config()?;
    let template = HubertForPretraining::new(&model_cfg, &pre, rf.federated.run.seed, dev)?;
    let initial = fedhubert_model::collect_tensors(&template);
    let n_params: usize = initial.num_params();
    let strategy_cfg = rf.strategy()?;
    let run_cfg = rf.run_config()?;
    println!(
        "federated pretraining: {} clients, {} rounds, strategy {}, model {} params ({:.1} MB per f32 transfer), {} threads",
        dirs.len(),
        run_cfg.num_rounds,
        strategy_cfg.name(),
        n_params,
        n_params as f64 * 4.0 / 1e6,
        rayon::current_num_threads()
    );
    let mut pool = HubertClients::new(
        dirs,
        template.clone(),
        rf.train_config()?,
        rf.sim_config(),
        dev.clone(),
    );
    let t0 = Instant::now();
    let bar = crate::progress::bar(run_cfg.num_rounds, "rounds");
    let res = fedhubert_fl::run(
        &mut pool,
        strategy_cfg.build()?,
        initial,
        &run_cfg,
        Some(out),
        resume,
        |r: &RoundRecord| {
            bar.set_position(r.round);
            bar.suspend(|| println!(
            "round {:>3}: train loss {:.4} acc_masked {:.3} | eval loss {} | clients {} ok, {} failed | up {:.2} MB down {:.2} MB | {:.1} s",
            r.round,
            r.train.get("loss").copied().unwrap_or(f64::NAN),
            r.train.get("acc_masked").copied().unwrap_or(f64::NAN),
            r.eval.get("loss").map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
            r.participated.len(),
            r.failures.len(),
            r.bytes_up as f64 / 1e6,
            r.bytes_down as f64 / 1e6,
            r.round_time_s
        ));
        },
    )?;
    bar.finish_and_clear();
    let model = fedhubert_model::load_tensors(template, res.weights)?;
    model.save_checkpoint(out.join("model.safetensors"))?;
    model.save_hf(out.join("hf"))?;
    let last = res.history.last();
    let summary = serde_json::json!({
        "mode": "federated-simulation",
        "rounds": res.history.len(),
        "strategy": strategy_cfg,
        "parameters": n_params,
        "first_round_train_loss": res.history.first().and_then(|r| r.train.get("loss")),
        "final_train_loss": last.and_then(|r| r.train.get("loss")),
        "final_eval_loss": last.and_then(|r| r.eval.get("loss")),
        "final_eval_acc_masked": last.and_then(|r| r.eval.get("acc_masked")),
        "bytes_up": res.history.iter().map(|r| r.bytes_up).sum::<u64>(),
        "bytes_down": res.history.iter().map(|r| r.bytes_down).sum::<u64>(),
        "failures": res.history.iter().map(|r| r.failures.len()).sum::<usize>(),
        "wall_time_s": t0.elapsed().as_secs_f64(),
        "hf_export": out.join("hf"),
    });
    fedhubert_fl::atomic_write(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    crate::plot::curves(&res.history, &out.join("curves.svg"))?;
    Ok(summary)
}

fn centralized(args: &Args, rf: &RunFile, dev: &Device) -> anyhow::Result<()> {
    let dirs = client_dirs(&args.clients)?;
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for d in &dirs {
        let data = load_client_dir(d, &rf.pretraining.label_stem)?;
        train.extend(data.train);
        valid.extend(data.valid);
    }
    let mut tcfg = rf.train_config()?;
    tcfg.max_steps = args.steps;
    tcfg.warmup_steps = (args.steps / 10).max(1);
    let model = HubertForPretraining::new(
        &rf.model_config()?,
        &rf.pretrain_config()?,
        rf.federated.run.seed,
        dev,
    )?;
    let mut tr = LocalTrainer::new(model, tcfg, dev)?;
    let ckpt = args.out.join("trainer.safetensors");
    let mut start = 0;
    if args.resume {
        let meta = tr.load(&ckpt)?;
        start = meta.get("step").and_then(|s| s.parse().ok()).unwrap_or(0);
        println!("resuming at step {start} from {}", ckpt.display());
    }
    let metrics_path = args.out.join("metrics.jsonl");
    let mut lines = if args.resume {
        std::fs::read_to_string(&metrics_path).unwrap_or_default()
    } else {
        String::new()
    };
    let bar = crate::progress::bar(args.steps, "steps");
    bar.set_position(start);
    let seed = rf.federated.run.seed;
    let every = 50.max(args.steps / 20);
    let mut k = start;
    while k < args.steps {
        let n = every.min(args.steps - k);
        let m = tr.train(&train, k, n, None, seed, None, |_, m| {
            bar.inc(1);
            bar.set_message(format!("loss {:.3} acc_masked {:.3}", m.loss, m.acc_masked));
        })?;
        k += n;
        let ev = tr.evaluate(&valid, seed)?;
        let line = serde_json::json!({"step": k, "train": m, "valid": ev});
        bar.suspend(|| {
            println!(
                "step {k}: train loss {:.4} acc_masked {:.3} | valid loss {:.4} acc_masked {:.3}",
                m.loss, m.acc_masked, ev.loss, ev.acc_masked
            )
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("step".into(), k.to_string());
        tr.save(&ckpt, meta)?;
        fedhubert_fl::atomic_write(&metrics_path, lines.as_bytes())?;
    }
    bar.finish_and_clear();
    tr.model.save_hf(args.out.join("hf"))?;
    println!(
        "centralized pretraining done: {} steps, checkpoint {}, HF export {}",
        args.steps,
        ckpt.display(),
        args.out.join("hf").display()
    );
    Ok(())
}
