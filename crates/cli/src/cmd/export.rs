//! `fedhubert export`: a checkpoint to a HuggingFace `HubertModel` directory that
//! `HubertModel.from_pretrained(DIR)` and s3prl's `hf_hubert_custom` load with no missing or
//! unexpected keys. The export is read back and compared tensor by tensor before we report success.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedhubert_eval::{UpstreamSpec, load_upstream};
use fedhubert_model::{HubertConfig, HubertForPretraining, HubertModel, collect_tensors};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A fedhubert checkpoint: `model.safetensors` of `pretrain`, `student.safetensors` of
    /// `distill`, or a trainer checkpoint (`trainer.safetensors` of `pretrain --centralized`);
    /// or a published one (fairseq, torchaudio, s3prl), as `fedhubert import` converts.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory: config.json, model.safetensors, preprocessor_config.json (and the
    /// pretraining head beside them when the checkpoint has one).
    #[arg(long)]
    pub out: PathBuf,
}

/// The export written and checked.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ExportOutcome {
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    /// Encoder tensors written (and read back bit-exact).
    pub tensors: usize,
}

impl ExportOutcome {
    pub fn print(&self) {
        println!(
            "exported {} -> {} ({} tensors; read back bit-exact). Load it with:\n  from transformers import HubertModel; HubertModel.from_pretrained(\"{}\")",
            self.checkpoint.display(),
            self.out.display(),
            self.tensors,
            self.out.display()
        );
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    export(&args)?.print();
    Ok(())
}

/// Writes the HF directory and checks that loading it gives back the same tensors, bit for bit.
pub fn export(req: &Args) -> anyhow::Result<ExportOutcome> {
    let (checkpoint, out) = (req.checkpoint.as_path(), req.out.as_path());
    let dev = fedhubert_model::cpu_device();
    if !checkpoint.is_file() {
        bail!(
            "--checkpoint {}: no such file (expected a .safetensors checkpoint)",
            checkpoint.display()
        );
    }
    if fedhubert_model::published::is_pytorch_file(checkpoint) {
        let o = crate::cmd::import::import(checkpoint, out)?;
        return Ok(ExportOutcome {
            checkpoint: o.source,
            out: o.out,
            tensors: o.tensors,
        });
    }
    let _lock = crate::common::FolderLock::acquire(out, "export")?;
    let (_, meta) = fedhubert_model::read_safetensors(checkpoint)
        .with_context(|| format!("reading {}", checkpoint.display()))?;
    let encoder: HubertModel = if meta.get("format").map(String::as_str) == Some("fedhubert") {
        let full = HubertForPretraining::load_checkpoint(checkpoint, &dev)
            .with_context(|| format!("loading {}", checkpoint.display()))?;
        full.save_hf(out)
            .with_context(|| format!("writing {}", out.display()))?;
        full.hubert
    } else {
        let spec = UpstreamSpec::Checkpoint(checkpoint.to_path_buf());
        let m = load_upstream(&spec, &dev)
            .with_context(|| format!("loading {}", checkpoint.display()))?;
        m.save_hf(out)
            .with_context(|| format!("writing {}", out.display()))?;
        m
    };
    let tensors = verify_export(&encoder, out)?;
    write_card(checkpoint, out)?;
    Ok(ExportOutcome {
        checkpoint: checkpoint.to_path_buf(),
        out: out.to_path_buf(),
        tensors,
    })
}

/// The export's model card: the run's own when the checkpoint sits in a run folder (its
/// `config.yaml` and `metrics.jsonl` beside it), else where the checkpoint came from.
fn write_card(checkpoint: &Path, out: &Path) -> anyhow::Result<()> {
    let run = checkpoint.parent().unwrap_or(Path::new("."));
    let (config, metrics) = (run.join("config.yaml"), run.join("metrics.jsonl"));
    if !(config.is_file() && metrics.is_file()) {
        let title = "HuBERT exported by fedhubert from a checkpoint";
        return Ok(fedhubert_train::write_source_card(
            out,
            title,
            checkpoint,
            &[],
        )?);
    }
    let history = fedhubert_fl::store::read_jsonl(&metrics)?;
    let config_yaml = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    let strategy = config_yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("strategy: "))
        .unwrap_or("fedavg")
        .to_string();
    fedhubert_train::ModelCard {
        title: "HuBERT, federated training (fedhubert), exported from its run folder",
        config_yaml: &config_yaml,
        strategy: &strategy,
        data: fedhubert_train::CardData::Recorded,
        history: &history,
        run_dir: run,
    }
    .write(out)?;
    Ok(())
}

/// Reads the HF directory `out` back and checks it holds `encoder`'s config and tensors, bit
/// for bit; returns the number of tensors.
pub fn verify_export(encoder: &HubertModel, out: &Path) -> anyhow::Result<usize> {
    let back = HubertModel::from_hf_dir(out, &encoder.masked_spec_embed.device())
        .with_context(|| format!("reading back the export {}", out.display()))?;
    let cfg_back = HubertConfig::from_json_file(out.join("config.json"))?;
    if cfg_back != *encoder.config() {
        bail!(
            "{}: config.json does not read back to the checkpoint's configuration",
            out.display()
        );
    }
    let a = collect_tensors(encoder).tensors;
    let b = collect_tensors(&back).tensors;
    if a.len() != b.len() {
        bail!(
            "export round-trip: {} tensors written, {} read back",
            a.len(),
            b.len()
        );
    }
    for (ta, tb) in a.iter().zip(&b) {
        let same = ta.name == tb.name
            && ta.shape == tb.shape
            && ta
                .data
                .iter()
                .zip(&tb.data)
                .all(|(x, y)| x.to_bits() == y.to_bits());
        if !same {
            bail!(
                "export round-trip: tensor {} differs after reading {} back",
                ta.name,
                out.display()
            );
        }
    }
    Ok(a.len())
}
