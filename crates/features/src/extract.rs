//! Streaming MFCC extraction of a manifest into a feature shard (`mfcc.npy` + `mfcc.len`) and its
//! description `features.json`.
//!
//! Utterances are decoded and featurized in parallel (rayon) a chunk at a time, then written in
//! manifest order, so memory is bounded by one chunk of features whatever the corpus size, and the
//! shard rows line up with the manifest rows.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fedhubert_audio::Manifest;
use fedhubert_io::provenance::Provenance;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::shard::{ShardWriter, shard_paths};
use crate::{FRAME_RATE, FeatureError, MFCC_DIM, Mfcc, RECIPE};

/// One utterance's features and its sample count, or why it failed.
type UttResult = Result<(Vec<f32>, usize), FeatureError>;

/// Name of the description written next to the shard.
pub const FEATURES_JSON: &str = "features.json";
/// Default shard stem: `mfcc.npy` / `mfcc.len`.
pub const MFCC_STEM: &str = "mfcc";

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Worker threads; 0 uses the current rayon pool (all cores by default).
    pub threads: usize,
    /// Utterances featurized in parallel before being written (bounds memory: about
    /// `chunk x utterance frames x 39 x 4` bytes).
    pub chunk: usize,
    /// Shard stem (`STEM.npy`, `STEM.len`).
    pub stem: String,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            chunk: 64,
            stem: MFCC_STEM.to_string(),
        }
    }
}

/// Reported after each utterance is written.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub frames: u64,
    pub audio_seconds: f64,
}

/// What one extraction did.
#[derive(Debug, Clone)]
pub struct ExtractSummary {
    pub npy: PathBuf,
    pub len: PathBuf,
    pub info: PathBuf,
    pub utterances: usize,
    /// Utterances shorter than one frame (400 samples), written with 0 frames.
    pub empty: usize,
    pub frames: u64,
    pub audio_seconds: f64,
    pub wall_seconds: f64,
    pub threads: usize,
}

impl ExtractSummary {
    pub fn utterances_per_second(&self) -> f64 {
        self.utterances as f64 / self.wall_seconds.max(1e-9)
    }

    /// Seconds of audio processed per second of wall time (decode + MFCC + write).
    pub fn realtime_factor(&self) -> f64 {
        self.audio_seconds / self.wall_seconds.max(1e-9)
    }
}

/// The `features.json` written next to a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturesInfo {
    pub feature: String,
    pub dims: usize,
    pub frame_rate: f64,
    pub sample_rate: u32,
    pub recipe: String,
    pub manifest: String,
    pub npy: String,
    pub len: String,
    pub utterances: usize,
    pub frames: u64,
    pub audio_seconds: f64,
}

impl FeaturesInfo {
    pub fn load(dir: &Path) -> Result<Self, FeatureError> {
        let path = dir.join(FEATURES_JSON);
        let text = std::fs::read_to_string(&path).map_err(|e| FeatureError::Io {
            path: path.clone(),
            error: e,
        })?;
        serde_json::from_str(&text).map_err(|e| FeatureError::Format {
            path,
            why: e.to_string(),
        })
    }
}

/// Extracts the 39-dim MFCC of every manifest row into `out_dir/STEM.npy` + `STEM.len` (rows in
/// manifest order) and writes `out_dir/features.json`. `manifest_path` is only recorded and used in
/// error messages. A row whose audio is missing or corrupt is an error naming the manifest line, the
/// utterance and the file, and so is one whose decoded length is not the row's `num_samples`;
/// nothing is left behind (the shard is renamed into place only when complete).
pub fn extract_manifest(
    manifest: &Manifest,
    manifest_path: &Path,
    out_dir: &Path,
    opts: &ExtractOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ExtractSummary, FeatureError> {
    let start = Instant::now();
    let pool = if opts.threads > 0 {
        Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(opts.threads)
                .build()
                .map_err(|e| {
                    FeatureError::Shape(format!(
                        "cannot start {} worker threads: {e}",
                        opts.threads
                    ))
                })?,
        )
    } else {
        None
    };
    let in_pool = |f: &(dyn Fn() -> Vec<UttResult> + Sync)| match &pool {
        Some(p) => p.install(f),
        None => f(),
    };
    let mfcc = Mfcc::default();
    let sr = mfcc.config().sample_rate as f64;
    let total = manifest.entries.len();
    let mut writer = ShardWriter::<f32>::create(out_dir, &opts.stem, Some(MFCC_DIM))?;
    let mut p = Progress {
        done: 0,
        total,
        frames: 0,
        audio_seconds: 0.0,
    };
    let mut empty = 0;
    let chunk = opts.chunk.max(1);
    for (c, entries) in manifest.entries.chunks(chunk).enumerate() {
        let feats = in_pool(&|| {
            entries
                .par_iter()
                .enumerate()
                .map_init(
                    || mfcc.scratch(),
                    |scratch, (k, e)| {
                        let row = c * chunk + k;
                        // A length that disagrees with the manifest is an error: the file
                        // changed since `prepare`, and its frames would not match its row.
                        let audio =
                            manifest
                                .load_entry_audio(e)
                                .map_err(|error| FeatureError::Audio {
                                    manifest: manifest_path.to_path_buf(),
                                    line: row + 2,
                                    id: e.id.clone(),
                                    error,
                                })?;
                        let mut out = Vec::new();
                        mfcc.compute_into(&audio.samples, scratch, &mut out);
                        Ok((out, audio.samples.len()))
                    },
                )
                .collect()
        });
        for (k, r) in feats.into_iter().enumerate() {
            let (f, n) = r?;
            if f.is_empty() {
                empty += 1;
                let e = &entries[k];
                tracing::warn!(
                    "{}: utterance {} is shorter than one 25 ms frame: 0 frames",
                    manifest_path.display(),
                    e.id
                );
            }
            writer.push(&f)?;
            p.done += 1;
            p.frames += (f.len() / MFCC_DIM) as u64;
            p.audio_seconds += n as f64 / sr;
            progress(&p);
        }
    }
    let (npy, len) = writer.finish()?;
    let info = FeaturesInfo {
        feature: "mfcc".into(),
        dims: MFCC_DIM,
        frame_rate: FRAME_RATE,
        sample_rate: mfcc.config().sample_rate,
        recipe: RECIPE.into(),
        manifest: manifest_path.display().to_string(),
        npy: file_name(&npy),
        len: file_name(&len),
        utterances: total,
        frames: p.frames,
        audio_seconds: p.audio_seconds,
    };
    let info_path = out_dir.join(FEATURES_JSON);
    write_atomic(
        &info_path,
        serde_json::to_string_pretty(&info)
            .expect("plain struct")
            .as_bytes(),
    )?;
    // What the labels computed from these features check: this manifest, at this frame rate.
    let record = Provenance::new("features", "fedhubert features");
    // A manifest built in memory has no file to hash; one read from disk is recorded.
    let record = if manifest_path.is_file() {
        record.input_file("manifest", manifest_path)
    } else {
        Ok(record)
    };
    record
        .and_then(|r| {
            r.param("feature", "mfcc")
                .param("dims", MFCC_DIM)
                .param("frame_rate", FRAME_RATE)
                .param("recipe", RECIPE)
                .write_for_shard(out_dir, &opts.stem)
        })
        .map_err(|e| FeatureError::Format {
            path: e.path,
            why: e.why,
        })?;
    Ok(ExtractSummary {
        npy,
        len,
        info: info_path,
        utterances: total,
        empty,
        frames: p.frames,
        audio_seconds: p.audio_seconds,
        wall_seconds: start.elapsed().as_secs_f64(),
        threads: pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads()),
    })
}

/// True when `dir` holds a complete shard named `stem` (both files present).
pub fn shard_exists(dir: &Path, stem: &str) -> bool {
    let (npy, len) = shard_paths(dir, stem);
    npy.is_file() && len.is_file()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FeatureError> {
    fedhubert_io::atomic_write(path, bytes).map_err(|e| FeatureError::Io {
        path: path.to_path_buf(),
        error: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::ShardReader;
    use fedhubert_audio::{Entry, Split, load_audio};

    fn sample_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/librispeech-sample")
    }

    /// An entry with the decoded length of its file (0 when it cannot be decoded).
    fn entry(id: &str, path: &str) -> Entry {
        let num_samples = load_audio(&sample_dir().join(path)).map_or(0, |a| a.samples.len());
        Entry {
            id: id.into(),
            path: path.into(),
            split: Split::Train,
            num_samples: num_samples as u64,
            sample_rate: 16_000,
            speaker: String::new(),
            chapter: String::new(),
            transcript: String::new(),
        }
    }

    fn flacs() -> Vec<String> {
        let mut v = Vec::new();
        let chapter = sample_dir().join("test-other/1688/142285");
        for e in std::fs::read_dir(&chapter).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "flac") {
                v.push(
                    p.strip_prefix(sample_dir())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        v.sort();
        v.truncate(5);
        v
    }

    #[test]
    fn shard_rows_follow_manifest_order_whatever_the_threads() {
        let files = flacs();
        assert!(files.len() >= 3);
        // Reverse order, chunk 2, so chunks and parallelism both matter.
        let entries: Vec<Entry> = files
            .iter()
            .rev()
            .enumerate()
            .map(|(i, p)| entry(&format!("u{i}"), p))
            .collect();
        let m = Manifest {
            root: sample_dir(),
            entries,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        let opts = ExtractOptions {
            threads: 2,
            chunk: 2,
            ..Default::default()
        };
        let s = extract_manifest(&m, Path::new("test.csv"), dir.path(), &opts, &mut |p| {
            seen.push(p.done)
        })
        .unwrap();
        assert_eq!(seen, (1..=m.entries.len()).collect::<Vec<_>>());
        assert_eq!(s.utterances, m.entries.len());
        let r = ShardReader::<f32>::open(dir.path(), MFCC_STEM).unwrap();
        assert_eq!(r.dim(), 39);
        assert_eq!(r.lengths().iter().sum::<usize>() as u64, s.frames);
        let all = r.read_all().unwrap();
        let mfcc = Mfcc::default();
        for (e, got) in m.entries.iter().zip(&all) {
            let a = load_audio(&m.abs_path(e)).unwrap();
            assert_eq!(got, &mfcc.compute(&a.samples), "row {} out of order", e.id);
        }
        let info = FeaturesInfo::load(dir.path()).unwrap();
        assert_eq!(
            (info.dims, info.frame_rate, info.utterances, info.frames),
            (39, 100.0, m.entries.len(), s.frames)
        );
        assert!((info.audio_seconds - s.audio_seconds).abs() < 1e-9 && s.audio_seconds > 1.0);
    }

    #[test]
    fn num_samples_mismatch_names_the_row_and_leaves_no_shard() {
        let mut entries: Vec<Entry> = flacs().iter().take(2).map(|p| entry("ok", p)).collect();
        entries[1].id = "stale".into();
        entries[1].num_samples += 1;
        let n = entries[1].num_samples;
        let m = Manifest {
            root: sample_dir(),
            entries,
        };
        let dir = tempfile::tempdir().unwrap();
        let err = extract_manifest(
            &m,
            Path::new("c/manifest.csv"),
            dir.path(),
            &Default::default(),
            &mut |_| {},
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                &err,
                FeatureError::Audio {
                    error: fedhubert_audio::AudioError::NumSamplesMismatch { .. },
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("line 3") && msg.contains("stale") && msg.contains(&n.to_string()),
            "{msg}"
        );
        assert!(!shard_exists(dir.path(), MFCC_STEM));
    }

    #[test]
    fn missing_audio_names_the_row_and_file_and_leaves_no_shard() {
        let mut entries: Vec<Entry> = flacs().iter().take(2).map(|p| entry("ok", p)).collect();
        entries.push(entry("gone", "test-clean/nope/missing.flac"));
        let m = Manifest {
            root: sample_dir(),
            entries,
        };
        let dir = tempfile::tempdir().unwrap();
        let err = extract_manifest(
            &m,
            Path::new("clients/client_0/manifest.csv"),
            dir.path(),
            &Default::default(),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("manifest.csv") && err.contains("line 4") && err.contains("gone"),
            "{err}"
        );
        assert!(err.contains("missing.flac"), "{err}");
        assert!(!shard_exists(dir.path(), MFCC_STEM));
    }
}
