//! `fedhubert distill`: federated knowledge distillation of a frozen teacher into a student, in
//! three modes on the same engine: `server` (clients pretrain, the server distils after each
//! aggregation on a server-side set), `client` (every client distils from its own teacher copy)
//! and `mvq` (clients predict multi-codebook VQ indexes of the teacher's embeddings).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fedhubert_distill::ServerRoundLog;
use fedhubert_distill::config::Mode;
use fedhubert_distill::setup::{SERVER_LOG, read_server_log, write_server_log};
use fedhubert_distill::student::{DistillStudent, hubert_param_count};
use fedhubert_distill::{
    DistillClients, DistillParts, DistillRunFile, DistillSetup, Quantizer, QuantizerReport,
};
use fedhubert_fl::store::checkpoint_path;
use fedhubert_fl::{RoundRecord, RunConfig, StrategyConfig, Weights};
use fedhubert_model::{Device, HubertForPretraining, load_tensors};
use fedhubert_train::{HubertClients, Preset, RunFile, TrainConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::common::{
    Start, StartArgs, device, federated_clients, json_pretty, open_run_folder, same_dir,
    train_quantizer, write_json, write_resolved_config,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// server (seed 000), client (seed 001) or mvq (seed 004).
    #[arg(long)]
    pub mode: Mode,
    /// YAML with `federated:`, `pretraining:` (the student; preset defaults to `student`, 384/3) and
    /// `distillation:` sections; every key can be overridden with --set.
    #[arg(long, required_unless_present = "preset")]
    pub config: Option<PathBuf>,
    /// Without --config: the student is this model preset and every other key its default.
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<Preset>,
    /// Teacher: a fedhubert checkpoint (model.safetensors of `fedhubert pretrain`) or a HF directory.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Partition folder (client_K/manifest.csv + km labels).
    #[arg(long)]
    pub clients: PathBuf,
    /// Output folder: round checkpoint, metrics.jsonl, summary.json, student.safetensors, hf/.
    #[arg(long)]
    pub out: PathBuf,
    /// Server-side audio set (folder with manifest.csv; labels optional): server distillation and
    /// quantizer training. Must not be one of the clients' folders.
    #[arg(long)]
    pub server_set: Option<PathBuf>,
    /// MVQ: a quantizer from `fedhubert mvq train` (else one is trained on the server-side set).
    #[arg(long)]
    pub quantizer: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: crate::common::Overrides,
    #[command(flatten)]
    pub start: StartArgs,
    /// cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// One distillation run.
#[derive(Clone, Debug)]
pub struct DistillRequest {
    pub mode: Mode,
    /// The run file, `distillation.teacher` (and `server_set`, where the mode needs one) set.
    pub run_file: DistillRunFile,
    /// Partition folder.
    pub clients: PathBuf,
    pub out: PathBuf,
    /// MVQ: a trained quantizer (else one is trained on the server-side set).
    pub quantizer: Option<PathBuf>,
    pub device: Device,
    /// What to do with an earlier run's files in `out`.
    pub start: Start,
}

/// `summary.json` of a distillation run: the figures read elsewhere typed, the rest (teacher,
/// layer plan, client metrics, quantizer report, ...) as `DistillSetup::summary` wrote it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillOutcome {
    pub rounds: usize,
    pub student_parameters_with_head: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Server mode: the server's distillation loss, first and last.
    pub server_distillation: Option<ServerDistillation>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerDistillation {
    /// Metrics of round 1's first server step.
    pub first_round_first_step: Option<StepMetrics>,
    /// Metrics of the last round's last server step.
    pub last_round_last_step: Option<StepMetrics>,
}

/// One server step's metrics: the loss typed, the rest as written.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepMetrics {
    pub loss: Option<f64>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl DistillOutcome {
    /// The server's loss at the first and the last step (server mode).
    pub fn server_losses(&self) -> (Option<f64>, Option<f64>) {
        let s = self.server_distillation.as_ref();
        let loss = |m: Option<&StepMetrics>| m.and_then(|m| m.loss);
        (
            loss(s.and_then(|s| s.first_round_first_step.as_ref())),
            loss(s.and_then(|s| s.last_round_last_step.as_ref())),
        )
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut set = args.overrides.pairs();
    if let Some(p) = args.preset {
        set.insert(0, format!("pretraining.preset={}", p.name()));
    }
    let mut rf = DistillRunFile::load(args.config.as_deref(), &set)?;
    if let Some(t) = &args.teacher {
        rf.distillation.teacher = Some(t.clone());
    }
    if let Some(s) = &args.server_set {
        rf.distillation.server_set = Some(s.clone());
    }
    let req = DistillRequest {
        mode: args.mode,
        run_file: rf,
        clients: args.clients,
        out: args.out,
        quantizer: args.quantizer,
        device: device(&args.device)?,
        start: args.start.start(),
    };
    let summary = distill(&req)?;
    println!("{}", json_pretty(&summary)?);
    Ok(())
}

/// What every mode's run is given.
struct Run<'a> {
    rf: &'a DistillRunFile,
    setup: &'a DistillSetup,
    dirs: Vec<PathBuf>,
    out: &'a Path,
    dev: &'a Device,
    resume: bool,
    base: RunFile,
    run_cfg: RunConfig,
    train_cfg: TrainConfig,
    strategy_cfg: StrategyConfig,
}

/// What a mode's run leaves.
struct Trained {
    student: HubertForPretraining,
    aux_params: usize,
    history: Vec<RoundRecord>,
    server_log: Option<Vec<ServerRoundLog>>,
    quantizer_report: Option<QuantizerReport>,
}

/// Runs one distillation mode end to end and writes the outputs; returns the summary.
pub fn distill(req: &DistillRequest) -> anyhow::Result<DistillOutcome> {
    let (rf, mode, clients, out, dev) = (
        &req.run_file,
        req.mode,
        req.clients.as_path(),
        req.out.as_path(),
        &req.device,
    );
    let t0 = Instant::now();
    let _lock = open_run_folder(out, "distill", req.start, &[SERVER_LOG])?;
    write_resolved_config(out, &rf.to_yaml()?)?;
    let d = rf.distillation.clone();
    if d.teacher.is_none() {
        bail!("distillation.teacher: no teacher given (use --teacher PATH)");
    }
    let setup = DistillSetup::new(rf, dev)?;
    let dirs = federated_clients(clients, rf.federated.run.num_clients)?;
    let server_set = d.server_set.clone();
    if let Some(s) = &server_set
        && let Some(c) = dirs.iter().find(|c| same_dir(c, s))
    {
        bail!(
            "distillation.server_set {} is client folder {}: the server must not hold client audio; pass a separate folder or fewer clients (--num-clients)",
            s.display(),
            c.display()
        );
    }
    let base = rf.run_file();
    announce(rf, mode, &setup, &base, dirs.len())?;
    let owners = dirs.clone();
    let run = Run {
        rf,
        setup: &setup,
        dirs,
        out,
        dev,
        resume: req.start == Start::Resume,
        run_cfg: base.run_config()?,
        train_cfg: base.train_config()?,
        strategy_cfg: base.strategy()?,
        base,
    };
    let bar = crate::progress::bar(run.run_cfg.num_rounds, "rounds");
    let on_round = |r: &RoundRecord| {
        bar.set_position(r.round);
        bar.suspend(|| print_round(r));
    };
    let trained = match mode {
        Mode::Server => run_server(run, on_round)?,
        Mode::Client | Mode::Mvq => run_clients(run, mode, req.quantizer.as_deref(), on_round)?,
    };
    bar.finish_and_clear();
    finish(rf, mode, &setup, trained, &owners, out, t0)
}

/// The setup's notes and the run's one-line description.
fn announce(
    rf: &DistillRunFile,
    mode: Mode,
    setup: &DistillSetup,
    base: &RunFile,
    n_clients: usize,
) -> anyhow::Result<()> {
    let student_cfg = base.model_config()?;
    for note in &setup.notes {
        println!("{note}");
    }
    let teacher = &setup.teacher;
    let (n_s, n_t) = (student_cfg.num_hidden_layers, teacher.num_layers());
    let student_params = hubert_param_count(&student_cfg);
    println!(
        "distillation ({mode:?}): teacher {} params ({} layers x {}), student {} encoder params ({} layers x {}), {} clients, {} rounds; layer plan {:?}",
        teacher.num_params(),
        n_t,
        teacher.hidden_size(),
        student_params,
        n_s,
        student_cfg.hidden_size,
        n_clients,
        rf.federated.run.num_rounds,
        setup.plan
    );
    Ok(())
}

fn print_round(r: &RoundRecord) {
    // Server mode's clients train masked prediction only: list just the parts they report.
    let parts: Vec<String> = ["distill", "mlm", "kl", "feature_mse", "mvq_ce"]
        .iter()
        .filter_map(|k| r.train.get(*k).map(|v| format!("{k} {v:.4}")))
        .collect();
    let parts = if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    };
    println!(
        "round {:>3}: client loss {:.4}{parts}{} | clients {} ok, {} failed | up {:.2} MB down {:.2} MB",
        r.round,
        r.train.get("loss").copied().unwrap_or(f64::NAN),
        fedhubert_fl::PrivacyRecord::console(r.privacy.as_ref()),
        r.participated.len(),
        r.failures.len(),
        r.bytes_up as f64 / 1e6,
        r.bytes_down as f64 / 1e6
    );
}

/// Server mode: clients pretrain, the server distils into every aggregate.
fn run_server(run: Run, on_round: impl Fn(&RoundRecord)) -> anyhow::Result<Trained> {
    let Run {
        rf,
        setup,
        dirs,
        out,
        dev,
        resume,
        base,
        run_cfg,
        train_cfg,
        strategy_cfg,
    } = run;
    let student = setup.student.clone();
    if rf.distillation.server_set.is_none() {
        bail!(
            "distillation.server_set: server mode needs a server-side audio set (--server-set DIR)"
        );
    }
    let strategy = setup.server_strategy(rf, strategy_cfg.build()?, dev)?;
    let aux = strategy.trainer().model.aux_weights().num_params();
    let initial = setup.initial();
    let log = strategy.log_handle();
    if resume {
        // The log of the rounds before the checkpoint comes from the earlier run's file.
        let done = fedhubert_fl::store::load_checkpoint(&checkpoint_path(out))?.round;
        *log.lock().unwrap_or_else(|p| p.into_inner()) = read_server_log(out, done + 1)?;
    }
    // Written after every round, so a run that dies keeps the log of what it finished.
    let round_log = log.clone();
    let on_round = |r: &RoundRecord| {
        on_round(r);
        let rows = round_log.lock().map(|l| l.clone()).unwrap_or_default();
        if let Err(e) = write_server_log(out, &rows) {
            tracing::warn!("round {}: {e}", r.round);
        }
    };
    let mut pool = HubertClients::new(
        dirs.clone(),
        student.clone(),
        train_cfg.clone(),
        base.sim_config(),
        dev.clone(),
    );
    let res = fedhubert_fl::run(
        &mut pool,
        Box::new(strategy),
        initial,
        &run_cfg,
        Some(out),
        resume,
        on_round,
    )?;
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    write_server_log(out, &log)?;
    Ok(Trained {
        student: load_tensors(student, res.weights)?,
        aux_params: aux,
        history: res.history,
        server_log: Some(log),
        quantizer_report: None,
    })
}

/// MVQ's quantizer: the one given, else one trained on the server-side set and saved in `out`.
/// Moves `plan.mvq` to the given quantizer's layer.
fn mvq_quantizer(
    run: &Run,
    plan: &mut fedhubert_distill::LayerPlan,
    quantizer: Option<&Path>,
    quantizer_report: &mut Option<QuantizerReport>,
) -> anyhow::Result<Quantizer> {
    let (rf, out, teacher) = (run.rf, run.out, &run.setup.teacher);
    let d = &rf.distillation;
    let seed = rf.federated.run.seed;
    Ok(match quantizer {
        Some(p) => {
            let qz = Quantizer::load(p)?;
            if qz.layer != plan.mvq {
                println!(
                    "quantizer {} encodes teacher layer {}; distillation.mvq.layer follows it",
                    p.display(),
                    qz.layer
                );
                plan.mvq = qz.layer;
            }
            if qz.num_codebooks() != d.mvq.num_codebooks {
                println!(
                    "quantizer {} has {} codebooks; the student's head follows it",
                    p.display(),
                    qz.num_codebooks()
                );
            }
            qz
        }
        None => {
            let set = d.server_set.clone().context("distillation.server_set: mvq mode needs --quantizer FILE or a server-side set (--server-set DIR) to train one on")?;
            let (qz, rep) = train_quantizer(teacher, &set, rf, plan.mvq, seed)?;
            qz.save(&out.join("quantizer.safetensors"))?;
            *quantizer_report = Some(rep);
            qz
        }
    })
}

/// Client and MVQ modes: every client distils from its own teacher copy.
fn run_clients(
    run: Run,
    mode: Mode,
    quantizer: Option<&Path>,
    on_round: impl Fn(&RoundRecord),
) -> anyhow::Result<Trained> {
    let mut plan = run.setup.plan.clone();
    let mut quantizer_report = None;
    let mut q = None;
    if mode == Mode::Mvq {
        let quant = mvq_quantizer(&run, &mut plan, quantizer, &mut quantizer_report)?;
        q = Some(Arc::new(quant));
    }
    let Run {
        rf,
        setup,
        dirs,
        out,
        dev,
        resume,
        base,
        run_cfg,
        train_cfg,
        strategy_cfg,
    } = run;
    let (d, seed, teacher) = (&rf.distillation, rf.federated.run.seed, &setup.teacher);
    let student = setup.student.clone();
    let books = q.as_ref().map(|q| q.num_codebooks());
    let (feat, pred) = if mode == Mode::Mvq {
        (false, false)
    } else {
        (d.feature_weight > 0.0, d.pred_weight > 0.0)
    };
    let ds = DistillStudent::new(
        student,
        teacher.hidden_size(),
        &plan,
        feat,
        pred,
        books,
        seed,
    );
    let aux = ds.aux_weights().num_params();
    let initial: Weights = ds.weights();
    let parts = DistillParts {
        teacher: teacher.clone(),
        cfg: d.clone(),
        mode,
        plan: plan.clone(),
        quantizer: q,
        train: train_cfg.clone(),
    };
    let mut pool = DistillClients::new(
        dirs.clone(),
        ds.clone(),
        parts,
        base.sim_config(),
        dev.clone(),
    );
    let res = fedhubert_fl::run(
        &mut pool,
        strategy_cfg.build()?,
        initial,
        &run_cfg,
        Some(out),
        resume,
        on_round,
    )?;
    Ok(Trained {
        student: ds.set_weights(&res.weights)?.student,
        aux_params: aux,
        history: res.history,
        server_log: None,
        quantizer_report,
    })
}

/// Saves the student (checkpoint and HF export), `summary.json` and the curves.
fn finish(
    rf: &DistillRunFile,
    mode: Mode,
    setup: &DistillSetup,
    trained: Trained,
    owners: &[PathBuf],
    out: &Path,
    t0: Instant,
) -> anyhow::Result<DistillOutcome> {
    let Trained {
        student: final_student,
        aux_params,
        history,
        server_log,
        quantizer_report,
    } = trained;
    final_student.save_checkpoint(out.join("student.safetensors"))?;
    final_student.save_hf(out.join("hf"))?;
    let title = format!("HuBERT student distilled federatedly ({mode:?} mode, fedhubert)");
    fedhubert_train::ModelCard {
        title: &title,
        config_yaml: &rf.to_yaml()?,
        strategy: rf.federated.strategy.name(),
        data: fedhubert_train::CardData::Partitions(owners),
        history: &history,
        run_dir: out,
    }
    .write(&out.join("hf"))?;
    let mut summary = setup.summary(
        rf,
        mode,
        &final_student,
        aux_params,
        &history,
        server_log.as_deref(),
        out,
    )?;
    summary["quantizer"] = serde_json::to_value(&quantizer_report)?;
    summary["wall_time_s"] = t0.elapsed().as_secs_f64().into();
    write_json(&out.join("summary.json"), &summary)?;
    let server_series = server_log
        .iter()
        .flat_map(|log| {
            [
                (
                    "server KD loss, first step",
                    "#9467bd",
                    log.iter().map(|r| (r.round as f64, r.first.loss)).collect(),
                ),
                (
                    "server KD loss, last step",
                    "#ff7f0e",
                    log.iter().map(|r| (r.round as f64, r.last.loss)).collect(),
                ),
            ]
        })
        .collect();
    crate::plot::curves_with(
        &history,
        server_series,
        &format!("fedhubert distillation ({mode:?})"),
        &out.join("curves.png"),
    )?;
    serde_json::from_value(summary).context("reading back the distillation summary")
}
