//! Manifests: one CSV row per utterance, paths relative to a declared root so a partition can move.
//!
//! The root is not stored in the CSV itself (it would break plain CSV readers); it is declared in
//! `partition.json` next to the client folders, or given explicitly.

use std::path::{Component, Path, PathBuf};

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

    /// Errors unless `decoded` (samples at 16 kHz, as `load_audio` returns) equals the manifest's
    /// `num_samples`: a file replaced or re-encoded since `prepare` would otherwise feed frames
    /// that no longer match the features and labels computed from it.
    pub fn check_decoded_len(&self, decoded: usize) -> Result<(), AudioError> {
        if decoded as u64 == self.num_samples {
            return Ok(());
        }
        Err(AudioError::NumSamplesMismatch {
            path: PathBuf::from(&self.path),
            id: self.id.clone(),
            manifest: self.num_samples,
            decoded: decoded as u64,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub root: PathBuf,
    pub entries: Vec<Entry>,
}

/// How strictly a manifest is read. The default refuses everything the issue "nothing silently
/// wrong" names: entries outside the root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManifestOptions {
    /// Accept entry paths that are absolute or climb above the root with `..`. Off by default: a
    /// partition is meant to move with its root, and a stray `../` reads audio nobody declared.
    pub allow_outside_root: bool,
}

/// Name of the partition description written by `prepare` next to the client folders.
pub const PARTITION_FILE: &str = "partition.json";

/// Positions of the manifest's columns; the optional ones may be absent.
struct Columns {
    id: usize,
    path: usize,
    num_samples: usize,
    split: Option<usize>,
    sample_rate: Option<usize>,
    speaker: Option<usize>,
    chapter: Option<usize>,
    transcript: Option<usize>,
}

impl Columns {
    fn find(
        path: &Path,
        headers: &csv::StringRecord,
        require_split: bool,
    ) -> Result<Self, AudioError> {
        let idx = |name: &str| headers.iter().position(|h| h == name);
        let need = |name: &str, what: &str| {
            idx(name).ok_or_else(|| AudioError::Manifest {
                path: path.to_path_buf(),
                line: 1,
                why: format!("missing column `{name}` ({what})"),
            })
        };
        let split = if require_split {
            Some(need(
                "split",
                "train or valid for each row; without it every row would silently be a training row",
            )?)
        } else {
            idx("split")
        };
        let basic = "expected at least id, path, num_samples";
        Ok(Columns {
            id: need("id", basic)?,
            path: need("path", basic)?,
            num_samples: need("num_samples", basic)?,
            split,
            sample_rate: idx("sample_rate"),
            speaker: idx("speaker"),
            chapter: idx("chapter"),
            transcript: idx("transcript"),
        })
    }
}

/// True when `rel` joined to a root stays inside it: relative, and no `..` climbs above the start.
/// Lexical on purpose: a symlink inside the root is the data owner's own choice.
fn stays_inside(rel: &str) -> bool {
    let mut depth = 0usize;
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

impl Manifest {
    pub fn abs_path(&self, e: &Entry) -> PathBuf {
        self.root.join(&e.path)
    }

    /// Entries of one split, in manifest order.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.split == split)
    }

    /// Loads a manifest; the root comes from `partition.json` in the manifest's folder or its parent.
    /// Refuses paths outside the root (see [`Manifest::load_with`]).
    pub fn load(path: &Path) -> Result<Manifest, AudioError> {
        Self::load_with(path, None, ManifestOptions::default())
    }

    /// Loads a manifest whose paths are relative to `root`. Refuses paths outside the root.
    pub fn load_with_root(path: &Path, root: PathBuf) -> Result<Manifest, AudioError> {
        Self::load_with(path, Some(root), ManifestOptions::default())
    }

    /// Loads a manifest with its root (`None`: declared by `partition.json`) and options. Every row
    /// must have a `split`; a path outside the root is an error unless `opts` allows it.
    pub fn load_with(
        path: &Path,
        root: Option<PathBuf>,
        opts: ManifestOptions,
    ) -> Result<Manifest, AudioError> {
        let root = match root {
            Some(r) => r,
            None => find_declared_root(path)?,
        };
        read_manifest(path, root, opts, true)
    }

    /// Decodes the audio of `e` and checks its length against the manifest's `num_samples`.
    /// Every reader of manifest audio should come through here rather than `load_audio`.
    pub fn load_entry_audio(&self, e: &Entry) -> Result<crate::Audio, AudioError> {
        let audio = crate::load_audio(&self.abs_path(e))?;
        e.check_decoded_len(audio.samples.len())?;
        Ok(audio)
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

/// Reads the rows of a manifest. `require_split` is false only for a corpus manifest given to
/// `prepare`, whose splits the partitioner assigns anew.
pub(crate) fn read_manifest(
    path: &Path,
    root: PathBuf,
    opts: ManifestOptions,
    require_split: bool,
) -> Result<Manifest, AudioError> {
    let mut rdr = csv::Reader::from_path(path).map_err(|e| csv_err(path, 0, e))?;
    let headers = rdr.headers().map_err(|e| csv_err(path, 1, e))?.clone();
    let cols = Columns::find(path, &headers, require_split)?;
    let mut entries = Vec::new();
    for (k, rec) in rdr.records().enumerate() {
        let line = k + 2;
        let rec = rec.map_err(|e| csv_err(path, line, e))?;
        let e = parse_row(path, line, &rec, &cols, require_split)?;
        if !opts.allow_outside_root && !stays_inside(&e.path) {
            return Err(AudioError::OutsideRoot {
                manifest: path.to_path_buf(),
                line,
                entry: e.path,
                root,
            });
        }
        entries.push(e);
    }
    Ok(Manifest { root, entries })
}

fn parse_row(
    path: &Path,
    line: usize,
    rec: &csv::StringRecord,
    cols: &Columns,
    require_split: bool,
) -> Result<Entry, AudioError> {
    let get = |i: Option<usize>| i.and_then(|i| rec.get(i)).unwrap_or("").to_string();
    let bad = |why: String| AudioError::Manifest {
        path: path.to_path_buf(),
        line,
        why,
    };
    let n = get(Some(cols.num_samples));
    let num_samples = n
        .parse::<u64>()
        .map_err(|_| bad(format!("num_samples {n:?} is not an integer")))?;
    let split = match get(cols.split).as_str() {
        "" if !require_split => Split::Train,
        "train" => Split::Train,
        "valid" => Split::Valid,
        s => return Err(bad(format!("split {s:?} (expected train or valid)"))),
    };
    let sample_rate = match get(cols.sample_rate).as_str() {
        "" => crate::MODEL_SAMPLE_RATE,
        s => s
            .parse::<u32>()
            .map_err(|_| bad(format!("sample_rate {s:?} is not an integer")))?,
    };
    let entry_path = get(Some(cols.path));
    if entry_path.is_empty() {
        return Err(bad("empty path".into()));
    }
    Ok(Entry {
        id: get(Some(cols.id)),
        path: entry_path,
        split,
        num_samples,
        sample_rate,
        speaker: get(cols.speaker),
        chapter: get(cols.chapter),
        transcript: get(cols.transcript),
    })
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
