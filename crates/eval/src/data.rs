//! Labelled clip folders: `ROOT/LABEL/*.wav` (Speech Commands layout, or any other labelled
//! folder of `.wav` / `.flac` files), decoded to mono 16 kHz f32.

use std::path::{Path, PathBuf};

use fedhubert_audio::{is_audio_file, load_audio};
use rayon::prelude::*;

use crate::EvalError;

/// Shortest clip the HuBERT conv front-end accepts (one 25 ms receptive field = 400 samples).
pub const MIN_SAMPLES: usize = 400;

/// One decoded clip.
#[derive(Debug, Clone)]
pub struct Clip {
    pub path: PathBuf,
    /// Index into [`LabelledClips::classes`].
    pub label: usize,
    /// Speaker id parsed from the file name ([`speaker_of`]), if any.
    pub speaker: Option<String>,
    /// Mono, 16 kHz.
    pub samples: Vec<f32>,
}

/// A labelled data set: class names (sorted folder names) and clips (sorted by class, then name).
#[derive(Debug, Clone)]
pub struct LabelledClips {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub clips: Vec<Clip>,
}

impl LabelledClips {
    /// Clips per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        self.clips.iter().for_each(|x| c[x.label] += 1);
        c
    }

    /// True when every clip carries a speaker id.
    pub fn has_speakers(&self) -> bool {
        !self.clips.is_empty() && self.clips.iter().all(|c| c.speaker.is_some())
    }

    /// Total audio in seconds.
    pub fn seconds(&self) -> f64 {
        self.clips
            .iter()
            .map(|c| c.samples.len() as f64)
            .sum::<f64>()
            / 16_000.0
    }
}

/// Loader options.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Crop clips longer than this many seconds (keeps the first part); `None` keeps everything.
    pub max_seconds: Option<f64>,
    /// Folder names skipped at the top level (Speech Commands' `_background_noise_` holds long
    /// noise recordings, not a class). Hidden folders (`.name`) are always skipped.
    pub skip_dirs: Vec<String>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            max_seconds: Some(10.0),
            skip_dirs: vec!["_background_noise_".into()],
        }
    }
}

/// Speaker id from a Speech Commands file name `SPEAKERHASH_nohash_N.wav` (the part before
/// `_nohash_`); `None` for names without that marker.
pub fn speaker_of(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    let (spk, _) = stem.split_once("_nohash_")?;
    (!spk.is_empty()).then(|| spk.to_string())
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let rd = std::fs::read_dir(dir).map_err(|e| EvalError::io(dir, e))?;
    let mut v = Vec::new();
    for e in rd {
        v.push(e.map_err(|e| EvalError::io(dir, e))?.path());
    }
    v.sort();
    Ok(v)
}

/// Loads `root/LABEL/*.{wav,flac}`: every sub-folder (except hidden ones and
/// `cfg.skip_dirs`) is a class; files that are not audio are ignored. Errors: missing or empty
/// root, a class folder without clips, an undecodable or too-short clip (naming the file).
pub fn load_labelled_dir(root: &Path, cfg: &LoadConfig) -> Result<LabelledClips, EvalError> {
    let mut classes = Vec::new();
    let mut files: Vec<(usize, PathBuf)> = Vec::new();
    for dir in sorted_entries(root)? {
        if !dir.is_dir() {
            continue;
        }
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') || cfg.skip_dirs.contains(&name) {
            continue;
        }
        let audio: Vec<PathBuf> = sorted_entries(&dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_audio_file(p))
            .collect();
        if audio.is_empty() {
            return Err(EvalError::EmptyClass {
                dir: dir.clone(),
                class: name,
            });
        }
        let label = classes.len();
        classes.push(name);
        files.extend(audio.into_iter().map(|p| (label, p)));
    }
    if classes.is_empty() {
        return Err(EvalError::EmptyDataset {
            dir: root.to_path_buf(),
        });
    }
    let max = cfg
        .max_seconds
        .map(|s| (s * 16_000.0).round().max(MIN_SAMPLES as f64) as usize);
    let clips = files
        .into_par_iter()
        .map(|(label, path)| {
            let mut samples = load_audio(&path)?.samples;
            if samples.len() < MIN_SAMPLES {
                return Err(EvalError::TooShort {
                    path,
                    samples: samples.len(),
                    min: MIN_SAMPLES,
                });
            }
            if let Some(m) = max {
                samples.truncate(m);
            }
            let speaker = speaker_of(&path);
            Ok(Clip {
                path,
                label,
                speaker,
                samples,
            })
        })
        .collect::<Result<Vec<_>, EvalError>>()?;
    Ok(LabelledClips {
        root: root.to_path_buf(),
        classes,
        clips,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaker_from_speech_commands_names() {
        assert_eq!(
            speaker_of(Path::new("yes/0a7c2a8d_nohash_3.wav")).as_deref(),
            Some("0a7c2a8d")
        );
        assert_eq!(speaker_of(Path::new("yes/tone_3.wav")), None);
        assert_eq!(speaker_of(Path::new("_nohash_1.wav")), None);
    }
}
