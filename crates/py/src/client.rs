//! One Flower client: a SuperNode's own partition folder, trained and evaluated by the same
//! `HubertClients` that `fedhubert pretrain --simulation` uses for each of its clients.

use std::path::{Path, PathBuf};

use fedhubert_fl::{ClientInstructions, ClientPool, EvalRes, FitRes, Weights};
use fedhubert_model::HubertForPretraining;
use fedhubert_train::{HubertClients, RunFile};

use crate::BridgeError;

pub struct LocalClient {
    pub dir: PathBuf,
    pool: HubertClients,
    /// Layout the server's weights must have (names and shapes of the configured model).
    pub layout: Weights,
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
    pub fn new(dir: &Path, rf: &RunFile) -> Result<Self, BridgeError> {
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
        })
    }

    pub fn fit(
        &mut self,
        global: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<FitRes, BridgeError> {
        self.layout
            .check_layout(global, "weights from the server")?;
        self.pool
            .fit(0, global, cfg)
            .map_err(|e| BridgeError::Client(format!("{}: {e}", self.dir.display())))
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
