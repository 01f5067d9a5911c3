//! `fedhubert demo`: the whole pipeline on the bundled LibriSpeech sample, stage by stage.
//! Each finished stage leaves `STAGE.done.json`; a rerun skips it (delete the file or pass
//! `--fresh` to redo). A failing stage is named with its cause.
//!
//! Every stage calls a subcommand's library function with a typed request and keeps its typed
//! outcome; nothing here builds command lines or reads results back by JSON key.

mod report;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use fedhubert_distill::DistillRunFile;
use fedhubert_distill::config::Mode;
use fedhubert_eval::{AcousticFeature, UpstreamSpec};
use fedhubert_features::ExtractOptions;
use fedhubert_model::HubertConfig;
use fedhubert_train::RunFile;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::distill::{DistillOutcome, DistillRequest, distill};
use super::features::{FeatureKind, FeaturesInput, FeaturesRequest, features};
use super::kmeans::{KmeansRequest, KmeansSummary, ModeArg, kmeans};
use super::layers::{LayersReport, LayersRequest, layers};
use super::prepare::{
    DEFAULT_MIN_CLIENT_UTTERANCES, DEFAULT_VALID_FRACTION, PrepareRequest, prepare, print_summary,
};
use super::pretrain::{FederatedSummary, PretrainMode, PretrainOutcome, PretrainRequest, pretrain};
use super::probe::{ProbeRequest, print_report, probe};
use crate::common::{Start, bundled, device};
use fedhubert_audio::partition::{Method, PartitionConfig};
use report::{DataSummary, LayerChoice, ProbeRow, Results, StageRow, fmt, mb};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Corpus to use (default: the bundled LibriSpeech sample).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where every stage writes (partition, features, labels, models, report).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Federated clients (speaker partition).
    #[arg(long, default_value_t = 10)]
    pub num_clients: usize,
    /// Smaller and shorter: about 2 minutes on 2 cores (used by the tests).
    #[arg(long)]
    pub quick: bool,
    /// Pretraining run configuration (default: configs/tiny.yaml's settings).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Federated pretraining rounds (default 20, `--quick` 2; overrides the config's num_rounds).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Distillation run configuration (default: configs/tiny_student.yaml).
    #[arg(long)]
    pub distill_config: Option<PathBuf>,
    /// Redo every stage even if it finished before.
    #[arg(long)]
    pub fresh: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// HuBERT iterations: 1 (MFCC targets), or 2 (then the per-layer report of the iteration-1
    /// teacher in OUT/layers, k-means of its middle layer, 50 Hz labels, and a second teacher
    /// pretrained on them from scratch, as fairseq's recipe).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub iterations: u8,
}

/// The features stage's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct FeaturesDone {
    clients: usize,
}

/// A stage marker: `STAGE.done.json`.
#[derive(Deserialize)]
struct Marker<T> {
    #[serde(default)]
    time_s: f64,
    result: T,
}

struct Stages {
    out: PathBuf,
    fresh: bool,
    rows: Vec<StageRow>,
}

impl Stages {
    /// Runs `f` unless the stage finished before; records its time and one-line result.
    fn run<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let marker = self.out.join(format!("{name}.done.json"));
        if !self.fresh && marker.is_file() {
            let v: Marker<T> = serde_json::from_str(&std::fs::read_to_string(&marker)?)
                .with_context(|| {
                    format!("reading {} (delete it to redo the stage)", marker.display())
                })?;
            println!(
                "== stage {name}: already done (delete {} to redo)",
                marker.display()
            );
            self.rows
                .push((name.to_string(), v.time_s, "cached".into()));
            return Ok(v.result);
        }
        println!("== stage {name}");
        let t0 = Instant::now();
        let result = f().with_context(|| format!("demo stage `{name}` failed"))?;
        let time_s = t0.elapsed().as_secs_f64();
        let v = serde_json::json!({"time_s": time_s, "result": serde_json::to_value(&result)?});
        fedhubert_fl::atomic_write(&marker, serde_json::to_string_pretty(&v)?.as_bytes())?;
        self.rows.push((name.to_string(), time_s, "ran".into()));
        Ok(result)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let data = match &args.data {
        Some(d) => d.clone(),
        None => bundled("assets/librispeech-sample")?,
    };
    let out = args.out.clone();
    let _lock = crate::common::FolderLock::acquire(&out, "demo")?;
    let mut st = Stages {
        out: out.clone(),
        fresh: args.fresh,
        rows: vec![],
    };
    let t_all = Instant::now();
    let k = if args.quick { 50 } else { 100 };
    let data = st.run("prepare", || prepare_stage(&args, data))?;
    st.run("features", || features_stage(&args))?;
    st.run("kmeans", || kmeans_stage(&args, k))?;
    let pre = st.run("pretrain", || pretrain_stage(&args, k))?;
    let dis = st.run("distill", || distill_stage(&args))?;
    let mut probes = probe_stages(&args, &mut st)?;
    let mut layer_choice = None;
    if args.iterations == 2 {
        let (row, choice) = iteration_two(&args, &mut st, k)?;
        probes.push(("teacher-it2", row));
        layer_choice = Some(choice);
    }
    let r = Results {
        data,
        pretrain: pre,
        distill: dis,
        probes,
        layers: layer_choice,
    };
    let total_s = t_all.elapsed().as_secs_f64();
    let report = out.join("report");
    report::write_report(&report, &out, &r, &st.rows).context("demo stage `report` failed")?;
    print_summary_table(&args, &r, &st.rows, total_s);
    println!("report: {}", report.join("report.md").display());
    if !r.pretrain.final_train_loss.is_some_and(f64::is_finite) {
        bail!("pretraining produced no loss");
    }
    Ok(())
}

fn partition_dir(args: &Args) -> PathBuf {
    args.out.join("partition")
}

/// The partition: one more speaker group than clients, the extra one the server-side set.
fn prepare_request(args: &Args, data: PathBuf) -> PrepareRequest {
    PrepareRequest {
        data,
        root: None,
        manifest_options: Default::default(),
        out: partition_dir(args),
        config: PartitionConfig {
            method: Method::Speaker,
            // One more speaker group than clients: the server-side distillation set.
            num_clients: args.num_clients + 1,
            seed: args.seed,
            valid_fraction: DEFAULT_VALID_FRACTION,
            min_client_utterances: DEFAULT_MIN_CLIENT_UTTERANCES,
        },
        skip_bad: false,
    }
}

fn prepare_stage(args: &Args, data: PathBuf) -> anyhow::Result<DataSummary> {
    let req = prepare_request(args, data);
    let summary = prepare(&req)?;
    print_summary(&summary, &req.out);
    Ok(DataSummary {
        utterances: summary.total_utterances,
        hours: summary.total_hours,
        clients: summary.clients.len(),
    })
}

fn features_request(args: &Args) -> FeaturesRequest {
    FeaturesRequest {
        input: FeaturesInput::Clients(partition_dir(args)),
        root: None,
        manifest_options: Default::default(),
        options: ExtractOptions::default(),
        kind: FeatureKind::Mfcc,
    }
}

fn features_stage(args: &Args) -> anyhow::Result<FeaturesDone> {
    features(&features_request(args))?.print();
    Ok(FeaturesDone {
        clients: args.num_clients,
    })
}

fn kmeans_stage(args: &Args, k: usize) -> anyhow::Result<KmeansSummary> {
    let req = KmeansRequest::new(
        partition_dir(args),
        ModeArg::Federated,
        k,
        args.out.join("kmeans"),
        args.seed,
    );
    let summary = kmeans(&req)?;
    summary.print(&req);
    Ok(summary)
}

fn pretrain_stage(args: &Args, k: usize) -> anyhow::Result<FederatedSummary> {
    pretrain_on(args, k, &[], "pretrain")
}

/// Federated pretraining on the partition's labels (`extra` overrides: another label set),
/// into `out/NAME`.
fn pretrain_on(
    args: &Args,
    k: usize,
    extra: &[String],
    name: &str,
) -> anyhow::Result<FederatedSummary> {
    let config = match &args.config {
        Some(c) => c.clone(),
        None => bundled("configs/tiny.yaml")?,
    };
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 20 });
    let mut set = vec![
        format!("pretraining.vocab_size={k}"),
        format!("federated.seed={}", args.seed),
        format!("federated.num_clients={}", args.num_clients),
        format!("federated.num_rounds={rounds}"),
    ];
    if args.quick {
        set.push("pretraining.local_steps=3".to_string());
    }
    set.extend(extra.iter().cloned());
    let rf = RunFile::load(Some(&config), &set)?;
    let req = PretrainRequest {
        mode: PretrainMode::Federated,
        clients: partition_dir(args),
        out: args.out.join(name),
        steps: 0,
        // The stage did not finish (it has no marker): whatever it left is redone.
        start: Start::Overwrite,
        heldout: None,
        init: None,
        run_file: rf,
        device: device("cpu")?,
    };
    match pretrain(&req)? {
        PretrainOutcome::Federated(summary) => Ok(summary),
        PretrainOutcome::Centralized(_) => bail!("a federated request ran centralized"),
    }
}

fn distill_stage(args: &Args) -> anyhow::Result<DistillOutcome> {
    let parts = partition_dir(args);
    let teacher_ckpt = args.out.join("pretrain/model.safetensors");
    let server_set = parts.join(format!("client_{}", args.num_clients));
    let config = match &args.distill_config {
        Some(c) => c.clone(),
        None => bundled("configs/tiny_student.yaml")?,
    };
    let mut set = vec![
        format!("federated.seed={}", args.seed),
        format!("federated.num_clients={}", args.num_clients),
    ];
    if args.quick {
        set.extend([
            "federated.num_rounds=2".to_string(),
            "pretraining.local_steps=3".to_string(),
            "distillation.server_steps=3".to_string(),
        ]);
    }
    let mut rf = DistillRunFile::load(Some(&config), &set)?;
    rf.distillation.teacher = Some(teacher_ckpt);
    rf.distillation.server_set = Some(server_set.clone());
    println!(
        "server-side set: {} (speakers no client holds)",
        server_set.display()
    );
    let req = DistillRequest {
        mode: Mode::Server,
        run_file: rf,
        clients: parts,
        out: args.out.join("distill"),
        quantizer: None,
        device: device("cpu")?,
        // The stage did not finish (it has no marker): whatever it left is redone.
        start: Start::Overwrite,
    };
    distill(&req)
}

/// The 5-fold speech-commands probe of `upstream` (report in `dir`, printed): a demo row.
fn probe_row(
    args: &Args,
    upstream: UpstreamSpec,
    commands: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<ProbeRow> {
    let mut req = ProbeRequest::new(
        upstream,
        commands.to_path_buf(),
        dir.to_path_buf(),
        args.seed,
    );
    req.config.folds = 5;
    let r = probe(&req)?;
    print_report(&r, dir);
    Ok(ProbeRow::from(&r))
}

/// The teacher, the student, the teacher's architecture untrained and the MFCC features the
/// k-means clusters (the baselines pretraining must beat), each probed on the bundled speech
/// commands.
fn probe_stages(args: &Args, st: &mut Stages) -> anyhow::Result<Vec<(&'static str, ProbeRow)>> {
    let commands = bundled("assets/speech-commands-sample")?;
    let out = &args.out;
    let mut probes = Vec::new();
    for name in ["teacher", "student", "random", "mfcc"] {
        let dir = out.join("probe").join(name);
        let row = st.run(&format!("probe-{name}"), || {
            let upstream = match name {
                "teacher" => UpstreamSpec::HfDir(out.join("pretrain/hf")),
                "student" => UpstreamSpec::HfDir(out.join("distill/hf")),
                "mfcc" => UpstreamSpec::Acoustic(AcousticFeature::Mfcc),
                _ => {
                    let cfg = out.join("pretrain/hf/config.json");
                    UpstreamSpec::Random {
                        config: HubertConfig::from_json_file(&cfg)
                            .with_context(|| format!("--config {}", cfg.display()))?,
                        seed: args.seed,
                    }
                }
            };
            probe_row(args, upstream, &commands, &dir)
        })?;
        probes.push((name, row));
    }
    Ok(probes)
}

/// `fedhubert layers` on the iteration-1 teacher, into `out/layers`: every layer's federated
/// k-means inertia and probe accuracy, which explain the layer iteration 2 takes (they do not
/// choose it). `--quick`: k = 20 on half of each client's utterances, 3 folds.
fn layers_stage(args: &Args, teacher: &std::path::Path, k: usize) -> anyhow::Result<LayersReport> {
    let (k, percent, folds) = if args.quick {
        (20, 0.5, 3)
    } else {
        (k, 1.0, 5)
    };
    let mut req = LayersRequest::new(
        teacher.to_path_buf(),
        partition_dir(args),
        k,
        args.out.join("layers"),
        args.seed,
    );
    req.percent = percent;
    req.probe = Some((bundled("assets/speech-commands-sample")?, folds));
    let r = layers(&req)?;
    super::layers::print_table(&r);
    println!("{}", super::layers::verdict(&r));
    Ok(r)
}

/// HuBERT's second iteration on the demo's partition: the layer report of the iteration-1
/// teacher, layer features of it (its middle layer: fairseq takes layer 6 of Base's 12),
/// federated k-means on them into `km2` labels at the teacher's 50 Hz, a second teacher
/// pretrained from scratch on those (`label_rate: 50`), and its speech-commands probe.
fn iteration_two(
    args: &Args,
    st: &mut Stages,
    k: usize,
) -> anyhow::Result<(ProbeRow, LayerChoice)> {
    let out = &args.out;
    let teacher = out.join("pretrain/model.safetensors");
    let cfg = HubertConfig::from_json_file(out.join("pretrain/hf/config.json"))?;
    let layer = (cfg.num_hidden_layers / 2).max(1);
    let feature = fedhubert_eval::layer_feature_stem(layer);
    let report = st.run("layers", || layers_stage(args, &teacher, k))?;
    st.run("features-it2", || {
        let mut req = features_request(args);
        req.kind = FeatureKind::Layer {
            model: teacher.clone(),
            layer,
            chunk_samples: fedhubert_eval::DEFAULT_CHUNK_SAMPLES,
        };
        features(&req)?.print();
        Ok(FeaturesDone {
            clients: args.num_clients,
        })
    })?;
    st.run("kmeans-it2", || {
        let mut req = KmeansRequest::new(
            partition_dir(args),
            ModeArg::Federated,
            k,
            out.join("kmeans2"),
            args.seed,
        );
        req.feature = feature.clone();
        req.labels = "km2".into();
        let summary = kmeans(&req)?;
        summary.print(&req);
        Ok(summary)
    })?;
    let rate = 16_000.0 / cfg.total_stride() as f64;
    let extra = [
        "pretraining.label_stem=km2".to_string(),
        format!("pretraining.label_rate={rate}"),
    ];
    st.run("pretrain-it2", || pretrain_on(args, k, &extra, "pretrain2"))?;
    let commands = bundled("assets/speech-commands-sample")?;
    let dir = out.join("probe").join("teacher-it2");
    let row = st.run("probe-teacher-it2", || {
        let upstream = UpstreamSpec::HfDir(out.join("pretrain2/hf"));
        probe_row(args, upstream, &commands, &dir)
    })?;
    Ok((
        row,
        LayerChoice {
            report,
            chosen: layer,
        },
    ))
}

fn print_summary_table(args: &Args, r: &Results, rows: &[StageRow], total_s: f64) {
    let (pre, dis, probe0) = (&r.pretrain, &r.distill, &r.probes[0].1);
    println!("\n== fedhubert demo summary ({total_s:.1} s)");
    println!(
        "data: {} utterances, {:.2} h; {} federated clients + 1 server-side set; {} test speech-command clips",
        r.data.utterances, r.data.hours, args.num_clients, probe0.test_clips
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "model", "params", "loss 1st", "loss last", "up MB", "down MB"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12.1} {:>12.1}",
        "teacher (federated MLM)",
        pre.parameters.to_string(),
        fmt(pre.first_round_train_loss),
        fmt(pre.final_train_loss),
        mb(pre.bytes_up),
        mb(pre.bytes_down)
    );
    let (first, last) = dis.server_losses();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12.1} {:>12.1}",
        "student (server-side KD)",
        dis.student_parameters_with_head.to_string(),
        fmt(first),
        fmt(last),
        mb(dis.bytes_up),
        mb(dis.bytes_down)
    );
    println!(
        "\nspeech commands ({} classes), frozen upstream + weighted layer sum + linear head:",
        probe0.classes
    );
    for (name, r) in &r.probes {
        println!(
            "  {name:<8} 5-fold accuracy {} (+- {} over folds)  single split: test {} valid {}",
            fmt(r.cv_accuracy),
            fmt(r.cv_fold_std),
            fmt(r.test_accuracy),
            fmt(r.valid_accuracy)
        );
    }
    if let Some(c) = &r.layers {
        println!(
            "\nlayer report of the iteration-1 teacher -> {}",
            args.out.join("layers/layers.md").display()
        );
        super::layers::print_table(&c.report);
        println!(
            "{} This demo's iteration 2 clusters layer {} (the middle one).",
            super::layers::verdict(&c.report),
            c.chosen
        );
    }
    println!("\n{:<16} {:>9}", "stage", "time (s)");
    for (name, t, how) in rows {
        println!("{name:<16} {t:>9.1} {how}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::parse_args;

    /// The demo's requests are what the same command lines would make.
    #[test]
    fn requests_match_the_command_line() {
        let args: Args = parse_args(&["--num-clients", "4", "--seed", "7"]);
        let prep: super::super::prepare::Args = parse_args(&[
            "--data",
            "corpus",
            "--out",
            "runs/demo/partition",
            "--num-clients",
            "5",
            "--partition",
            "speaker",
            "--seed",
            "7",
        ]);
        assert_eq!(
            format!("{:?}", prepare_request(&args, "corpus".into())),
            format!("{:?}", PrepareRequest::from(&prep))
        );
        let feat: super::super::features::Args = parse_args(&["--clients", "runs/demo/partition"]);
        assert_eq!(
            format!("{:?}", features_request(&args)),
            format!("{:?}", FeaturesRequest::try_from(&feat).unwrap())
        );
    }
}
