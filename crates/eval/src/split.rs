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
        let mut groups = speaker_groups(data);
        if groups.len() < 3 {
            return Err(EvalError::Split(format!(
                "{} speaker(s) found; a speaker-disjoint split needs at least 3",
                groups.len()
            )));
        }
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

/// Clip indices grouped by speaker, in speaker-id order.
fn speaker_groups(data: &LabelledClips) -> Vec<Vec<usize>> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, c) in data.clips.iter().enumerate() {
        groups
            .entry(c.speaker.as_deref().unwrap_or_default())
            .or_default()
            .push(i);
    }
    groups.into_values().collect()
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

/// `k` cross-validation splits: the clips are dealt into `k` folds (whole speaker groups when
/// [`LabelledClips::has_speakers`], largest group to the smallest fold; else each class
/// round-robin), and split `f` tests on fold `f`, selects on fold `f + 1` and trains on the rest.
/// Every clip is tested exactly once over the `k` splits, which is what makes the accuracy of a
/// few hundred clips worth reading.
pub fn kfold_splits(
    data: &LabelledClips,
    k: usize,
    seed: u64,
) -> Result<Vec<DataSplit>, EvalError> {
    if k < 3 {
        return Err(EvalError::Split(format!(
            "cross-validation needs at least 3 folds (test, valid, train), got {k}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xF01D_5EED);
    let n = data.clips.len();
    let mut folds: Vec<Vec<usize>> = vec![Vec::new(); k];
    let speaker_disjoint = data.has_speakers();
    if speaker_disjoint {
        let mut groups = speaker_groups(data);
        if groups.len() < k {
            return Err(EvalError::Split(format!(
                "{} speakers cannot fill {k} speaker-disjoint folds",
                groups.len()
            )));
        }
        groups.shuffle(&mut rng);
        groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
        for g in groups {
            let f = (0..k).min_by_key(|&f| (folds[f].len(), f)).unwrap_or(0);
            folds[f].extend(g);
        }
    } else {
        let mut next = 0;
        for class in 0..data.classes.len() {
            let mut idx: Vec<usize> = (0..n).filter(|&i| data.clips[i].label == class).collect();
            idx.shuffle(&mut rng);
            for i in idx {
                folds[next % k].push(i);
                next += 1;
            }
        }
    }
    if let Some(f) = folds.iter().position(|f| f.is_empty()) {
        return Err(EvalError::Split(format!(
            "fold {f} of {k} is empty ({n} clips)"
        )));
    }
    Ok((0..k)
        .map(|f| {
            let v = (f + 1) % k;
            let mut train: Vec<usize> = (0..k)
                .filter(|&g| g != f && g != v)
                .flat_map(|g| folds[g].iter().copied())
                .collect();
            train.sort_unstable();
            let (mut valid, mut test) = (folds[v].clone(), folds[f].clone());
            valid.sort_unstable();
            test.sort_unstable();
            DataSplit {
                train,
                valid,
                test,
                speaker_disjoint,
            }
        })
        .collect())
}

#[cfg(test)]
mod kfold_tests {
    use super::*;
    use crate::data::Clip;

    fn clips(speakers: bool) -> LabelledClips {
        let mut c = Vec::new();
        for label in 0..4 {
            for j in 0..12 {
                c.push(Clip {
                    path: format!("w{label}/{j}.wav").into(),
                    label,
                    speaker: speakers.then(|| format!("spk{}", j % 6)),
                    samples: vec![0.0; 4],
                });
            }
        }
        LabelledClips {
            root: "x".into(),
            classes: (0..4).map(|i| format!("w{i}")).collect(),
            clips: c,
        }
    }

    #[test]
    fn every_clip_is_tested_once_and_folds_keep_speakers_apart() {
        for speakers in [true, false] {
            let d = clips(speakers);
            let s = kfold_splits(&d, 5, 3).unwrap();
            let mut tested: Vec<usize> = s.iter().flat_map(|x| x.test.clone()).collect();
            tested.sort_unstable();
            assert_eq!(tested, (0..d.clips.len()).collect::<Vec<_>>());
            for x in &s {
                let mut all: Vec<usize> = x.parts().concat();
                all.sort_unstable();
                assert_eq!(all.len(), d.clips.len(), "a clip in two parts or none");
                all.dedup();
                assert_eq!(all.len(), d.clips.len());
                if speakers {
                    assert_eq!(
                        speakers_per_split(&d, x).iter().sum::<usize>(),
                        6,
                        "a speaker in two parts"
                    );
                }
            }
        }
        assert!(
            kfold_splits(&clips(true), 7, 0).is_err(),
            "6 speakers, 7 folds"
        );
        assert!(kfold_splits(&clips(true), 2, 0).is_err());
    }
}
