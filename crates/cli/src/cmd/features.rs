//! `fedhubert features`: 39-dim Kaldi-compatible MFCC (100 Hz) for one manifest or every client
//! folder, written as fairseq-layout shards (`mfcc.npy` + `mfcc.len`) plus `features.json`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedhubert_audio::{Manifest, ManifestOptions};
use fedhubert_eval::{LayerSource, extract_layer_features, load_feature_model};
use fedhubert_features::{ExtractOptions, ExtractSummary, extract_manifest};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["manifest", "clients"])))]
pub struct Args {
    /// One manifest CSV to featurize (needs --out).
    #[arg(long, value_name = "CSV", requires = "out")]
    pub manifest: Option<PathBuf>,
    /// Output folder for --manifest (gets mfcc.npy, mfcc.len, features.json).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// A partition folder: featurizes every DIR/client_*/manifest.csv into its own client folder.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    pub clients: Option<PathBuf>,
    /// Audio root the manifest paths are relative to (default: the root declared in partition.json
    /// next to the manifest or in its parent folder).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::common::parse_threads)]
    pub threads: usize,
    /// Utterances featurized in parallel before being written in order (bounds memory).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk: u64,
    /// Accept manifest paths that leave the audio root (absolute, or `..` above it).
    #[arg(long)]
    pub allow_outside_root: bool,
    /// HuBERT iteration 2: instead of MFCC, the frames of a layer of this model (a fedhubert
    /// checkpoint, an HF directory, or a published fairseq / torchaudio / s3prl `.pt`) at its
    /// 50 Hz, into `hubert_L.npy` + `.len`, one utterance at a time as fairseq's
    /// `dump_hubert_feature.py` (a padded batch would change a group-norm model's frames).
    #[arg(long, value_name = "CKPT|HF_DIR", requires = "layer")]
    pub model: Option<PathBuf>,
    /// With --model: the layer (HF `hidden_states[L]`, the output of the L-th transformer
    /// layer, fairseq's `output_layer`; 6 for HuBERT Base's iteration 2).
    #[arg(long, requires = "model")]
    pub layer: Option<usize>,
    /// With --model: audio longer than this runs in pieces (fairseq's max_chunk, 100 s).
    #[arg(long, default_value_t = 100.0, value_name = "S")]
    pub chunk_seconds: f64,
}

/// Which features a request writes.
#[derive(Clone, Debug)]
pub enum FeatureKind {
    /// 39-dim MFCC at 100 Hz, iteration 1's targets.
    Mfcc,
    /// Layer `layer` of `model` at its frame rate, iteration 2's.
    Layer {
        model: PathBuf,
        layer: usize,
        chunk_samples: usize,
    },
}

fn load_manifest(path: &Path, root: Option<&Path>, opts: ManifestOptions) -> Result<Manifest> {
    Manifest::load_with(path, root.map(Path::to_path_buf), opts)
        .with_context(|| format!("cannot load manifest {}", path.display()))
}

/// Every `DIR/client_*/manifest.csv`, sorted by client number.
pub(crate) fn client_manifests(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read client folder {}", dir.display()))?;
    let mut found: Vec<(u64, String, PathBuf)> = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("cannot read client folder {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("client_") else {
            continue;
        };
        let m = e.path().join("manifest.csv");
        if e.path().is_dir() && m.is_file() {
            found.push((rest.parse().unwrap_or(u64::MAX), name, m));
        }
    }
    if found.is_empty() {
        bail!(
            "{}: no client_*/manifest.csv found (run `fedhubert prepare` first)",
            dir.display()
        );
    }
    found.sort();
    Ok(found.into_iter().map(|(_, _, p)| p).collect())
}

fn run_one(
    manifest_path: &Path,
    out: &Path,
    req: &FeaturesRequest,
    label: &str,
) -> Result<ExtractSummary> {
    let manifest = load_manifest(manifest_path, req.root.as_deref(), req.manifest_options)?;
    let total = manifest.entries.len() as u64;
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} utts {msg} ({elapsed}, eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b.set_prefix(label.to_string());
        b
    } else {
        ProgressBar::hidden()
    };
    let res = extract_manifest(&manifest, manifest_path, out, &req.options, &mut |p| {
        bar.set_position(p.done as u64);
        bar.set_message(format!("{:.0} s audio", p.audio_seconds));
    });
    bar.finish_and_clear();
    let s = res?;
    tracing::debug!(
        "{label}: {} utterances, {} frames, {:.1} s audio in {:.2} s ({:.0}x real time) -> {}",
        s.utterances,
        s.frames,
        s.audio_seconds,
        s.wall_seconds,
        s.realtime_factor(),
        s.npy.display()
    );
    if s.empty > 0 {
        tracing::warn!(
            "{label}: {} utterances shorter than 25 ms have 0 frames",
            s.empty
        );
    }
    Ok(s)
}

/// What to featurize.
#[derive(Clone, Debug)]
pub enum FeaturesInput {
    /// One manifest, into `out`.
    Manifest { manifest: PathBuf, out: PathBuf },
    /// Every `DIR/client_*/manifest.csv`, each into its own client folder.
    Clients(PathBuf),
}

#[derive(Clone, Debug)]
pub struct FeaturesRequest {
    pub input: FeaturesInput,
    /// Audio root the manifest paths are relative to (default: from partition.json).
    pub root: Option<PathBuf>,
    /// How strictly the manifests are read.
    pub manifest_options: ManifestOptions,
    pub options: ExtractOptions,
    pub kind: FeatureKind,
}

impl TryFrom<&Args> for FeaturesRequest {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> Result<Self> {
        let input = match (&args.manifest, &args.clients) {
            (Some(m), None) => FeaturesInput::Manifest {
                manifest: m.clone(),
                out: args
                    .out
                    .clone()
                    .expect("clap requires --out with --manifest"),
            },
            (None, Some(dir)) => FeaturesInput::Clients(dir.clone()),
            _ => bail!("give exactly one of --manifest (with --out) or --clients"),
        };
        Ok(Self {
            input,
            root: args.root.clone(),
            manifest_options: ManifestOptions {
                allow_outside_root: args.allow_outside_root,
            },
            options: ExtractOptions {
                threads: args.threads,
                chunk: args.chunk as usize,
                ..Default::default()
            },
            kind: match (&args.model, args.layer) {
                (Some(model), Some(layer)) => {
                    if !(args.chunk_seconds.is_finite() && args.chunk_seconds >= 1.0) {
                        bail!(
                            "--chunk-seconds {}: expected at least 1",
                            args.chunk_seconds
                        );
                    }
                    FeatureKind::Layer {
                        model: model.clone(),
                        layer,
                        chunk_samples: (args.chunk_seconds * 16_000.0) as usize,
                    }
                }
                _ => FeatureKind::Mfcc,
            },
        })
    }
}

/// Totals over every manifest featurized.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FeaturesOutcome {
    pub manifests: usize,
    pub utterances: usize,
    pub frames: u64,
    pub audio_seconds: f64,
    pub wall_seconds: f64,
    pub threads: usize,
    /// Feature dimensions (39 for MFCC).
    #[serde(default = "mfcc_dims")]
    pub dims: usize,
}

fn mfcc_dims() -> usize {
    fedhubert_features::MFCC_DIM
}

impl FeaturesOutcome {
    /// Totals of `manifests` manifests before any is featurized.
    fn empty(manifests: usize, threads: usize, dims: usize) -> Self {
        Self {
            manifests,
            utterances: 0,
            frames: 0,
            audio_seconds: 0.0,
            wall_seconds: 0.0,
            threads,
            dims,
        }
    }

    pub fn print(&self) {
        let (utts, frames, threads) = (self.utterances, self.frames, self.threads);
        println!(
            "features: {} manifest(s), {utts} utterances, {frames} frames x {} dims, {:.1} s of audio in {:.2} s \
             ({:.1} utt/s, {:.0}x real time, {threads} threads)",
            self.manifests,
            self.dims,
            self.audio_seconds,
            self.wall_seconds,
            utts as f64 / self.wall_seconds.max(1e-9),
            self.audio_seconds / self.wall_seconds.max(1e-9),
        );
    }
}

pub fn run(args: Args) -> Result<()> {
    features(&FeaturesRequest::try_from(&args)?)?.print();
    Ok(())
}

/// `(manifest, output folder, label)` of every manifest the request names.
fn jobs(input: &FeaturesInput) -> Result<Vec<(PathBuf, PathBuf, String)>> {
    Ok(match input {
        FeaturesInput::Manifest { manifest, out } => {
            vec![(
                manifest.clone(),
                out.clone(),
                manifest.display().to_string(),
            )]
        }
        FeaturesInput::Clients(dir) => client_manifests(dir)?
            .into_iter()
            .map(|m| {
                let client = m.parent().expect("client_*/manifest.csv").to_path_buf();
                let label = client
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (m, client, label)
            })
            .collect(),
    })
}

/// Featurizes every manifest of the request, printing one line per manifest.
pub fn features(req: &FeaturesRequest) -> Result<FeaturesOutcome> {
    let _lock = crate::common::FolderLock::acquire(
        match &req.input {
            FeaturesInput::Manifest { out, .. } => out,
            FeaturesInput::Clients(root) => root,
        },
        "features",
    )?;
    let jobs = jobs(&req.input)?;
    if let FeatureKind::Layer {
        model,
        layer,
        chunk_samples,
    } = &req.kind
    {
        return layer_features(req, &jobs, model, *layer, *chunk_samples);
    }
    let mut total = FeaturesOutcome::empty(jobs.len(), 0, fedhubert_features::MFCC_DIM);
    for (m, out, label) in &jobs {
        let s = run_one(m, out, req, label)?;
        total.utterances += s.utterances;
        total.frames += s.frames;
        total.audio_seconds += s.audio_seconds;
        total.wall_seconds += s.wall_seconds;
        total.threads = s.threads;
        println!(
            "{label}: {} utterances, {} frames ({:.1} s of audio) -> {}, {}",
            s.utterances,
            s.frames,
            s.audio_seconds,
            s.npy.display(),
            s.len.display()
        );
    }
    Ok(total)
}

/// `--model M --layer L`: layer L's frames of every manifest of the request (iteration 2).
fn layer_features(
    req: &FeaturesRequest,
    jobs: &[(PathBuf, PathBuf, String)],
    model_path: &Path,
    layer: usize,
    chunk_samples: usize,
) -> Result<FeaturesOutcome> {
    let dev = fedhubert_model::cpu_device();
    let (model, model_digest) = load_feature_model(model_path, &dev)
        .with_context(|| format!("--model {}", model_path.display()))?;
    let src = LayerSource {
        model: &model,
        layer,
        model_digest,
        made_by: format!(
            "fedhubert features --model {} --layer {layer}",
            model_path.display()
        ),
        chunk_samples,
    };
    let t0 = std::time::Instant::now();
    let mut total = FeaturesOutcome::empty(
        jobs.len(),
        rayon::current_num_threads(),
        model.config().hidden_size,
    );
    for (m, out, label) in jobs {
        let manifest = load_manifest(m, req.root.as_deref(), req.manifest_options)?;
        let s = extract_layer_features(&src, &manifest, m, out)
            .with_context(|| format!("{label}: layer {layer} features"))?;
        println!(
            "{label}: {} utterances, {} frames of layer {layer} ({} dims, {} Hz) -> {}",
            s.utterances,
            s.frames,
            s.dims,
            s.frame_rate,
            out.join(format!("{}.npy", s.stem)).display()
        );
        total.utterances += s.utterances;
        total.frames += s.frames;
        total.audio_seconds += s.audio_seconds;
    }
    total.wall_seconds = t0.elapsed().as_secs_f64();
    Ok(total)
}
