//! What a distillation run starts from, built from the run file once, for every runner: the native
//! `fedhubert distill` and the Flower ServerApp (`fedhubert.ServerDistillation`) both go through
//! here, so a run gets the same teacher, initial student, layer plan and server-side strategy
//! whichever runner drives its rounds.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use fedhubert_fl::{RoundRecord, Strategy};
use fedhubert_model::{HubertForPretraining, collect_tensors, param_shapes};
use fedhubert_train::{RunFile, TrainConfig};

use crate::config::{DistillRunFile, LayerPlan, Mode, StudentInit};
use crate::data::{has_labels, load_audio_dir};
use crate::server::{ServerDistill, ServerRoundLog};
use crate::student::{DistillStudent, hubert_param_count, init_from_teacher};
use crate::teacher::Teacher;
use crate::trainer::{DistillParts, DistillTrainer};
use crate::{DistillError, Result, cfg_err};

/// The per-round log of server-side distillation, next to `metrics.jsonl`.
pub const SERVER_LOG: &str = "server_distill.jsonl";

pub struct DistillSetup {
    pub teacher_path: PathBuf,
    pub teacher: Teacher,
    /// The initial student: the run file's architecture with the teacher's head (when the teacher
    /// has one), initialised from the teacher with `student_init: teacher`.
    pub student: HubertForPretraining,
    pub plan: LayerPlan,
    /// What was changed from the run file, one line each, for the run's log.
    pub notes: Vec<String>,
}

impl DistillSetup {
    /// Loads the teacher (`distillation.teacher`) and builds the initial student.
    pub fn new(rf: &DistillRunFile, dev: &Device) -> Result<Self> {
        let d = &rf.distillation;
        let teacher_path = d
            .teacher
            .clone()
            .ok_or_else(|| cfg_err("distillation.teacher: no teacher given"))?;
        let teacher = Teacher::load(&teacher_path, dev).map_err(|e| match e {
            DistillError::Data(m) => DistillError::Data(format!("distillation.teacher: {m}")),
            e => DistillError::Data(format!(
                "distillation.teacher {}: {e}",
                teacher_path.display()
            )),
        })?;
        let base = rf.run_file();
        let student_cfg = base.model_config()?;
        let mut pre = base.pretrain_config()?;
        let mut notes = Vec::new();
        if teacher.has_head {
            let tp = &teacher.model.pretrain;
            if (pre.num_classes, pre.head, pre.label_rate)
                != (tp.num_classes, tp.head, tp.label_rate)
            {
                notes.push(format!(
                    "student head follows the teacher's: {} classes, {:?} head, labels at {} Hz",
                    tp.num_classes, tp.head, tp.label_rate
                ));
            }
            pre.num_classes = tp.num_classes;
            pre.head = tp.head;
            pre.label_rate = tp.label_rate;
        }
        let (n_s, n_t) = (student_cfg.num_hidden_layers, teacher.num_layers());
        let plan = d.layer_plan(n_s, n_t)?;
        let mut student =
            HubertForPretraining::new(&student_cfg, &pre, rf.federated.run.seed, dev)?;
        if d.student_init == StudentInit::Teacher {
            let layers = d.init_layers.unwrap_or(n_s.min(n_t));
            let (s, rep) = init_from_teacher(student, &teacher.model, layers)?;
            notes.push(format!(
                "student initialised from the teacher: {} tensors copied, {} skipped (shape differs)",
                rep.copied.len(),
                rep.skipped_shape.len()
            ));
            student = s;
        }
        Ok(Self {
            teacher_path,
            teacher,
            student,
            plan,
            notes,
        })
    }

    /// The run file the clients train the student with: the student's sections, with the head it
    /// actually has (it follows the teacher's), so a client builds the same model from it.
    pub fn client_run_file(&self, rf: &DistillRunFile) -> RunFile {
        let mut base = rf.run_file();
        let pre = &self.student.pretrain;
        base.pretraining.vocab_size = pre.num_classes;
        base.pretraining.head = pre.head;
        base.pretraining.label_rate = pre.label_rate;
        base
    }

    /// Server mode's strategy: `inner` aggregates, then the teacher is distilled into the
    /// aggregate on `distillation.server_set`. Loads (and checks) the server-side set.
    pub fn server_strategy(
        &self,
        rf: &DistillRunFile,
        inner: Box<dyn Strategy>,
        dev: &Device,
    ) -> Result<ServerDistill> {
        let d = &rf.distillation;
        let set = d.server_set.as_ref().ok_or_else(|| {
            cfg_err("distillation.server_set: server mode needs a server-side audio set")
        })?;
        let data = load_audio_dir(set, &rf.run_file().label_spec(), d.server_max_utterances)
            .map_err(|e| match e {
                DistillError::Data(m) => {
                    DistillError::Data(format!("distillation.server_set: {m}"))
                }
                e => DistillError::Data(format!("distillation.server_set {}: {e}", set.display())),
            })?;
        if d.alpha < 1.0 && !has_labels(&data.train) {
            return Err(cfg_err(format!(
                "distillation.alpha = {} < 1 blends in masked prediction, which needs labels: {} has no {}.npy (run `fedhubert kmeans` on it or set distillation.alpha=1)",
                d.alpha,
                set.display(),
                rf.pretraining.label_stem
            )));
        }
        let seed = rf.federated.run.seed;
        let ds = DistillStudent::new(
            self.student.clone(),
            self.teacher.hidden_size(),
            &self.plan,
            d.feature_weight > 0.0,
            d.pred_weight > 0.0,
            None,
            seed,
        );
        let server_train = TrainConfig {
            learning_rate: d.server_learning_rate,
            ..rf.run_file().train_config()?
        };
        let parts = DistillParts {
            teacher: self.teacher.clone(),
            cfg: d.clone(),
            mode: Mode::Server,
            plan: self.plan.clone(),
            quantizer: None,
            train: server_train,
        };
        let trainer = DistillTrainer::new(ds, parts, dev)?;
        Ok(ServerDistill::new(
            inner,
            trainer,
            data.train,
            self.initial(),
            d.server_steps,
            d.server_learning_rate,
            seed,
        ))
    }

    /// The initial global weights (the student's own names).
    pub fn initial(&self) -> fedhubert_fl::Weights {
        collect_tensors(&self.student)
    }

    /// `summary.json` of a finished run (the runner adds what only it knows, e.g. wall time).
    #[allow(clippy::too_many_arguments)]
    pub fn summary(
        &self,
        rf: &DistillRunFile,
        mode: Mode,
        final_student: &HubertForPretraining,
        aux_params: usize,
        history: &[RoundRecord],
        server_log: Option<&[ServerRoundLog]>,
        out: &Path,
    ) -> Result<serde_json::Value> {
        let first = history.first().map(|r| &r.train);
        let last = history.last().map(|r| &r.train);
        let plan = &self.plan;
        Ok(serde_json::json!({
            "mode": mode,
            "rounds": history.len(),
            "teacher": self.teacher_path,
            "teacher_parameters": self.teacher.num_params(),
            "student_encoder_parameters": hubert_param_count(&rf.run_file().model_config()?),
            "student_parameters_with_head": param_shapes(final_student)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum::<usize>(),
            "distillation_head_parameters": aux_params,
            "layer_plan": {"feature": plan.feature, "pred": plan.pred, "mvq": plan.mvq},
            "first_round_client_metrics": first,
            "final_round_client_metrics": last,
            "final_eval": history.last().map(|r| &r.eval),
            "server_distillation": server_log.map(|l| serde_json::json!({
                "first_round_first_step": l.first().map(|r| &r.first),
                "last_round_last_step": l.last().map(|r| &r.last),
            })),
            "bytes_up": history.iter().map(|r| r.bytes_up).sum::<u64>(),
            "bytes_down": history.iter().map(|r| r.bytes_down).sum::<u64>(),
            "failures": history.iter().map(|r| r.failures.len()).sum::<usize>(),
            "privacy": history.last().and_then(|r| r.privacy.as_ref()),
            "student_checkpoint": out.join("student.safetensors"),
            "hf_export": out.join("hf"),
        }))
    }
}

/// Writes `out/server_distill.jsonl`.
pub fn write_server_log(out: &Path, log: &[ServerRoundLog]) -> Result<()> {
    let mut lines = String::new();
    for r in log {
        lines.push_str(&serde_json::to_string(r).map_err(|e| DistillError::Data(e.to_string()))?);
        lines.push('\n');
    }
    Ok(fedhubert_fl::atomic_write(
        &out.join(SERVER_LOG),
        lines.as_bytes(),
    )?)
}

/// The rows of `out/server_distill.jsonl` for rounds before `next_round` (none when the file is
/// missing): what a resumed run keeps of the log, since it redoes every later round.
pub fn read_server_log(out: &Path, next_round: u64) -> Result<Vec<ServerRoundLog>> {
    let path = out.join(SERVER_LOG);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if next_round > 1 {
                tracing::warn!(
                    "{}: missing; the resumed log will lack rounds 1..{}",
                    path.display(),
                    next_round - 1
                );
            }
            return Ok(vec![]);
        }
        Err(e) => return Err(DistillError::Data(format!("{}: {e}", path.display()))),
    };
    let mut rows: Vec<ServerRoundLog> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: ServerRoundLog = serde_json::from_str(line)
            .map_err(|e| DistillError::Data(format!("{} line {}: {e}", path.display(), i + 1)))?;
        if r.round < next_round {
            rows.push(r);
        }
    }
    // A run stopped between writing its checkpoint and its log lacks the last rounds' rows.
    let missing: Vec<u64> = (1..next_round)
        .filter(|k| !rows.iter().any(|r| r.round == *k))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            "{}: no server distillation rows for rounds {missing:?}; the resumed log will lack them",
            path.display()
        );
    }
    Ok(rows)
}
