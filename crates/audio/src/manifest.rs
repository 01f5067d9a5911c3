//! Manifests: one CSV row per utterance, paths relative to a declared root so a partition can move.
//!
//! The root is not stored in the CSV itself (it would break plain CSV readers); it is declared in
//! `partition.json` next to the client folders, or given explicitly.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{AudioError, atomic_write};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
}

/// One utterance. `num_samples` counts samples at 16 kHz (what the model sees);
/// `sample_rate` is the file's original rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub path: String,
    pub split: Split,
    pub num_samples: u64,
    pub sample_rate: u32,
    pub speaker: String,
    pub chapter: String,
    pub transcript: String,
}

impl Entry {
    pub fn duration_s(&self) -> f64 {
        self.num_samples as f64 / crate::MODEL_SAMPLE_RATE as f64
    }
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub root: PathBuf,
    pub entries: Vec<Entry>,
}

/// Name of the partition description written by `prepare` next to the client folders.
pub const PARTITION_FILE: &str = "partition.json";

impl Manifest {
    pub fn abs_path(&self, e: &Entry) -> PathBuf {
        self.root.join(&e.path)
    }

    /// Entries of one split, in manifest order.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.split == split)
    }

    /// Loads a manifest; the root comes from `partition.json` in the manifest's folder or its parent.
    pub fn load(path: &Path) -> Result<Manifest, AudioError> {
        let root = find_declared_root(path)?;
        Self::load_with_root(path, root)
    }

    pub fn load_with_root(path: &Path, root: PathBuf) -> Result<Manifest, AudioError> {
        let mut rdr = csv::Reader::from_path(path).map_err(|e| csv_err(path, 0, e))?;
        let headers = rdr.headers().map_err(|e| csv_err(path, 1, e))?.clone();
        for col in ["id", "path", "num_samples"] {
            if !headers.iter().any(|h| h == col) {
                return Err(AudioError::Manifest {
                    path: path.to_path_buf(),
                    line: 1,
                    why: format!(
                        "missing column `{col}` (expected at least id, path, num_samples)"
                    ),
                });
            }
        }
        let idx = |name: &str| headers.iter().position(|h| h == name);
        let (i_id, i_path, i_n) = (
            idx("id").unwrap(),
            idx("path").unwrap(),
            idx("num_samples").unwrap(),
        );
        let (i_split, i_sr, i_spk, i_ch, i_tr) = (
            idx("split"),
            idx("sample_rate"),
            idx("speaker"),
            idx("chapter"),
            idx("transcript"),
        );
        let mut entries = Vec::new();
        for (k, rec) in rdr.records().enumerate() {
            let line = k + 2;
            let rec = rec.map_err(|e| csv_err(path, line, e))?;
            let get = |i: Option<usize>| i.and_then(|i| rec.get(i)).unwrap_or("").to_string();
            let bad = |why: String| AudioError::Manifest {
                path: path.to_path_buf(),
                line,
                why,
            };
            let num_samples = get(Some(i_n)).parse::<u64>().map_err(|_| {
                bad(format!(
                    "num_samples {:?} is not an integer",
                    get(Some(i_n))
                ))
            })?;
            let split = match get(i_split).as_str() {
                "" | "train" => Split::Train,
                "valid" => Split::Valid,
                s => return Err(bad(format!("split {s:?} (expected train or valid)"))),
            };
            let sample_rate = match get(i_sr).as_str() {
                "" => crate::MODEL_SAMPLE_RATE,
                s => s
                    .parse::<u32>()
                    .map_err(|_| bad(format!("sample_rate {s:?} is not an integer")))?,
            };
            entries.push(Entry {
                id: get(Some(i_id)),
                path: get(Some(i_path)),
                split,
                num_samples,
                sample_rate,
                speaker: get(i_spk),
                chapter: get(i_ch),
                transcript: get(i_tr),
            });
        }
        Ok(Manifest { root, entries })
    }

    /// Writes the manifest atomically.
    pub fn save(&self, path: &Path) -> Result<(), AudioError> {
        let mut w = csv::Writer::from_writer(Vec::new());
        for e in &self.entries {
            w.serialize(e).map_err(|e| csv_err(path, 0, e))?;
        }
        let bytes = w
            .into_inner()
            .map_err(|e| AudioError::io(path, e.into_error()))?;
        atomic_write(path, &bytes)
    }
}

fn csv_err(path: &Path, line: usize, e: csv::Error) -> AudioError {
    let line = e.position().map(|p| p.line() as usize).unwrap_or(line);
    AudioError::Manifest {
        path: path.to_path_buf(),
        line,
        why: e.to_string(),
    }
}

/// The root declared by `partition.json` in the manifest's folder or its parent; a relative root is
/// taken relative to the folder holding `partition.json`.
pub fn find_declared_root(manifest: &Path) -> Result<PathBuf, AudioError> {
    let dir = manifest.parent().unwrap_or(Path::new("."));
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(PARTITION_FILE);
        if p.is_file() {
            let text = std::fs::read_to_string(&p).map_err(|e| AudioError::io(&p, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| AudioError::Json {
                    path: p.clone(),
                    why: e.to_string(),
                })?;
            let root = v
                .get("root")
                .and_then(|r| r.as_str())
                .ok_or_else(|| AudioError::Json {
                    path: p.clone(),
                    why: "missing string field `root` (the folder manifest paths are relative to)"
                        .into(),
                })?;
            return Ok(d.join(root));
        }
    }
    Err(AudioError::Manifest {
        path: manifest.to_path_buf(),
        line: 0,
        why: format!(
            "no {PARTITION_FILE} declaring the audio root next to it or in its parent folder; pass the root explicitly"
        ),
    })
}
