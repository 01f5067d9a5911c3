//! Seeded train / validation / test split: speaker-disjoint when every file name carries a
//! speaker id (Speech Commands' `HASH_nohash_N.wav`), else stratified per class.

use std::collections::{BTreeMap, BTreeSet};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{EvalError, LabelledClips};

/// Target fractions (of clips) and seed; train gets the rest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitConfig {
    pub valid_fraction: f64,
    pub test_fraction: f64,
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            valid_fraction: 0.15,
            test_fraction: 0.15,
            seed: 0,
        }
    }
}

/// Clip indices of each split (sorted) and how they were made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataSplit {
    pub train: Vec<usize>,
    pub valid: Vec<usize>,
    pub test: Vec<usize>,
    /// True when the split grouped clips by speaker (no speaker in two splits).
    pub speaker_disjoint: bool,
}

impl DataSplit {
    /// `[train, valid, test]`.
    pub fn parts(&self) -> [&[usize]; 3] {
        [&self.train, &self.valid, &self.test]
    }
}

/// Splits `data`. Speaker-disjoint when [`LabelledClips::has_speakers`]: speaker groups are
/// shuffled with `cfg.seed`, ordered largest first (ties keep the shuffled order) and each is
/// given to the split furthest below its clip target (longest-processing-time greedy). Otherwise
/// each class is shuffled and cut into round(n * fraction) valid / test clips (at least one each
/// when the class has 3 or more clips). Errors when a split would be empty.
pub fn split_clips(data: &LabelledClips, cfg: &SplitConfig) -> Result<DataSplit, EvalError> {
    let (fv, ft) = (cfg.valid_fraction, cfg.test_fraction);
    if !(fv > 0.0 && ft > 0.0 && fv + ft < 1.0) {
        return Err(EvalError::Split(format!(
            "valid_fraction {fv} and test_fraction {ft} must be > 0 with a sum < 1"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5917_5EED);
    let n = data.clips.len();
    let mut parts: [Vec<usize>; 3] = Default::default();
    let speaker_disjoint = data.has_speakers();
    if speaker_disjoint {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, c) in data.clips.iter().enumerate() {
            groups
                .entry(c.speaker.as_deref().unwrap_or_default())
                .or_default()
                .push(i);
        }
        if groups.len() < 3 {
            return Err(EvalError::Split(format!(
                "{} speaker(s) found; a speaker-disjoint split needs at least 3",
                groups.len()
            )));
        }
        let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
        groups.shuffle(&mut rng);
        groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
        let target = [n as f64 * (1.0 - fv - ft), n as f64 * fv, n as f64 * ft];
        for g in groups {
            let k = (0..3)
                .max_by(|&a, &b| {
                    let da = target[a] - parts[a].len() as f64;
                    let db = target[b] - parts[b].len() as f64;
                    da.partial_cmp(&db).unwrap().then(b.cmp(&a))
                })
                .unwrap();
            parts[k].extend(g);
        }
    } else {
        for class in 0..data.classes.len() {
            let mut idx: Vec<usize> = (0..n).filter(|&i| data.clips[i].label == class).collect();
            idx.shuffle(&mut rng);
            let m = idx.len();
            let at_least = |x: f64| {
                if m >= 3 {
                    (x.round() as usize).max(1)
                } else {
                    x.round() as usize
                }
            };
            let nv = at_least(m as f64 * fv).min(m);
            let nt = at_least(m as f64 * ft).min(m - nv);
            parts[1].extend(&idx[..nv]);
            parts[2].extend(&idx[nv..nv + nt]);
            parts[0].extend(&idx[nv + nt..]);
        }
    }
    for (p, name) in parts.iter_mut().zip(["train", "validation", "test"]) {
        if p.is_empty() {
            return Err(EvalError::Split(format!(
                "the {name} split is empty ({n} clips)"
            )));
        }
        p.sort_unstable();
    }
    let [train, valid, test] = parts;
    Ok(DataSplit {
        train,
        valid,
        test,
        speaker_disjoint,
    })
}

/// Distinct speakers in each of `[train, valid, test]` (0s when clips have no speaker ids).
pub fn speakers_per_split(data: &LabelledClips, split: &DataSplit) -> [usize; 3] {
    split.parts().map(|p| {
        p.iter()
            .filter_map(|&i| data.clips[i].speaker.as_deref())
            .collect::<BTreeSet<_>>()
            .len()
    })
}
