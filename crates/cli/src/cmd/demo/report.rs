//! The demo's report folder: every stage's metrics, curves, confusion matrices and HF exports,
//! `report.md` and `summary.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;

use fedhubert_eval::ProbeReport;
use serde::{Deserialize, Serialize};

use crate::cmd::distill::DistillOutcome;
use crate::cmd::layers::LayersReport;
use crate::cmd::pretrain::FederatedSummary;

/// The data stage's record: what was partitioned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataSummary {
    pub utterances: usize,
    pub hours: f64,
    /// Partitions: the federated clients and the server-side set.
    pub clients: usize,
}

/// One upstream's speech-commands probe, as the summary reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeRow {
    pub upstream: String,
    pub test_accuracy: Option<f64>,
    /// 5-fold cross-validated accuracy.
    pub cv_accuracy: Option<f64>,
    pub cv_fold_std: Option<f64>,
    pub valid_accuracy: Option<f64>,
    pub classes: usize,
    pub test_clips: usize,
    pub majority_baseline: Option<f64>,
}

impl From<&ProbeReport> for ProbeRow {
    fn from(r: &ProbeReport) -> Self {
        let cv = r.cross_validation.as_ref();
        Self {
            upstream: r.upstream.clone(),
            test_accuracy: Some(r.test_accuracy),
            cv_accuracy: cv.map(|c| c.accuracy),
            cv_fold_std: cv.map(|c| c.fold_std),
            valid_accuracy: Some(r.valid_accuracy),
            classes: r.classes.len(),
            test_clips: r.split.clips[2],
            majority_baseline: Some(r.majority_baseline),
        }
    }
}

/// A stage's row in the summary: name, seconds, `ran` or `cached`.
pub type StageRow = (String, f64, String);

/// What the stages leave for the summary and the report.
pub struct Results {
    pub data: DataSummary,
    pub pretrain: FederatedSummary,
    pub distill: DistillOutcome,
    pub probes: Vec<(&'static str, ProbeRow)>,
    /// Iteration 2: the layer report of the iteration-1 teacher and the layer taken.
    pub layers: Option<LayerChoice>,
}

/// The layer report of the iteration-1 teacher and the layer iteration 2 clusters.
#[derive(Clone, Debug, Serialize)]
pub struct LayerChoice {
    pub report: LayersReport,
    pub chosen: usize,
}

impl LayerChoice {
    /// `k = 20, 50 % of the utterances, 3-fold probe`.
    pub fn settings(&self) -> String {
        let r = &self.report;
        format!(
            "k = {}, {} % of the utterances, {}-fold probe",
            r.k,
            r.percent * 100.0,
            r.folds.unwrap_or(0)
        )
    }
}

pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Four decimals, or `-` for a missing or non-finite number.
pub fn fmt(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.4}"))
        .unwrap_or_else(|| "-".into())
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
pub fn write_report(
    report: &Path,
    out: &Path,
    r: &Results,
    rows: &[StageRow],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(report).with_context(|| format!("creating {}", report.display()))?;
    copy_outputs(report, out, r)?;
    fedhubert_fl::atomic_write(&report.join("report.md"), markdown(r, rows).as_bytes())?;
    let summary = serde_json::json!({
        "data": r.data, "pretrain": r.pretrain, "distill": r.distill,
        "probe": r.probes.iter().map(|(n, p)| (n.to_string(), p)).collect::<BTreeMap<_, _>>(),
        "layers": r.layers,
        "stages": rows.iter().map(|(n, t, h)| serde_json::json!({"stage": n, "time_s": t, "how": h})).collect::<Vec<_>>(),
    });
    fedhubert_fl::atomic_write(
        &report.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(())
}

/// Copies what the stages wrote into the report folder.
fn copy_outputs(report: &Path, out: &Path, r: &Results) -> anyhow::Result<()> {
    for (stage, dir) in [("pretrain", "pretrain"), ("distill", "distill")] {
        let d = out.join(dir);
        for (file, stem, ext) in [
            ("metrics.jsonl", "metrics", "jsonl"),
            ("curves.png", "curves", "png"),
            ("curves.svg", "curves", "svg"),
            ("summary.json", "summary", "json"),
        ] {
            copy_if(&d.join(file), &report.join(format!("{stage}_{stem}.{ext}")))?;
        }
    }
    copy_if(
        &out.join("distill/server_distill.jsonl"),
        &report.join("server_distill.jsonl"),
    )?;
    copy_dir(&out.join("pretrain/hf"), &report.join("hf/teacher"))?;
    copy_dir(&out.join("distill/hf"), &report.join("hf/student"))?;
    copy_if(&out.join("layers/layers.json"), &report.join("layers.json"))?;
    copy_if(&out.join("layers/layers.md"), &report.join("layers.md"))?;
    for (name, _) in &r.probes {
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
    Ok(())
}

/// Whether the teacher beats its random-init baseline, cross-validated.
fn verdict(t: f64, r: f64, mfcc: f64) -> String {
    let random = if t > r {
        format!(
            "Cross-validated, the federated-pretrained teacher beats its random-init baseline by {:.1} points",
            (t - r) * 100.0
        )
    } else {
        format!(
            "Cross-validated, the federated-pretrained teacher does NOT beat its random-init baseline here ({:.1} points behind)",
            (r - t) * 100.0
        )
    };
    let acoustic = if t > mfcc {
        format!(
            "and the plain MFCC features by {:.1} points.",
            (t - mfcc) * 100.0
        )
    } else {
        format!(
            "and does NOT beat the plain MFCC features ({:.1} points behind): this run pretrains a tiny model for a few minutes on 6 minutes of audio, far from enough to learn features better than the acoustics it is trained to predict; scale up with --config.",
            (mfcc - t) * 100.0
        )
    };
    format!("{random}, {acoustic}")
}

/// `report.md`'s data and models sections.
fn models_md(r: &Results) -> String {
    let (prep, pre, dis) = (&r.data, &r.pretrain, &r.distill);
    let mut md = String::new();
    md += "# fedhubert demo report\n\n";
    md += &format!(
        "Data: {} LibriSpeech utterances ({:.2} h), {} speaker partitions ({} federated clients + 1 server-side set); downstream: the bundled Speech Commands clips (CC BY 4.0).\n\n",
        prep.utterances,
        prep.hours,
        prep.clients,
        prep.clients.saturating_sub(1)
    );
    md += "## Models\n\n| model | parameters | first-round loss | last-round loss | traffic up (MB) | traffic down (MB) |\n|---|---:|---:|---:|---:|---:|\n";
    md += &format!(
        "| teacher: federated masked prediction ({} rounds) | {} | {} | {} | {:.1} | {:.1} |\n",
        pre.rounds,
        pre.parameters,
        fmt(pre.first_round_train_loss),
        fmt(pre.final_train_loss),
        mb(pre.bytes_up),
        mb(pre.bytes_down)
    );
    let (first, last) = dis.server_losses();
    md += &format!(
        "| student: server-side distillation ({} rounds; server loss) | {} | {} | {} | {:.1} | {:.1} |\n\n",
        dis.rounds,
        dis.student_parameters_with_head,
        fmt(first),
        fmt(last),
        mb(dis.bytes_up),
        mb(dis.bytes_down)
    );
    md += &format!(
        "Teacher eval (clients' validation sets, last round): loss {}, masked accuracy {}.\n\n",
        fmt(pre.final_eval_loss),
        fmt(pre.final_eval_acc_masked)
    );
    md += "![pretraining curves](pretrain_curves.png)\n\n![distillation curves](distill_curves.png)\n\n";
    md
}

/// `report.md`: data, models, the speech-commands probes and the stages.
fn markdown(r: &Results, rows: &[StageRow]) -> String {
    let probes = &r.probes;
    let acc = |name: &str| {
        probes
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, r)| r.cv_accuracy)
            .unwrap_or(f64::NAN)
    };
    let (t, st, rnd, mfcc) = (acc("teacher"), acc("student"), acc("random"), acc("mfcc"));
    let probe0 = &probes[0].1;
    let mut md = models_md(r);
    md += &format!(
        "## Downstream: speech commands\n\nFrozen upstream, softmax-weighted sum of all hidden layers, mean pooling, linear classifier. 5-fold speaker-disjoint cross-validation (every clip tested once, by a head that never heard its speaker); chance is {:.3}. The single 70/15/15 split's test set has only {} clips, so its accuracy moves by {:.1} points per clip.\n\n| upstream | 5-fold accuracy | fold std | single-split test | single-split valid | majority baseline |\n|---|---:|---:|---:|---:|---:|\n",
        1.0 / probe0.classes as f64,
        probe0.test_clips,
        100.0 / probe0.test_clips as f64
    );
    for (name, r) in probes {
        md += &format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            fmt(r.cv_accuracy),
            fmt(r.cv_fold_std),
            fmt(r.test_accuracy),
            fmt(r.valid_accuracy),
            fmt(r.majority_baseline)
        );
    }
    md += &format!("\n{} Student: {:.3}.\n\n", verdict(t, rnd, mfcc), st);
    for (name, _) in probes {
        md += &format!("![{name} confusion](probe_{name}_confusion.png) ");
    }
    if let Some(c) = &r.layers {
        md += &format!(
            "\n\n## Choosing the layer (iteration 2)\n\n`fedhubert layers` on the iteration-1 teacher ({}); iteration 2 clusters layer {} (`layers.json`).\n\n{}",
            c.settings(),
            c.chosen,
            crate::cmd::layers::markdown(&c.report).trim_end()
        );
    }
    md += "\n\n## Stages\n\n| stage | time (s) | |\n|---|---:|---|\n";
    for (name, t, how) in rows {
        md += &format!("| {name} | {t:.1} | {how} |\n");
    }
    md += "\nThe exported HuggingFace models are in `hf/teacher` and `hf/student` (`HubertModel.from_pretrained(DIR)`).\n";
    md
}
