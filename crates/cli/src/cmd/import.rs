//! `fedhubert import`: a published HuBERT checkpoint (fairseq `.pt`, torchaudio state dict,
//! s3prl converted upstream) to a HuggingFace `HubertModel` directory, checked by reading it
//! back. Every other command takes these files as they are; `import` is for the tools that
//! take only an HF directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedhubert_model::PretrainConfig;
use fedhubert_model::published::{PublishedFormat, read_published};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The checkpoint: fairseq (`hubert_base_ls960.pt`), torchaudio (`torch.save` of a
    /// `torchaudio.models.hubert_*` model's state dict) or s3prl (`convert.py` output).
    pub src: PathBuf,
    /// Output directory: config.json, model.safetensors, preprocessor_config.json, and the
    /// pretraining head beside them when the checkpoint has one; `import.json` records the
    /// source and what was assumed.
    #[arg(long)]
    pub out: PathBuf,
}

/// What `import` wrote (also `OUT/import.json`).
#[derive(Clone, Debug, Serialize)]
pub struct ImportOutcome {
    pub source: PathBuf,
    pub source_sha256: String,
    pub format: PublishedFormat,
    pub naming: String,
    pub hidden_size: usize,
    pub layers: usize,
    pub pretraining_head: bool,
    pub tensors: usize,
    pub notes: Vec<String>,
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let o = import(&args.src, &args.out)?;
    println!(
        "imported {} ({:?} layout, {} names): {} layers of {}, {} encoder tensors{} -> {} (read back bit-exact)",
        o.source.display(),
        o.format,
        o.naming,
        o.layers,
        o.hidden_size,
        o.tensors,
        if o.pretraining_head {
            " + pretraining head"
        } else {
            ""
        },
        o.out.display()
    );
    for n in &o.notes {
        println!("  note: {n}");
    }
    Ok(())
}

/// Converts `src` into the HF directory `out` and verifies the result.
pub fn import(src: &Path, out: &Path) -> anyhow::Result<ImportOutcome> {
    let p = read_published(src).with_context(|| format!("importing {}", src.display()))?;
    let _lock = crate::common::FolderLock::acquire(out, "import")?;
    let dev = fedhubert_model::cpu_device();
    let encoder = if p.has_head() {
        let (model, _) = p.for_pretraining(&PretrainConfig::default(), 0, &dev)?;
        model
            .save_hf(out)
            .with_context(|| format!("writing {}", out.display()))?;
        model.hubert
    } else {
        let model = p.encoder(&dev)?;
        model
            .save_hf(out)
            .with_context(|| format!("writing {}", out.display()))?;
        model
    };
    let tensors = crate::cmd::export::verify_export(&encoder, out)?;
    let facts: Vec<String> = std::iter::once(format!(
        "Layout {:?}, {} names; {} layers of width {}.",
        p.format,
        format!("{:?}", p.naming).to_lowercase(),
        p.config.num_hidden_layers,
        p.config.hidden_size
    ))
    .chain(p.notes.iter().map(|n| format!("Assumed: {n}")))
    .collect();
    fedhubert_train::write_source_card(
        out,
        "A published HuBERT imported by fedhubert",
        src,
        &facts,
    )?;
    let outcome = ImportOutcome {
        source: src.to_path_buf(),
        source_sha256: fedhubert_io::provenance::sha256_file(src)
            .with_context(|| format!("hashing {}", src.display()))?,
        format: p.format,
        naming: format!("{:?}", p.naming).to_lowercase(),
        hidden_size: p.config.hidden_size,
        layers: p.config.num_hidden_layers,
        pretraining_head: p.has_head(),
        tensors,
        notes: p.notes.clone(),
        out: out.to_path_buf(),
    };
    crate::common::write_json(&out.join("import.json"), &outcome)?;
    Ok(outcome)
}
