//! The three ways to get pseudo-labels for federated clients, and label writing.
//!
//! * `local`: every client fits its own codebook (the seed prototype; cluster ids disagree across
//!   clients, which is the problem this crate fixes);
//! * `federated`: one global codebook from [`crate::fit_federated`];
//! * `central`: one mini-batch fit over all frames pooled (upper bound, not private).

use std::path::Path;

use fedhubert_features::shard::{ShardReader, ShardWriter};
use fedhubert_io::provenance::Provenance;
use serde::{Deserialize, Serialize};

use crate::codebook::Codebook;
use crate::kernel::assign;
use crate::metrics::Contingency;
use crate::{KmError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Local,
    Federated,
    Central,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Local => "local",
            Mode::Federated => "federated",
            Mode::Central => "central",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = KmError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "local" => Ok(Mode::Local),
            "federated" => Ok(Mode::Federated),
            "central" => Ok(Mode::Central),
            _ => Err(KmError::Invalid(format!(
                "unknown mode {s:?} (local, federated, central)"
            ))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LabelReport {
    pub utterances: usize,
    pub frames: u64,
    /// Inertia of the client's frames under `codebook`.
    pub inertia: f64,
    /// Frames per cluster.
    pub usage: Vec<u64>,
    /// `labels x reference labels`, when a reference codebook was given.
    pub contingency: Option<Contingency>,
}

/// Labels a client's feature shard `DIR/FEATURE.{npy,len}` with `codebook`, one utterance at a time.
/// With `out_stem`, writes `DIR/OUT_STEM.npy` (u16, one label per frame) + `.len` (same frame counts
/// as the features, manifest order). With `reference`, also tabulates labels against it.
pub fn label_client(
    dir: &Path,
    feature: &str,
    codebook: &Codebook,
    out_stem: Option<&str>,
    reference: Option<&Codebook>,
) -> Result<LabelReport> {
    if codebook.k > u16::MAX as usize + 1 {
        return Err(KmError::Invalid(format!(
            "k = {} does not fit u16 labels",
            codebook.k
        )));
    }
    let manifest = dir.join("manifest.csv");
    let features = features_record(dir, feature, &manifest)?;
    let mut reader = ShardReader::<f32>::open(dir, feature)?;
    if reader.dim() != codebook.dim {
        return Err(KmError::Invalid(format!(
            "{}: {}-dim frames but the codebook is {}-dim",
            dir.join(format!("{feature}.npy")).display(),
            reader.dim(),
            codebook.dim
        )));
    }
    if reference.is_some_and(|r| r.dim != codebook.dim) {
        return Err(KmError::Invalid("reference codebook dim differs".into()));
    }
    let mut writer = match out_stem {
        Some(s) => Some(ShardWriter::<u16>::create(dir, s, None)?),
        None => None,
    };
    let p = codebook.packed();
    let pr = reference.map(|r| r.packed());
    let mut rep = LabelReport {
        utterances: 0,
        frames: 0,
        inertia: 0.0,
        usage: vec![0; codebook.k],
        contingency: reference.map(|r| Contingency::new(codebook.k, r.k)),
    };
    let (mut x, mut l, mut dd, mut lr, mut l16) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    while reader.next_into(&mut x)? {
        let m = x.len() / p.d;
        l.resize(m, 0);
        dd.resize(m, 0.0);
        assign(&p, &x, &mut l, &mut dd);
        for (&li, &di) in l.iter().zip(&dd) {
            rep.usage[li as usize] += 1;
            rep.inertia += di as f64;
        }
        if let (Some(pr), Some(ct)) = (&pr, rep.contingency.as_mut()) {
            lr.resize(m, 0);
            assign(pr, &x, &mut lr, &mut dd);
            for (&a, &b) in l.iter().zip(&lr) {
                ct.add(a, b);
            }
        }
        if let Some(w) = writer.as_mut() {
            l16.clear();
            l16.extend(l.iter().map(|&v| v as u16));
            w.push(&l16)?;
        }
        rep.utterances += 1;
        rep.frames += m as u64;
    }
    if let (Some(w), Some(stem)) = (writer, out_stem) {
        w.finish()?;
        label_record(&features, feature, codebook, &manifest)?.write_for_shard(dir, stem)?;
    }
    Ok(rep)
}

/// The record of the features `dir/FEATURE` labels are computed from, checked against the
/// folder's manifest (when it has one): features of an edited or re-prepared manifest are stale.
fn features_record(dir: &Path, feature: &str, manifest: &Path) -> Result<Provenance> {
    let rec = Provenance::read_for_shard(dir, feature, "fedhubert features")?;
    let inputs: Vec<(&str, &Path)> = if manifest.is_file() {
        vec![("manifest", manifest)]
    } else {
        vec![]
    };
    rec.check(dir, &inputs)?;
    Ok(rec)
}

/// The labels' record: their manifest, features and codebook, and the rate they run at (the
/// features' frame rate).
fn label_record(
    features: &Provenance,
    feature: &str,
    codebook: &Codebook,
    manifest: &Path,
) -> Result<Provenance> {
    let mut rec = Provenance::new("labels", "fedhubert kmeans")
        .param("feature", feature)
        .param("k", codebook.k)
        .param("codebook", codebook.digest());
    if let Some(rate) = features.params.get("frame_rate") {
        rec = rec.param("label_rate", rate.clone());
    }
    rec.inputs.insert("features".into(), features.digest());
    if manifest.is_file() {
        rec = rec.input_file("manifest", manifest)?;
    }
    Ok(rec)
}
