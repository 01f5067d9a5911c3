//! Corpus scanning: a LibriSpeech-layout folder, a plain folder of audio files, or a manifest CSV.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::manifest::{ManifestOptions, find_declared_root, read_manifest};
use crate::{AudioError, Entry, Split, is_audio_file, load_audio};

/// A file left out under `--skip-bad`, with the reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Every usable utterance of a corpus (split not yet assigned) and what was skipped.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub root: PathBuf,
    pub utterances: Vec<Entry>,
    pub skipped: Vec<Skipped>,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), AudioError> {
    walk_once(dir, out, &mut std::collections::HashSet::new())
}

/// Walks `dir` unless its real path was walked already: a symlink loop used to be followed
/// some 40 levels deep (until the path was too long) and its files reported as duplicate ids.
fn walk_once(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), AudioError> {
    let real = std::fs::canonicalize(dir).map_err(|e| AudioError::io(dir, e))?;
    if !seen.insert(real.clone()) {
        tracing::warn!(
            "{}: skipped, it is {} again (a symlink loop or a second link to one folder)",
            dir.display(),
            real.display()
        );
        return Ok(());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| AudioError::io(dir, e))?;
    let mut items: Vec<PathBuf> = Vec::new();
    for ent in rd {
        items.push(ent.map_err(|e| AudioError::io(dir, e))?.path());
    }
    items.sort();
    for p in items {
        if p.is_dir() {
            walk_once(&p, out, seen)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// `SPEAKER-CHAPTER-UTT` (LibriSpeech) → (speaker, chapter).
fn librispeech_ids(stem: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = stem.split('-').collect();
    (parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
    .then(|| (parts[0].to_string(), parts[1].to_string()))
}

fn read_transcripts(path: &Path, into: &mut HashMap<String, String>) -> Result<(), AudioError> {
    let text = std::fs::read_to_string(path).map_err(|e| AudioError::io(path, e))?;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (id, words) = line.split_once(' ').ok_or_else(|| AudioError::Manifest {
            path: path.to_path_buf(),
            line: i + 1,
            why: "expected `UTTERANCE-ID TRANSCRIPT`".into(),
        })?;
        into.insert(id.to_string(), words.trim().to_string());
    }
    Ok(())
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Scans `root` recursively for `.flac`/`.wav`. LibriSpeech names give speaker and chapter; other
/// files take their parent folder as speaker. Every file is decoded (in parallel) to count its
/// samples and to catch corrupt, truncated or empty audio: an error names the file, or with
/// `skip_bad` the file is listed in `skipped`.
pub fn scan_dir(root: &Path, skip_bad: bool) -> Result<Corpus, AudioError> {
    if !root.is_dir() {
        return Err(AudioError::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
        ));
    }
    let mut files = Vec::new();
    walk(root, &mut files)?;
    let mut transcripts = HashMap::new();
    for f in files
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".trans.txt"))
    {
        read_transcripts(f, &mut transcripts)?;
    }
    let audio: Vec<&PathBuf> = files.iter().filter(|f| is_audio_file(f)).collect();
    if audio.is_empty() {
        return Err(AudioError::NoAudio {
            dir: root.to_path_buf(),
        });
    }
    let decoded: Vec<Result<Entry, AudioError>> = audio
        .par_iter()
        .map(|p| {
            let a = load_audio(p)?;
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let (speaker, chapter) = librispeech_ids(&stem).unwrap_or_else(|| {
                let parent = p
                    .parent()
                    .filter(|d| *d != root)
                    .and_then(|d| d.file_name());
                (
                    parent
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    String::new(),
                )
            });
            Ok(Entry {
                transcript: transcripts.get(&stem).cloned().unwrap_or_default(),
                id: stem,
                path: rel(root, p),
                split: Split::Train,
                num_samples: a.samples.len() as u64,
                sample_rate: a.orig_sample_rate,
                speaker,
                chapter,
            })
        })
        .collect();
    collect(root.to_path_buf(), decoded, skip_bad)
}

fn collect(
    root: PathBuf,
    results: Vec<Result<Entry, AudioError>>,
    skip_bad: bool,
) -> Result<Corpus, AudioError> {
    let mut utterances = Vec::new();
    let mut skipped = Vec::new();
    for r in results {
        match r {
            Ok(e) => utterances.push(e),
            Err(e) if skip_bad => {
                let path = match &e {
                    AudioError::Io { path, .. }
                    | AudioError::Decode { path, .. }
                    | AudioError::Empty { path }
                    | AudioError::HeaderExceedsFile { path, .. }
                    | AudioError::TooLong { path, .. }
                    | AudioError::Unsupported { path }
                    | AudioError::Resample { path, .. } => rel(&root, path),
                    _ => String::new(),
                };
                skipped.push(Skipped {
                    path,
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    let mut seen = HashMap::new();
    for e in &utterances {
        if let Some(prev) = seen.insert(e.id.clone(), e.path.clone()) {
            return Err(AudioError::Partition(format!(
                "utterance id {} appears twice ({} and {})",
                e.id, prev, e.path
            )));
        }
    }
    if utterances.is_empty() {
        return Err(AudioError::NoAudio { dir: root });
    }
    Ok(Corpus {
        root,
        utterances,
        skipped,
    })
}

/// Reads an existing manifest CSV as a corpus (splits are reassigned by the partitioner, so a
/// `split` column is optional here). Files are checked to exist; their sample counts are taken
/// from the manifest (and checked against the audio when features are extracted). Paths outside
/// the root are refused; see [`scan_manifest_with`].
pub fn scan_manifest(
    path: &Path,
    root: Option<PathBuf>,
    skip_bad: bool,
) -> Result<Corpus, AudioError> {
    scan_manifest_with(path, root, skip_bad, ManifestOptions::default())
}

/// [`scan_manifest`] with explicit options (e.g. `allow_outside_root`).
pub fn scan_manifest_with(
    path: &Path,
    root: Option<PathBuf>,
    skip_bad: bool,
    opts: ManifestOptions,
) -> Result<Corpus, AudioError> {
    let root = match root {
        Some(r) => r,
        None => find_declared_root(path)?,
    };
    let m = read_manifest(path, root, opts, false)?;
    let results = m
        .entries
        .iter()
        .map(|e| {
            let p = m.abs_path(e);
            if !p.is_file() {
                return Err(AudioError::io(
                    p,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "listed in the manifest but missing",
                    ),
                ));
            }
            if e.num_samples == 0 {
                return Err(AudioError::Empty { path: p });
            }
            Ok(e.clone())
        })
        .collect();
    collect(m.root.clone(), results, skip_bad)
}
