//! `fedhubert embed`: every hidden state of one audio file, for checking a checkpoint against
//! `transformers` (`HubertModel(input_values, output_hidden_states=True)` on `input_values`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use fedhubert_eval::{UpstreamSpec, hidden_states, load_upstream, normalize_wave};
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dev = fedhubert_model::cpu_device();
    let spec = if args.checkpoint.is_dir() {
        UpstreamSpec::HfDir(args.checkpoint.clone())
    } else if args.checkpoint.is_file() {
        UpstreamSpec::Checkpoint(args.checkpoint.clone())
    } else {
        bail!(
            "--checkpoint {}: no such file or directory (expected a checkpoint file or an HF directory)",
            args.checkpoint.display()
        );
    };
    let model = load_upstream(&spec, &dev)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let audio = fedhubert_audio::load_audio(&args.audio)?;
    let normalize = match args.normalize.as_str() {
        "auto" => model.config().feat_extract_norm == FeatExtractNorm::Layer,
        "true" => true,
        "false" => false,
        other => bail!("--normalize {other}: expected auto, true or false"),
    };
    let wave = if normalize {
        normalize_wave(&audio.samples)
    } else {
        audio.samples
    };
    let min = model.config().conv_kernel[0];
    if wave.len() < min * 2 {
        bail!(
            "{}: {} samples is too short for the conv front-end",
            args.audio.display(),
            wave.len()
        );
    }
    let (hs, last) = hidden_states(&model, &wave)?;
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
            args.checkpoint.display().to_string(),
        ),
        ("audio".to_string(), args.audio.display().to_string()),
        ("normalized".to_string(), normalize.to_string()),
    ]);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_safetensors(&args.out, &Weights::new(tensors), meta)?;
    println!(
        "{}: {:.2} s of audio -> {t} frames x {h}; wrote input_values, hidden_states.0..{} and last_hidden_state to {}",
        args.audio.display(),
        wave.len() as f64 / 16000.0,
        n - 1,
        args.out.display()
    );
    Ok(())
}
