//! Server-side distillation (`fedhubert distill --mode server`) on Flower: the same
//! [`RoundServer`] steps, with the strategy the native run uses, `ServerDistill`, which distils
//! the teacher into the aggregate after every aggregation. Clients are plain pretraining clients
//! ([`crate::LocalClient`]) given [`ServerDistillation::client_run_file`], as the native run's
//! `HubertClients` are, so a Flower run reproduces the native one and can resume its checkpoint.

use std::path::Path;
use std::sync::{Arc, Mutex};

use fedhubert_distill::config::Mode;
use fedhubert_distill::setup::{SERVER_LOG, read_server_log, write_server_log};
use fedhubert_distill::{DistillRunFile, DistillSetup, ServerDistill, ServerRoundLog};
use fedhubert_fl::Progress;
use fedhubert_fl::store::Start;
use fedhubert_train::RunFile;

use crate::{BridgeError, RoundServer};

/// The configs/tiny_student.yaml distillation configuration, selectable by name.
const TINY_STUDENT_YAML: &str = include_str!("../../../configs/tiny_student.yaml");

/// Reads a distillation run configuration (`tiny_student` for the built-in
/// configs/tiny_student.yaml, else a YAML path), applies `section.key=value` overrides and
/// validates it.
pub fn distill_run_file(config: &str, overrides: &[String]) -> Result<DistillRunFile, BridgeError> {
    if config == "tiny_student" {
        let mut f =
            tempfile::NamedTempFile::new().map_err(|e| BridgeError::Io(std::env::temp_dir(), e))?;
        std::io::Write::write_all(&mut f, TINY_STUDENT_YAML.as_bytes())
            .map_err(|e| BridgeError::Io(f.path().to_path_buf(), e))?;
        return Ok(DistillRunFile::load(Some(f.path()), overrides)?);
    }
    let p = Path::new(config);
    if !p.is_file() {
        return Err(BridgeError::Config(format!(
            "distillation configuration {config}: no such file (give a YAML path like configs/tiny_student.yaml, or `tiny_student`)"
        )));
    }
    Ok(DistillRunFile::load(Some(p), overrides)?)
}

/// Everything server-side distillation needs before the clients are known: the teacher, the
/// initial student, the server-side set and the strategy. Built before SuperNode discovery, so a
/// missing teacher or server set fails at once, and the nodes get the right client run file.
pub struct ServerDistillation {
    pub rf: DistillRunFile,
    pub setup: DistillSetup,
    strategy: ServerDistill,
}

impl ServerDistillation {
    pub fn new(rf: DistillRunFile) -> Result<Self, BridgeError> {
        let dev = fedhubert_model::cpu_device();
        let setup = DistillSetup::new(&rf, &dev)?;
        let inner = rf.run_file().strategy()?.build()?;
        let strategy = setup.server_strategy(&rf, inner, &dev)?;
        Ok(Self {
            rf,
            setup,
            strategy,
        })
    }

    /// What the clients train with (the student, its head following the teacher's).
    pub fn client_run_file(&self) -> RunFile {
        self.setup.client_run_file(&self.rf)
    }

    /// The round loop over `num_clients` clients.
    pub fn server(
        self,
        out: &Path,
        num_clients: usize,
        start: Start,
    ) -> Result<DistillServer, BridgeError> {
        let client_rf = self.client_run_file();
        let strategy = self.strategy;
        let log = strategy.log_handle();
        let aux_params = strategy.trainer().model.aux_weights().num_params();
        let rounds = RoundServer::with_model(
            client_rf,
            self.setup.student.clone(),
            Box::new(strategy),
            out,
            num_clients,
            start,
            &[SERVER_LOG],
        )?;
        let next = rounds.history().len() as u64 + 1;
        *log.lock().unwrap_or_else(|p| p.into_inner()) = read_server_log(out, next)?;
        Ok(DistillServer {
            rounds,
            rf: self.rf,
            setup: self.setup,
            log,
            aux_params,
        })
    }
}

pub struct DistillServer {
    pub rounds: RoundServer,
    rf: DistillRunFile,
    setup: DistillSetup,
    log: Arc<Mutex<Vec<ServerRoundLog>>>,
    aux_params: usize,
}

impl DistillServer {
    /// The server distillation log so far (one entry per finished round).
    pub fn server_log(&self) -> Vec<ServerRoundLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// [`RoundServer::close_exchange`]; after a round also `server_distill.jsonl`, and what the
    /// server's distillation did in the round.
    pub fn close_exchange(&mut self) -> Result<(Progress, Option<ServerRoundLog>), BridgeError> {
        let progress = self.rounds.close_exchange()?;
        let Progress::RoundDone(rec) = &progress else {
            return Ok((progress, None));
        };
        let log = self.server_log();
        write_server_log(self.rounds.out(), &log)?;
        let kd = log.iter().rev().find(|r| r.round == rec.round).cloned();
        Ok((progress, kd))
    }

    /// Writes `student.safetensors`, `hf/` and `summary.json` as `fedhubert distill` does.
    pub fn export(&self) -> Result<serde_json::Value, BridgeError> {
        let out = self.rounds.out();
        let student = self.rounds.model()?;
        student.save_checkpoint(out.join("student.safetensors"))?;
        student.save_hf(out.join("hf"))?;
        self.rounds.write_card(
            "HuBERT student distilled on the Flower server after each aggregation (fedhubert)",
            &self.rf.to_yaml()?,
        )?;
        let log = self.server_log();
        let mut summary = self.setup.summary(
            &self.rf,
            Mode::Server,
            &student,
            self.aux_params,
            self.rounds.history(),
            Some(&log),
            out,
        )?;
        summary["runner"] = "federated-flower".into();
        fedhubert_fl::atomic_write(
            &out.join("summary.json"),
            serde_json::to_string_pretty(&summary)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        Ok(summary)
    }
}
