//! `fedhubert pretrain`: federated (simulation) or centralized masked-prediction pretraining.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use fedhubert_eval::{UpstreamSpec, load_upstream};
use fedhubert_fl::{PrivacyRecord, RoundRecord, StrategyConfig};
use fedhubert_model::{
    Device, HubertConfig, HubertForPretraining, HubertModel, collect_tensors, load_tensors,
};
use fedhubert_train::{
    Heldout, HubertClients, LocalTrainer, Preset, RunFile, check_partition_labels, load_client_dir,
    pin_run_labels,
};
use serde::{Deserialize, Serialize};

use crate::common::{
    Overrides, Start, StartArgs, client_dirs, device, federated_clients, json_pretty,
    open_run_folder, resources, write_json, write_resolved_config,
};

/// The centralized baseline's checkpoint (model and optimizer) in `--out`.
const CENTRALIZED_CHECKPOINT: &str = "trainer.safetensors";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// YAML run configuration (configs/*.yaml); every key can be overridden below or with --set.
    #[arg(long, required_unless_present = "preset")]
    pub config: Option<PathBuf>,
    /// Without --config: every default of this model preset (tiny, student, base, large).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<Preset>,
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
    #[command(flatten)]
    pub start: StartArgs,
    /// A client-layout folder (manifest, features, labels from `kmeans --codebook`) of speakers
    /// no client has: the server evaluates the global model on all of it after every round (or
    /// every logged step when centralized), as `server_eval` in metrics.jsonl.
    #[arg(long, value_name = "DIR")]
    pub heldout: Option<PathBuf>,
    /// Start from this encoder instead of a random one: a published HuBERT (fairseq `.pt`,
    /// torchaudio, s3prl), an HF directory or a fedhubert checkpoint. Its architecture is
    /// kept; dropout and masking come from the run file, and the head is fresh for the run's
    /// codebook (`pretraining.vocab_size`).
    #[arg(long, value_name = "CKPT")]
    pub init: Option<PathBuf>,
    /// cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn build_run_file(args: &Args) -> anyhow::Result<RunFile> {
    let mut set = args.overrides.pairs();
    if let Some(p) = args.preset {
        set.insert(0, format!("pretraining.preset={}", p.name()));
    }
    Ok(RunFile::load(args.config.as_deref(), &set)?)
}

/// Federated simulation or the pooled (centralized) baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PretrainMode {
    Federated,
    Centralized,
}

/// One pretraining run.
#[derive(Clone, Debug)]
pub struct PretrainRequest {
    pub mode: PretrainMode,
    /// Partition folder (or one client folder for the centralized baseline).
    pub clients: PathBuf,
    pub out: PathBuf,
    /// Centralized: optimizer steps.
    pub steps: u64,
    /// What to do with an earlier run's files in `out`.
    pub start: Start,
    /// Unseen-speaker folder the server evaluates on.
    pub heldout: Option<PathBuf>,
    /// The encoder to start from (`--init`); `None`: random at the run's seed.
    pub init: Option<PathBuf>,
    pub run_file: RunFile,
    pub device: Device,
}

/// `summary.json` of a federated run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FederatedSummary {
    pub mode: String,
    pub rounds: usize,
    pub strategy: StrategyConfig,
    pub parameters: usize,
    pub first_round_train_loss: Option<f64>,
    pub final_train_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub final_eval_acc_masked: Option<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub failures: usize,
    pub wall_time_s: f64,
    pub hf_export: PathBuf,
    /// Differential privacy after the last round: epsilon spent, delta, noise, clipping norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyRecord>,
    /// Why the run ended before `num_rounds` (`privacy.max_epsilon`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

impl FederatedSummary {
    /// The summary of a finished run's `history`, its model exported to `out/hf`.
    fn new(
        res: &fedhubert_fl::RunResult,
        strategy: StrategyConfig,
        parameters: usize,
        wall_time_s: f64,
        out: &Path,
    ) -> Self {
        let history = &res.history;
        let last = history.last();
        Self {
            mode: "federated-simulation".into(),
            rounds: history.len(),
            strategy,
            parameters,
            first_round_train_loss: history.first().and_then(|r| r.train.get("loss").copied()),
            final_train_loss: last.and_then(|r| r.train.get("loss").copied()),
            final_eval_loss: last.and_then(|r| r.eval.get("loss").copied()),
            final_eval_acc_masked: last.and_then(|r| r.eval.get("acc_masked").copied()),
            bytes_up: history.iter().map(|r| r.bytes_up).sum::<u64>(),
            bytes_down: history.iter().map(|r| r.bytes_down).sum::<u64>(),
            failures: history.iter().map(|r| r.failures.len()).sum::<usize>(),
            wall_time_s,
            hf_export: out.join("hf"),
            privacy: last.and_then(|r| r.privacy.clone()),
            stopped: res.stopped.clone(),
        }
    }
}

/// Where the centralized baseline left its model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CentralizedOutcome {
    pub steps: u64,
    pub checkpoint: PathBuf,
    pub hf_export: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub enum PretrainOutcome {
    Federated(FederatedSummary),
    Centralized(CentralizedOutcome),
}

impl PretrainOutcome {
    /// The summary `fedhubert pretrain` prints last.
    pub fn print(&self) -> anyhow::Result<()> {
        match self {
            Self::Federated(summary) => println!("{}", json_pretty(summary)?),
            Self::Centralized(c) => println!(
                "centralized pretraining done: {} steps, checkpoint {}, HF export {}",
                c.steps,
                c.checkpoint.display(),
                c.hf_export.display()
            ),
        }
        Ok(())
    }
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
    let req = PretrainRequest {
        mode: if args.centralized {
            PretrainMode::Centralized
        } else {
            PretrainMode::Federated
        },
        clients: args.clients,
        out: args.out,
        steps: args.steps,
        start: args.start.start(),
        heldout: args.heldout,
        init: args.init,
        run_file: rf,
        device: dev,
    };
    pretrain(&req)?.print()
}

/// Pretrains as the request says and writes the model (checkpoint and HF export) into `out`.
pub fn pretrain(req: &PretrainRequest) -> anyhow::Result<PretrainOutcome> {
    let (rf, dev) = (&req.run_file, &req.device);
    let own: &[&str] = match req.mode {
        PretrainMode::Centralized => &[CENTRALIZED_CHECKPOINT],
        PretrainMode::Federated => &[],
    };
    let _lock = open_run_folder(&req.out, "pretrain", req.start, own)?;
    write_resolved_config(&req.out, &rf.to_yaml()?)?;
    Ok(match req.mode {
        PretrainMode::Centralized => PretrainOutcome::Centralized(centralized(req, rf, dev)?),
        PretrainMode::Federated => PretrainOutcome::Federated(federated(req, rf, dev)?),
    })
}

/// The `--heldout` folder, loaded.
fn load_heldout(req: &PretrainRequest, rf: &RunFile) -> anyhow::Result<Option<Heldout>> {
    let Some(dir) = &req.heldout else {
        return Ok(None);
    };
    let h = Heldout::load(dir, &rf.label_spec())
        .with_context(|| format!("--heldout {}", dir.display()))?;
    println!(
        "held-out evaluation: {} utterances from {} (majority-cluster rate {:.3})",
        h.utts.len(),
        dir.display(),
        h.majority_rate
    );
    Ok(Some(h))
}

/// ` | held-out acc_masked A (majority M)` for a round's line, empty without a held-out set.
/// A metric with `digits` decimals, or "-" when the round has none (no evaluation this round;
/// under DP the clients publish no training metrics).
fn metric(m: &std::collections::BTreeMap<String, f64>, key: &str, digits: usize) -> String {
    m.get(key)
        .map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn heldout_text(m: &std::collections::BTreeMap<String, f64>) -> String {
    match (m.get("acc_masked"), m.get("majority_rate")) {
        (Some(a), Some(maj)) => format!(" | held-out acc_masked {a:.3} (majority {maj:.3})"),
        _ => String::new(),
    }
}

/// The model a run starts from: the run file's architecture at the run's seed, or with
/// `--init` that encoder (its architecture, the run's dropout and masking) and a fresh head
/// for the run's codebook.
fn initial_model(req: &PretrainRequest, dev: &Device) -> anyhow::Result<HubertForPretraining> {
    let rf = &req.run_file;
    let seed = rf.federated.run.seed;
    let Some(init) = &req.init else {
        return Ok(HubertForPretraining::new(
            &rf.model_config()?,
            &rf.pretrain_config()?,
            seed,
            dev,
        )?);
    };
    let loaded = UpstreamSpec::from_path(init)
        .and_then(|spec| load_upstream(&spec, dev))
        .with_context(|| format!("--init {}", init.display()))?;
    let run = rf.model_config()?;
    let cfg = HubertConfig {
        hidden_dropout: run.hidden_dropout,
        attention_dropout: run.attention_dropout,
        activation_dropout: run.activation_dropout,
        feat_proj_dropout: run.feat_proj_dropout,
        layerdrop: run.layerdrop,
        mask_time_prob: run.mask_time_prob,
        mask_time_length: run.mask_time_length,
        mask_time_min_masks: run.mask_time_min_masks,
        ..loaded.config().clone()
    };
    let encoder = load_tensors(HubertModel::new(&cfg, seed, dev)?, collect_tensors(&loaded))?;
    let pre = rf.pretrain_config_for(cfg.hidden_size)?;
    println!(
        "initialised from {} ({} layers of {}); a fresh head for {} classes",
        init.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        pre.num_classes
    );
    Ok(HubertForPretraining::with_encoder(encoder, &pre, seed)?)
}

/// Runs the federated simulation and exports the final model; returns the summary it writes.
fn federated(
    req: &PretrainRequest,
    rf: &RunFile,
    dev: &Device,
) -> anyhow::Result<FederatedSummary> {
    let (out, resume) = (req.out.as_path(), req.start == Start::Resume);
    let dirs = federated_clients(&req.clients, rf.federated.run.num_clients)?;
    let codebook = check_partition_labels(&dirs, &rf.label_spec())?;
    pin_run_labels(out, &codebook, &rf.label_spec(), resume)?;
    let template = initial_model(req, dev)?;
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
        dirs.clone(),
        template.clone(),
        rf.train_config()?,
        rf.sim_config(),
        dev.clone(),
    );
    if let Some(h) = load_heldout(req, rf)? {
        pool = pool.with_heldout(h);
    }
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
            "round {:>3}: train loss {} acc_masked {} | eval loss {}{}{} | clients {} ok, {} failed | up {:.2} MB down {:.2} MB | {:.1} s",
            r.round,
            metric(&r.train, "loss", 4),
            metric(&r.train, "acc_masked", 3),
            metric(&r.eval, "loss", 4),
            heldout_text(&r.server_eval),
            PrivacyRecord::console(r.privacy.as_ref()),
            r.participated.len(),
            r.failures.len(),
            r.bytes_up as f64 / 1e6,
            r.bytes_down as f64 / 1e6,
            r.round_time_s
        ));
        },
    )?;
    bar.finish_and_clear();
    if let Some(why) = &res.stopped {
        println!("stopped after round {}: {why}", res.history.len());
    }
    let summary = FederatedSummary::new(
        &res,
        strategy_cfg,
        n_params,
        t0.elapsed().as_secs_f64(),
        out,
    );
    let model = fedhubert_model::load_tensors(template, res.weights)?;
    model.save_checkpoint(out.join("model.safetensors"))?;
    model.save_hf(out.join("hf"))?;
    fedhubert_train::ModelCard {
        title: "HuBERT, federated masked-prediction pretraining (fedhubert)",
        config_yaml: &rf.to_yaml()?,
        strategy: summary.strategy.name(),
        data: fedhubert_train::CardData::Partitions(&dirs),
        history: &res.history,
        run_dir: out,
    }
    .write(&out.join("hf"))?;
    write_json(&out.join("summary.json"), &summary)?;
    crate::plot::curves(&res.history, &out.join("curves.svg"))?;
    Ok(summary)
}

fn centralized(
    args: &PretrainRequest,
    rf: &RunFile,
    dev: &Device,
) -> anyhow::Result<CentralizedOutcome> {
    let dirs = client_dirs(&args.clients)?;
    let codebook = check_partition_labels(&dirs, &rf.label_spec())?;
    pin_run_labels(
        &args.out,
        &codebook,
        &rf.label_spec(),
        args.start == Start::Resume,
    )?;
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for d in &dirs {
        let data = load_client_dir(d, &rf.label_spec())?;
        train.extend(data.train);
        valid.extend(data.valid);
    }
    let mut tcfg = rf.train_config()?;
    tcfg.lr_schedule = rf.lr_schedule(Some(args.steps))?;
    let mut tr = LocalTrainer::new(initial_model(args, dev)?, tcfg, dev)?;
    let ckpt = args.out.join(CENTRALIZED_CHECKPOINT);
    let resume = args.start == Start::Resume;
    let mut start = 0;
    if resume {
        let meta = tr.load(&ckpt)?;
        start = meta.get("step").and_then(|s| s.parse().ok()).unwrap_or(0);
        println!("resuming at step {start} from {}", ckpt.display());
    }
    let metrics_path = args.out.join("metrics.jsonl");
    let mut lines = if resume {
        std::fs::read_to_string(&metrics_path).unwrap_or_default()
    } else {
        String::new()
    };
    let bar = crate::progress::bar(args.steps, "steps");
    bar.set_position(start);
    let seed = rf.federated.run.seed;
    let heldout = load_heldout(args, rf)?;
    let every = 50.max(args.steps / 20);
    let schedule = tr.cfg.clone();
    let mut k = start;
    while k < args.steps {
        let n = every.min(args.steps - k);
        let m = tr.train(
            &train,
            k,
            n,
            |k| schedule.lr_at(k),
            seed,
            None,
            |_, m| {
                bar.inc(1);
                bar.set_message(format!("loss {:.3} acc_masked {:.3}", m.loss, m.acc_masked));
            },
        )?;
        k += n;
        let ev = tr.evaluate(&valid, seed)?;
        let server_eval = match &heldout {
            Some(h) => h.evaluate(&tr.model, &tr.cfg.batch, tr.cfg.seed)?,
            None => Default::default(),
        };
        let line =
            serde_json::json!({"step": k, "train": m, "valid": ev, "server_eval": server_eval});
        bar.suspend(|| {
            println!(
                "step {k}: train loss {:.4} acc_masked {:.3} | valid loss {:.4} acc_masked {:.3}{}",
                m.loss,
                m.acc_masked,
                ev.loss,
                ev.acc_masked,
                heldout_text(&server_eval)
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
    Ok(CentralizedOutcome {
        steps: args.steps,
        checkpoint: ckpt,
        hf_export: args.out.join("hf"),
    })
}
