//! Server-side distillation (seed 000): a [`Strategy`] wrapper. Clients train students with the
//! self-supervised loss; after the inner strategy aggregates, the server — holding the frozen
//! teacher and a server-side audio set, never client audio — distils the teacher into the
//! aggregate for a number of steps, and the distilled weights become the next global model. The fl
//! engine's checkpoints, resume and traffic accounting apply unchanged; the server's distillation
//! heads and optimizer moments travel in the strategy state, so a resumed run continues exactly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fedhubert_fl::{FitRes, FlError, Strategy, StrategyConfig, Tensor, Weights};
use fedhubert_io::seeds::{self, mix};
use fedhubert_train::Utt;
use serde::{Deserialize, Serialize};

use crate::trainer::{DistillMetrics, DistillTrainer};

/// What the server's distillation did in one round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerRoundLog {
    pub round: u64,
    /// Metrics of the round's first distillation step (the aggregate as the clients left it).
    pub first: DistillMetrics,
    /// Means over the round's distillation steps.
    pub mean: DistillMetrics,
    /// Metrics of the round's last step.
    pub last: DistillMetrics,
}

pub struct ServerDistill {
    inner: Box<dyn Strategy>,
    trainer: DistillTrainer,
    data: Arc<Vec<Utt>>,
    /// The full student (own names), kept in step with the engine's global weights.
    full: Weights,
    steps: u64,
    lr: f64,
    seed: u64,
    round: u64,
    log: Arc<Mutex<Vec<ServerRoundLog>>>,
}

fn fl_err(e: crate::DistillError) -> FlError {
    FlError::Config(format!("server distillation: {e}"))
}

const INNER: &str = "inner.";
const AUX: &str = "server_aux";
const ADAM_M: &str = "server_adam_m";
const ADAM_V: &str = "server_adam_v";
const ADAM_STEP: &str = "server_adam_step";

impl ServerDistill {
    /// `initial_student`: the run's initial global weights (the student's own names).
    pub fn new(
        inner: Box<dyn Strategy>,
        trainer: DistillTrainer,
        data: Vec<Utt>,
        initial_student: Weights,
        steps: u64,
        lr: f64,
        seed: u64,
    ) -> Self {
        Self {
            inner,
            trainer,
            data: Arc::new(data),
            full: initial_student,
            steps,
            lr,
            seed,
            round: 0,
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The per-round log (shared: readable while the engine owns the strategy).
    pub fn log_handle(&self) -> Arc<Mutex<Vec<ServerRoundLog>>> {
        self.log.clone()
    }

    pub fn trainer(&self) -> &DistillTrainer {
        &self.trainer
    }

    fn distill(&mut self) -> Result<(), crate::DistillError> {
        let model = self.trainer.model.clone().set_parts(&self.full, None)?;
        self.trainer.model = model;
        let mut first = None;
        let mut last = None;
        let mean = self.trainer.train_steps(
            &self.data,
            self.steps,
            |_| self.lr,
            mix(self.seed, &[seeds::SERVER_DISTILL, self.round]),
            None,
            |_, m| {
                if first.is_none() {
                    first = Some(m.clone());
                }
                last = Some(m.clone());
            },
        )?;
        self.full = self.trainer.model.student_weights();
        let rec = ServerRoundLog {
            round: self.round,
            first: first.unwrap_or_default(),
            mean,
            last: last.unwrap_or_default(),
        };
        tracing::info!(
            "round {}: server distillation {} steps, loss {:.4} -> {:.4} (kl {:.4}, feature {:.4}, pred {:.4})",
            rec.round,
            rec.mean.steps,
            rec.first.loss,
            rec.last.loss,
            rec.last.kl,
            rec.last.feature_mse,
            rec.last.pred_l1
        );
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(rec);
        Ok(())
    }
}

impl Strategy for ServerDistill {
    fn config(&self) -> &StrategyConfig {
        self.inner.config()
    }

    fn begin_round(&mut self, round: u64, current: &Weights) -> Result<(), FlError> {
        self.round = round;
        self.full.update_from(current)?;
        self.inner.begin_round(round, current)
    }

    fn accumulate(&mut self, res: FitRes) -> Result<(), FlError> {
        self.inner.accumulate(res)
    }

    fn end_round(&mut self) -> Result<Weights, FlError> {
        let aggregated = self.inner.end_round()?;
        self.full.update_from(&aggregated)?;
        if self.steps > 0 {
            self.distill().map_err(fl_err)?;
        }
        let names: std::collections::BTreeSet<&str> =
            aggregated.tensors.iter().map(|t| t.name.as_str()).collect();
        Ok(self.full.filter(|n| names.contains(n)))
    }

    fn state(&self) -> BTreeMap<String, Weights> {
        let mut s: BTreeMap<String, Weights> = self
            .inner
            .state()
            .into_iter()
            .map(|(k, v)| (format!("{INNER}{k}"), v))
            .collect();
        s.insert(AUX.into(), self.trainer.model.aux_weights());
        let (m, v, step) = self.trainer.opt_state();
        s.insert(ADAM_M.into(), m);
        s.insert(ADAM_V.into(), v);
        s.insert(
            ADAM_STEP.into(),
            Weights::new(vec![Tensor {
                name: "step".into(),
                shape: vec![2],
                data: vec![(step >> 24) as f32, (step & 0xFF_FFFF) as f32],
            }]),
        );
        s
    }

    fn load_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), FlError> {
        let mut inner = BTreeMap::new();
        let (mut aux, mut m, mut v, mut step) = (None, None, None, 0u64);
        for (k, w) in state {
            if let Some(rest) = k.strip_prefix(INNER) {
                inner.insert(rest.to_string(), w);
            } else if k == AUX {
                aux = Some(w);
            } else if k == ADAM_M {
                m = Some(w);
            } else if k == ADAM_V {
                v = Some(w);
            } else if k == ADAM_STEP {
                let d = &w
                    .tensors
                    .first()
                    .ok_or_else(|| FlError::Config("server_adam_step: empty".into()))?
                    .data;
                step = ((d[0] as u64) << 24) | d[1] as u64;
            } else {
                return Err(FlError::Config(format!(
                    "unexpected strategy state {k:?} for server distillation"
                )));
            }
        }
        self.inner.load_state(inner)?;
        if let Some(a) = aux {
            let student = self.trainer.model.student_weights();
            self.trainer.model = self
                .trainer
                .model
                .clone()
                .set_parts(&student, Some(&a))
                .map_err(fl_err)?;
        }
        if let (Some(m), Some(v)) = (m, v) {
            self.trainer.set_opt_state(&m, &v, step);
        }
        Ok(())
    }
}
