//! One Flower client: a SuperNode's own partition folder, trained and evaluated by the same
//! `HubertClients` that `fedhubert pretrain --simulation` uses for each of its clients.

use std::path::{Path, PathBuf};

use fedhubert_fl::{ClientInstructions, ClientPool, EvalRes, FitRes, LocalOptimizerState, Weights};
use fedhubert_model::HubertForPretraining;
use fedhubert_train::{HubertClients, RunFile, check_partition_labels};

use crate::BridgeError;

pub struct LocalClient {
    pub dir: PathBuf,
    pool: HubertClients,
    /// Layout the server's weights must have (names and shapes of the configured model).
    pub layout: Weights,
    /// The node's own folder for what it keeps between rounds.
    state: Option<NodeState>,
    /// Hash of the codebook the partition's labels come from (their provenance record).
    pub codebook: String,
}

/// A node's own folder for what it keeps between rounds (`local_optimizer_state: keep`): never
/// the data partition, which may be read-only. After each round it trained in, the node writes
/// `optimizer_state.round_R.safetensors` (the two newest are kept); a round starts from the newest
/// state of an earlier round, so a server that resumed and redoes a round does not see the
/// state that round already left.
pub struct NodeState {
    dir: PathBuf,
}

impl NodeState {
    pub fn new(dir: &Path) -> Result<Self, BridgeError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            BridgeError::Config(format!("node state folder {}: {e}", dir.display()))
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Rounds with a saved state, oldest first.
    fn rounds(&self) -> Result<Vec<u64>, BridgeError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| {
            BridgeError::Config(format!("node state folder {}: {e}", self.dir.display()))
        })?;
        let mut rounds: Vec<u64> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("optimizer_state.round_")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()
            })
            .collect();
        rounds.sort_unstable();
        Ok(rounds)
    }

    fn path(&self, round: u64) -> PathBuf {
        self.dir
            .join(format!("optimizer_state.round_{round}.safetensors"))
    }

    /// The state left by the newest round before `round`; None when the node has none yet.
    /// States only from `round` on mean the server went back further than one round (another
    /// run, or an older checkpoint): an error, not a silent fresh start.
    pub fn load_before(&self, round: u64) -> Result<Option<Weights>, BridgeError> {
        let rounds = self.rounds()?;
        let Some(&r) = rounds.iter().rev().find(|&&r| r < round) else {
            if rounds.is_empty() {
                return Ok(None);
            }
            return Err(BridgeError::Config(format!(
                "node state folder {} holds the optimizer state of rounds {rounds:?}, none before round {round}: the server went back further than its last round (another run, or an older checkpoint); empty the folder to start this node's optimizer afresh",
                self.dir.display()
            )));
        };
        let (mut groups, _) = fedhubert_io::load_safetensors(&self.path(r))?;
        Ok(Some(groups.remove("opt").unwrap_or_default()))
    }

    /// Writes the state `round` left (atomically) and drops all but the two newest.
    pub fn save(&self, round: u64, w: &Weights) -> Result<(), BridgeError> {
        let meta = [("round".to_string(), round.to_string())].into();
        fedhubert_io::save_safetensors(&self.path(round), &[("opt/", w)], meta)?;
        let rounds = self.rounds()?;
        for r in rounds.iter().take(rounds.len().saturating_sub(2)) {
            let _ = std::fs::remove_file(self.path(*r));
        }
        Ok(())
    }
}

/// The client index a partition folder stands for: `client_K` → K.
pub fn index_from_dir(dir: &Path) -> Option<usize> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("client_")?
        .parse()
        .ok()
}

impl LocalClient {
    /// Checks the folder up front so a misconfigured node fails with the path in the message,
    /// not in the middle of a round.
    pub fn new(dir: &Path, rf: &RunFile, state: Option<NodeState>) -> Result<Self, BridgeError> {
        let manifest = dir.join("manifest.csv");
        if !manifest.is_file() {
            return Err(BridgeError::Config(format!(
                "partition {}: no manifest.csv (expected a client_K folder written by `fedhubert prepare`)",
                dir.display()
            )));
        }
        let labels = dir.join(format!("{}.npy", rf.pretraining.label_stem));
        if !labels.is_file() {
            return Err(BridgeError::Config(format!(
                "partition {}: no {} (run `fedhubert features` and `fedhubert kmeans` on the partition first)",
                dir.display(),
                labels.display()
            )));
        }
        // The labels' provenance (made from this manifest, at the run's label_rate), as
        // `fedhubert pretrain` checks it before round 1: a 50 Hz label set trained at 100 Hz
        // fails when the node opens its partition, not in every attempt of round 1.
        let codebook = check_partition_labels(&[dir.to_path_buf()], &rf.label_spec())?;
        let dev = fedhubert_model::cpu_device();
        // The template's initial weights are replaced by the server's every call; only its
        // architecture matters, but seeding it like the server keeps it identical to the native run.
        let template = HubertForPretraining::new(
            &rf.model_config()?,
            &rf.pretrain_config()?,
            rf.federated.run.seed,
            &dev,
        )?;
        let layout = fedhubert_model::collect_tensors(&template);
        let pool = HubertClients::new(
            vec![dir.to_path_buf()],
            template,
            rf.train_config()?,
            rf.sim_config(),
            dev,
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            pool,
            layout,
            state,
            codebook,
        })
    }

    pub fn fit(
        &mut self,
        global: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<FitRes, BridgeError> {
        self.layout
            .check_layout(global, "weights from the server")?;
        let keep = cfg.settings.local_optimizer_state == LocalOptimizerState::Keep;
        let state = match (&self.state, keep) {
            (Some(st), true) => Some(st),
            (None, true) => {
                return Err(BridgeError::Config(
                    "local_optimizer_state: keep needs the node config `state-dir` (a folder of the node's own for what it keeps between rounds)".into(),
                ));
            }
            (_, false) => None,
        };
        if let Some(st) = state {
            let kept = st.load_before(cfg.round)?.map(|w| ("0".to_string(), w));
            self.pool
                .restore_client_state(kept.into_iter().collect())
                .map_err(BridgeError::Config)?;
        }
        let res = self
            .pool
            .fit(0, global, cfg)
            .map_err(|e| BridgeError::Client(format!("{}: {e}", self.dir.display())))?;
        if let Some(st) = state
            && let Some(w) = self.pool.client_state().remove("0")
        {
            st.save(cfg.round, &w)?;
        }
        Ok(res)
    }

    pub fn evaluate(
        &mut self,
        global: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<EvalRes, BridgeError> {
        self.layout
            .check_layout(global, "weights from the server")?;
        self.pool
            .evaluate(0, global, cfg)
            .map_err(|e| BridgeError::Client(format!("{}: {e}", self.dir.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(x: f32) -> Weights {
        let mut w = Weights::default();
        w.tensors.push(fedhubert_fl::Tensor {
            name: "m/a".into(),
            shape: vec![2],
            data: vec![x, x],
        });
        w
    }

    #[test]
    fn a_round_starts_from_the_newest_earlier_state_and_two_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let st = NodeState::new(&dir.path().join("node")).unwrap();
        assert_eq!(st.load_before(1).unwrap(), None);
        for r in [1, 2, 4] {
            st.save(r, &state(r as f32)).unwrap();
        }
        assert_eq!(st.rounds().unwrap(), vec![2, 4], "the two newest are kept");
        assert_eq!(st.load_before(5).unwrap(), Some(state(4.0)));
        // A server that resumed from round 3's checkpoint redoes round 4: it must start from
        // round 2's state, not from the one round 4 already left.
        assert_eq!(st.load_before(4).unwrap(), Some(state(2.0)));
        let e = st.load_before(2).unwrap_err().to_string();
        assert!(e.contains("none before round 2"), "{e}");
    }
}
