//! The ServerApp's round loop as a state machine that Python steps through, one Flower
//! `send_and_receive` at a time.
//!
//! `fedhubert_fl::run` calls its clients one after another through a `ClientPool`; on Flower the
//! sampled clients train in parallel on their own machines, so the loop is turned inside out:
//! Python asks which clients to send what, ships the messages, and hands the replies back here.
//! Every decision (sampling, per-client seeds, aggregation order, checkpoint layout) is the one
//! `fedhubert_fl::run` makes, so a Flower run with the same seed and data reproduces
//! `fedhubert pretrain --simulation`, and either one can `--resume` the other's checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use fedhubert_fl::rounds::{
    Checkpoint, Failure, checkpoint_path, load_checkpoint, mix, sample_clients, save_checkpoint,
    write_jsonl,
};
use fedhubert_fl::strategy::weighted_metrics;
use fedhubert_fl::{
    Compression, EvalRes, FitConfig, FitRes, RoundRecord, RunConfig, Strategy, Weights,
};
use fedhubert_model::HubertForPretraining;
use fedhubert_train::{RunFile, from_weights, to_weights};

use crate::BridgeError;

/// What a client sends back after training, before decompression.
pub enum Upload {
    Weights(Weights),
    /// `fedhubert_fl::compress::encode` of the trainable weights against the global ones.
    Payload(Vec<u8>),
}

struct Attempt {
    sampled: Vec<usize>,
    /// The trainable part of the global weights this attempt started from.
    current: Weights,
    participated: Vec<usize>,
    metrics: Vec<(u64, BTreeMap<String, f64>)>,
    client_bytes: BTreeMap<usize, (u64, u64)>,
    failures: Vec<Failure>,
    /// Last client accumulated: replies must come in client order so float sums match the native run.
    last: Option<usize>,
}

pub struct RoundServer {
    pub rf: RunFile,
    pub run_cfg: RunConfig,
    strategy: Box<dyn Strategy>,
    template: HubertForPretraining,
    pub global: Weights,
    pub history: Vec<RoundRecord>,
    synced: BTreeSet<usize>,
    out: PathBuf,
    num_clients: usize,
    round: u64,
    attempt: u32,
    round_failures: Vec<Failure>,
    round_t0: Instant,
    open: Option<Attempt>,
    done: Option<RoundRecord>,
}

fn is_frozen(name: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| name.starts_with(p.as_str()))
}

impl RoundServer {
    /// A fresh run (or, with `resume`, the run whose checkpoint is in `out`) over `num_clients`
    /// clients numbered 0..num_clients, the partition's `client_K` folders.
    pub fn new(
        rf: RunFile,
        out: &Path,
        num_clients: usize,
        resume: bool,
    ) -> Result<Self, BridgeError> {
        let template = HubertForPretraining::new(
            &rf.model_config()?,
            &rf.pretrain_config()?,
            rf.federated.seed,
            &fedhubert_model::cpu_device(),
        )?;
        let strategy = rf.strategy()?.build()?;
        Self::with_model(rf, template, strategy, out, num_clients, resume)
    }

    /// As [`RoundServer::new`], for a run whose initial model (`template`'s weights) and strategy
    /// the caller built, e.g. server-side distillation's student and `ServerDistill`.
    pub fn with_model(
        rf: RunFile,
        template: HubertForPretraining,
        mut strategy: Box<dyn Strategy>,
        out: &Path,
        num_clients: usize,
        resume: bool,
    ) -> Result<Self, BridgeError> {
        let mut global = to_weights(fedhubert_model::collect_tensors(&template));
        let run_cfg = rf.run_config()?;
        run_cfg.validate(num_clients)?;
        std::fs::create_dir_all(out).map_err(|e| BridgeError::Io(out.to_path_buf(), e))?;
        let mut history = Vec::new();
        let mut synced = BTreeSet::new();
        let ck_path = checkpoint_path(out);
        if resume && ck_path.is_file() {
            let ck = load_checkpoint(&ck_path)?;
            global.check_layout(&ck.global, "checkpoint global weights")?;
            let here = serde_json::to_string(strategy.config()).unwrap_or_default();
            if ck.strategy != here {
                return Err(BridgeError::Config(format!(
                    "{}: the checkpoint was made with strategy {} but this run uses {here}",
                    ck_path.display(),
                    ck.strategy
                )));
            }
            if ck.seed != run_cfg.seed {
                return Err(BridgeError::Config(format!(
                    "{}: checkpoint seed {} differs from federated.seed {}",
                    ck_path.display(),
                    ck.seed,
                    run_cfg.seed
                )));
            }
            global = ck.global;
            strategy.load_state(ck.state)?;
            history = ck.history;
            synced = ck.synced;
        }
        Ok(Self {
            rf,
            run_cfg,
            strategy,
            template,
            global,
            round: history.len() as u64 + 1,
            history,
            synced,
            out: out.to_path_buf(),
            num_clients,
            attempt: 0,
            round_failures: vec![],
            round_t0: Instant::now(),
            open: None,
            done: None,
        })
    }

    pub fn num_clients(&self) -> usize {
        self.num_clients
    }

    /// The round to run next, or None when the run is complete.
    pub fn next_round(&self) -> Option<u64> {
        (self.round <= self.run_cfg.num_rounds).then_some(self.round)
    }

    pub fn compression(&self) -> Compression {
        self.run_cfg.compression
    }

    /// Starts an attempt of the next round: the sampled clients with their instructions.
    pub fn begin_attempt(&mut self) -> Result<Vec<(usize, FitConfig)>, BridgeError> {
        let round = self
            .next_round()
            .ok_or_else(|| BridgeError::State("the run is complete".into()))?;
        if self.attempt == 0 && self.open.is_none() {
            self.round_t0 = Instant::now();
            self.round_failures.clear();
        }
        let cfg = &self.run_cfg;
        let sampled = sample_clients(
            self.num_clients,
            cfg.fraction_fit,
            cfg.min_fit_clients,
            cfg.seed,
            round,
            self.attempt,
        );
        let current = self.global.filter(|n| !is_frozen(n, &cfg.frozen_prefixes));
        self.strategy.begin_round(round, &current)?;
        let plan = sampled
            .iter()
            .map(|&c| {
                (
                    c,
                    FitConfig {
                        round,
                        seed: mix(cfg.seed, &[0xC11E, round, self.attempt as u64, c as u64]),
                        proximal_mu: self.strategy.config().proximal_mu(),
                        extra: cfg.client_extra.clone(),
                    },
                )
            })
            .collect();
        self.open = Some(Attempt {
            sampled,
            current,
            participated: vec![],
            metrics: vec![],
            client_bytes: BTreeMap::new(),
            failures: vec![],
            last: None,
        });
        Ok(plan)
    }

    fn attempt_mut(&mut self) -> Result<&mut Attempt, BridgeError> {
        self.open
            .as_mut()
            .ok_or_else(|| BridgeError::State("no round attempt is open".into()))
    }

    fn down_bytes(&self, c: usize) -> u64 {
        let trainable = self
            .global
            .filter(|n| !is_frozen(n, &self.run_cfg.frozen_prefixes))
            .nbytes() as u64;
        let frozen = self.global.nbytes() as u64 - trainable;
        trainable + if self.synced.contains(&c) { 0 } else { frozen }
    }

    /// A sampled client's reply. Replies must come in increasing client order (the order in which
    /// `fedhubert_fl::run` aggregates), whatever order they arrived in.
    pub fn accumulate(
        &mut self,
        client: usize,
        upload: Upload,
        num_examples: u64,
        metrics: BTreeMap<String, f64>,
    ) -> Result<(), BridgeError> {
        let down = self.down_bytes(client);
        let compression = self.run_cfg.compression;
        let frozen = self.run_cfg.frozen_prefixes.clone();
        let attempt = self.attempt;
        let a = self.attempt_mut()?;
        if !a.sampled.contains(&client) {
            return Err(BridgeError::State(format!(
                "client {client} was not sampled in this round (sampled: {:?})",
                a.sampled
            )));
        }
        if a.last.is_some_and(|l| l >= client) {
            return Err(BridgeError::State(format!(
                "client {client}'s reply after client {}'s: pass replies in increasing client order",
                a.last.unwrap()
            )));
        }
        a.last = Some(client);
        let decoded = match upload {
            Upload::Payload(p) => {
                let len = p.len() as u64;
                fedhubert_fl::compress::decode(&p, &a.current, compression).map(|w| (w, len))
            }
            Upload::Weights(w) => {
                let sent = w.filter(|n| !is_frozen(n, &frozen));
                // Uncompressed, the wire carries exactly the f32 payload that encode() would make.
                fedhubert_fl::compress::encode(&sent, &a.current, compression).and_then(|p| {
                    Ok((
                        fedhubert_fl::compress::decode(&p, &a.current, compression)?,
                        p.len() as u64,
                    ))
                })
            }
        };
        let (received, up) = match decoded {
            Ok(x) => x,
            Err(e) => {
                a.failures.push(Failure {
                    client,
                    attempt,
                    why: e.to_string(),
                });
                a.client_bytes.insert(client, (down, 0));
                return Ok(());
            }
        };
        a.client_bytes.insert(client, (down, up));
        a.metrics.push((num_examples, metrics.clone()));
        let r = FitRes {
            client,
            weights: received,
            num_examples,
            metrics,
        };
        let res = self.strategy.accumulate(r);
        let a = self.attempt_mut()?;
        match res {
            Err(e) => a.failures.push(Failure {
                client,
                attempt,
                why: e.to_string(),
            }),
            Ok(()) => {
                a.participated.push(client);
                self.synced.insert(client);
            }
        }
        Ok(())
    }

    /// A sampled client that failed (error reply, no reply before the deadline, lost node).
    pub fn fail(&mut self, client: usize, why: String) -> Result<(), BridgeError> {
        let down = self.down_bytes(client);
        let attempt = self.attempt;
        let a = self.attempt_mut()?;
        a.failures.push(Failure {
            client,
            attempt,
            why,
        });
        a.client_bytes.insert(client, (down, 0));
        Ok(())
    }

    /// Closes the attempt. True: the round is aggregated (evaluate, then `finish_round`).
    /// False: too few replies, call `begin_attempt` again for a fresh sample. Errors once
    /// `max_round_retries` is used up, keeping the last checkpoint.
    pub fn end_attempt(&mut self) -> Result<bool, BridgeError> {
        let a = self
            .open
            .take()
            .ok_or_else(|| BridgeError::State("no round attempt is open".into()))?;
        let cfg = &self.run_cfg;
        let enough = a.participated.len() >= cfg.min_fit_clients
            && (cfg.accept_failures || a.failures.is_empty());
        self.round_failures.extend(a.failures);
        let why = || {
            self.round_failures
                .iter()
                .map(|f| format!("client {}: {}", f.client, f.why))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if enough {
            let new_trainable = self.strategy.end_round()?;
            self.global.update_from(&new_trainable)?;
            self.done = Some(RoundRecord {
                round: self.round,
                sampled: a.sampled,
                num_examples: a.metrics.iter().map(|(n, _)| *n).sum(),
                train: weighted_metrics(a.metrics.iter().map(|(n, m)| (*n, m))),
                participated: a.participated,
                failures: self.round_failures.clone(),
                attempts: self.attempt + 1,
                eval: BTreeMap::new(),
                bytes_down: a.client_bytes.values().map(|b| b.0).sum(),
                bytes_up: a.client_bytes.values().map(|b| b.1).sum(),
                client_bytes: a.client_bytes,
                round_time_s: 0.0,
            });
            return Ok(true);
        }
        tracing::warn!(
            "round {} attempt {}: {} of {} sampled clients replied (min_fit_clients {}): {}",
            self.round,
            self.attempt + 1,
            a.participated.len(),
            a.sampled.len(),
            cfg.min_fit_clients,
            why()
        );
        if self.attempt >= cfg.max_round_retries {
            return Err(fedhubert_fl::FlError::RoundFailed {
                round: self.round,
                attempts: self.attempt + 1,
                got: a.participated.len(),
                needed: cfg.min_fit_clients,
                why: why(),
            }
            .into());
        }
        self.attempt += 1;
        Ok(false)
    }

    /// The clients to evaluate the new global model on this round (empty when not an eval round).
    pub fn eval_plan(&self) -> Vec<(usize, FitConfig)> {
        let cfg = &self.run_cfg;
        let round = self.round;
        if !(cfg.fraction_evaluate > 0.0
            && ((cfg.eval_every > 0 && round % cfg.eval_every == 0) || round == cfg.num_rounds))
        {
            return vec![];
        }
        sample_clients(
            self.num_clients,
            cfg.fraction_evaluate,
            cfg.min_evaluate_clients.min(self.num_clients),
            cfg.seed ^ 0xE7A1,
            round,
            0,
        )
        .into_iter()
        .map(|c| {
            (
                c,
                FitConfig {
                    round,
                    seed: mix(cfg.seed, &[0xE7A1, round, c as u64]),
                    proximal_mu: 0.0,
                    extra: cfg.client_extra.clone(),
                },
            )
        })
        .collect()
    }

    /// Records the evaluation replies (in client order), writes the round checkpoint and
    /// `metrics.jsonl`, and returns the round's record.
    pub fn finish_round(&mut self, evals: Vec<EvalRes>) -> Result<RoundRecord, BridgeError> {
        let mut rec = self
            .done
            .take()
            .ok_or_else(|| BridgeError::State("no aggregated round to finish".into()))?;
        let evals: Vec<_> = evals.into_iter().filter(|r| r.num_examples > 0).collect();
        rec.eval = weighted_metrics(evals.iter().map(|r| (r.num_examples, &r.metrics)));
        rec.round_time_s = self.round_t0.elapsed().as_secs_f64();
        self.history.push(rec.clone());
        let ck = Checkpoint {
            round: self.round,
            seed: self.run_cfg.seed,
            strategy: serde_json::to_string(self.strategy.config()).unwrap_or_default(),
            global: self.global.clone(),
            state: self.strategy.state(),
            history: self.history.clone(),
            synced: self.synced.clone(),
        };
        save_checkpoint(&checkpoint_path(&self.out), &ck)?;
        write_jsonl(&self.out.join("metrics.jsonl"), &self.history)?;
        self.round += 1;
        self.attempt = 0;
        Ok(rec)
    }

    /// The global model.
    pub fn model(&self) -> Result<HubertForPretraining, BridgeError> {
        Ok(fedhubert_model::load_tensors(
            self.template.clone(),
            from_weights(&self.global),
        )?)
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Writes the global model as `model.safetensors` (fedhubert checkpoint), `hf/` (HuggingFace
    /// `HubertModel` directory) and `summary.json`, as `fedhubert pretrain --simulation` does.
    pub fn export(&self, mode: &str) -> Result<serde_json::Value, BridgeError> {
        let model = self.model()?;
        model.save_checkpoint(self.out.join("model.safetensors"))?;
        model.save_hf(self.out.join("hf"))?;
        let last = self.history.last();
        let summary = serde_json::json!({
            "mode": mode,
            "rounds": self.history.len(),
            "strategy": self.strategy.config(),
            "parameters": self.global.num_params(),
            "first_round_train_loss": self.history.first().and_then(|r| r.train.get("loss")),
            "final_train_loss": last.and_then(|r| r.train.get("loss")),
            "final_eval_loss": last.and_then(|r| r.eval.get("loss")),
            "final_eval_acc_masked": last.and_then(|r| r.eval.get("acc_masked")),
            "bytes_up": self.history.iter().map(|r| r.bytes_up).sum::<u64>(),
            "bytes_down": self.history.iter().map(|r| r.bytes_down).sum::<u64>(),
            "failures": self.history.iter().map(|r| r.failures.len()).sum::<usize>(),
            "hf_export": self.out.join("hf"),
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
