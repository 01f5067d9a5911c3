//! `fedhubert mvq`: the multi-codebook vector quantizer of MVQ-KD. `train` fits it on teacher
//! embeddings of a server-side set; `encode` turns every utterance of client folders into
//! `B` bytes per frame (`{stem}.u8`, frame-major, with `{stem}.len` holding frames per utterance in
//! manifest order) and reports the reconstruction error and storage.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedhubert_audio::{Manifest, load_audio};
use fedhubert_distill::{DistillRunFile, Quantizer, Teacher};

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
        Sub::Train(a) => train(a),
        Sub::Encode(a) => encode(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let mut set = a.set.clone();
    if let Some(l) = a.layer {
        set.push(format!("distillation.mvq.layer={l}"));
    }
    if let Some(b) = a.num_codebooks {
        set.push(format!("distillation.mvq.num_codebooks={b}"));
    }
    let rf = DistillRunFile::load(a.config.as_deref(), &set)?;
    let dev = crate::cmd::pretrain::device(&a.device)?;
    let teacher = Teacher::load(&a.teacher, &dev)
        .with_context(|| format!("loading the teacher {}", a.teacher.display()))?;
    let n_t = teacher.num_layers();
    let layer = match rf.distillation.mvq.layer {
        Some(l) if l >= n_t => {
            anyhow::bail!("distillation.mvq.layer: {l} >= the teacher's num_hidden_layers {n_t}")
        }
        Some(l) => l,
        None => n_t - 1,
    };
    let (q, rep) = crate::cmd::distill::train_quantizer(&teacher, &a.data, &rf, layer, a.seed)?;
    q.save(&a.out)?;
    let report = a.out.with_extension("json");
    fedhubert_fl::atomic_write(&report, serde_json::to_string_pretty(&rep)?.as_bytes())?;
    println!("wrote {} and {}", a.out.display(), report.display());
    Ok(())
}

fn folders(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if root.join("manifest.csv").is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    crate::cmd::pretrain::client_dirs(root)
}

fn encode(a: EncodeArgs) -> anyhow::Result<()> {
    let dev = crate::cmd::pretrain::device(&a.device)?;
    let teacher = Teacher::load(&a.teacher, &dev)
        .with_context(|| format!("loading the teacher {}", a.teacher.display()))?;
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
    // Chunks start on the frame grid (multiples of the total stride) and overlap by the receptive
    // field minus one stride, so the chunks' frames tile the utterance's: frame f of the whole
    // utterance is frame f - start/stride of its chunk, and every utterance gets exactly
    // `num_frames(len)` frames of codes, the alignment `distill --mode mvq` crops them by.
    let tcfg = teacher.model.hubert.config.clone();
    let stride = tcfg.total_stride();
    let field = receptive_field(&tcfg.conv_kernel, &tcfg.conv_stride);
    let chunk = (a.chunk_samples.max(16_000) / stride * stride).max(stride);
    let (mut frames_all, mut err_num, mut err_den) = (0usize, 0f64, 0f64);
    for dir in folders(&a.clients)? {
        let mpath = dir.join("manifest.csv");
        let m = Manifest::load(&mpath)?;
        let bin = dir.join(format!("{}.u8", a.stem));
        let mut codes_out = Vec::new();
        let mut lens = String::new();
        for e in &m.entries {
            let audio = load_audio(&m.abs_path(e))?;
            let mut n_frames = 0;
            let n = audio.samples.len();
            let pieces = (0..n)
                .step_by(chunk)
                .map(|s| &audio.samples[s..(s + chunk + field - stride).min(n)])
                .filter(|p| tcfg.num_frames(p.len()) > 0);
            for piece in pieces {
                let out = teacher.forward(&[piece.to_vec()], false)?;
                let x: Vec<f32> = out.hidden_states[q.layer + 1]
                    .clone()
                    .into_data()
                    .try_into_vec_as::<f32>()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let codes = q.encode(&x)?;
                let xh = q.decode(&codes);
                err_num += x
                    .iter()
                    .zip(&xh)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
                err_den += x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
                n_frames += codes.len() / q.num_codebooks();
                codes_out.extend(codes);
            }
            if n_frames != tcfg.num_frames(n) {
                anyhow::bail!(
                    "{}: encoded {n_frames} frames, the teacher gives {} for the whole utterance",
                    e.id,
                    tcfg.num_frames(n)
                );
            }
            frames_all += n_frames;
            lens.push_str(&format!("{n_frames}\n"));
        }
        fedhubert_io::atomic_write(&bin, &codes_out)
            .with_context(|| format!("writing {}", bin.display()))?;
        fedhubert_fl::atomic_write(&dir.join(format!("{}.len", a.stem)), lens.as_bytes())?;
        println!(
            "{}: {} utterances, {} bytes",
            bin.display(),
            m.entries.len(),
            codes_out.len()
        );
    }
    let bpf = q.num_codebooks();
    println!(
        "encoded {frames_all} frames: {bpf} bytes/frame ({} bytes in all; the f32 layer-{} embeddings would take {} bytes, {:.0}x more); relative reconstruction error {:.4}",
        frames_all * bpf,
        q.layer,
        frames_all * q.dim() * 4,
        (q.dim() * 4) as f64 / bpf as f64,
        err_num / err_den.max(1e-30)
    );
    Ok(())
}

/// Input samples one output frame of a conv stack sees.
fn receptive_field(kernels: &[usize], strides: &[usize]) -> usize {
    let (mut field, mut jump) = (1, 1);
    for (&k, &s) in kernels.iter().zip(strides) {
        field += (k - 1) * jump;
        jump *= s;
    }
    field
}

#[cfg(test)]
mod tests {
    use super::receptive_field;

    #[test]
    fn hubert_front_end_sees_400_samples() {
        assert_eq!(
            receptive_field(&[10, 3, 3, 3, 3, 2, 2], &[5, 2, 2, 2, 2, 2, 2]),
            400
        );
    }
}
