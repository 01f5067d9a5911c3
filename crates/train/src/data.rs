//! A client's data in memory: decoded 16 kHz audio and its k-means labels, split train/valid, and
//! fairseq-style batches (length-sorted, cropped to the shortest utterance of the batch).

use std::path::Path;

use fedhubert_audio::{Manifest, Split, load_audio};
use fedhubert_features::shard::ShardReader;
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// One utterance: waveform and labels at `label_rate`.
#[derive(Debug, Clone)]
pub struct Utt {
    pub id: String,
    pub wav: Vec<f32>,
    pub labels: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct ClientData {
    pub train: Vec<Utt>,
    pub valid: Vec<Utt>,
}

impl ClientData {
    pub fn train_seconds(&self) -> f64 {
        self.train
            .iter()
            .map(|u| u.wav.len() as f64 / 16_000.0)
            .sum()
    }
}

/// Loads `DIR/manifest.csv` with the labels of shard `DIR/{label_stem}.npy` (one row per manifest
/// row, in order). Every mismatch names the file.
pub fn load_client_dir(dir: &Path, label_stem: &str) -> Result<ClientData, TrainError> {
    let mpath = dir.join("manifest.csv");
    let manifest = Manifest::load(&mpath)?;
    let mut reader = ShardReader::<u16>::open(dir, label_stem)?;
    if reader.lengths().len() != manifest.entries.len() {
        return Err(TrainError::Data(format!(
            "{}: {} label rows but {} has {} utterances; rerun `fedhubert kmeans` for this partition",
            dir.join(format!("{label_stem}.len")).display(),
            reader.lengths().len(),
            mpath.display(),
            manifest.entries.len()
        )));
    }
    let mut data = ClientData::default();
    let mut labels = Vec::new();
    for e in &manifest.entries {
        reader.next_into(&mut labels)?;
        let audio = load_audio(&manifest.abs_path(e))?;
        let utt = Utt {
            id: e.id.clone(),
            wav: audio.samples,
            labels: labels.iter().map(|&l| l as u32).collect(),
        };
        match e.split {
            Split::Train => data.train.push(utt),
            Split::Valid => data.valid.push(utt),
        }
    }
    if data.train.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no training utterances",
            mpath.display()
        )));
    }
    Ok(data)
}

/// Batching: fairseq's `max_tokens` (samples per batch after cropping), crop bounds, batch size cap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Utterances per batch at most.
    pub batch_size: usize,
    /// Audio samples per batch at most (batch size x cropped length), fairseq `max_tokens`.
    pub max_tokens: usize,
    /// Longer utterances are randomly cropped to this many samples (fairseq `max_sample_size`).
    pub max_sample_size: usize,
    /// Shorter utterances are skipped (fairseq `min_sample_size`).
    pub min_sample_size: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            max_tokens: 1_400_000,
            max_sample_size: 250_000,
            min_sample_size: 32_000,
        }
    }
}

/// A batch: equal-length crops and their label windows.
pub struct Batch {
    pub wavs: Vec<Vec<f32>>,
    pub labels: Vec<Vec<u32>>,
    /// Where each crop starts in its utterance (samples), to align other per-frame targets.
    pub starts: Vec<usize>,
}

/// Groups utterance indices into batches for one epoch: shuffled, stable-sorted by length so a
/// batch wastes little audio when cropped to its shortest member, then the batch order shuffled.
pub fn epoch_batches<R: Rng>(utts: &[Utt], cfg: &BatchConfig, rng: &mut R) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..utts.len())
        .filter(|&i| utts[i].wav.len() >= cfg.min_sample_size)
        .collect();
    idx.shuffle(rng);
    idx.sort_by_key(|&i| utts[i].wav.len());
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in idx {
        let crop = |j: usize| utts[j].wav.len().min(cfg.max_sample_size);
        let shortest = cur.iter().map(|&j| crop(j)).chain([crop(i)]).min().unwrap();
        if !cur.is_empty()
            && ((cur.len() + 1) * shortest > cfg.max_tokens || cur.len() >= cfg.batch_size)
        {
            batches.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches.shuffle(rng);
    batches
}

/// Crops every utterance of a batch to the shortest one (capped at `max_sample_size`) at a random
/// offset, with the matching label window (fairseq `HubertDataset.collater`, `pad_audio=False`).
pub fn make_batch<R: Rng>(
    utts: &[&Utt],
    max_sample_size: usize,
    label_rate: f64,
    rng: &mut R,
) -> Batch {
    let len = utts
        .iter()
        .map(|u| u.wav.len())
        .min()
        .unwrap_or(0)
        .min(max_sample_size);
    let mut wavs = Vec::with_capacity(utts.len());
    let mut labels = Vec::with_capacity(utts.len());
    let mut starts = Vec::with_capacity(utts.len());
    for u in utts {
        let start = if u.wav.len() > len {
            rng.random_range(0..=u.wav.len() - len)
        } else {
            0
        };
        wavs.push(u.wav[start..start + len].to_vec());
        starts.push(start);
        let f0 = (start as f64 * label_rate / 16_000.0).round() as usize;
        let nf = (len as f64 * label_rate / 16_000.0).round() as usize;
        let f0 = f0.min(u.labels.len());
        labels.push(u.labels[f0..(f0 + nf).min(u.labels.len())].to_vec());
    }
    Batch {
        wavs,
        labels,
        starts,
    }
}
