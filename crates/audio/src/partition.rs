//! Partitioning a corpus into federated clients, and each client's train/validation split.
//!
//! All randomness comes from ChaCha8 seeded by the user's seed, so the same seed gives the same
//! partition on any machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use crate::manifest::PARTITION_FILE;
use crate::scan::{Corpus, Skipped};
use crate::{AudioError, Entry, Manifest, Split, atomic_write};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// Non-IID: whole speakers per client, balanced by audio duration.
    Speaker,
    /// Utterances shuffled and dealt evenly.
    Iid,
    /// Speaker-label skew as Flower Datasets' `DirichletPartitioner` (label = speaker).
    Dirichlet { alpha: f64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionConfig {
    #[serde(flatten)]
    pub method: Method,
    pub num_clients: usize,
    pub seed: u64,
    pub valid_fraction: f64,
    /// Dirichlet only: resample until every client has at least this many utterances.
    pub min_client_utterances: usize,
}

impl PartitionConfig {
    pub fn validate(&self) -> Result<(), AudioError> {
        let bad = |s: String| Err(AudioError::Partition(s));
        if self.num_clients == 0 {
            return bad("num_clients must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.valid_fraction) {
            return bad(format!(
                "valid_fraction {} must be in [0, 1)",
                self.valid_fraction
            ));
        }
        if let Method::Dirichlet { alpha } = self.method
            && !(alpha > 0.0 && alpha.is_finite())
        {
            return bad(format!("dirichlet alpha {alpha} must be a positive number"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientSummary {
    pub client: usize,
    pub dir: String,
    pub speakers: Vec<String>,
    pub train_utterances: usize,
    pub valid_utterances: usize,
    pub hours: f64,
}

/// What `partition.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionSummary {
    #[serde(flatten)]
    pub config: PartitionConfig,
    /// The folder every manifest path is relative to.
    pub root: String,
    pub total_utterances: usize,
    pub total_hours: f64,
    pub clients: Vec<ClientSummary>,
    pub skipped: Vec<Skipped>,
}

/// Assigns utterances to clients and splits each client into train/valid. Each returned client's
/// entries are ordered train first, then valid, each by id.
pub fn partition(corpus: &Corpus, cfg: &PartitionConfig) -> Result<Vec<Vec<Entry>>, AudioError> {
    cfg.validate()?;
    let n = cfg.num_clients;
    let utts = &corpus.utterances;
    let mut by_speaker: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, u) in utts.iter().enumerate() {
        by_speaker.entry(u.speaker.as_str()).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let assignment: Vec<Vec<usize>> = match cfg.method {
        Method::Speaker => {
            if n > by_speaker.len() {
                return Err(AudioError::Partition(format!(
                    "{n} clients but only {} speakers: speaker partitioning puts whole speakers on one client, so use at most {} clients (or --partition iid / dirichlet)",
                    by_speaker.len(),
                    by_speaker.len()
                )));
            }
            // Longest-processing-time greedy: biggest speakers first onto the lightest client.
            // Sums in u128: `num_samples` comes from a manifest, and u64 sums of it can overflow.
            let mut spk: Vec<(&str, u128, &Vec<usize>)> = by_speaker
                .iter()
                .map(|(s, ix)| {
                    let dur = ix.iter().map(|&i| utts[i].num_samples as u128).sum();
                    (*s, dur, ix)
                })
                .collect();
            spk.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let mut load = vec![0u128; n];
            let mut out = vec![Vec::new(); n];
            for (_, dur, ix) in spk {
                let c = (0..n).min_by_key(|&c| (load[c], c)).unwrap();
                load[c] += dur;
                out[c].extend_from_slice(ix);
            }
            out
        }
        Method::Iid => {
            if n > utts.len() {
                return Err(AudioError::Partition(format!(
                    "{n} clients but only {} utterances",
                    utts.len()
                )));
            }
            let mut order: Vec<usize> = (0..utts.len()).collect();
            order.shuffle(&mut rng);
            let mut out = vec![Vec::new(); n];
            for (k, i) in order.into_iter().enumerate() {
                out[k % n].push(i);
            }
            out
        }
        Method::Dirichlet { alpha } => dirichlet(
            &by_speaker,
            utts.len(),
            n,
            alpha,
            cfg.min_client_utterances,
            &mut rng,
        )?,
    };
    let mut clients = Vec::with_capacity(n);
    for (k, ix) in assignment.into_iter().enumerate() {
        if ix.is_empty() {
            return Err(AudioError::Partition(format!(
                "client {k} received no utterances"
            )));
        }
        let mut entries: Vec<Entry> = ix.iter().map(|&i| utts[i].clone()).collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        let mut order: Vec<usize> = (0..entries.len()).collect();
        let mut split_rng = ChaCha8Rng::seed_from_u64(
            cfg.seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1),
        );
        order.shuffle(&mut split_rng);
        let mut n_valid = (entries.len() as f64 * cfg.valid_fraction).round() as usize;
        if cfg.valid_fraction > 0.0 && entries.len() >= 2 {
            n_valid = n_valid.max(1);
        }
        n_valid = n_valid.min(entries.len() - 1);
        for &j in &order[..n_valid] {
            entries[j].split = Split::Valid;
        }
        for &j in &order[n_valid..] {
            entries[j].split = Split::Train;
        }
        entries.sort_by(|a, b| {
            (a.split == Split::Valid, &a.id).cmp(&(b.split == Split::Valid, &b.id))
        });
        clients.push(entries);
    }
    Ok(clients)
}

/// Flower Datasets' DirichletPartitioner with self-balancing: per speaker, proportions over clients
/// are drawn from Dir(alpha); clients already above the average size get none of the next speaker.
fn dirichlet(
    by_speaker: &BTreeMap<&str, Vec<usize>>,
    total: usize,
    n: usize,
    alpha: f64,
    min_size: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, AudioError> {
    // Every client needs at least one utterance, so more clients than utterances can never
    // succeed; refusing here also keeps a huge client count from sizing the buffers below.
    if n > total {
        return Err(AudioError::Partition(format!(
            "{n} clients but only {total} utterances"
        )));
    }
    let gamma = Gamma::new(alpha, 1.0)
        .map_err(|e| AudioError::Partition(format!("dirichlet alpha {alpha}: {e}")))?;
    let avg = total as f64 / n as f64;
    for _attempt in 0..100 {
        let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
        for ix in by_speaker.values() {
            let mut ix = ix.clone();
            ix.shuffle(rng);
            let mut p: Vec<f64> = (0..n).map(|_| gamma.sample(rng)).collect();
            for (c, pc) in p.iter_mut().enumerate() {
                if out[c].len() as f64 >= avg {
                    *pc = 0.0;
                }
            }
            let s: f64 = p.iter().sum();
            if s <= 0.0 {
                p = vec![1.0 / n as f64; n];
            } else {
                p.iter_mut().for_each(|v| *v /= s);
            }
            let mut cum = 0.0;
            let mut start = 0;
            for (c, pc) in p.iter().enumerate() {
                cum += pc;
                let end = if c + 1 == n {
                    ix.len()
                } else {
                    ((cum * ix.len() as f64) as usize).min(ix.len())
                };
                out[c].extend_from_slice(&ix[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if out.iter().all(|c| c.len() >= min_size.max(1)) {
            return Ok(out);
        }
    }
    Err(AudioError::Partition(format!(
        "dirichlet alpha {alpha}: no partition in 100 draws gave every one of {n} clients at least {} utterances ({total} utterances in all); use fewer clients, a larger alpha or a smaller --min-client-utterances",
        min_size.max(1)
    )))
}

/// Folder name of client `k`.
pub fn client_dir(out: &Path, k: usize) -> PathBuf {
    out.join(format!("client_{k}"))
}

/// Writes `OUT/client_K/manifest.csv` for every client and `OUT/partition.json`, each atomically.
/// Client folders of an earlier partition beyond the new client count are removed so the folder
/// never mixes two partitions.
pub fn write_partition(
    out: &Path,
    corpus: &Corpus,
    clients: &[Vec<Entry>],
    cfg: &PartitionConfig,
) -> Result<PartitionSummary, AudioError> {
    std::fs::create_dir_all(out).map_err(|e| AudioError::io(out, e))?;
    let root = std::fs::canonicalize(&corpus.root).map_err(|e| AudioError::io(&corpus.root, e))?;
    let mut summaries = Vec::new();
    for (k, entries) in clients.iter().enumerate() {
        let dir = client_dir(out, k);
        let m = Manifest {
            root: root.clone(),
            entries: entries.clone(),
        };
        m.save(&dir.join("manifest.csv"))?;
        let mut speakers: Vec<String> = entries.iter().map(|e| e.speaker.clone()).collect();
        speakers.sort();
        speakers.dedup();
        summaries.push(ClientSummary {
            client: k,
            dir: format!("client_{k}"),
            speakers,
            train_utterances: entries.iter().filter(|e| e.split == Split::Train).count(),
            valid_utterances: entries.iter().filter(|e| e.split == Split::Valid).count(),
            hours: entries.iter().map(|e| e.duration_s()).sum::<f64>() / 3600.0,
        });
    }
    let mut k = clients.len();
    while client_dir(out, k).join("manifest.csv").is_file() {
        std::fs::remove_dir_all(client_dir(out, k))
            .map_err(|e| AudioError::io(client_dir(out, k), e))?;
        k += 1;
    }
    let summary = PartitionSummary {
        config: cfg.clone(),
        root: root.to_string_lossy().to_string(),
        total_utterances: clients.iter().map(Vec::len).sum(),
        total_hours: summaries.iter().map(|s| s.hours).sum(),
        clients: summaries,
        skipped: corpus.skipped.clone(),
    };
    let p = out.join(PARTITION_FILE);
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| AudioError::Json {
        path: p.clone(),
        why: e.to_string(),
    })?;
    atomic_write(&p, &json)?;
    Ok(summary)
}
