//! `fedhubert demo`: the whole pipeline on the bundled LibriSpeech sample, stage by stage.
//! Each finished stage leaves `STAGE.done.json`; a rerun skips it (delete the file or pass
//! `--fresh` to redo). A failing stage is named with its cause.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;

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

struct Stages {
    out: PathBuf,
    fresh: bool,
    rows: Vec<(String, f64, String)>,
}

impl Stages {
    /// Runs `f` unless the stage finished before; records its time and one-line result.
    fn run(
        &mut self,
        name: &str,
        f: impl FnOnce() -> anyhow::Result<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let marker = self.out.join(format!("{name}.done.json"));
        if !self.fresh && marker.is_file() {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&marker)?)?;
            println!(
                "== stage {name}: already done (delete {} to redo)",
                marker.display()
            );
            self.rows.push((
                name.to_string(),
                v["time_s"].as_f64().unwrap_or(0.0),
                "cached".into(),
            ));
            return Ok(v["result"].clone());
        }
        println!("== stage {name}");
        let t0 = Instant::now();
        let result = f().with_context(|| format!("demo stage `{name}` failed"))?;
        let time_s = t0.elapsed().as_secs_f64();
        let v = serde_json::json!({"time_s": time_s, "result": result});
        fedhubert_fl::atomic_write(&marker, serde_json::to_string_pretty(&v)?.as_bytes())?;
        self.rows.push((name.to_string(), time_s, "ran".into()));
        Ok(result)
    }
}

#[derive(Parser)]
struct Wrap<A: clap::Args> {
    #[command(flatten)]
    a: A,
}

/// Builds a subcommand's arguments exactly as a user would type them.
fn parse<A: clap::Args>(argv: &[String]) -> anyhow::Result<A> {
    let full = std::iter::once("fedhubert".to_string()).chain(argv.iter().cloned());
    Ok(Wrap::<A>::try_parse_from(full)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .a)
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().to_string()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let data = match &args.data {
        Some(d) => d.clone(),
        None => bundled("assets/librispeech-sample")?,
    };
    let out = args.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let parts = out.join("partition");
    let mut st = Stages {
        out: out.clone(),
        fresh: args.fresh,
        rows: vec![],
    };
    let t_all = Instant::now();

    let prep = st.run("prepare", || {
        let a: super::prepare::Args = parse(&[
            "--data".into(),
            s(&data),
            "--out".into(),
            s(&parts),
            "--num-clients".into(),
            // One more speaker group than clients: the server-side distillation set.
            (args.num_clients + 1).to_string(),
            "--partition".into(),
            "speaker".into(),
            "--seed".into(),
            args.seed.to_string(),
        ])?;
        let summary = super::prepare::prepare(&a)?;
        super::prepare::print_summary(&summary, &parts);
        Ok(serde_json::json!({"utterances": summary.total_utterances, "hours": summary.total_hours, "clients": summary.clients.len()}))
    })?;

    st.run("features", || {
        super::features::run(parse(&["--clients".into(), s(&parts)])?)?;
        Ok(serde_json::json!({"clients": args.num_clients}))
    })?;

    let k = if args.quick { 50 } else { 100 };
    st.run("kmeans", || {
        super::kmeans::run(parse(&[
            "--clients".into(),
            s(&parts),
            "--mode".into(),
            "federated".into(),
            "--k".into(),
            k.to_string(),
            "--out".into(),
            s(out.join("kmeans")),
            "--seed".into(),
            args.seed.to_string(),
        ])?)?;
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("kmeans/summary.json"))?)?;
        Ok(summary)
    })?;

    let pre = st.run("pretrain", || {
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
        let rf = fedhubert_train::RunFile::load(Some(&config), &set)?;
        let dev = super::pretrain::device("cpu")?;
        super::pretrain::federated(&parts, &out.join("pretrain"), &rf, &dev, false)
    })?;

    let teacher_ckpt = out.join("pretrain/model.safetensors");
    let server_set = parts.join(format!("client_{}", args.num_clients));
    let dis = st.run("distill", || {
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
        let mut rf = fedhubert_distill::DistillRunFile::load(Some(&config), &set)?;
        rf.distillation.teacher = Some(teacher_ckpt.clone());
        rf.distillation.server_set = Some(server_set.clone());
        println!(
            "server-side set: {} (speakers no client holds)",
            server_set.display()
        );
        let dev = super::pretrain::device("cpu")?;
        super::distill::distill(
            &rf,
            fedhubert_distill::config::Mode::Server,
            &parts,
            &out.join("distill"),
            None,
            &dev,
            false,
        )
    })?;

    let commands = bundled("assets/speech-commands-sample")?;
    let mut probes = Vec::new();
    for (name, upstream) in [
        ("teacher", s(out.join("pretrain/hf"))),
        ("student", s(out.join("distill/hf"))),
        ("random", "random".to_string()),
    ] {
        let dir = out.join("probe").join(name);
        let r = st.run(&format!("probe-{name}"), || {
            let mut argv = vec![
                "--upstream".into(),
                upstream.clone(),
                "--data".into(),
                s(&commands),
                "--out".into(),
                s(&dir),
                "--seed".into(),
                args.seed.to_string(),
                "--folds".into(),
                "5".into(),
            ];
            if upstream == "random" {
                // The teacher's architecture, untrained: the baseline pretraining must beat.
                argv.extend(["--config".into(), s(out.join("pretrain/hf/config.json"))]);
            }
            super::probe::run(parse(&argv)?)?;
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("probe.json"))?)?;
            Ok(serde_json::json!({
                "upstream": r["upstream"],
                "test_accuracy": r["test_accuracy"],
                "cv_accuracy": r["cross_validation"]["accuracy"],
                "cv_fold_std": r["cross_validation"]["fold_std"],
                "valid_accuracy": r["valid_accuracy"],
                "classes": r["classes"].as_array().map(|c| c.len()),
                "test_clips": r["split"]["clips"][2],
                "majority_baseline": r["majority_baseline"],
            }))
        })?;
        probes.push((name, r));
    }

    let total_s = t_all.elapsed().as_secs_f64();
    let report = out.join("report");
    write_report(&report, &out, &prep, &pre, &dis, &probes, &st.rows)
        .context("demo stage `report` failed")?;

    println!("\n== fedhubert demo summary ({total_s:.1} s)");
    println!(
        "data: {} utterances, {:.2} h; {} federated clients + 1 server-side set; {} speech-command clips",
        prep["utterances"],
        prep["hours"].as_f64().unwrap_or(0.0),
        args.num_clients,
        probes[0].1["test_clips"]
            .as_u64()
            .map(|t| format!("{t} test"))
            .unwrap_or_default()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "model", "params", "loss 1st", "loss last", "up MB", "down MB"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12.1} {:>12.1}",
        "teacher (federated MLM)",
        pre["parameters"].to_string(),
        fmt(&pre["first_round_train_loss"]),
        fmt(&pre["final_train_loss"]),
        mb(&pre["bytes_up"]),
        mb(&pre["bytes_down"])
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12.1} {:>12.1}",
        "student (server-side KD)",
        dis["student_parameters_with_head"].to_string(),
        fmt(&dis["server_distillation"]["first_round_first_step"]["loss"]),
        fmt(&dis["server_distillation"]["last_round_last_step"]["loss"]),
        mb(&dis["bytes_up"]),
        mb(&dis["bytes_down"])
    );
    println!(
        "\nspeech commands ({} classes), frozen upstream + weighted layer sum + linear head:",
        probes[0].1["classes"]
    );
    for (name, r) in &probes {
        println!(
            "  {name:<8} 5-fold accuracy {} (+- {} over folds)  single split: test {} valid {}",
            fmt(&r["cv_accuracy"]),
            fmt(&r["cv_fold_std"]),
            fmt(&r["test_accuracy"]),
            fmt(&r["valid_accuracy"])
        );
    }
    println!("\n{:<16} {:>9}", "stage", "time (s)");
    for (name, t, how) in &st.rows {
        println!("{name:<16} {t:>9.1} {how}");
    }
    println!("report: {}", report.join("report.md").display());
    if pre["final_train_loss"].is_null() {
        bail!("pretraining produced no loss");
    }
    Ok(())
}

fn mb(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / 1e6
}

/// Copies `from` to `to` if it exists (reports keep working when a stage wrote less).
fn copy_if(from: &Path, to: &Path) -> anyhow::Result<()> {
    if from.is_file() {
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            copy_if(&e.path(), &to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// The report folder: metrics (JSONL), curves (PNG + SVG), confusion matrices, both HF exports
/// and `report.md`.
fn write_report(
    report: &Path,
    out: &Path,
    prep: &serde_json::Value,
    pre: &serde_json::Value,
    dis: &serde_json::Value,
    probes: &[(&str, serde_json::Value)],
    rows: &[(String, f64, String)],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(report).with_context(|| format!("creating {}", report.display()))?;
    for (stage, dir) in [("pretrain", "pretrain"), ("distill", "distill")] {
        let d = out.join(dir);
        copy_if(
            &d.join("metrics.jsonl"),
            &report.join(format!("{stage}_metrics.jsonl")),
        )?;
        copy_if(
            &d.join("curves.png"),
            &report.join(format!("{stage}_curves.png")),
        )?;
        copy_if(
            &d.join("curves.svg"),
            &report.join(format!("{stage}_curves.svg")),
        )?;
        copy_if(
            &d.join("summary.json"),
            &report.join(format!("{stage}_summary.json")),
        )?;
    }
    copy_if(
        &out.join("distill/server_distill.jsonl"),
        &report.join("server_distill.jsonl"),
    )?;
    copy_dir(&out.join("pretrain/hf"), &report.join("hf/teacher"))?;
    copy_dir(&out.join("distill/hf"), &report.join("hf/student"))?;
    for (name, _) in probes {
        let d = out.join("probe").join(name);
        copy_if(
            &d.join("probe.json"),
            &report.join(format!("probe_{name}.json")),
        )?;
        copy_if(
            &d.join("confusion.png"),
            &report.join(format!("probe_{name}_confusion.png")),
        )?;
    }
    let acc = |name: &str| {
        probes
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, r)| r["cv_accuracy"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let (t, st, r) = (acc("teacher"), acc("student"), acc("random"));
    let verdict = if t > r {
        format!(
            "Cross-validated, the federated-pretrained teacher beats its random-init baseline by {:.1} points.",
            (t - r) * 100.0
        )
    } else {
        format!(
            "Cross-validated, the federated-pretrained teacher does NOT beat its random-init baseline here ({:.1} points behind): this run pretrains a tiny model for a few minutes on 6 minutes of audio, far from enough to learn better-than-random features; scale up with --config.",
            (r - t) * 100.0
        )
    };
    let mut md = String::new();
    md += "# fedhubert demo report\n\n";
    md += &format!(
        "Data: {} LibriSpeech utterances ({:.2} h), {} speaker partitions ({} federated clients + 1 server-side set); downstream: the bundled Speech Commands clips (CC BY 4.0).\n\n",
        prep["utterances"],
        prep["hours"].as_f64().unwrap_or(0.0),
        prep["clients"],
        prep["clients"].as_u64().unwrap_or(1).saturating_sub(1)
    );
    md += "## Models\n\n| model | parameters | first-round loss | last-round loss | traffic up (MB) | traffic down (MB) |\n|---|---:|---:|---:|---:|---:|\n";
    md += &format!(
        "| teacher: federated masked prediction ({} rounds) | {} | {} | {} | {:.1} | {:.1} |\n",
        pre["rounds"],
        pre["parameters"],
        fmt(&pre["first_round_train_loss"]),
        fmt(&pre["final_train_loss"]),
        mb(&pre["bytes_up"]),
        mb(&pre["bytes_down"])
    );
    md += &format!(
        "| student: server-side distillation ({} rounds; server loss) | {} | {} | {} | {:.1} | {:.1} |\n\n",
        dis["rounds"],
        dis["student_parameters_with_head"],
        fmt(&dis["server_distillation"]["first_round_first_step"]["loss"]),
        fmt(&dis["server_distillation"]["last_round_last_step"]["loss"]),
        mb(&dis["bytes_up"]),
        mb(&dis["bytes_down"])
    );
    md += &format!(
        "Teacher eval (clients' validation sets, last round): loss {}, masked accuracy {}.\n\n",
        fmt(&pre["final_eval_loss"]),
        fmt(&pre["final_eval_acc_masked"])
    );
    md += "![pretraining curves](pretrain_curves.png)\n\n![distillation curves](distill_curves.png)\n\n";
    md += &format!(
        "## Downstream: speech commands\n\nFrozen upstream, softmax-weighted sum of all hidden layers, mean pooling, linear classifier. 5-fold speaker-disjoint cross-validation (every clip tested once, by a head that never heard its speaker); chance is {:.3}. The single 70/15/15 split's test set has only {} clips, so its accuracy moves by {:.1} points per clip.\n\n| upstream | 5-fold accuracy | fold std | single-split test | single-split valid | majority baseline |\n|---|---:|---:|---:|---:|---:|\n",
        1.0 / probes[0].1["classes"].as_f64().unwrap_or(1.0),
        probes[0].1["test_clips"],
        100.0 / probes[0].1["test_clips"].as_f64().unwrap_or(1.0)
    );
    for (name, r) in probes {
        md += &format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            fmt(&r["cv_accuracy"]),
            fmt(&r["cv_fold_std"]),
            fmt(&r["test_accuracy"]),
            fmt(&r["valid_accuracy"]),
            fmt(&r["majority_baseline"])
        );
    }
    md += &format!("\n{verdict} Student: {:.3}.\n\n", st);
    for (name, _) in probes {
        md += &format!("![{name} confusion](probe_{name}_confusion.png) ");
    }
    md += "\n\n## Stages\n\n| stage | time (s) | |\n|---|---:|---|\n";
    for (name, t, how) in rows {
        md += &format!("| {name} | {t:.1} | {how} |\n");
    }
    md += "\nThe exported HuggingFace models are in `hf/teacher` and `hf/student` (`HubertModel.from_pretrained(DIR)`).\n";
    fedhubert_fl::atomic_write(&report.join("report.md"), md.as_bytes())?;
    let summary = serde_json::json!({
        "data": prep, "pretrain": pre, "distill": dis,
        "probe": probes.iter().map(|(n, r)| (n.to_string(), r.clone())).collect::<serde_json::Map<_, _>>(),
        "stages": rows.iter().map(|(n, t, h)| serde_json::json!({"stage": n, "time_s": t, "how": h})).collect::<Vec<_>>(),
    });
    fedhubert_fl::atomic_write(
        &report.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(())
}

fn fmt(v: &serde_json::Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.4}"))
        .unwrap_or_else(|| "-".into())
}
