//! Provenance records: what a derived artefact (features, labels, codebook) was made from.
//!
//! Label files used to be checked by row count alone: swapping two manifest rows after
//! `kmeans`, re-running `prepare` into a prepared folder, or a `kmeans` that failed half way
//! (some clients relabelled with k=10, others still k=20) all trained with exit code 0 on the
//! wrong targets. Every shard writer now leaves `DIR/STEM.provenance.json` beside `STEM.npy` and
//! `STEM.len`: the content hashes of its inputs (the manifest, the features it was computed from,
//! the codebook), the parameters that shape it, and a stamp of its own files. Consumers call
//! [`Provenance::check`] and refuse an artefact whose inputs changed since, naming the command
//! that remakes it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Layout version of the record.
pub const PROVENANCE_VERSION: u32 = 1;

/// The record's file name for the shard `STEM` in `dir`.
pub fn record_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.provenance.json"))
}

/// SHA-256 of a file's bytes, in hex, read in blocks (never the whole file at once).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of bytes, in hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What went wrong with a record; the message names the file and the command to rerun.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct ProvenanceError {
    pub path: PathBuf,
    pub why: String,
}

/// The stamp of one of the artefact's own files: its size always, its hash where the file is
/// small enough to hash on every use (the `.len` index; the `.npy` data is stamped by size).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl FileStamp {
    /// The stamp of `path`, hashed when `hash`.
    pub fn of(path: &Path, hash: bool) -> std::io::Result<Self> {
        Ok(Self {
            bytes: std::fs::metadata(path)?.len(),
            sha256: if hash { Some(sha256_file(path)?) } else { None },
        })
    }
}

/// A derived artefact's record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub format_version: u32,
    /// What it is: `features`, `labels`, `mvq-codes`.
    pub kind: String,
    /// The command that made it, and that remakes it when it is stale.
    pub made_by: String,
    /// Content hashes of what it was made from, by role (`manifest`, `features`, `codebook`).
    pub inputs: BTreeMap<String, String>,
    /// Parameters that shape its content (feature name, dims, frame rate, k, ...).
    pub params: BTreeMap<String, serde_json::Value>,
    /// Its own files by name, stamped after they were written.
    pub files: BTreeMap<String, FileStamp>,
}

impl Provenance {
    pub fn new(kind: &str, made_by: &str) -> Self {
        Self {
            format_version: PROVENANCE_VERSION,
            kind: kind.into(),
            made_by: made_by.into(),
            inputs: BTreeMap::new(),
            params: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }

    /// Records the hash of input `role` read from `path`.
    pub fn input_file(mut self, role: &str, path: &Path) -> Result<Self, ProvenanceError> {
        let h = sha256_file(path).map_err(|e| err(path, e.to_string()))?;
        self.inputs.insert(role.into(), h);
        Ok(self)
    }

    pub fn param(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// Stamps the shard `dir/STEM.{len,npy}` (the index hashed, the data by size) and writes
    /// the record atomically beside it.
    pub fn write_for_shard(self, dir: &Path, stem: &str) -> Result<(), ProvenanceError> {
        self.write_for_files(dir, stem, &[("len", true), ("npy", false)])
    }

    /// Stamps `dir/STEM.EXT` for each `(EXT, hash it)` and writes the record as
    /// `dir/STEM.provenance.json`.
    pub fn write_for_files(
        mut self,
        dir: &Path,
        stem: &str,
        files: &[(&str, bool)],
    ) -> Result<(), ProvenanceError> {
        for (ext, hash) in files {
            let p = dir.join(format!("{stem}.{ext}"));
            let stamp = FileStamp::of(&p, *hash).map_err(|e| err(&p, e.to_string()))?;
            self.files.insert(format!("{stem}.{ext}"), stamp);
        }
        let path = record_path(dir, stem);
        let json = serde_json::to_string_pretty(&self).map_err(|e| err(&path, e.to_string()))?;
        crate::atomic_write(&path, json.as_bytes()).map_err(|e| err(&path, e.to_string()))
    }

    /// The record of the shard `dir/STEM`; a missing one is an error that says to rerun
    /// `remake` (the command that writes this shard).
    pub fn read_for_shard(dir: &Path, stem: &str, remake: &str) -> Result<Self, ProvenanceError> {
        let path = record_path(dir, stem);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err(
                    &path,
                    format!(
                        "missing: the shard `{stem}` in {} has no record of what it was made from (written by an older fedhubert, or copied without it); rerun `{remake}`",
                        dir.display()
                    ),
                ));
            }
            Err(e) => return Err(err(&path, e.to_string())),
        };
        let rec: Self = serde_json::from_str(&text).map_err(|e| {
            err(
                &path,
                format!("not a provenance record: {e}; rerun `{remake}`"),
            )
        })?;
        if rec.format_version > PROVENANCE_VERSION {
            return Err(err(
                &path,
                format!(
                    "format_version {} is newer than this fedhubert's ({PROVENANCE_VERSION}): upgrade fedhubert",
                    rec.format_version
                ),
            ));
        }
        Ok(rec)
    }

    /// Errors unless the shard's files are still the ones stamped and input `role` still hashes
    /// to what was recorded for `input` (e.g. the manifest the shard's rows follow).
    pub fn check(&self, dir: &Path, inputs: &[(&str, &Path)]) -> Result<(), ProvenanceError> {
        for (name, stamp) in &self.files {
            let p = dir.join(name);
            let now =
                FileStamp::of(&p, stamp.sha256.is_some()).map_err(|e| err(&p, e.to_string()))?;
            if &now != stamp {
                return Err(err(
                    &p,
                    format!(
                        "changed since `{}` wrote it ({} bytes then, {} now); rerun `{}`",
                        self.made_by, stamp.bytes, now.bytes, self.made_by
                    ),
                ));
            }
        }
        for (role, path) in inputs {
            let Some(then) = self.inputs.get(*role) else {
                return Err(err(
                    path,
                    format!(
                        "the record does not name a {role}; rerun `{}`",
                        self.made_by
                    ),
                ));
            };
            let now = sha256_file(path).map_err(|e| err(path, e.to_string()))?;
            if &now != then {
                return Err(err(
                    path,
                    format!(
                        "changed since `{}` used it (the {} in {} no longer matches its rows); rerun `{}`",
                        self.made_by,
                        self.kind,
                        dir.display(),
                        self.made_by
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The record's own hash: what an artefact made from this one records as its input.
    pub fn digest(&self) -> String {
        sha256_bytes(serde_json::to_string(self).unwrap_or_default().as_bytes())
    }
}

fn err(path: &Path, why: String) -> ProvenanceError {
    ProvenanceError {
        path: path.to_path_buf(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(dir: &Path, stem: &str, len: &[u8], npy: &[u8]) {
        std::fs::write(dir.join(format!("{stem}.len")), len).unwrap();
        std::fs::write(dir.join(format!("{stem}.npy")), npy).unwrap();
    }

    #[test]
    fn a_record_catches_a_changed_input_and_a_changed_shard() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("manifest.csv");
        std::fs::write(&m, "id,path\na,a.flac\nb,b.flac\n").unwrap();
        shard(d.path(), "km", b"3\n4\n", b"npy-data");
        Provenance::new("labels", "fedhubert kmeans")
            .input_file("manifest", &m)
            .unwrap()
            .param("k", 20)
            .write_for_shard(d.path(), "km")
            .unwrap();
        let rec = Provenance::read_for_shard(d.path(), "km", "fedhubert kmeans").unwrap();
        rec.check(d.path(), &[("manifest", &m)]).unwrap();
        // Two manifest rows swapped: same size, other content.
        std::fs::write(&m, "id,path\nb,b.flac\na,a.flac\n").unwrap();
        let e = rec
            .check(d.path(), &[("manifest", &m)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("manifest.csv") && e.contains("rerun `fedhubert kmeans`"),
            "{e}"
        );
        std::fs::write(&m, "id,path\na,a.flac\nb,b.flac\n").unwrap();
        // The index rewritten by something else.
        shard(d.path(), "km", b"4\n3\n", b"npy-data");
        let e = rec
            .check(d.path(), &[("manifest", &m)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("km.len") && e.contains("changed since"), "{e}");
    }

    #[test]
    fn a_missing_record_names_the_command_to_rerun() {
        let d = tempfile::tempdir().unwrap();
        let e = Provenance::read_for_shard(d.path(), "mfcc", "fedhubert features")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mfcc.provenance.json") && e.contains("rerun `fedhubert features`"),
            "{e}"
        );
    }
}
