//! A client's data in memory: decoded 16 kHz audio and its k-means labels, split train/valid, and
//! fairseq-style batches (length-sorted, cropped to the shortest utterance of the batch).

use std::path::{Path, PathBuf};

use fedhubert_audio::{Manifest, Split};
use fedhubert_features::shard::ShardReader;
use fedhubert_io::provenance::Provenance;
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

/// Which label shard of a client folder the model trains on, and at which rate (frames per
/// second) its labels run: the run file's `label_stem` and `label_rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelSpec {
    pub stem: String,
    pub rate: f64,
}

impl Default for LabelSpec {
    fn default() -> Self {
        Self {
            stem: "km".into(),
            rate: 100.0,
        }
    }
}

/// fairseq `HubertDataset.verify_label_lengths`' tolerance: an utterance's duration from its
/// audio and from its labels at `label_rate` may differ by this much (seconds). fairseq warns
/// and trains on; a misaligned label file is an error here.
pub const LABEL_LENGTH_TOLERANCE_S: f64 = 0.1;

/// The command that remakes label shards.
const REMAKE_LABELS: &str = "fedhubert kmeans";

/// The provenance record of the labels of `dir`; errors unless they were made from this very
/// manifest, at `labels.rate`.
fn check_label_provenance(dir: &Path, labels: &LabelSpec) -> Result<Provenance, TrainError> {
    let rec = Provenance::read_for_shard(dir, &labels.stem, REMAKE_LABELS)?;
    rec.check(dir, &[("manifest", &dir.join("manifest.csv"))])?;
    if let Some(made) = rec.params.get("label_rate").and_then(|v| v.as_f64())
        && (made - labels.rate).abs() > 1e-9
    {
        return Err(TrainError::Data(format!(
            "{}: labels at {made} Hz but pretraining.label_rate is {}: set label_rate: {made}, or relabel with features at {} Hz",
            dir.join(format!("{}.npy", labels.stem)).display(),
            labels.rate,
            labels.rate
        )));
    }
    Ok(rec)
}

/// Errors unless `n_labels` frames at `rate` span the utterance's audio within
/// [`LABEL_LENGTH_TOLERANCE_S`], naming the utterance.
fn check_label_length(
    dir: &Path,
    id: &str,
    samples: usize,
    n_labels: usize,
    labels: &LabelSpec,
) -> Result<(), TrainError> {
    let from_audio = samples as f64 / fedhubert_audio::MODEL_SAMPLE_RATE as f64;
    let from_labels = n_labels as f64 / labels.rate;
    if (from_audio - from_labels).abs() > LABEL_LENGTH_TOLERANCE_S {
        return Err(TrainError::Data(format!(
            "{}: utterance {id}: {n_labels} labels at label_rate {} Hz span {from_labels:.3} s but its audio is {from_audio:.3} s (tolerance {LABEL_LENGTH_TOLERANCE_S} s): the labels are not this audio's at this rate; check pretraining.label_rate, or rerun `{REMAKE_LABELS}`",
            dir.join(format!("{}.npy", labels.stem)).display(),
            labels.rate
        )));
    }
    Ok(())
}

/// Errors unless every client folder's labels were made from its manifest at `labels.rate`
/// (see [`load_client_dir`]; checked before a run starts, not in its first round) and all come
/// from one codebook: a `kmeans` that failed
/// half way leaves some clients relabelled (say k=10) and others with the previous labels
/// (k=20), and a run on both would train on two target sets without a word.
///
/// Returns the codebook's hash, which a run pins (see [`pin_run_labels`]).
pub fn check_partition_labels(dirs: &[PathBuf], labels: &LabelSpec) -> Result<String, TrainError> {
    let mut first: Option<(&Path, Provenance, String)> = None;
    for d in dirs {
        // A manifest that cannot be read (a missing column) fails here, once, rather than
        // in every client's every attempt of round 1.
        Manifest::load(&d.join("manifest.csv"))?;
        let rec = check_label_provenance(d, labels)?;
        let cb = match rec.params.get("codebook") {
            Some(serde_json::Value::String(h)) => h.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        match &first {
            None => first = Some((d, rec, cb)),
            Some((d0, rec0, cb0)) if *cb0 != cb => {
                return Err(TrainError::Data(format!(
                    "{} and {} hold labels of different codebooks ({} and {}): a kmeans run did not finish for every client, or labelled each with its own codebook (--mode local); rerun `{REMAKE_LABELS}` on the whole partition with one codebook",
                    d0.join(format!("{}.npy", labels.stem)).display(),
                    d.join(format!("{}.npy", labels.stem)).display(),
                    describe_codebook(rec0),
                    describe_codebook(&rec),
                )));
            }
            Some(_) => {}
        }
    }
    Ok(first.map(|(_, _, cb)| cb).unwrap_or_default())
}

/// The labels a run in `out` trains on: `out/labels.json` holds the codebook hash of the
/// labels the run started with. A resume over a partition relabelled since (another `kmeans`)
/// would continue on other targets without a word; it is refused. A new run writes the file.
pub fn pin_run_labels(
    out: &Path,
    codebook: &str,
    labels: &LabelSpec,
    resume: bool,
) -> Result<(), TrainError> {
    let path = out.join("labels.json");
    let now = serde_json::json!({"codebook": codebook, "label_stem": labels.stem, "label_rate": labels.rate});
    if resume && path.is_file() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        let then: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        if then != now {
            return Err(TrainError::Data(format!(
                "{}: this run started on other labels ({then}) than the partition holds now ({now}): the partition was relabelled since; resume with the labels it started with, or start again with --overwrite",
                path.display()
            )));
        }
        return Ok(());
    }
    fedhubert_io::atomic_write(&path, now.to_string().as_bytes())
        .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))
}

fn describe_codebook(rec: &Provenance) -> String {
    let k = rec
        .params
        .get("k")
        .map(|v| v.to_string())
        .unwrap_or("?".into());
    let h = rec
        .params
        .get("codebook")
        .and_then(|v| v.as_str())
        .map(|h| &h[..h.len().min(12)])
        .unwrap_or("none");
    format!("k={k}, codebook {h}")
}

/// Loads `DIR/manifest.csv` with the labels of shard `DIR/{stem}.npy` (one row per manifest
/// row, in order). The labels must have been made from this manifest (their provenance record)
/// and each utterance's labels must span its audio at `labels.rate`; every mismatch names the
/// file, and the utterance where it is one.
pub fn load_client_dir(dir: &Path, labels: &LabelSpec) -> Result<ClientData, TrainError> {
    let mpath = dir.join("manifest.csv");
    let manifest = Manifest::load(&mpath)?;
    check_label_provenance(dir, labels)?;
    let mut reader = ShardReader::<u16>::open(dir, &labels.stem)?;
    if reader.lengths().len() != manifest.entries.len() {
        return Err(TrainError::Data(format!(
            "{}: {} label rows but {} has {} utterances; rerun `{REMAKE_LABELS}` for this partition",
            dir.join(format!("{}.len", labels.stem)).display(),
            reader.lengths().len(),
            mpath.display(),
            manifest.entries.len()
        )));
    }
    let mut data = ClientData::default();
    let mut row = Vec::new();
    for e in &manifest.entries {
        reader.next_into(&mut row)?;
        let audio = manifest.load_entry_audio(e)?;
        check_label_length(dir, &e.id, audio.samples.len(), row.len(), labels)?;
        let utt = Utt {
            id: e.id.clone(),
            wav: audio.samples,
            labels: row.iter().map(|&l| l as u32).collect(),
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
