//! Audio sets for distillation: client folders (manifest + labels, as pretraining) and the
//! server-side set, whose labels are optional (output / feature / MVQ distillation need none).

use std::path::Path;

use fedhubert_audio::{Manifest, Split};
use fedhubert_train::{ClientData, LabelSpec, Utt, load_client_dir};

use crate::{DistillError, Result};

/// Loads `DIR/manifest.csv` with the labels of `DIR/{label_stem}.npy` when that shard exists,
/// else with empty labels (masked prediction then refuses to run, naming the missing file).
/// `max_utterances` > 0 keeps the first that many training utterances.
pub fn load_audio_dir(dir: &Path, labels: &LabelSpec, max_utterances: usize) -> Result<ClientData> {
    let mut data = if dir.join(format!("{}.npy", labels.stem)).is_file() {
        load_client_dir(dir, labels)?
    } else {
        let mpath = dir.join("manifest.csv");
        if !mpath.is_file() {
            return Err(DistillError::Data(format!(
                "{}: no such manifest (the server-side set must be a folder with manifest.csv)",
                mpath.display()
            )));
        }
        let manifest = Manifest::load(&mpath)?;
        let mut d = ClientData::default();
        for e in &manifest.entries {
            let audio = manifest.load_entry_audio(e)?;
            let utt = Utt {
                id: e.id.clone(),
                wav: audio.samples,
                labels: vec![],
            };
            match e.split {
                Split::Train => d.train.push(utt),
                Split::Valid => d.valid.push(utt),
            }
        }
        if d.train.is_empty() {
            return Err(DistillError::Data(format!(
                "{}: no training utterances",
                mpath.display()
            )));
        }
        d
    };
    if max_utterances > 0 {
        data.train.truncate(max_utterances);
    }
    Ok(data)
}

/// Whether every utterance has labels (masked prediction possible).
pub fn has_labels(utts: &[Utt]) -> bool {
    !utts.is_empty() && utts.iter().all(|u| !u.labels.is_empty())
}
