//! Published HuBERT checkpoints (fairseq `hubert_base_ls960.pt`, torchaudio
//! `torchaudio.models.hubert_*` state dicts, s3prl's converted upstreams) read into the same
//! [`HubertModel`] as a HuggingFace directory.
//!
//! The `.pt` pickles are read with burn's `pytorch-reader`, which interprets only the calls
//! torch uses to rebuild tensors and a few containers (`OrderedDict`, `set`); every other
//! object (`argparse.Namespace`, fairseq's `Dictionary`, numpy scalars) comes back as an inert
//! stub naming its type, and nothing in a pickle is ever run. Only the model state and the
//! model config are used. A pickle that calls into a module that runs commands or code
//! (`os.system`, `builtins.eval`, ...) is refused outright: it is a hostile file, and the error
//! says not to open it with `torch.load` either.

mod arch;
mod names;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use pytorch_reader::{DType, PickleValue, PytorchReader, Tensor as PtTensor};
use serde::Serialize;

pub use arch::FairseqModelCfg;
pub use names::{Naming, Target, parse_conv_layers};

use crate::config::HubertConfig;
use crate::error::ModelError;
use crate::hf::{
    FloatKind, HostTensor, Weights, collect_tensors, floats_from_le, load_tensors, param_shapes,
};
use crate::hubert::HubertModel;
use crate::pretraining::{HeadKind, HubertForPretraining, PretrainConfig};
use burn::tensor::Device;

/// Tensors of a checkpoint by (HF) name, not yet read.
type Tensors = BTreeMap<String, PtTensor>;

/// A pretraining head: its config and its tensors.
type Head = (PretrainConfig, Tensors);

/// The layout a `.pt` checkpoint was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishedFormat {
    /// fairseq: `{"cfg" | "args", "model": state dict, ...}`.
    Fairseq,
    /// s3prl's converted upstream: `{"model_cfg", "task_cfg", "model_weight", ...}`.
    S3prl,
    /// A bare state dict (torchaudio's `Wav2Vec2Model` / `HuBERTPretrainModel`, or fairseq
    /// names without a config).
    StateDict,
}

/// A published checkpoint, opened: its architecture and its tensors by HF name, not yet read.
pub struct PublishedHubert {
    pub path: PathBuf,
    pub format: PublishedFormat,
    pub naming: Naming,
    pub config: HubertConfig,
    /// Encoder tensors by HF `HubertModel` name.
    encoder: Tensors,
    /// The fairseq pretraining head, when the file has one that fits one codebook.
    head: Option<Head>,
    /// What was assumed or left out, for the user (printed by `import`).
    pub notes: Vec<String>,
}

/// Whether `path` is a file in one of torch's containers (a ZIP archive, or a pickle): what
/// [`read_published`] opens. A safetensors file is not.
pub fn is_pytorch_file(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 9];
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let n = f.read(&mut head).unwrap_or(0);
    if n >= 4 && &head[..4] == b"PK\x03\x04" {
        return true;
    }
    // A safetensors file starts with its JSON header's length, then `{`.
    n == 9 && head[0] == 0x80 && head[8] != b'{'
}

fn file_error(path: &Path, why: impl std::fmt::Display) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Open a fairseq, s3prl or torchaudio checkpoint: detect its layout, refuse a hostile
/// pickle, take the architecture from its config (or its shapes) and map its names.
pub fn read_published(path: &Path) -> Result<PublishedHubert, ModelError> {
    let root = PytorchReader::read_pickle_data(path, None).map_err(|e| file_error(path, e))?;
    refuse_code(path, &root)?;
    let PickleValue::Dict(top) = &root else {
        return Err(file_error(
            path,
            format!(
                "the pickle holds a {}, not a dict of tensors or a checkpoint",
                kind(&root)
            ),
        ));
    };
    let (format, weights_key, cfg) = detect_layout(path, top)?;
    let tensors = match weights_key {
        Some(k) => PytorchReader::with_top_level_key(path, k),
        None => PytorchReader::new(path),
    }
    .map_err(|e| file_error(path, e))?
    .into_tensors();
    let naming = Naming::detect(tensors.keys().map(String::as_str)).ok_or_else(|| {
        file_error(
            path,
            "no HuBERT parameters found (neither fairseq nor torchaudio names)",
        )
    })?;
    let mut notes = Vec::new();
    let (encoder, head_tensors) = map_names(path, naming, tensors, &mut notes)?;
    let config = match &cfg {
        Some((key, cfg)) => cfg.to_hf(key).map_err(|e| file_error(path, e))?,
        None => {
            let shapes = encoder
                .iter()
                .map(|(k, t)| (k.clone(), t.shape().to_vec()))
                .collect();
            arch::infer_from_shapes(&shapes, &mut notes)
                .map_err(|e| file_error(path, format!("architecture: {e}")))?
        }
    };
    config.validate()?;
    let head = head_config(path, cfg.as_ref().map(|c| &c.1), head_tensors, &mut notes)?;
    Ok(PublishedHubert {
        path: path.to_path_buf(),
        format,
        naming,
        config,
        encoder,
        head,
        notes,
    })
}

/// The layout of the root dict: the format, the key holding the weights (`None`: the root
/// itself) and the fairseq model config with where it came from.
#[allow(clippy::type_complexity)]
fn detect_layout(
    path: &Path,
    top: &HashMap<String, PickleValue>,
) -> Result<
    (
        PublishedFormat,
        Option<&'static str>,
        Option<(String, FairseqModelCfg)>,
    ),
    ModelError,
> {
    let cfg_at = |v: &PickleValue, key: &str| -> Result<_, ModelError> {
        let json = to_json(v);
        let cfg: FairseqModelCfg =
            serde_json::from_value(json).map_err(|e| file_error(path, format!("`{key}`: {e}")))?;
        Ok(Some((key.to_string(), cfg)))
    };
    if top.contains_key("model_weight") {
        let cfg = match top.get("model_cfg") {
            Some(v @ PickleValue::Dict(_)) => cfg_at(v, "model_cfg")?,
            _ => None,
        };
        return Ok((PublishedFormat::S3prl, Some("model_weight"), cfg));
    }
    if matches!(top.get("model"), Some(PickleValue::Dict(_))) {
        let cfg = match top.get("cfg") {
            Some(PickleValue::Dict(c)) => match c.get("model") {
                Some(m @ PickleValue::Dict(_)) => cfg_at(m, "cfg.model")?,
                _ => None,
            },
            _ => None,
        };
        return Ok((PublishedFormat::Fairseq, Some("model"), cfg));
    }
    Ok((PublishedFormat::StateDict, None, None))
}

/// Tensors to HF names; a key neither scheme knows is an error naming it.
fn map_names(
    path: &Path,
    naming: Naming,
    tensors: HashMap<String, PtTensor>,
    notes: &mut Vec<String>,
) -> Result<(Tensors, Tensors), ModelError> {
    let mut encoder = BTreeMap::new();
    let mut head = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut ignored = 0usize;
    for (key, t) in tensors {
        match naming.map(&key) {
            Some(Target::Encoder(name)) => {
                encoder.insert(name, t);
            }
            Some(Target::Head(name)) => {
                head.insert(name, t);
            }
            Some(Target::Ignored) => ignored += 1,
            None => unknown.push(key),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(file_error(
            path,
            format!(
                "{} tensor(s) that are not HuBERT {naming:?} parameters: {}",
                unknown.len(),
                unknown
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if ignored > 0 {
        notes.push(format!("{ignored} fine-tuning head tensor(s) left out"));
    }
    Ok((encoder, head))
}

/// The pretraining head's config, when the file has the cosine head over one codebook.
fn head_config(
    path: &Path,
    cfg: Option<&FairseqModelCfg>,
    tensors: Tensors,
    notes: &mut Vec<String>,
) -> Result<Option<Head>, ModelError> {
    let Some(emb) = tensors.get("label_embs_concat") else {
        if !tensors.is_empty() {
            notes.push("a partial pretraining head left out".into());
        }
        return Ok(None);
    };
    let [num_classes, final_dim] = emb.shape() else {
        return Err(file_error(
            path,
            format!(
                "label embeddings have shape {:?}, expected 2 dims",
                emb.shape()
            ),
        ));
    };
    let proj_out = tensors.get("final_proj.weight").map(|w| w.shape()[0]);
    if proj_out != Some(*final_dim) {
        // untie_final_proj over several codebooks: one projection per codebook.
        notes.push(format!(
            "pretraining head left out: final_proj has {proj_out:?} outputs for {final_dim}-dim \
             label embeddings (several codebooks); a fresh head is used"
        ));
        return Ok(None);
    }
    let defaults = FairseqModelCfg::default();
    let cfg = cfg.unwrap_or(&defaults);
    let label_rate = cfg.label_rate.unwrap_or_else(|| {
        notes.push("label rate not in the file: 50 Hz assumed (HuBERT's iteration 2+)".into());
        50.0
    });
    let pretrain = PretrainConfig {
        num_classes: *num_classes,
        final_dim: *final_dim,
        head: HeadKind::Cosine,
        logit_temp: cfg.logit_temp,
        label_rate,
        feature_grad_mult: cfg.feature_grad_mult,
        ..PretrainConfig::default()
    };
    Ok(Some((pretrain, tensors)))
}

/// Callables that run commands or code. A pickle naming one (at any depth of the parts the
/// reader can see) is hostile: `torch.load` would have run it.
fn runs_code(name: &str) -> bool {
    let (module, item) = name.rsplit_once('.').unwrap_or((name, ""));
    let root = module.split('.').next().unwrap_or(module);
    const MODULES: [&str; 24] = [
        "os",
        "posix",
        "nt",
        "subprocess",
        "_posixsubprocess",
        "sys",
        "shutil",
        "socket",
        "runpy",
        "importlib",
        "ctypes",
        "pickle",
        "_pickle",
        "marshal",
        "code",
        "codeop",
        "pty",
        "webbrowser",
        "multiprocessing",
        "signal",
        "pdb",
        "operator",
        "types",
        "asyncio",
    ];
    const BUILTINS: [&str; 14] = [
        "eval",
        "exec",
        "execfile",
        "compile",
        "getattr",
        "setattr",
        "delattr",
        "__import__",
        "open",
        "input",
        "breakpoint",
        "globals",
        "vars",
        "apply",
    ];
    MODULES.contains(&root)
        || (matches!(root, "builtins" | "__builtin__") && BUILTINS.contains(&item))
}

fn refuse_code(path: &Path, root: &PickleValue) -> Result<(), ModelError> {
    let mut found = None;
    walk(root, &mut |name| {
        if found.is_none() && runs_code(name) {
            found = Some(name.to_string());
        }
    });
    match found {
        Some(name) => Err(file_error(
            path,
            format!(
                "the pickle calls `{name}`, which runs code when torch.load opens the file: \
                 this is a tampered or malicious checkpoint. fedhubert never runs code from a \
                 pickle and refuses the file; do not open it with torch.load either"
            ),
        )),
        None => Ok(()),
    }
}

fn walk(v: &PickleValue, f: &mut impl FnMut(&str)) {
    match v {
        PickleValue::Unsupported(name) => f(name),
        PickleValue::List(items) => items.iter().for_each(|i| walk(i, f)),
        PickleValue::Dict(m) => m.values().for_each(|i| walk(i, f)),
        _ => {}
    }
}

fn kind(v: &PickleValue) -> String {
    match v {
        PickleValue::Unsupported(name) => format!("`{name}` object"),
        PickleValue::List(_) => "list".into(),
        PickleValue::Dict(_) => "dict".into(),
        PickleValue::String(_) => "string".into(),
        _ => "scalar".into(),
    }
}

/// A pickle value as JSON for serde, with `None` and uninterpreted objects left out of dicts
/// so that the config's defaults apply to them.
fn to_json(v: &PickleValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        PickleValue::None | PickleValue::Unsupported(_) | PickleValue::Bytes(_) => Value::Null,
        PickleValue::Bool(b) => Value::Bool(*b),
        PickleValue::Int(i) => Value::from(*i),
        PickleValue::Float(x) => {
            serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number)
        }
        PickleValue::String(s) => Value::String(s.clone()),
        PickleValue::List(items) => Value::Array(items.iter().map(to_json).collect()),
        PickleValue::Dict(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .filter(|(_, v)| !v.is_null())
                .collect(),
        ),
    }
}

/// A tensor's values as f32 (f32, f64, f16 and bf16 checkpoints).
fn read_f32(path: &Path, name: &str, t: &PtTensor) -> Result<Vec<f32>, ModelError> {
    let kind = match t.dtype() {
        DType::F32 => FloatKind::F32,
        DType::F64 => FloatKind::F64,
        DType::F16 => FloatKind::F16,
        DType::BF16 => FloatKind::BF16,
        other => {
            return Err(ModelError::UnsupportedDtype {
                key: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    };
    let bytes = t.read().map_err(|e| file_error(path, e))?;
    Ok(floats_from_le(kind, &bytes))
}

/// Read `tensors` (already checked against `expected`'s shapes, so nothing larger than the
/// model is allocated) into host tensors named `prefix + name`.
fn read_checked(
    path: &Path,
    tensors: &Tensors,
    expected: &HashMap<String, Vec<usize>>,
    prefix: &str,
    out: &mut Weights,
) -> Result<(), ModelError> {
    for (name, t) in tensors {
        let full = format!("{prefix}{name}");
        let Some(shape) = expected.get(&full) else {
            return Err(ModelError::UnexpectedKeys(vec![full]));
        };
        if t.shape() != shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                key: full,
                expected: shape.clone(),
                found: t.shape().to_vec(),
            });
        }
        out.tensors.push(HostTensor {
            name: full,
            shape: shape.clone(),
            data: read_f32(path, name, t)?,
        });
    }
    Ok(())
}

impl PublishedHubert {
    /// Whether the file carries a usable pretraining head.
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// The encoder on `device`. Parameters fairseq and torchaudio may leave out are filled
    /// as they define them: the mask embedding (absent from a fine-tuned torchaudio
    /// `Wav2Vec2Model`) at its fresh initialisation, and the projection (absent in fairseq
    /// when the conv width equals the model width) as the identity.
    pub fn encoder(&self, device: &Device) -> Result<HubertModel, ModelError> {
        let fresh = HubertModel::new(&self.config, 0, device)?;
        let expected: HashMap<_, _> = param_shapes(&fresh).into_iter().collect();
        let mut weights = Weights::default();
        read_checked(&self.path, &self.encoder, &expected, "", &mut weights)?;
        self.fill_absent(&fresh, &mut weights);
        load_tensors(fresh, weights)
    }

    fn fill_absent(&self, fresh: &HubertModel, weights: &mut Weights) {
        let has = |k: &str| self.encoder.contains_key(k);
        let h = self.config.hidden_size;
        if !has("feature_projection.projection.weight") && self.config.conv_out_dim() == h {
            let eye = (0..h * h)
                .map(|i| f32::from(u8::from(i / h == i % h)))
                .collect();
            weights.tensors.push(HostTensor {
                name: "feature_projection.projection.weight".into(),
                shape: vec![h, h],
                data: eye,
            });
            weights.tensors.push(HostTensor {
                name: "feature_projection.projection.bias".into(),
                shape: vec![h],
                data: vec![0.0; h],
            });
        }
        if !has("masked_spec_embed") {
            let init = collect_tensors(fresh);
            weights.tensors.extend(
                init.tensors
                    .into_iter()
                    .filter(|t| t.name == "masked_spec_embed"),
            );
        }
    }

    /// The encoder with the file's pretraining head (`true`), or with a fresh head for
    /// `fallback` seeded by `seed` (`false`) when the file has none.
    pub fn for_pretraining(
        &self,
        fallback: &PretrainConfig,
        seed: u64,
        device: &Device,
    ) -> Result<(HubertForPretraining, bool), ModelError> {
        let encoder = self.encoder(device)?;
        let Some((pretrain, tensors)) = &self.head else {
            return Ok((
                HubertForPretraining::with_encoder(encoder, fallback, seed)?,
                false,
            ));
        };
        let model = HubertForPretraining::with_encoder(encoder, pretrain, 0)?;
        let expected: HashMap<_, _> = param_shapes(&model).into_iter().collect();
        let mut weights = collect_tensors(&model);
        weights.tensors.retain(|t| t.name.starts_with("hubert."));
        read_checked(&self.path, tensors, &expected, "", &mut weights)?;
        Ok((load_tensors(model, weights)?, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_running_callables_are_named() {
        for bad in [
            "posix.system",
            "os.system",
            "builtins.eval",
            "__builtin__.exec",
            "subprocess.Popen",
        ] {
            assert!(runs_code(bad), "{bad}");
        }
        for ok in [
            "argparse.Namespace",
            "numpy.core.multiarray.scalar",
            "fairseq.data.dictionary.Dictionary",
            "torch.float32",
            "builtins.set",
            "collections.OrderedDict",
        ] {
            assert!(!runs_code(ok), "{ok}");
        }
    }
}
