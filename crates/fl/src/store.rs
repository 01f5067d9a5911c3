//! The run folder's files: the round checkpoint (`checkpoint.safetensors`: global weights, server
//! optimizer state, round, seed, history) and `metrics.jsonl`. The engine has no I/O; its drivers
//! write these after every round through this module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::engine::RoundRecord;
use crate::weights::{load_safetensors, order_metadata, save_safetensors};
use crate::{FlError, Weights};

const CKPT: &str = "checkpoint.safetensors";
const FORMAT: &str = "fedhubert-round-checkpoint";
/// Version of the round checkpoint layout. 2: strategies as aggregator x server optimizer (the
/// strategy settings use the run file's keys; FedProx's mu is a client setting).
pub const CHECKPOINT_VERSION: u32 = 2;

/// A round checkpoint: what `--resume` needs to continue exactly.
pub struct Checkpoint {
    pub round: u64,
    pub seed: u64,
    /// The strategy's configuration as JSON; a resumed run must use the same.
    pub strategy: String,
    pub global: Weights,
    pub state: BTreeMap<String, Weights>,
    pub history: Vec<RoundRecord>,
    pub synced: BTreeSet<usize>,
    /// What the clients were told (settings and upload plan) as JSON; None in checkpoints older
    /// than this field.
    pub clients: Option<String>,
    /// What simulated clients keep between rounds (`ClientPool::client_state`), by client.
    pub client_state: BTreeMap<String, Weights>,
    /// The privacy ledger of a DP run (`Strategy::ledger`), as JSON.
    pub privacy: Option<String>,
}

pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join(CKPT)
}

/// The files of a run's folder that a fresh start would silently replace.
const RUN_FILES: [&str; 2] = [CKPT, "metrics.jsonl"];

/// What a run does with an earlier run's files in its output folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run; refused while the folder holds an earlier run's checkpoint.
    Fresh,
    /// Continue the earlier run from its checkpoint.
    Resume,
    /// Discard the earlier run's checkpoint and metrics, then start a new one.
    Overwrite,
}

/// Locks `dir` for `command` (held until the returned lock drops) and applies `start`: an
/// overwrite removes the earlier run's round checkpoint, metrics and `own_files` (the caller's
/// own run files); a fresh start is refused while any of them exists, so a rerun without
/// `--resume` never replaces a later round's checkpoint with round 1's.
pub fn open_run_folder(
    dir: &Path,
    command: &str,
    start: Start,
    own_files: &[&str],
) -> Result<crate::FolderLock, FlError> {
    let lock = crate::FolderLock::acquire(dir, command)?;
    match start {
        Start::Resume => {}
        Start::Overwrite => {
            for name in RUN_FILES.iter().chain(own_files) {
                let p = dir.join(name);
                match std::fs::remove_file(&p) {
                    Ok(()) => tracing::info!("overwrite: removed {}", p.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(FlError::Config(format!("removing {}: {e}", p.display())));
                    }
                }
            }
        }
        Start::Fresh => {
            refuse_fresh_start(dir)?;
            if let Some(p) = own_files.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
                return Err(FlError::Config(format!(
                    "{} is an earlier run's: continue that run with --resume, or discard it with --overwrite",
                    p.display()
                )));
            }
        }
    }
    Ok(lock)
}

/// A fresh run into `dir` is refused while `dir` holds an earlier run's round checkpoint:
/// starting again would replace its later rounds with round 1. The error says both ways out.
pub fn refuse_fresh_start(dir: &Path) -> Result<(), FlError> {
    let path = checkpoint_path(dir);
    if path.exists() {
        return Err(FlError::Config(format!(
            "{} holds the round checkpoint of an earlier run: continue it with --resume, or discard it with --overwrite (Flower: run_config resume=true or overwrite=true)",
            path.display()
        )));
    }
    Ok(())
}

/// Writes the round checkpoint and `metrics.jsonl` into `dir`, each atomically.
pub fn save_round(dir: &Path, ck: &Checkpoint) -> Result<(), FlError> {
    save_checkpoint(&checkpoint_path(dir), ck)?;
    write_jsonl(&dir.join("metrics.jsonl"), &ck.history)
}

pub fn write_jsonl(path: &Path, history: &[RoundRecord]) -> Result<(), FlError> {
    let mut s = String::new();
    for r in history {
        s.push_str(&serde_json::to_string(r).map_err(|e| FlError::format(path, e))?);
        s.push('\n');
    }
    crate::atomic_write(path, s.as_bytes())
}

/// The rounds of a run folder's `metrics.jsonl` ([`write_jsonl`]'s format).
pub fn read_jsonl(path: &Path) -> Result<Vec<RoundRecord>, FlError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        FlError::Tensor(crate::TensorError::Io {
            path: path.to_path_buf(),
            source,
        })
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| FlError::format(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

pub fn save_checkpoint(path: &Path, ck: &Checkpoint) -> Result<(), FlError> {
    let mut groups: Vec<(String, &Weights)> = vec![("global/".into(), &ck.global)];
    for (k, w) in &ck.state {
        groups.push((format!("state.{k}/"), w));
    }
    for (k, w) in &ck.client_state {
        groups.push((format!("client.{k}/"), w));
    }
    let gref: Vec<(&str, &Weights)> = groups.iter().map(|(p, w)| (p.as_str(), *w)).collect();
    let fmt = |e: serde_json::Error| FlError::format(path, e);
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("format_version".into(), CHECKPOINT_VERSION.to_string());
    meta.insert("round".into(), ck.round.to_string());
    meta.insert("seed".into(), ck.seed.to_string());
    meta.insert("strategy".into(), ck.strategy.clone());
    meta.insert(
        "history".into(),
        serde_json::to_string(&ck.history).map_err(fmt)?,
    );
    meta.insert(
        "synced".into(),
        serde_json::to_string(&ck.synced).map_err(fmt)?,
    );
    if let Some(c) = &ck.clients {
        meta.insert("clients".into(), c.clone());
    }
    if let Some(p) = &ck.privacy {
        meta.insert("privacy".into(), p.clone());
    }
    meta.insert("order".into(), order_metadata(&gref));
    Ok(save_safetensors(path, &gref, meta)?)
}

/// Version 1 named the adaptive strategies' betas `beta_1`/`beta_2` and the trimmed mean's cut
/// `beta`, and had FedProx as a strategy (FedAvg on the server, which it now is).
fn migrate_strategy_v1(json: &str) -> Result<String, String> {
    let mut v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let m = v.as_object_mut().ok_or("strategy is not a JSON object")?;
    for (old, new) in [
        ("beta_1", "beta1"),
        ("beta_2", "beta2"),
        ("beta", "trim_beta"),
    ] {
        if let Some(x) = m.remove(old) {
            m.insert(new.into(), x);
        }
    }
    if m.get("strategy").and_then(|s| s.as_str()) == Some("fedprox") {
        m.clear();
        m.insert("strategy".into(), "fedavg".into());
    }
    let s: crate::StrategyConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
    serde_json::to_string(&s).map_err(|e| e.to_string())
}

pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, FlError> {
    let (mut groups, meta) = load_safetensors(path)?;
    let bad = |why: String| FlError::format(path, why);
    let version = fedhubert_io::format_version(&meta, FORMAT).ok_or_else(|| {
        bad("not a fedhubert round checkpoint (metadata `format` missing)".into())
    })?;
    if version > CHECKPOINT_VERSION {
        return Err(bad(format!(
            "round checkpoint format version {version} is newer than this fedhubert's ({CHECKPOINT_VERSION}): upgrade fedhubert"
        )));
    }
    let field = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("metadata `{k}` missing")))
    };
    let round = field("round")?
        .parse()
        .map_err(|_| bad("bad round".into()))?;
    let seed = field("seed")?.parse().map_err(|_| bad("bad seed".into()))?;
    let history =
        serde_json::from_str(&field("history")?).map_err(|e| bad(format!("history: {e}")))?;
    let synced =
        serde_json::from_str(&field("synced")?).map_err(|e| bad(format!("synced: {e}")))?;
    let mut strategy = field("strategy")?;
    if version == 1 {
        strategy = migrate_strategy_v1(&strategy)
            .map_err(|e| bad(format!("strategy of a version-1 checkpoint: {e}")))?;
    }
    let global = groups
        .remove("global")
        .ok_or_else(|| bad("no global weights".into()))?;
    let mut state = BTreeMap::new();
    let mut client_state = BTreeMap::new();
    for (k, w) in groups {
        if let Some(s) = k.strip_prefix("state.") {
            state.insert(s.to_string(), w);
        } else if let Some(c) = k.strip_prefix("client.") {
            client_state.insert(c.to_string(), w);
        }
    }
    Ok(Checkpoint {
        round,
        seed,
        strategy,
        global,
        state,
        history,
        synced,
        clients: meta.get("clients").cloned(),
        client_state,
        privacy: meta.get("privacy").cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_strategies_migrate() {
        let m = |s: &str| migrate_strategy_v1(s).unwrap();
        assert_eq!(
            m(r#"{"strategy":"fedadam","eta":0.1,"beta_1":0.9,"beta_2":0.99,"tau":0.001}"#),
            r#"{"strategy":"fedadam","eta":0.1,"beta1":0.9,"beta2":0.99,"tau":0.001}"#
        );
        assert_eq!(
            m(r#"{"strategy":"fedprox","proximal_mu":0.01}"#),
            r#"{"strategy":"fedavg"}"#
        );
        assert_eq!(
            m(r#"{"strategy":"fedtrimmedavg","beta":0.1}"#),
            r#"{"strategy":"fedtrimmedavg","trim_beta":0.1}"#
        );
        assert!(migrate_strategy_v1(r#"{"strategy":"fedfoo"}"#).is_err());
    }

    #[test]
    fn newer_and_foreign_checkpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let w = Weights::default();
        for (format, version, want) in [
            (FORMAT, "3", "newer than this fedhubert"),
            ("something-else", "2", "not a fedhubert round checkpoint"),
        ] {
            let mut meta = BTreeMap::new();
            meta.insert("format".into(), format.to_string());
            meta.insert("format_version".into(), version.to_string());
            save_safetensors(&p, &[("global/", &w)], meta).unwrap();
            let e = load_checkpoint(&p).err().unwrap().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
