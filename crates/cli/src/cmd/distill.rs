//! `fedhubert distill`: federated knowledge distillation of a frozen teacher into a student, in
//! three modes on the same engine: `server` (clients pretrain, the server distils after each
//! aggregation on a server-side set), `client` (every client distils from its own teacher copy)
//! and `mvq` (clients predict multi-codebook VQ indexes of the teacher's embeddings).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fedhubert_distill::config::Mode;
use fedhubert_distill::data::load_audio_dir;
use fedhubert_distill::setup::{read_server_log, write_server_log};
use fedhubert_distill::student::{DistillStudent, hubert_param_count};
use fedhubert_distill::{
    DistillClients, DistillRunFile, DistillSetup, Quantizer, QuantizerReport, Teacher,
};
use fedhubert_fl::store::checkpoint_path;
use fedhubert_fl::{RoundRecord, Weights};
use fedhubert_model::{Device, load_tensors};
use fedhubert_train::HubertClients;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// server (seed 000), client (seed 001) or mvq (seed 004).
    #[arg(long)]
    pub mode: Mode,
    /// YAML with `federated:`, `pretraining:` (the student; preset defaults to `student`, 384/3) and
    /// `distillation:` sections; every key can be overridden with --set.
    #[arg(long)]
    pub config: Option<PathBuf>,
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
    pub overrides: crate::cmd::pretrain::Overrides,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
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
    let data = load_audio_dir(set, &rf.pretraining.label_stem, d.server_max_utterances)?;
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

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut rf = DistillRunFile::load(args.config.as_deref(), &args.overrides.pairs())?;
    if let Some(t) = &args.teacher {
        rf.distillation.teacher = Some(t.clone());
    }
    if let Some(s) = &args.server_set {
        rf.distillation.server_set = Some(s.clone());
    }
    let summary = distill(
        &rf,
        args.mode,
        &args.clients,
        &args.out,
        args.quantizer.as_deref(),
        &crate::cmd::pretrain::device(&args.device)?,
        args.resume,
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Runs one distillation mode end to end and writes the outputs; returns the summary.
pub fn distill(
    rf: &DistillRunFile,
    mode: Mode,
    clients: &Path,
    out: &Path,
    quantizer: Option<&Path>,
    dev: &Device,
    resume: bool,
) -> anyhow::Result<serde_json::Value> {
    let t0 = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let d = rf.distillation.clone();
    let seed = rf.federated.run.seed;
    if d.teacher.is_none() {
        bail!("distillation.teacher: no teacher given (use --teacher PATH)");
    }
    let setup = DistillSetup::new(rf, dev)?;
    let mut dirs = crate::cmd::pretrain::client_dirs(clients)?;
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
    let student_cfg = base.model_config()?;
    for note in &setup.notes {
        println!("{note}");
    }
    let teacher = &setup.teacher;
    let (n_s, n_t) = (student_cfg.num_hidden_layers, teacher.num_layers());
    let mut plan = setup.plan.clone();
    let student = setup.student.clone();
    let student_params = hubert_param_count(&student_cfg);
    println!(
        "distillation ({mode:?}): teacher {} params ({} layers x {}), student {} encoder params ({} layers x {}), {} clients, {} rounds; layer plan {:?}",
        teacher.num_params(),
        n_t,
        teacher.hidden_size(),
        student_params,
        n_s,
        student_cfg.hidden_size,
        dirs.len(),
        rf.federated.run.num_rounds,
        plan
    );
    let run_cfg = base.run_config()?;
    let train_cfg = base.train_config()?;
    let strategy_cfg = base.strategy()?;
    let mut quantizer_report: Option<QuantizerReport> = None;
    let bar = crate::progress::bar(run_cfg.num_rounds, "rounds");
    let on_round = |r: &RoundRecord| {
        bar.set_position(r.round);
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
        bar.suspend(|| {
            println!(
                "round {:>3}: client loss {:.4}{parts} | clients {} ok, {} failed | up {:.2} MB down {:.2} MB",
                r.round,
                r.train.get("loss").copied().unwrap_or(f64::NAN),
                r.participated.len(),
                r.failures.len(),
                r.bytes_up as f64 / 1e6,
                r.bytes_down as f64 / 1e6
            )
        });
    };
    let mut server_log = None;
    let (final_student, aux_params, history) = match mode {
        Mode::Server => {
            if server_set.is_none() {
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
            server_log = Some(log);
            (load_tensors(student, res.weights)?, aux, res.history)
        }
        Mode::Client | Mode::Mvq => {
            let mut q = None;
            if mode == Mode::Mvq {
                let quant = match quantizer {
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
                        let set = server_set.context("distillation.server_set: mvq mode needs --quantizer FILE or a server-side set (--server-set DIR) to train one on")?;
                        let (qz, rep) = train_quantizer(&teacher, &set, rf, plan.mvq, seed)?;
                        qz.save(&out.join("quantizer.safetensors"))?;
                        quantizer_report = Some(rep);
                        qz
                    }
                };
                q = Some(Arc::new(quant));
            }
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
            let mut pool = DistillClients::new(
                dirs.clone(),
                ds.clone(),
                teacher.clone(),
                d.clone(),
                mode,
                plan.clone(),
                q,
                train_cfg.clone(),
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
            (ds.set_weights(&res.weights)?.student, aux, res.history)
        }
    };
    bar.finish_and_clear();
    final_student.save_checkpoint(out.join("student.safetensors"))?;
    final_student.save_hf(out.join("hf"))?;
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
    fedhubert_fl::atomic_write(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
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
    Ok(summary)
}
