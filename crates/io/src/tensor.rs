//! Named f32 host tensors: the one host tensor type of the workspace. Model parameters read out
//! of burn, the weights that cross the wire between server and clients, optimizer moments and
//! checkpoint contents are all [`Weights`]; this crate does not depend on burn, so the federated
//! engine and the file formats stay engine-free.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

/// Why a tensor operation or a tensor file failed.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
    #[error("weights layout mismatch: {0}")]
    Layout(String),
}

/// One named tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A model's parameters (or a server optimizer's moments), in a fixed order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Weights {
    pub tensors: Vec<Tensor>,
}

impl FromIterator<Tensor> for Weights {
    fn from_iter<I: IntoIterator<Item = Tensor>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

impl Weights {
    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors }
    }

    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// Bytes of the weights as raw f32.
    pub fn nbytes(&self) -> usize {
        self.num_params() * 4
    }

    pub fn zeros_like(&self) -> Self {
        Self {
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data: vec![0.0; t.data.len()],
                })
                .collect(),
        }
    }

    /// Errors unless `other` has the same tensor names and shapes in the same order.
    pub fn check_layout(&self, other: &Weights, what: &str) -> Result<(), TensorError> {
        if self.tensors.len() != other.tensors.len() {
            return Err(TensorError::Layout(format!(
                "{what}: {} tensors, expected {}",
                other.tensors.len(),
                self.tensors.len()
            )));
        }
        for (a, b) in self.tensors.iter().zip(&other.tensors) {
            if a.name != b.name || a.shape != b.shape || b.data.len() != a.data.len() {
                return Err(TensorError::Layout(format!(
                    "{what}: tensor {} {:?}, expected {} {:?}",
                    b.name, b.shape, a.name, a.shape
                )));
            }
        }
        Ok(())
    }

    /// Keeps the tensors whose name passes `keep` (e.g. everything but a frozen conv front-end).
    pub fn filter(&self, keep: impl Fn(&str) -> bool) -> Weights {
        Weights {
            tensors: self
                .tensors
                .iter()
                .filter(|t| keep(&t.name))
                .cloned()
                .collect(),
        }
    }

    /// Overwrites the tensors of `self` that `part` names.
    pub fn update_from(&mut self, part: &Weights) -> Result<(), TensorError> {
        let idx: BTreeMap<String, usize> = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        for t in &part.tensors {
            let i = *idx
                .get(&t.name)
                .ok_or_else(|| TensorError::Layout(format!("unknown tensor {}", t.name)))?;
            if self.tensors[i].shape != t.shape {
                return Err(TensorError::Layout(format!(
                    "tensor {} {:?}, expected {:?}",
                    t.name, t.shape, self.tensors[i].shape
                )));
            }
            self.tensors[i].data.clone_from(&t.data);
        }
        Ok(())
    }

    pub fn iter_data(&self) -> impl Iterator<Item = &f32> {
        self.tensors.iter().flat_map(|t| t.data.iter())
    }

    pub fn iter_data_mut(&mut self) -> impl Iterator<Item = &mut f32> {
        self.tensors.iter_mut().flat_map(|t| t.data.iter_mut())
    }

    /// Squared L2 distance (f64 accumulation).
    pub fn dist2(&self, other: &Weights) -> f64 {
        self.iter_data()
            .zip(other.iter_data())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    }

    /// Serialises as safetensors bytes with `prefix` on every name.
    pub fn to_views(&self, prefix: &str) -> Vec<(String, Vec<u8>, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|t| {
                (
                    format!("{prefix}{}", t.name),
                    t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    t.shape.clone(),
                )
            })
            .collect()
    }
}

/// Writes named groups of weights and string metadata to one safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    groups: &[(&str, &Weights)],
    metadata: BTreeMap<String, String>,
) -> Result<(), TensorError> {
    let mut owned = Vec::new();
    for (prefix, w) in groups {
        owned.extend(w.to_views(prefix));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("byte length matches shape"),
            )
        })
        .collect();
    let bytes = crate::safetensors_bytes(views, &metadata).map_err(|e| TensorError::Format {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    crate::atomic_write(path, &bytes).map_err(|e| TensorError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Reads every f32 tensor of a safetensors file, grouped by the prefix before the first '/'.
/// Tensor order within a group follows the file's names in sorted order unless `order` is given,
/// in which case it must name every tensor of the file exactly once. Memory is bounded by the
/// file's size: the safetensors header is validated against the bytes that exist.
pub fn load_safetensors(
    path: &Path,
) -> Result<(BTreeMap<String, Weights>, BTreeMap<String, String>), TensorError> {
    let bytes = std::fs::read(path).map_err(|e| TensorError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let bad = |why: String| TensorError::Format {
        path: path.to_path_buf(),
        why,
    };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    crate::verify_checksums(&st, metadata.get(crate::CHECKSUMS_KEY)).map_err(bad)?;
    let order = tensor_order(&st, &metadata).map_err(bad)?;
    let mut groups: BTreeMap<String, Weights> = BTreeMap::new();
    for full in &order {
        let t = st.tensor(full).map_err(|e| bad(format!("{full}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("{full}: dtype {:?}, expected F32", t.dtype())));
        }
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (group, name) = full.split_once('/').unwrap_or(("", full));
        groups
            .entry(group.to_string())
            .or_default()
            .tensors
            .push(Tensor {
                name: name.to_string(),
                shape: t.shape().to_vec(),
                data,
            });
    }
    Ok((groups, metadata))
}

/// The tensor names to read, in order: the `order` metadata when present, else sorted names. A
/// name listed twice would copy its tensor twice (a short header could multiply a large tensor
/// without bound), and a tensor the list leaves out would be dropped silently: both are errors.
fn tensor_order(
    st: &safetensors::SafeTensors<'_>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let mut in_file: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    in_file.sort();
    let Some(listed) = metadata.get("order") else {
        return Ok(in_file);
    };
    let order: Vec<String> = listed
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for name in &order {
        if !seen.insert(name.as_str()) {
            return Err(format!("metadata `order` lists tensor {name} twice"));
        }
    }
    if let Some(left_out) = in_file.iter().find(|n| !seen.contains(n.as_str())) {
        return Err(format!(
            "tensor {left_out} is in the file but not in its metadata `order` ({} names)",
            order.len()
        ));
    }
    Ok(order)
}

/// The `order` metadata entry that makes `load_safetensors` restore tensor order exactly.
pub fn order_metadata(groups: &[(&str, &Weights)]) -> String {
    groups
        .iter()
        .flat_map(|(p, w)| w.tensors.iter().map(move |t| format!("{p}{}", t.name)))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(names: &[&str]) -> Weights {
        names
            .iter()
            .map(|n| Tensor {
                name: n.to_string(),
                shape: vec![2],
                data: vec![1.0, 2.0],
            })
            .collect()
    }

    fn write_with_order(path: &Path, w: &Weights, order: &str) {
        let meta = [("order".to_string(), order.to_string())].into();
        save_safetensors(path, &[("g/", w)], meta).unwrap();
    }

    #[test]
    fn order_restores_and_must_name_each_tensor_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let w = weights(&["b", "a"]);
        write_with_order(&p, &w, &order_metadata(&[("g/", &w)]));
        let (groups, _) = load_safetensors(&p).unwrap();
        assert_eq!(groups["g"], w, "order metadata restores b before a");
        // A name listed twice copied the tensor twice: a short header could multiply a big
        // tensor without bound. A tensor left out was dropped without a word.
        for (order, why) in [("g/b,g/a,g/b", "twice"), ("g/b", "not in its metadata")] {
            write_with_order(&p, &w, order);
            let e = load_safetensors(&p).unwrap_err().to_string();
            assert!(
                e.contains("w.safetensors") && e.contains(why),
                "{order}: {e}"
            );
        }
        write_with_order(&p, &w, "g/b,g/a,g/zz");
        assert!(
            load_safetensors(&p).is_err(),
            "a listed name that is absent"
        );
    }

    #[test]
    fn header_claiming_more_than_the_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let w = weights(&["a"]);
        save_safetensors(&p, &[("g/", &w)], BTreeMap::new()).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 4);
        std::fs::write(&p, &bytes).unwrap();
        let e = load_safetensors(&p).unwrap_err();
        assert!(matches!(e, TensorError::Format { .. }), "{e}");
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = load_safetensors(&p).unwrap_err();
        assert!(e.to_string().contains("t.safetensors"), "{e}");
    }
}
