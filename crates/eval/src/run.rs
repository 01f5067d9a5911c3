//! [`probe`]: split, extract once, train the head, evaluate, optionally fine-tune.

use std::time::Instant;

use fedhubert_model::HubertModel;
use serde::{Deserialize, Serialize};

use crate::report::{ConfusionMatrix, CrossValidation, ProbeReport, SplitSummary};
use crate::split::{DataSplit, kfold_splits, speakers_per_split};
use crate::{
    AcousticFeature, EvalError, FinetuneConfig, HeadConfig, LabelledClips, PooledFeatures,
    SplitConfig, extract_pooled, finetune, split_clips, train_probe,
};

/// What is probed: a HuBERT (every hidden state) or a non-learned acoustic baseline.
#[derive(Clone, Copy)]
pub enum Upstream<'a> {
    Hubert(&'a HubertModel),
    Acoustic(AcousticFeature),
}

impl Upstream<'_> {
    fn extract(&self, waves: &[&[f32]], batch: usize) -> Result<PooledFeatures, EvalError> {
        match self {
            Self::Hubert(m) => extract_pooled(m, waves, batch),
            Self::Acoustic(a) => a.extract_pooled(waves),
        }
    }
}

/// One hidden state probed alone (`ProbeConfig::per_layer`): which layer carries what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerProbe {
    /// 0 is the encoder input (HF `hidden_states[0]`).
    pub layer: usize,
    pub test_accuracy: f64,
    pub valid_accuracy: f64,
    /// With `folds`: accuracy over all clips, and the std of the fold accuracies.
    pub cv_accuracy: Option<f64>,
    pub cv_fold_std: Option<f64>,
}

/// Everything [`probe`] needs besides the upstream and the data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeConfig {
    /// Task name for the report (e.g. `speech-commands`).
    pub task: String,
    /// Upstream description for the report (e.g. `UpstreamSpec::describe`).
    pub upstream_name: String,
    pub split: SplitConfig,
    pub head: HeadConfig,
    /// Clips per upstream forward pass during extraction (equal-length clips only).
    pub extract_batch: usize,
    /// Fine-tune upstream + head after the frozen probe (slow; off by default).
    pub finetune: Option<FinetuneConfig>,
    /// Also run k-fold cross-validation of the frozen probe (0 = off; else >= 3).
    #[serde(default)]
    pub folds: usize,
    /// Also probe every hidden state alone (`--layers each`).
    #[serde(default)]
    pub per_layer: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            task: "speech-commands".into(),
            upstream_name: "upstream".into(),
            split: SplitConfig::default(),
            head: HeadConfig::default(),
            extract_batch: 8,
            finetune: None,
            folds: 0,
            per_layer: false,
        }
    }
}

/// SUPERB-style probe of a frozen `upstream` on `data`: seeded split ([`split_clips`]), pooled
/// hidden states of every clip extracted once ([`extract_pooled`]), head trained on train and
/// selected on validation ([`train_probe`]), test accuracy and confusion matrix measured; with
/// `cfg.folds`, the same head is also cross-validated ([`kfold_splits`]) on the same features.
pub fn probe(
    upstream: Upstream<'_>,
    data: &LabelledClips,
    cfg: &ProbeConfig,
) -> Result<ProbeReport, EvalError> {
    cfg.head.validate()?;
    let split = split_clips(data, &cfg.split)?;
    let n = data.clips.len();
    tracing::info!(
        "probe {}: {} clips, {} classes; split train {} / valid {} / test {} ({})",
        cfg.upstream_name,
        n,
        data.classes.len(),
        split.train.len(),
        split.valid.len(),
        split.test.len(),
        if split.speaker_disjoint {
            "speaker-disjoint"
        } else {
            "stratified"
        }
    );
    let t0 = Instant::now();
    let waves: Vec<&[f32]> = data.clips.iter().map(|c| c.samples.as_slice()).collect();
    let feats = upstream.extract(&waves, cfg.extract_batch)?;
    let extract_seconds = t0.elapsed().as_secs_f64();
    let labels: Vec<usize> = data.clips.iter().map(|c| c.label).collect();
    let t1 = Instant::now();
    let out = train_probe(
        &feats,
        &labels,
        data.classes.len(),
        &split.train,
        &split.valid,
        &cfg.head,
    )?;
    let train_seconds = t1.elapsed().as_secs_f64();
    let confusion = ConfusionMatrix::from_pairs(
        data.classes.clone(),
        split
            .test
            .iter()
            .map(|&i| (labels[i], out.head.predict(feats.clip(i)))),
    );
    let mut train_counts = vec![0usize; data.classes.len()];
    split
        .train
        .iter()
        .for_each(|&i| train_counts[labels[i]] += 1);
    let majority = (0..train_counts.len())
        .max_by_key(|&c| (train_counts[c], std::cmp::Reverse(c)))
        .unwrap_or(0);
    let majority_baseline = split
        .test
        .iter()
        .filter(|&&i| labels[i] == majority)
        .count() as f64
        / split.test.len() as f64;
    let finetune_summary = match (&cfg.finetune, upstream) {
        (Some(fc), Upstream::Hubert(m)) => Some(finetune(m, &out.head, data, &split, fc)?.summary),
        (Some(_), Upstream::Acoustic(a)) => {
            return Err(EvalError::Config(format!(
                "fine-tuning needs a model; {} has no parameters",
                a.describe()
            )));
        }
        (None, _) => None,
    };
    let cross_validation = match cfg.folds {
        0 => None,
        _ => Some(cross_validate(&feats, &labels, data, cfg)?),
    };
    let per_layer = if cfg.per_layer {
        (0..feats.layers)
            .map(|l| probe_layer(&feats.layer(l), l, &labels, data, &split, cfg))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![]
    };
    let sizes = split.parts().map(|p| p.len());
    Ok(ProbeReport {
        task: cfg.task.clone(),
        upstream: cfg.upstream_name.clone(),
        data: data.root.display().to_string(),
        classes: data.classes.clone(),
        hidden_size: feats.dim,
        num_hidden_states: feats.layers,
        head: cfg.head.clone(),
        split: SplitSummary {
            speaker_disjoint: split.speaker_disjoint,
            clips: sizes,
            fractions: sizes.map(|s| s as f64 / n as f64),
            speakers: speakers_per_split(data, &split),
            test_per_class: confusion.row_sums(),
            seed: cfg.split.seed,
        },
        test_accuracy: confusion.accuracy(),
        valid_accuracy: out.valid_accuracy,
        train_accuracy: out.train_accuracy,
        majority_baseline,
        best_epoch: out.best_epoch,
        epochs_run: out.epochs_run,
        layer_weights: out.head.layer_weights(),
        confusion,
        extract_seconds,
        train_seconds,
        finetune: finetune_summary,
        cross_validation,
        per_layer,
    })
}

/// The frozen probe cross-validated over `cfg.folds` speaker-disjoint folds of `feats`.
fn cross_validate(
    feats: &PooledFeatures,
    labels: &[usize],
    data: &LabelledClips,
    cfg: &ProbeConfig,
) -> Result<CrossValidation, EvalError> {
    let splits = kfold_splits(data, cfg.folds, cfg.split.seed)?;
    let mut pairs = Vec::with_capacity(labels.len());
    let mut fold_accuracies = Vec::with_capacity(splits.len());
    for sp in &splits {
        let o = train_probe(
            feats,
            labels,
            data.classes.len(),
            &sp.train,
            &sp.valid,
            &cfg.head,
        )?;
        let p: Vec<(usize, usize)> = sp
            .test
            .iter()
            .map(|&i| (labels[i], o.head.predict(feats.clip(i))))
            .collect();
        fold_accuracies
            .push(p.iter().filter(|(a, b)| a == b).count() as f64 / p.len().max(1) as f64);
        pairs.extend(p);
    }
    let cm = ConfusionMatrix::from_pairs(data.classes.clone(), pairs.into_iter());
    let k = fold_accuracies.len() as f64;
    let mean = fold_accuracies.iter().sum::<f64>() / k;
    let var = fold_accuracies
        .iter()
        .map(|a| (a - mean).powi(2))
        .sum::<f64>()
        / (k - 1.0).max(1.0);
    Ok(CrossValidation {
        folds: cfg.folds,
        accuracy: cm.accuracy(),
        fold_accuracies,
        fold_std: var.sqrt(),
        confusion: cm,
    })
}

/// Hidden state `layer` (already cut out as `feats`) probed alone: the split's head, and the
/// cross-validation when `cfg.folds` asks for it.
fn probe_layer(
    feats: &PooledFeatures,
    layer: usize,
    labels: &[usize],
    data: &LabelledClips,
    split: &DataSplit,
    cfg: &ProbeConfig,
) -> Result<LayerProbe, EvalError> {
    let k = data.classes.len();
    let out = train_probe(feats, labels, k, &split.train, &split.valid, &cfg.head)?;
    let correct = (split.test.iter())
        .filter(|&&i| out.head.predict(feats.clip(i)) == labels[i])
        .count();
    let cv = match cfg.folds {
        0 => None,
        _ => Some(cross_validate(feats, labels, data, cfg)?),
    };
    Ok(LayerProbe {
        layer,
        test_accuracy: correct as f64 / split.test.len().max(1) as f64,
        valid_accuracy: out.valid_accuracy,
        cv_accuracy: cv.as_ref().map(|c| c.accuracy),
        cv_fold_std: cv.as_ref().map(|c| c.fold_std),
    })
}
