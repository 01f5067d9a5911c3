//! A k x d codebook and its safetensors file (`centroids` f32 [k, d] + string metadata).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{KmError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    pub k: usize,
    pub dim: usize,
    /// Row-major `k x dim`.
    pub centroids: Vec<f32>,
}

/// Metadata stored in the safetensors header (all values as strings there).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CodebookMeta {
    pub mode: String,
    pub seed: u64,
    /// Sum of squared distances of all frames to their nearest centroid.
    pub inertia: f64,
    pub n_frames: u64,
}

impl Codebook {
    pub fn new(k: usize, dim: usize, centroids: Vec<f32>) -> Result<Self> {
        if centroids.len() != k * dim || k == 0 || dim == 0 {
            return Err(KmError::Invalid(format!(
                "codebook of {} values is not {k} x {dim} (k and dim must be positive)",
                centroids.len()
            )));
        }
        Ok(Self { k, dim, centroids })
    }

    /// SHA-256 of the codebook's shape and centroids: what the labels it made record, so labels
    /// of two codebooks (a `kmeans` that failed half way) are never trained on together.
    pub fn digest(&self) -> String {
        let mut bytes = Vec::with_capacity(16 + 4 * self.centroids.len());
        bytes.extend((self.k as u64).to_le_bytes());
        bytes.extend((self.dim as u64).to_le_bytes());
        bytes.extend(self.centroids.iter().flat_map(|c| c.to_le_bytes()));
        fedhubert_io::provenance::sha256_bytes(&bytes)
    }

    pub fn row(&self, j: usize) -> &[f32] {
        &self.centroids[j * self.dim..(j + 1) * self.dim]
    }

    pub(crate) fn packed(&self) -> crate::kernel::Packed {
        crate::kernel::Packed::new(&self.centroids, self.k, self.dim)
    }

    /// Nearest centroid of each row of `x` (row-major) and its squared distance.
    pub fn assign(&self, x: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let n = x.len() / self.dim;
        let (mut l, mut d) = (vec![0u32; n], vec![0f32; n]);
        crate::kernel::assign(&self.packed(), &x[..n * self.dim], &mut l, &mut d);
        (l, d)
    }

    pub fn save(&self, path: &Path, meta: &CodebookMeta) -> Result<()> {
        let bytes: Vec<u8> = self
            .centroids
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![self.k, self.dim],
            &bytes,
        )
        .map_err(|e| KmError::Codebook {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let info: std::collections::BTreeMap<String, String> = [
            ("mode", meta.mode.clone()),
            ("k", self.k.to_string()),
            ("dim", self.dim.to_string()),
            ("seed", meta.seed.to_string()),
            ("inertia", format!("{}", meta.inertia)),
            ("n_frames", meta.n_frames.to_string()),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .collect();
        let out = fedhubert_io::safetensors_bytes([("centroids", view)], &info).map_err(|e| {
            KmError::Codebook {
                path: path.to_path_buf(),
                why: e.to_string(),
            }
        })?;
        fedhubert_io::atomic_write(path, &out).map_err(|e| KmError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    }

    pub fn load(path: &Path) -> Result<(Self, CodebookMeta)> {
        let bad = |why: String| KmError::Codebook {
            path: path.to_path_buf(),
            why,
        };
        let bytes = std::fs::read(path).map_err(|e| KmError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let checksums = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(fedhubert_io::CHECKSUMS_KEY));
        fedhubert_io::verify_checksums(&st, checksums).map_err(bad)?;
        let t = st
            .tensor("centroids")
            .map_err(|e| bad(format!("no `centroids` tensor: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 2 {
            return Err(bad(format!(
                "`centroids` is {:?} {:?}, expected F32 [k, dim]",
                t.dtype(),
                t.shape()
            )));
        }
        let (k, dim) = (t.shape()[0], t.shape()[1]);
        let c: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let m = header.metadata().clone().unwrap_or_default();
        let meta = CodebookMeta {
            mode: m.get("mode").cloned().unwrap_or_default(),
            seed: m.get("seed").and_then(|s| s.parse().ok()).unwrap_or(0),
            inertia: m
                .get("inertia")
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN),
            n_frames: m.get("n_frames").and_then(|s| s.parse().ok()).unwrap_or(0),
        };
        Ok((
            Codebook::new(k, dim, c).map_err(|e| bad(e.to_string()))?,
            meta,
        ))
    }
}
