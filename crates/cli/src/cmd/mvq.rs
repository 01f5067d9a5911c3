//! `fedhubert mvq`: the multi-codebook vector quantizer of MVQ-KD. `train` fits it on teacher
//! embeddings of a server-side set; `encode` turns every utterance of client folders into
//! `B` bytes per frame (`{stem}.u8`, frame-major, with `{stem}.len` holding frames per utterance in
//! manifest order) and reports the reconstruction error and storage.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedhubert_audio::Manifest;
use fedhubert_distill::{DistillRunFile, Quantizer, QuantizerReport, Teacher};
use fedhubert_model::{Device, HubertConfig};
use serde::{Deserialize, Serialize};

use crate::common::{client_dirs, device, train_quantizer};
use fedhubert_io::provenance::Provenance;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Train a quantizer on a teacher layer's outputs over a server-side set.
    Train(TrainArgs),
    /// Encode client folders (or one folder with manifest.csv) into codebook indexes.
    Encode(EncodeArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Teacher checkpoint or HF directory.
    #[arg(long)]
    pub teacher: PathBuf,
    /// Folder with manifest.csv (the server-side set).
    #[arg(long)]
    pub data: PathBuf,
    /// Quantizer file to write (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// YAML with a `distillation.mvq` section; overridable with --set.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Teacher layer (0-based; default: the last).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Codebooks (bytes per frame).
    #[arg(long)]
    pub num_codebooks: Option<usize>,
    #[arg(long = "set")]
    pub set: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(clap::Args, Debug)]
pub struct EncodeArgs {
    #[arg(long)]
    pub teacher: PathBuf,
    #[arg(long)]
    pub quantizer: PathBuf,
    /// Partition folder (client_K/) or a single folder with manifest.csv.
    #[arg(long)]
    pub clients: PathBuf,
    /// Output name inside each folder: STEM.u8 and STEM.len.
    #[arg(long, default_value = "mvq")]
    pub stem: String,
    /// Longest audio per teacher forward, in samples (longer utterances are encoded in chunks).
    #[arg(long, default_value_t = 320_000)]
    pub chunk_samples: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Sub::Train(a) => train(&TrainRequest::try_from(&a)?)?.print(),
        Sub::Encode(a) => encode(&EncodeRequest::try_from(&a)?)?.print(),
    }
    Ok(())
}

/// Train a quantizer on a teacher layer over a server-side set.
#[derive(Clone, Debug)]
pub struct TrainRequest {
    pub teacher: PathBuf,
    /// Folder with manifest.csv.
    pub data: PathBuf,
    /// Quantizer file to write; the report goes beside it (`.json`).
    pub out: PathBuf,
    /// Its `distillation.mvq` section configures the quantizer.
    pub run_file: DistillRunFile,
    pub seed: u64,
    pub device: Device,
}

impl TryFrom<&TrainArgs> for TrainRequest {
    type Error = anyhow::Error;

    fn try_from(a: &TrainArgs) -> anyhow::Result<Self> {
        let mut set = a.set.clone();
        if let Some(l) = a.layer {
            set.push(format!("distillation.mvq.layer={l}"));
        }
        if let Some(b) = a.num_codebooks {
            set.push(format!("distillation.mvq.num_codebooks={b}"));
        }
        let rf = DistillRunFile::load(a.config.as_deref(), &set)?;
        Ok(Self {
            teacher: a.teacher.clone(),
            data: a.data.clone(),
            out: a.out.clone(),
            run_file: rf,
            seed: a.seed,
            device: device(&a.device)?,
        })
    }
}

/// The quantizer written and what training measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub quantizer: PathBuf,
    pub report_path: PathBuf,
    pub report: QuantizerReport,
}

impl TrainOutcome {
    pub fn print(&self) {
        println!(
            "wrote {} and {}",
            self.quantizer.display(),
            self.report_path.display()
        );
    }
}

fn load_teacher(path: &Path, dev: &Device) -> anyhow::Result<Teacher> {
    Teacher::load(path, dev).with_context(|| format!("loading the teacher {}", path.display()))
}

pub fn train(a: &TrainRequest) -> anyhow::Result<TrainOutcome> {
    let rf = &a.run_file;
    let teacher = load_teacher(&a.teacher, &a.device)?;
    let n_t = teacher.num_layers();
    let layer = match rf.distillation.mvq.layer {
        Some(l) if l >= n_t => {
            anyhow::bail!("distillation.mvq.layer: {l} >= the teacher's num_hidden_layers {n_t}")
        }
        Some(l) => l,
        None => n_t - 1,
    };
    let (q, rep) = train_quantizer(&teacher, &a.data, rf, layer, a.seed)?;
    q.save(&a.out)?;
    let report = a.out.with_extension("json");
    fedhubert_fl::atomic_write(&report, serde_json::to_string_pretty(&rep)?.as_bytes())?;
    Ok(TrainOutcome {
        quantizer: a.out.clone(),
        report_path: report,
        report: rep,
    })
}

/// Encode client folders into codebook indexes.
#[derive(Clone, Debug)]
pub struct EncodeRequest {
    pub teacher: PathBuf,
    pub quantizer: PathBuf,
    /// Partition folder (client_K/) or a single folder with manifest.csv.
    pub clients: PathBuf,
    /// Output name inside each folder: STEM.u8 and STEM.len.
    pub stem: String,
    /// Longest audio per teacher forward, in samples.
    pub chunk_samples: usize,
    pub device: Device,
}

impl TryFrom<&EncodeArgs> for EncodeRequest {
    type Error = anyhow::Error;

    fn try_from(a: &EncodeArgs) -> anyhow::Result<Self> {
        Ok(Self {
            device: device(&a.device)?,
            teacher: a.teacher.clone(),
            quantizer: a.quantizer.clone(),
            clients: a.clients.clone(),
            stem: a.stem.clone(),
            chunk_samples: a.chunk_samples,
        })
    }
}

/// Totals over every folder encoded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncodeOutcome {
    pub frames: usize,
    pub bytes_per_frame: usize,
    pub layer: usize,
    pub dim: usize,
    /// Relative reconstruction error over all frames.
    pub rel_error: f64,
}

impl EncodeOutcome {
    pub fn print(&self) {
        let (frames_all, bpf) = (self.frames, self.bytes_per_frame);
        println!(
            "encoded {frames_all} frames: {bpf} bytes/frame ({} bytes in all; the f32 layer-{} embeddings would take {} bytes, {:.0}x more); relative reconstruction error {:.4}",
            frames_all * bpf,
            self.layer,
            frames_all * self.dim * 4,
            (self.dim * 4) as f64 / bpf as f64,
            self.rel_error
        );
    }
}

/// Cuts utterances into teacher-sized chunks and encodes their frames.
///
/// Chunks start on the frame grid (multiples of the total stride) and overlap by the receptive
/// field minus one stride, so the chunks' frames tile the utterance's: frame f of the whole
/// utterance is frame f - start/stride of its chunk, and every utterance gets exactly
/// `num_frames(len)` frames of codes, the alignment `distill --mode mvq` crops them by.
struct Encoder {
    teacher: Teacher,
    q: Quantizer,
    tcfg: HubertConfig,
    stride: usize,
    field: usize,
    chunk: usize,
    /// The quantizer's file, which the codes' provenance records.
    quantizer: PathBuf,
    err_num: f64,
    err_den: f64,
}

impl Encoder {
    /// The codes of one utterance's frames (`num_frames(len)` frames of `B` bytes).
    fn utterance(&mut self, samples: &[f32]) -> anyhow::Result<Vec<u8>> {
        let q = &self.q;
        let (chunk, span) = (self.chunk, self.chunk + self.field - self.stride);
        let n = samples.len();
        let pieces = (0..n)
            .step_by(chunk)
            .map(|s| &samples[s..(s + span).min(n)])
            .filter(|p| self.tcfg.num_frames(p.len()) > 0);
        let mut codes_out = Vec::new();
        for piece in pieces {
            let out = self.teacher.forward(&[piece.to_vec()], false)?;
            let x: Vec<f32> = out.hidden_states[q.layer + 1]
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let codes = q.encode(&x)?;
            let xh = q.decode(&codes);
            self.err_num += x
                .iter()
                .zip(&xh)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            self.err_den += x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            codes_out.extend(codes);
        }
        Ok(codes_out)
    }

    /// Encodes one folder's manifest into `STEM.u8` + `STEM.len`; returns its frames.
    fn folder(&mut self, dir: &Path, stem: &str) -> anyhow::Result<usize> {
        let mpath = dir.join("manifest.csv");
        let m = Manifest::load(&mpath)?;
        let bin = dir.join(format!("{stem}.u8"));
        let mut codes_out = Vec::new();
        let mut lens = String::new();
        let mut frames = 0;
        for e in &m.entries {
            let audio = m.load_entry_audio(e)?;
            let codes = self.utterance(&audio.samples)?;
            let n_frames = codes.len() / self.q.num_codebooks();
            let n = audio.samples.len();
            if n_frames != self.tcfg.num_frames(n) {
                anyhow::bail!(
                    "{}: encoded {n_frames} frames, the teacher gives {} for the whole utterance",
                    e.id,
                    self.tcfg.num_frames(n)
                );
            }
            codes_out.extend(codes);
            frames += n_frames;
            lens.push_str(&format!("{n_frames}\n"));
        }
        fedhubert_io::atomic_write(&bin, &codes_out)
            .with_context(|| format!("writing {}", bin.display()))?;
        fedhubert_fl::atomic_write(&dir.join(format!("{stem}.len")), lens.as_bytes())?;
        Provenance::new("mvq-codes", "fedhubert mvq encode")
            .input_file("manifest", &mpath)?
            .input_file("quantizer", &self.quantizer)?
            .param("layer", self.q.layer)
            .param("num_codebooks", self.q.num_codebooks())
            .write_for_files(dir, stem, &fedhubert_distill::codes::CODE_FILES)?;
        println!(
            "{}: {} utterances, {} bytes",
            bin.display(),
            m.entries.len(),
            codes_out.len()
        );
        Ok(frames)
    }
}

pub fn encode(a: &EncodeRequest) -> anyhow::Result<EncodeOutcome> {
    let _lock = crate::common::FolderLock::acquire(&a.clients, "mvq encode")?;
    let teacher = load_teacher(&a.teacher, &a.device)?;
    let q = Quantizer::load(&a.quantizer)?;
    if q.dim() != teacher.hidden_size() || q.layer >= teacher.num_layers() {
        anyhow::bail!(
            "{}: quantizer of dim {} for layer {} does not fit the teacher ({} layers of width {})",
            a.quantizer.display(),
            q.dim(),
            q.layer,
            teacher.num_layers(),
            teacher.hidden_size()
        );
    }
    let tcfg = teacher.model.hubert.config.clone();
    let stride = tcfg.total_stride();
    let field = tcfg.receptive_field();
    let chunk = (a.chunk_samples.max(16_000) / stride * stride).max(stride);
    let mut enc = Encoder {
        teacher,
        q,
        tcfg,
        stride,
        field,
        chunk,
        quantizer: a.quantizer.clone(),
        err_num: 0.0,
        err_den: 0.0,
    };
    let mut frames_all = 0usize;
    for dir in client_dirs(&a.clients)? {
        frames_all += enc.folder(&dir, &a.stem)?;
    }
    Ok(EncodeOutcome {
        frames: frames_all,
        bytes_per_frame: enc.q.num_codebooks(),
        layer: enc.q.layer,
        dim: enc.q.dim(),
        rel_error: enc.err_num / enc.err_den.max(1e-30),
    })
}
