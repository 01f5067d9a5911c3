//! Which upstream to probe: a fedhubert checkpoint, an exported HuggingFace directory, or the
//! same architecture at random initialisation (the baseline pretraining must beat).

use std::path::{Path, PathBuf};

use fedhubert_model::{
    Device, HostTensor, HubertConfig, HubertForPretraining, HubertModel, Weights, load_tensors,
    read_safetensors,
};

use crate::{AcousticFeature, EvalError};

/// An upstream model to load.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum UpstreamSpec {
    /// A safetensors file: `HubertForPretraining::save_checkpoint` (format `fedhubert`), or any
    /// file with a `hubert_config` in its metadata and `[model/]hubert.*` tensors (trainer
    /// checkpoints).
    Checkpoint(PathBuf),
    /// A HuggingFace `HubertModel` directory (`config.json` + `model.safetensors`).
    HfDir(PathBuf),
    /// A published torch checkpoint: fairseq (`hubert_base_ls960.pt`), torchaudio state dict
    /// or s3prl's converted upstream ([`fedhubert_model::published`]).
    Published(PathBuf),
    /// `HubertModel::new(config, seed)`, untrained.
    Random { config: HubertConfig, seed: u64 },
    /// A non-learned acoustic baseline (`mfcc`, `fbank`): no model at all.
    Acoustic(AcousticFeature),
}

/// `tiny`, `student`, `base` or `large` presets.
pub fn arch_config(name: &str) -> Result<HubertConfig, EvalError> {
    match name {
        "tiny" => Ok(HubertConfig::tiny()),
        "student" => Ok(HubertConfig::student()),
        "base" => Ok(HubertConfig::base()),
        "large" => Ok(HubertConfig::large()),
        other => Err(EvalError::Config(format!(
            "unknown arch `{other}` (expected tiny, student, base or large)"
        ))),
    }
}

impl UpstreamSpec {
    /// `random` (with `random_config` as its architecture), `mfcc` or `fbank`, a directory (HF
    /// export) or a file (checkpoint).
    pub fn parse(spec: &str, random_config: HubertConfig, seed: u64) -> Result<Self, EvalError> {
        if let Some(a) = AcousticFeature::parse(spec) {
            return Ok(Self::Acoustic(a));
        }
        if spec == "random" {
            return Ok(Self::Random {
                config: random_config,
                seed,
            });
        }
        Self::from_path(Path::new(spec))
    }

    /// The model at `path`: an HF directory, a published torch checkpoint, or a fedhubert
    /// safetensors checkpoint.
    pub fn from_path(path: &Path) -> Result<Self, EvalError> {
        let p = path.to_path_buf();
        if p.is_dir() {
            Ok(Self::HfDir(p))
        } else if fedhubert_model::published::is_pytorch_file(&p) {
            Ok(Self::Published(p))
        } else if p.is_file() {
            Ok(Self::Checkpoint(p))
        } else {
            Err(EvalError::Upstream {
                spec: path.display().to_string(),
                why: "no such file or directory (expected a checkpoint file, an HF directory or `random`)".into(),
            })
        }
    }

    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            Self::Checkpoint(p) => format!("checkpoint {}", p.display()),
            Self::HfDir(p) => format!("hf {}", p.display()),
            Self::Published(p) => format!("published checkpoint {}", p.display()),
            Self::Random { config, seed } => format!(
                "random init (hidden {}, {} layers, seed {seed})",
                config.hidden_size, config.num_hidden_layers
            ),
            Self::Acoustic(a) => a.describe().into(),
        }
    }
}

fn load_file(path: &Path, device: &Device) -> Result<HubertModel, EvalError> {
    let err = |why: String| EvalError::Upstream {
        spec: path.display().to_string(),
        why,
    };
    let (tensors, meta) = read_safetensors(path)?;
    if meta.get("format").map(String::as_str) == Some("fedhubert") {
        return Ok(HubertForPretraining::load_checkpoint(path, device)?.hubert);
    }
    let Some(cfg) = meta.get("hubert_config") else {
        let dir = path.parent().unwrap_or(Path::new("."));
        if dir.join("config.json").is_file() {
            return Ok(HubertModel::from_hf_dir(dir, device)?);
        }
        return Err(err(
            "no `hubert_config` in the safetensors metadata and no config.json beside it".into(),
        ));
    };
    let cfg = HubertConfig::from_json_str(cfg)?;
    let mut map = Weights::default();
    for (k, v) in tensors {
        let k = k.strip_prefix("model/").unwrap_or(&k);
        if let Some(rest) = k.strip_prefix("hubert.") {
            map.tensors.push(HostTensor {
                name: rest.to_string(),
                ..v
            });
        }
    }
    if map.tensors.is_empty() {
        return Err(err("no `hubert.*` tensors found".into()));
    }
    Ok(load_tensors(HubertModel::new(&cfg, 0, device)?, map)?)
}

/// Builds or loads the upstream on `device`.
pub fn load_upstream(spec: &UpstreamSpec, device: &Device) -> Result<HubertModel, EvalError> {
    match spec {
        UpstreamSpec::Checkpoint(p) => load_file(p, device),
        UpstreamSpec::HfDir(d) => Ok(HubertModel::from_hf_dir(d, device)?),
        UpstreamSpec::Published(p) => {
            Ok(fedhubert_model::published::read_published(p)?.encoder(device)?)
        }
        UpstreamSpec::Random { config, seed } => Ok(HubertModel::new(config, *seed, device)?),
        UpstreamSpec::Acoustic(a) => Err(EvalError::Upstream {
            spec: a.describe().into(),
            why: "an acoustic baseline is not a model (it can be probed, not loaded)".into(),
        }),
    }
}
