//! Parameters by name: listing, safetensors import / export (HuggingFace directories and full
//! burn-module checkpoints), atomic file writes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData, bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::{FeatExtractNorm, HubertConfig};
use crate::error::ModelError;
use crate::hubert::HubertModel;

pub use fedhubert_io::{Tensor as HostTensor, Weights};

/// Tensors by name, sorted.
pub type TensorMap = BTreeMap<String, HostTensor>;

struct PathTracker(Vec<String>);

impl PathTracker {
    fn name(&self) -> String {
        self.0.join(".")
    }
}

struct ShapeLister {
    path: PathTracker,
    out: Vec<(String, Vec<usize>)>,
}

impl ModuleVisitor for ShapeLister {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out
            .push((self.path.name(), param.lazy_shape().to_vec()));
    }
}

struct TensorCollector {
    path: PathTracker,
    out: Vec<HostTensor>,
}

impl ModuleVisitor for TensorCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data: Vec<f32> = t
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("float tensor data converts to f32");
        self.out.push(HostTensor {
            name: self.path.name(),
            shape,
            data,
        });
    }
}

struct TensorLoader {
    path: PathTracker,
    tensors: HashMap<String, HostTensor>,
    missing: Vec<String>,
    mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl ModuleMapper for TensorLoader {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.0.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.name();
        let expected = param.lazy_shape().to_vec();
        match self.tensors.remove(&name) {
            None => {
                self.missing.push(name);
                param
            }
            Some(t) if t.shape != expected => {
                self.mismatched.push((name, expected, t.shape));
                param
            }
            Some(t) => param.map(move |old| {
                let device = old.device();
                let require_grad = old.is_require_grad();
                Tensor::<D>::from_data(TensorData::new(t.data, t.shape), &device)
                    .set_require_grad(require_grad)
            }),
        }
    }
}

/// Every float parameter of `module` as (dotted module path, shape), in module order.
pub fn param_shapes<M: Module>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut v = ShapeLister {
        path: PathTracker(Vec::new()),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Every float parameter of `module` copied to the host, by dotted module path.
pub fn collect_tensors<M: Module>(module: &M) -> Weights {
    let mut v = TensorCollector {
        path: PathTracker(Vec::new()),
        out: Vec::new(),
    };
    module.visit(&mut v);
    Weights::new(v.out)
}

/// Replace every float parameter of `module` by the tensor of the same name (strict: errors on
/// any missing, unexpected or mis-shaped key). Parameter ids and gradient settings are kept.
pub fn load_tensors<M: Module>(module: M, tensors: Weights) -> Result<M, ModelError> {
    let mut loader = TensorLoader {
        path: PathTracker(Vec::new()),
        tensors: tensors
            .tensors
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect(),
        missing: Vec::new(),
        mismatched: Vec::new(),
    };
    let module = module.map(&mut loader);
    if let Some((key, expected, found)) = loader.mismatched.into_iter().next() {
        return Err(ModelError::ShapeMismatch {
            key,
            expected,
            found,
        });
    }
    if !loader.missing.is_empty() {
        return Err(ModelError::MissingKeys(loader.missing));
    }
    if !loader.tensors.is_empty() {
        let mut keys: Vec<String> = loader.tensors.into_keys().collect();
        keys.sort();
        return Err(ModelError::UnexpectedKeys(keys));
    }
    Ok(module)
}

/// The float element types a checkpoint may store, all read as f32.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FloatKind {
    F32,
    F64,
    F16,
    BF16,
}

/// Little-endian `bytes` of `kind` elements as f32 (safetensors, and torch checkpoints, which
/// `pytorch-reader` hands over in the host's order: little-endian on every target we build).
pub(crate) fn floats_from_le(kind: FloatKind, b: &[u8]) -> Vec<f32> {
    match kind {
        FloatKind::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        FloatKind::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        FloatKind::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        FloatKind::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

fn decode(key: &str, view: &TensorView<'_>) -> Result<Vec<f32>, ModelError> {
    let kind = match view.dtype() {
        Dtype::F32 => FloatKind::F32,
        Dtype::F64 => FloatKind::F64,
        Dtype::F16 => FloatKind::F16,
        Dtype::BF16 => FloatKind::BF16,
        other => {
            return Err(ModelError::UnsupportedDtype {
                key: key.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(floats_from_le(kind, view.data()))
}

/// Read every tensor of a safetensors file (F32 / F64 / F16 / BF16, converted to f32) and its
/// `__metadata__`.
pub fn read_safetensors(
    path: impl AsRef<Path>,
) -> Result<(TensorMap, HashMap<String, String>), ModelError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| ModelError::SafeTensors(format!("{}: {e}", path.display())))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::SafeTensors(format!("{}: {e}", path.display())))?;
    fedhubert_io::verify_checksums(&st, metadata.get(fedhubert_io::CHECKSUMS_KEY))
        .map_err(|e| ModelError::SafeTensors(format!("{}: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = decode(&name, &view)?;
        out.insert(
            name.clone(),
            HostTensor {
                name,
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, metadata))
}

/// Write `(name, tensor)` pairs as an F32 safetensors file with the given metadata, atomically.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &Weights,
    metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    let path = path.as_ref();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, data, shape) in &bytes {
        let view = TensorView::new(Dtype::F32, shape.clone(), data)
            .map_err(|e| ModelError::SafeTensors(format!("{name}: {e}")))?;
        views.push((name.as_str(), view));
    }
    // Sorted metadata: the same tensors and metadata always give the same bytes.
    let metadata: std::collections::BTreeMap<String, String> = metadata.into_iter().collect();
    let buf = fedhubert_io::safetensors_bytes(views, &metadata)
        .map_err(|e| ModelError::SafeTensors(format!("{}: {e}", path.display())))?;
    write_atomic(path, &buf)
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    fedhubert_io::atomic_write(path, bytes).map_err(|e| ModelError::io(path, e))
}

/// Map legacy HF / torch weight-norm names (`weight_g`, `weight_v`) to the parametrization
/// names this crate (and current transformers) uses.
///
/// As the `legacy` `WeightRenaming`s of transformers v5.23.0,
/// src/transformers/conversion_mapping.py:L2162-L2170.
pub fn normalize_hf_key(key: &str) -> String {
    if let Some(prefix) = key.strip_suffix(".weight_g") {
        format!("{prefix}.parametrizations.weight.original0")
    } else if let Some(prefix) = key.strip_suffix(".weight_v") {
        format!("{prefix}.parametrizations.weight.original1")
    } else {
        key.to_string()
    }
}

/// `preprocessor_config.json` of a `Wav2Vec2FeatureExtractor` matching the model: 16 kHz mono,
/// `do_normalize` / `return_attention_mask` false for the group-norm layout, true for the
/// layer-norm layout (as HF's Base / Large checkpoints).
///
/// The fields of `Wav2Vec2FeatureExtractor` (transformers v5.23.0,
/// src/transformers/models/wav2vec2/feature_extraction_wav2vec2.py:L28).
pub fn preprocessor_config_json(config: &HubertConfig) -> String {
    let layer = config.feat_extract_norm == FeatExtractNorm::Layer;
    let v = serde_json::json!({
        "do_normalize": layer,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": layer,
        "sampling_rate": 16000
    });
    serde_json::to_string_pretty(&v).expect("static json")
}

fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

impl HubertModel {
    /// HF state-dict names and shapes, exactly what [`HubertModel::save_hf`] writes.
    pub fn hf_param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        param_shapes(self)
    }

    /// Load a HuggingFace `HubertModel` directory (`config.json` + `model.safetensors`). Accepts
    /// both `parametrizations.weight.original0/1` and legacy `weight_g` / `weight_v` names; any
    /// missing, unexpected or mis-shaped key is an error naming it.
    ///
    /// The counterpart of `PreTrainedModel.from_pretrained` (transformers v5.23.0,
    /// src/transformers/modeling_utils.py:L3894), strict where it is lenient.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let config = HubertConfig::from_json_file(dir.join("config.json"))?;
        let model = Self::new(&config, 0, device)?;
        model.load_hf_weights(dir.join("model.safetensors"))
    }

    /// Replace all weights by those of a HF `model.safetensors` file (strict).
    pub fn load_hf_weights(self, path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let (tensors, _) = read_safetensors(path)?;
        let renamed = tensors.into_values().map(|mut t| {
            t.name = normalize_hf_key(&t.name);
            t
        });
        load_tensors(self, renamed.collect())
    }

    /// Write a HF `HubertModel` directory: `config.json`, `model.safetensors` (HF names, f32,
    /// metadata format=pt) and `preprocessor_config.json`, each atomically. The directory is
    /// created if needed.
    ///
    /// The counterpart of `PreTrainedModel.save_pretrained` (transformers v5.23.0,
    /// src/transformers/modeling_utils.py:L3310).
    pub fn save_hf(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        write_safetensors(
            dir.join("model.safetensors"),
            &collect_tensors(self),
            pt_metadata(),
        )?;
        write_atomic(&dir.join("config.json"), self.config.to_json()?.as_bytes())?;
        write_atomic(
            &dir.join("preprocessor_config.json"),
            preprocessor_config_json(&self.config).as_bytes(),
        )?;
        Ok(())
    }
}

/// Save every float parameter of any module (e.g. [`crate::HubertForPretraining`], heads
/// included) to a safetensors file by module path, with free-form string metadata.
pub fn save_checkpoint<M: Module>(
    module: &M,
    path: impl AsRef<Path>,
    metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    write_safetensors(path, &collect_tensors(module), metadata)
}

/// Load a checkpoint written by [`save_checkpoint`] into a module of the same architecture
/// (strict); returns the module and the file's metadata.
pub fn load_checkpoint<M: Module>(
    module: M,
    path: impl AsRef<Path>,
) -> Result<(M, HashMap<String, String>), ModelError> {
    let (tensors, metadata) = read_safetensors(path)?;
    let module = load_tensors(module, tensors.into_values().collect())?;
    Ok((module, metadata))
}
