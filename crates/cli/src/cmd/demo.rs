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
            args.num_clients.to_string(),
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
        let mut set = vec![
            format!("pretraining.vocab_size={k}"),
            format!("federated.seed={}", args.seed),
        ];
        if args.quick {
            set.extend([
                "federated.num_rounds=2".to_string(),
                "pretraining.local_steps=3".to_string(),
            ]);
        }
        let rf = fedhubert_train::RunFile::load(Some(&config), &set)?;
        let dev = super::pretrain::device("cpu")?;
        super::pretrain::federated(&parts, &out.join("pretrain"), &rf, &dev, false)
    })?;

    println!(
        "\n== fedhubert demo summary ({:.1} s)",
        t_all.elapsed().as_secs_f64()
    );
    println!(
        "data: {} utterances, {:.2} h, {} clients",
        prep["utterances"],
        prep["hours"].as_f64().unwrap_or(0.0),
        prep["clients"]
    );
    println!(
        "pretrain: {} rounds, train loss {} -> {}, eval loss {}, eval masked acc {}, {} params, traffic up {:.1} MB / down {:.1} MB",
        pre["rounds"],
        fmt(&pre["first_round_train_loss"]),
        fmt(&pre["final_train_loss"]),
        fmt(&pre["final_eval_loss"]),
        fmt(&pre["final_eval_acc_masked"]),
        pre["parameters"],
        pre["bytes_up"].as_f64().unwrap_or(0.0) / 1e6,
        pre["bytes_down"].as_f64().unwrap_or(0.0) / 1e6
    );
    println!("{:<10} {:>9} {}", "stage", "time (s)", "");
    for (name, t, how) in &st.rows {
        println!("{name:<10} {t:>9.1} {how}");
    }
    if pre["final_train_loss"].is_null() {
        bail!("pretraining produced no loss");
    }
    Ok(())
}

fn fmt(v: &serde_json::Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.4}"))
        .unwrap_or_else(|| "-".into())
}
