//! `fedhubert embed`: every hidden state of one audio file, for checking a checkpoint against
//! `transformers` (`HubertModel(input_values, output_hidden_states=True)` on `input_values`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use fedhubert_eval::{
    UpstreamSpec, hidden_states, hidden_states_in_pieces, load_upstream, normalize_wave,
};
use fedhubert_model::{FeatExtractNorm, HostTensor, Weights, write_safetensors};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A fedhubert checkpoint file or an exported HuggingFace directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// FLAC or WAV file (any rate and channel count: downmixed and resampled to 16 kHz mono).
    #[arg(long)]
    pub audio: PathBuf,
    /// Output safetensors: input_values [1, S], hidden_states.0..N and last_hidden_state [1, T, H].
    #[arg(long)]
    pub out: PathBuf,
    /// Normalise the waveform to zero mean / unit variance first (auto: as the model's
    /// preprocessor_config.json `do_normalize`, i.e. for the layer-norm layout only).
    #[arg(long, default_value = "auto")]
    pub normalize: String,
    /// Run the model on pieces of about this many seconds instead of the whole file, so memory
    /// is one piece's activations plus the output (a two-hour file asked for 5.9 GB at once).
    /// The frames tile the whole file's exactly, as `mvq encode`'s do; the transformer then
    /// attends within a piece, so values near the pieces' edges differ from a whole-file run.
    #[arg(long, value_name = "S")]
    pub chunk_seconds: Option<f64>,
}

/// Whether the waveform is normalised to zero mean / unit variance first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalize {
    /// As the model's preprocessor does: for the layer-norm layout only.
    Auto,
    Yes,
    No,
}

/// One model, one audio file, one output file.
#[derive(Clone, Debug)]
pub struct EmbedRequest {
    pub model: UpstreamSpec,
    /// The path the model came from, recorded in the output's metadata.
    pub checkpoint: PathBuf,
    pub audio: PathBuf,
    pub out: PathBuf,
    pub normalize: Normalize,
    /// Samples per piece (a multiple of the conv stride), or the whole file at once.
    pub chunk_seconds: Option<f64>,
}

impl TryFrom<&Args> for EmbedRequest {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<Self> {
        let model = UpstreamSpec::from_path(&args.checkpoint)
            .with_context(|| format!("--checkpoint {}", args.checkpoint.display()))?;
        let normalize = match args.normalize.as_str() {
            "auto" => Normalize::Auto,
            "true" => Normalize::Yes,
            "false" => Normalize::No,
            other => bail!("--normalize {other}: expected auto, true or false"),
        };
        Ok(Self {
            model,
            checkpoint: args.checkpoint.clone(),
            audio: args.audio.clone(),
            out: args.out.clone(),
            normalize,
            chunk_seconds: match args.chunk_seconds {
                Some(s) if !(s.is_finite() && s >= 1.0) => {
                    bail!("--chunk-seconds {s}: expected at least 1 second")
                }
                s => s,
            },
        })
    }
}

/// What was written.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EmbedOutcome {
    pub audio: PathBuf,
    pub out: PathBuf,
    pub seconds: f64,
    pub frames: usize,
    pub hidden_size: usize,
    /// `hidden_states.0..N-1`.
    pub hidden_states: usize,
    pub normalized: bool,
}

impl EmbedOutcome {
    pub fn print(&self) {
        println!(
            "{}: {:.2} s of audio -> {} frames x {}; wrote input_values, hidden_states.0..{} and last_hidden_state to {}",
            self.audio.display(),
            self.seconds,
            self.frames,
            self.hidden_size,
            self.hidden_states - 1,
            self.out.display()
        );
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    embed(&EmbedRequest::try_from(&args)?)?.print();
    Ok(())
}

/// Writes the model's input and every hidden state for the audio file.
pub fn embed(req: &EmbedRequest) -> anyhow::Result<EmbedOutcome> {
    let dev = fedhubert_model::cpu_device();
    let model = load_upstream(&req.model, &dev)
        .with_context(|| format!("loading {}", req.checkpoint.display()))?;
    let audio = fedhubert_audio::load_audio(&req.audio)?;
    let normalize = match req.normalize {
        Normalize::Auto => model.config().feat_extract_norm == FeatExtractNorm::Layer,
        Normalize::Yes => true,
        Normalize::No => false,
    };
    let wave = if normalize {
        normalize_wave(&audio.samples)
    } else {
        audio.samples
    };
    let min = model.config().receptive_field();
    if wave.len() < min {
        bail!(
            "{}: {} samples is too short: the conv front-end needs at least {min} ({} ms at 16 kHz) for one frame",
            req.audio.display(),
            wave.len(),
            min / 16
        );
    }
    let (hs, last) = match req.chunk_seconds {
        None => {
            refuse_unbounded_attention(model.config(), wave.len(), &req.audio)?;
            hidden_states(&model, &wave)?
        }
        Some(s) => hidden_states_in_pieces(&model, &wave, (s * 16_000.0) as usize)?,
    };
    let mut tensors = vec![HostTensor {
        name: "input_values".to_string(),
        shape: vec![1, wave.len()],
        data: wave.clone(),
    }];
    let n = hs.len();
    let (t, h) = (last.shape[1], last.shape[2]);
    for (i, x) in hs.into_iter().enumerate() {
        tensors.push(HostTensor {
            name: format!("hidden_states.{i}"),
            ..x
        });
    }
    tensors.push(HostTensor {
        name: "last_hidden_state".to_string(),
        ..last
    });
    let meta = HashMap::from([
        (
            "checkpoint".to_string(),
            req.checkpoint.display().to_string(),
        ),
        ("audio".to_string(), req.audio.display().to_string()),
        ("normalized".to_string(), normalize.to_string()),
    ]);
    if let Some(dir) = req.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_safetensors(&req.out, &Weights::new(tensors), meta)?;
    Ok(EmbedOutcome {
        audio: req.audio.clone(),
        out: req.out.clone(),
        seconds: wave.len() as f64 / 16000.0,
        frames: t,
        hidden_size: h,
        hidden_states: n,
        normalized: normalize,
    })
}

/// Most memory one whole-file forward may ask for its attention scores; above it `embed` needs
/// `--chunk-seconds`. (A 20-minute file asked a tiny model for 57 GB at once, and the
/// allocation failure aborted the process.)
const MAX_ATTENTION_BYTES: u64 = 4 << 30;

/// Errors, naming the file, when attending over the whole of `samples` would need more than
/// [`MAX_ATTENTION_BYTES`] (frames^2 scores per head, f32).
fn refuse_unbounded_attention(
    cfg: &fedhubert_model::HubertConfig,
    samples: usize,
    audio: &std::path::Path,
) -> anyhow::Result<()> {
    let t = cfg.num_frames(samples) as u64;
    let bytes = t
        .saturating_mul(t)
        .saturating_mul(cfg.num_attention_heads as u64)
        .saturating_mul(4);
    if bytes > MAX_ATTENTION_BYTES {
        bail!(
            "{}: {:.0} s of audio is {t} frames; attending over all of them at once needs {:.1} GB for the attention scores alone: pass --chunk-seconds 30 (frames tile the whole file exactly)",
            audio.display(),
            samples as f64 / 16_000.0,
            bytes as f64 / 1e9
        );
    }
    Ok(())
}
