//! `fedhubert probe`: SUPERB-style downstream evaluation of an upstream (checkpoint, HF export or
//! random init) on a labelled clip folder (Speech Commands layout `WORD/*.wav`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedhubert_eval::{
    FinetuneConfig, HeadConfig, HeadKind, LoadConfig, ProbeConfig, ProbeReport, SplitConfig,
    Upstream, UpstreamSpec, load_labelled_dir, load_upstream, upstream::arch_config, write_report,
};
use fedhubert_model::{Device, HubertConfig};

use crate::common::{bundled, device};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A fedhubert checkpoint file (model.safetensors from `pretrain`), an exported HuggingFace
    /// directory, `random` (untrained, see --arch / --config), or a non-learned acoustic
    /// baseline: `mfcc` (the 39-dim MFCC k-means clusters) or `fbank` (80-dim log-mel).
    #[arg(long)]
    pub upstream: String,
    /// `speech-commands` (speaker-disjoint split from HASH_nohash_N names) or `folder` (any
    /// LABEL/*.wav folder; the split is speaker-disjoint only when names carry speaker ids).
    #[arg(long, default_value = "speech-commands")]
    pub task: String,
    /// Labelled clip folder (default: the bundled assets/speech-commands-sample).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder: probe.json, confusion.{csv,json,png}.
    #[arg(long, default_value = "runs/probe")]
    pub out: PathBuf,
    /// Maximum probe-head epochs (early stopping on validation accuracy).
    #[arg(long, default_value_t = 200)]
    pub epochs: usize,
    /// Stop after this many epochs without a better validation accuracy (0: never).
    #[arg(long, default_value_t = 50)]
    pub patience: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Head learning rate (AdamW).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Use a one-hidden-layer ReLU MLP of this width instead of a linear classifier.
    #[arg(long)]
    pub mlp: Option<usize>,
    /// After the frozen probe, fine-tune the upstream transformer + head (burn autodiff).
    #[arg(long)]
    pub finetune: bool,
    #[arg(long, default_value_t = 5)]
    pub finetune_epochs: usize,
    #[arg(long, default_value_t = 5e-5)]
    pub finetune_lr: f64,
    /// `random` upstream: architecture preset (tiny, student, base, large).
    #[arg(long, default_value = "tiny")]
    pub arch: String,
    /// `random` upstream: HF config.json (overrides --arch).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also cross-validate the frozen probe over this many folds (speaker-disjoint; every clip
    /// tested once). 0 = off.
    #[arg(long, default_value_t = 0)]
    pub folds: usize,
    /// `each`: also probe every hidden state alone and report its accuracy (`weighted`, the
    /// default: only the learned weighted sum of all layers).
    #[arg(long, value_enum, default_value = "weighted")]
    pub layers: LayersArg,
    /// Clips per upstream forward pass during extraction.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayersArg {
    Weighted,
    Each,
}

/// One probe: which upstream, on which clips, how.
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    pub upstream: UpstreamSpec,
    /// Labelled clip folder.
    pub data: PathBuf,
    /// Output folder: probe.json, confusion.{csv,json,png}.
    pub out: PathBuf,
    pub config: ProbeConfig,
    pub device: Device,
}

impl ProbeRequest {
    /// A frozen linear probe of `upstream` on `data` with the command line's defaults, `seed` for
    /// the split and the head, on the CPU.
    pub fn new(upstream: UpstreamSpec, data: PathBuf, out: PathBuf, seed: u64) -> Self {
        Self {
            config: ProbeConfig {
                upstream_name: upstream.describe(),
                split: SplitConfig {
                    seed,
                    ..Default::default()
                },
                head: HeadConfig {
                    seed,
                    ..Default::default()
                },
                ..Default::default()
            },
            upstream,
            data,
            out,
            device: fedhubert_model::cpu_device(),
        }
    }
}

impl TryFrom<&Args> for ProbeRequest {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<Self> {
        if !matches!(args.task.as_str(), "speech-commands" | "folder") {
            bail!("--task {}: expected speech-commands or folder", args.task);
        }
        let dev = device(&args.device)?;
        let data_dir = match &args.data {
            Some(d) => d.clone(),
            None => bundled("assets/speech-commands-sample")?,
        };
        let random_cfg = match &args.config {
            Some(p) => HubertConfig::from_json_file(p)
                .with_context(|| format!("--config {}", p.display()))?,
            None => arch_config(&args.arch)?,
        };
        let spec = UpstreamSpec::parse(&args.upstream, random_cfg, args.seed)?;
        let mut req = Self::new(spec, data_dir, args.out.clone(), args.seed);
        req.device = dev;
        let cfg = &mut req.config;
        cfg.task = args.task.clone();
        cfg.head.kind = args
            .mlp
            .map_or(HeadKind::Linear, |hidden| HeadKind::Mlp { hidden });
        cfg.head.learning_rate = args.lr;
        cfg.head.epochs = args.epochs;
        cfg.head.patience = args.patience;
        cfg.extract_batch = args.batch;
        cfg.folds = args.folds;
        cfg.per_layer = args.layers == LayersArg::Each;
        cfg.finetune = args.finetune.then(|| FinetuneConfig {
            epochs: args.finetune_epochs,
            upstream_lr: args.finetune_lr,
            seed: args.seed,
            ..Default::default()
        });
        Ok(req)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let req = ProbeRequest::try_from(&args)?;
    let r = probe(&req)?;
    print_report(&r, &req.out);
    Ok(())
}

/// Loads the upstream and the clips, probes and writes the report into `out`.
pub fn probe(req: &ProbeRequest) -> anyhow::Result<ProbeReport> {
    let model;
    let upstream = match &req.upstream {
        UpstreamSpec::Acoustic(a) => Upstream::Acoustic(*a),
        spec => {
            model = load_upstream(spec, &req.device)?;
            Upstream::Hubert(&model)
        }
    };
    let data = load_labelled_dir(&req.data, &LoadConfig::default())?;
    println!(
        "data {}: {} clips, {} classes, {:.0} s{}",
        req.data.display(),
        data.clips.len(),
        data.classes.len(),
        data.seconds(),
        if data.has_speakers() {
            ", speaker ids from file names"
        } else {
            ""
        }
    );
    let r = fedhubert_eval::probe(upstream, &data, &req.config)?;
    write_report(&r, &req.out)?;
    Ok(r)
}

/// The lines `fedhubert probe` prints about a finished probe written to `out`.
pub fn print_report(r: &ProbeReport, out: &Path) {
    let s = &r.split;
    println!(
        "split ({}): train {} / valid {} / test {} clips ({:.0}/{:.0}/{:.0} %), speakers {:?}",
        if s.speaker_disjoint {
            "speaker-disjoint"
        } else {
            "stratified"
        },
        s.clips[0],
        s.clips[1],
        s.clips[2],
        s.fractions[0] * 100.0,
        s.fractions[1] * 100.0,
        s.fractions[2] * 100.0,
        s.speakers
    );
    println!(
        "upstream: {} ({} hidden states x {})",
        r.upstream, r.num_hidden_states, r.hidden_size
    );
    println!(
        "test accuracy {:.3}  valid {:.3}  train {:.3}  (majority baseline {:.3}, chance {:.3}); best epoch {} of {}",
        r.test_accuracy,
        r.valid_accuracy,
        r.train_accuracy,
        r.majority_baseline,
        1.0 / r.classes.len() as f64,
        r.best_epoch,
        r.epochs_run
    );
    if let Some(cv) = &r.cross_validation {
        println!(
            "{}-fold cross-validation: accuracy {:.3} over all {} clips (folds {:.3} +- {:.3})",
            cv.folds,
            cv.accuracy,
            cv.confusion.row_sums().iter().sum::<usize>(),
            cv.fold_accuracies.iter().sum::<f64>() / cv.folds as f64,
            cv.fold_std
        );
    }
    let w: Vec<String> = r.layer_weights.iter().map(|w| format!("{w:.3}")).collect();
    println!("layer weights [{}]", w.join(", "));
    for l in &r.per_layer {
        println!(
            "layer {:>2} alone: test accuracy {:.3}  valid {:.3}{}",
            l.layer,
            l.test_accuracy,
            l.valid_accuracy,
            match (l.cv_accuracy, l.cv_fold_std) {
                (Some(a), Some(s)) => format!("  cross-validated {a:.3} (fold std {s:.3})"),
                _ => String::new(),
            }
        );
    }
    if let Some(f) = &r.finetune {
        println!(
            "fine-tuned ({} steps, lr {}): test accuracy {:.3}  valid {:.3}  ({:.0} s)",
            f.steps, f.learning_rate, f.test_accuracy, f.valid_accuracy, f.seconds
        );
    }
    println!(
        "timing: extract {:.1} s, head {:.1} s; wrote {}/probe.json, confusion.{{csv,json,png}}",
        r.extract_seconds,
        r.train_seconds,
        out.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_has_the_command_line_defaults() {
        let args: Args = crate::common::parse_args(&[
            "--upstream",
            "random",
            "--data",
            "clips",
            "--out",
            "probe",
            "--seed",
            "2",
        ]);
        let spec = UpstreamSpec::Random {
            config: HubertConfig::tiny(),
            seed: 2,
        };
        let want = ProbeRequest::new(spec, "clips".into(), "probe".into(), 2);
        assert_eq!(
            format!("{:?}", ProbeRequest::try_from(&args).unwrap()),
            format!("{want:?}")
        );
    }
}
