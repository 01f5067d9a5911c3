//! The ServerApp's rounds: a thin wrapper over `fedhubert_fl::RoundEngine`, the same engine
//! `fedhubert pretrain --simulation` drives. Python only moves messages: it asks for the next
//! exchange, sends the global model and each client's instructions, hands every reply back here
//! as it arrives (in any order), and closes the exchange; after a round this wrapper writes the
//! checkpoint and `metrics.jsonl`. A Flower run with the same seed and data therefore reproduces
//! the native simulation, and either one can `--resume` the other's checkpoint.

use std::path::{Path, PathBuf};

use fedhubert_fl::store::{Start, checkpoint_path, load_checkpoint, open_run_folder, save_round};
use fedhubert_fl::{
    Exchange, FolderLock, Progress, Reply, RoundEngine, RoundRecord, Strategy, Weights,
};
use fedhubert_model::HubertForPretraining;
use fedhubert_train::RunFile;

use crate::BridgeError;

pub struct RoundServer {
    pub rf: RunFile,
    engine: RoundEngine,
    template: HubertForPretraining,
    out: PathBuf,
    // The output folder is this server's until it is dropped.
    _lock: FolderLock,
}

impl RoundServer {
    /// A run over `num_clients` clients numbered 0..num_clients, the partition's `client_K`
    /// folders, started in `out` as `start` says.
    pub fn new(
        rf: RunFile,
        out: &Path,
        num_clients: usize,
        start: Start,
    ) -> Result<Self, BridgeError> {
        let template = HubertForPretraining::new(
            &rf.model_config()?,
            &rf.pretrain_config()?,
            rf.federated.run.seed,
            &fedhubert_model::cpu_device(),
        )?;
        let strategy = rf.strategy()?.build()?;
        Self::with_model(rf, template, strategy, out, num_clients, start, &[])
    }

    /// As [`RoundServer::new`], for a run whose initial model (`template`'s weights) and strategy
    /// the caller built, e.g. server-side distillation's student and `ServerDistill`.
    pub fn with_model(
        rf: RunFile,
        template: HubertForPretraining,
        strategy: Box<dyn Strategy>,
        out: &Path,
        num_clients: usize,
        start: Start,
        own_files: &[&str],
    ) -> Result<Self, BridgeError> {
        let initial = fedhubert_model::collect_tensors(&template);
        let cfg = rf.run_config()?;
        let ck_path = checkpoint_path(out);
        // A ServerApp started with resume=true and no checkpoint yet starts fresh.
        let start = match start {
            Start::Resume if !ck_path.is_file() => Start::Fresh,
            s => s,
        };
        let lock = open_run_folder(out, "flower server", start, own_files)?;
        let engine = if start == Start::Resume {
            let ck = load_checkpoint(&ck_path)?;
            RoundEngine::resume(cfg, strategy, initial, num_clients, ck)
                .map_err(|e| BridgeError::Config(format!("{}: {e}", ck_path.display())))?
        } else {
            RoundEngine::new(cfg, strategy, initial, num_clients)?
        };
        Ok(Self {
            rf,
            engine,
            template,
            out: out.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn engine(&self) -> &RoundEngine {
        &self.engine
    }

    pub fn global(&self) -> &Weights {
        self.engine.global()
    }

    pub fn history(&self) -> &[RoundRecord] {
        self.engine.history()
    }

    /// The round in progress (or next), None when the run is complete.
    pub fn next_round(&self) -> Option<u64> {
        self.engine.next_round()
    }

    /// The open exchange (opening the next one): None when the run is complete.
    pub fn next_exchange(&mut self) -> Result<Option<Exchange>, BridgeError> {
        Ok(self.engine.next_exchange()?)
    }

    /// A client's reply to the open exchange, in any order.
    pub fn deliver(&mut self, client: usize, reply: Reply) -> Result<(), BridgeError> {
        Ok(self.engine.deliver(client, reply)?)
    }

    /// Closes the open exchange; when that completes a round (`Progress::RoundDone`), writes the
    /// round checkpoint and `metrics.jsonl` first.
    pub fn close_exchange(&mut self) -> Result<Progress, BridgeError> {
        let progress = self.engine.close_exchange()?;
        if let Progress::RoundDone(_) = progress {
            save_round(&self.out, &self.engine.checkpoint()?)?;
        }
        Ok(progress)
    }

    /// The global model.
    pub fn model(&self) -> Result<HubertForPretraining, BridgeError> {
        Ok(fedhubert_model::load_tensors(
            self.template.clone(),
            self.engine.global().clone(),
        )?)
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    /// The model card of the run's HF export (`hf/README.md`); the data stayed on the nodes.
    pub fn write_card(&self, title: &str, config_yaml: &str) -> Result<(), BridgeError> {
        fedhubert_train::ModelCard {
            title,
            config_yaml,
            strategy: self.engine.strategy().config().name(),
            data: fedhubert_train::CardData::Nodes(self.engine.num_clients()),
            history: self.history(),
            run_dir: &self.out,
        }
        .write(&self.out.join("hf"))?;
        Ok(())
    }

    /// Writes the global model as `model.safetensors` (fedhubert checkpoint), `hf/` (HuggingFace
    /// `HubertModel` directory) and `summary.json`, as `fedhubert pretrain --simulation` does.
    pub fn export(&self, mode: &str) -> Result<serde_json::Value, BridgeError> {
        let model = self.model()?;
        model.save_checkpoint(self.out.join("model.safetensors"))?;
        model.save_hf(self.out.join("hf"))?;
        let history = self.history();
        self.write_card(
            "HuBERT, federated masked-prediction pretraining on Flower (fedhubert)",
            &self.rf.to_yaml()?,
        )?;
        let last = history.last();
        let summary = serde_json::json!({
            "mode": mode,
            "rounds": history.len(),
            "strategy": self.engine.strategy().config(),
            "parameters": self.global().num_params(),
            "first_round_train_loss": history.first().and_then(|r| r.train.get("loss")),
            "final_train_loss": last.and_then(|r| r.train.get("loss")),
            "final_eval_loss": last.and_then(|r| r.eval.get("loss")),
            "final_eval_acc_masked": last.and_then(|r| r.eval.get("acc_masked")),
            "bytes_up": history.iter().map(|r| r.bytes_up).sum::<u64>(),
            "bytes_down": history.iter().map(|r| r.bytes_down).sum::<u64>(),
            "failures": history.iter().map(|r| r.failures.len()).sum::<usize>(),
            "hf_export": self.out.join("hf"),
            "privacy": last.and_then(|r| r.privacy.as_ref()),
            "stopped": self.engine.stopped(),
        });
        fedhubert_fl::atomic_write(
            &self.out.join("summary.json"),
            serde_json::to_string_pretty(&summary)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        Ok(summary)
    }
}
