//! The distillation trainer: frozen teacher forward (plain device), one student pass (autodiff
//! device), the weighted losses and backward; clipping, AdamW and the step loop are the shared
//! trainer core's (`fedhubert_train::core`), on the student and its heads.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use fedhubert_io::seeds::{self, mix};
use fedhubert_train::core::{self, Reported, StepMetrics, StepPlan, Update};
use fedhubert_train::data::make_batch;
use fedhubert_train::{AdamState, TrainConfig, Utt};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::codes::{CodeTable, crop_codes};
use crate::config::{DistillConfig, LayerPlan, Mode};
use crate::losses::{codebook_ce, distilhubert_loss, kl_loss, mse_loss, student_pass};
use crate::quantizer::Quantizer;
use crate::student::DistillStudent;
use crate::teacher::{Teacher, to_student};
use crate::{DistillError, Result, cfg_err};

/// Loss components and statistics (means over steps or utterances).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DistillMetrics {
    /// `alpha * distill + (1 - alpha) * mlm`.
    pub loss: f64,
    /// Weighted distillation loss.
    pub distill: f64,
    /// Masked-prediction loss (0 when alpha = 1).
    pub mlm: f64,
    pub kl: f64,
    pub feature_mse: f64,
    pub pred_l1: f64,
    pub pred_cos: f64,
    pub mvq_ce: f64,
    pub mvq_acc: f64,
    pub acc_masked: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub steps: u64,
    pub utterances: u64,
}

impl Reported for DistillMetrics {
    fn utterances(&self) -> u64 {
        self.utterances
    }
}

impl StepMetrics for DistillMetrics {
    fn running_mean(&mut self, m: &DistillMetrics, n: f64) {
        let upd = |a: &mut f64, b: f64| *a += (b - *a) / n;
        upd(&mut self.loss, m.loss);
        upd(&mut self.distill, m.distill);
        upd(&mut self.mlm, m.mlm);
        upd(&mut self.kl, m.kl);
        upd(&mut self.feature_mse, m.feature_mse);
        upd(&mut self.pred_l1, m.pred_l1);
        upd(&mut self.pred_cos, m.pred_cos);
        upd(&mut self.mvq_ce, m.mvq_ce);
        upd(&mut self.mvq_acc, m.mvq_acc);
        upd(&mut self.acc_masked, m.acc_masked);
        upd(&mut self.grad_norm, m.grad_norm);
        self.lr = m.lr;
        self.steps += m.steps;
        self.utterances += m.utterances;
    }
}

fn add(d: &mut Option<Tensor<1>>, x: Tensor<1>) {
    *d = Some(match d.take() {
        Some(a) => a + x,
        None => x,
    });
}

fn scalar(x: &Tensor<1>) -> f64 {
    x.clone()
        .detach()
        .into_data()
        .try_into_vec_as::<f64>()
        .expect("f64 data")[0]
}

/// Prefix of the student's conv front-end inside [`DistillStudent`].
pub const STUDENT_FEATURE_EXTRACTOR: &str = "student.hubert.feature_extractor.";

/// What a distillation trainer is made of besides the student: the frozen teacher, the losses'
/// configuration, the mode and its layer plan, the MVQ quantizer, the local training settings.
#[derive(Clone)]
pub struct DistillParts {
    pub teacher: Teacher,
    pub cfg: DistillConfig,
    pub mode: Mode,
    pub plan: LayerPlan,
    pub quantizer: Option<Arc<Quantizer>>,
    pub train: TrainConfig,
}

/// Student (+ heads) on an autodiff device, the frozen teacher, the losses' configuration and the
/// optimizer state.
pub struct DistillTrainer {
    pub model: DistillStudent,
    pub parts: DistillParts,
    pub opt: AdamState,
    /// MVQ mode: precomputed codes of the utterances trained on; the teacher then does not run.
    pub codes: Option<Arc<CodeTable>>,
    device: Device,
}

impl DistillTrainer {
    /// Checks that the losses the mode and weights ask for are computable (teacher head, class
    /// counts, frame rates, quantizer) and moves the student to the autodiff version of `device`.
    pub fn new(model: DistillStudent, parts: DistillParts, device: &Device) -> Result<Self> {
        let DistillParts {
            teacher,
            cfg,
            mode,
            plan,
            quantizer,
            train,
        } = &parts;
        cfg.validate()?;
        train.validate()?;
        let s = &model.student;
        let (sc, tc) = (&s.hubert.config, &teacher.model.hubert.config);
        if sc.total_stride() != tc.total_stride() {
            return Err(cfg_err(format!(
                "pretraining: the student's conv stride {} differs from the teacher's {}; frames would not align",
                sc.total_stride(),
                tc.total_stride()
            )));
        }
        match mode {
            Mode::Mvq => {
                let q = quantizer.as_ref().ok_or_else(|| {
                    cfg_err("distillation.mvq: mode mvq needs a trained quantizer")
                })?;
                if q.dim() != tc.hidden_size {
                    return Err(cfg_err(format!(
                        "distillation.mvq: quantizer dim {} differs from the teacher's hidden size {}",
                        q.dim(),
                        tc.hidden_size
                    )));
                }
                if model.mvq_head.is_none() {
                    return Err(cfg_err("distillation.mvq: the student has no MVQ head"));
                }
            }
            Mode::Client | Mode::Server => {
                if cfg.kl_weight > 0.0 {
                    if !teacher.has_head {
                        return Err(cfg_err(
                            "distillation.kl_weight: the teacher has no pretraining head (HF export without pretraining_head.safetensors); set kl_weight=0",
                        ));
                    }
                    if teacher.model.pretrain.num_classes != s.pretrain.num_classes {
                        return Err(cfg_err(format!(
                            "pretraining.vocab_size: the student predicts {} classes, the teacher {}; output distillation needs the same k-means classes",
                            s.pretrain.num_classes, teacher.model.pretrain.num_classes
                        )));
                    }
                }
                if cfg.feature_weight > 0.0
                    && sc.hidden_size != tc.hidden_size
                    && model.feat_proj.len() != plan.feature.len()
                {
                    return Err(cfg_err(
                        "distillation.feature_weight: widths differ and the student has no feature projections",
                    ));
                }
                if cfg.pred_weight > 0.0 && model.pred_heads.len() != plan.pred.len() {
                    return Err(cfg_err(
                        "distillation.pred_weight: the student has no prediction heads",
                    ));
                }
            }
        }
        let ad = device.clone().autodiff();
        let mut model = model.to_device(&ad).train();
        if train.freeze_feature_extractor {
            model.student.pretrain.feature_grad_mult = 0.0;
        }
        Ok(Self {
            model,
            parts,
            opt: AdamState::default(),
            codes: None,
            device: ad,
        })
    }

    fn mlm_active(&self) -> bool {
        self.parts.cfg.alpha < 1.0
    }

    /// Forward of one batch of equal-length crops: the total loss tensor and its components.
    /// The precomputed codes of `utts` (MVQ mode with `distillation.mvq.codes`), else None.
    fn utt_codes<'a>(&'a self, utts: &[&Utt]) -> Result<Option<Vec<&'a [u8]>>> {
        let Some(table) = self.codes.as_ref().filter(|_| self.parts.mode == Mode::Mvq) else {
            return Ok(None);
        };
        let cfg = &self.parts.teacher.model.hubert.config;
        utts.iter()
            .map(|u| table.get(&u.id, cfg.num_frames(u.wav.len())))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Forward of one batch of equal-length crops: the total loss tensor and its components.
    /// `codes`: per crop, the whole utterance's precomputed MVQ codes and the crop's start.
    fn losses(
        &self,
        model: &DistillStudent,
        wavs: &[Vec<f32>],
        labels: &[Vec<u32>],
        codes: Option<(Vec<&[u8]>, &[usize])>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor<1>, DistillMetrics)> {
        let device = model.student.hubert.masked_spec_embed.device();
        let use_kl = self.parts.mode != Mode::Mvq && self.parts.cfg.kl_weight > 0.0;
        // With precomputed codes the teacher's only job is already done.
        let tout = match codes {
            Some(_) => None,
            None => Some(self.parts.teacher.forward(wavs, use_kl)?),
        };
        let (b, s) = (wavs.len(), wavs[0].len());
        let flat: Vec<f32> = wavs.iter().flat_map(|w| w.iter().copied()).collect();
        let wav = Tensor::<2>::from_data(TensorData::new(flat, [b, s]), &device);
        let pass = student_pass(&model.student, wav, labels, self.mlm_active(), rng)?;
        let t = pass.frames;
        if let Some(tout) = &tout
            && tout.frames < t
        {
            return Err(DistillError::Data(format!(
                "teacher gives {} frames, student {t}: conv front-ends differ",
                tout.frames
            )));
        }
        let cut = |x: Tensor<3>| -> Tensor<3> {
            let x = if x.dims()[1] > t {
                x.narrow(1, 0, t)
            } else {
                x
            };
            to_student(x, &device)
        };
        let h = model.student.hubert.config.hidden_size;
        let mut m = DistillMetrics {
            utterances: b as u64,
            ..Default::default()
        };
        let mut distill: Option<Tensor<1>> = None;
        match self.parts.mode {
            Mode::Mvq => {
                let q = self.parts.quantizer.as_ref().expect("checked in new");
                let codes = match (&tout, codes) {
                    (_, Some((utt_codes, starts))) => {
                        let stride = self.parts.teacher.model.hubert.config.total_stride();
                        let mut v = Vec::with_capacity(b * t * q.num_codebooks());
                        for (c, &start) in utt_codes.iter().zip(starts) {
                            v.extend_from_slice(crop_codes(
                                c,
                                q.num_codebooks(),
                                stride,
                                start,
                                t,
                            )?);
                        }
                        v
                    }
                    (Some(tout), None) => {
                        let emb = tout.hidden_states[self.parts.plan.mvq + 1].clone();
                        let emb = if emb.dims()[1] > t {
                            emb.narrow(1, 0, t)
                        } else {
                            emb
                        };
                        let host: Vec<f32> =
                            emb.into_data().try_into_vec_as::<f32>().expect("f32 data");
                        q.encode(&host)?
                    }
                    (None, None) => {
                        return Err(DistillError::Data(
                            "MVQ: neither precomputed codes nor a teacher pass".into(),
                        ));
                    }
                };
                let head = model.mvq_head.as_ref().expect("checked in new");
                let logits = head.forward(pass.last_hidden_state.clone().reshape([b * t, h]));
                let (ce, correct, count) = codebook_ce(logits, &codes, q.num_codebooks())?;
                m.mvq_ce = scalar(&ce);
                m.mvq_acc = correct as f64 / count.max(1) as f64;
                add(&mut distill, ce * self.parts.cfg.mvq.loss_scale);
            }
            Mode::Client | Mode::Server => {
                let tout = tout.ok_or_else(|| {
                    DistillError::Data("precomputed codes are for mode mvq only".into())
                })?;
                if use_kl {
                    let tl = tout.logits.expect("teacher logits requested");
                    let k = tl.dims()[1];
                    let tl = tl.reshape([b, tout.frames, k]);
                    let tl = cut(tl).reshape([b * t, k]);
                    let sl = model
                        .student
                        .logits(pass.last_hidden_state.clone().reshape([b * t, h]));
                    let kl = kl_loss(tl, sl, self.parts.cfg.temperature);
                    m.kl = scalar(&kl);
                    add(&mut distill, kl * self.parts.cfg.kl_weight);
                }
                if self.parts.cfg.feature_weight > 0.0 {
                    let mut sum: Option<Tensor<1>> = None;
                    for (i, &(sl, tl)) in self.parts.plan.feature.iter().enumerate() {
                        let x = pass.hidden_states[sl + 1].clone();
                        let x = match model.feat_proj.get(i) {
                            Some(p) => p.forward(x),
                            None => x,
                        };
                        add(
                            &mut sum,
                            mse_loss(x, cut(tout.hidden_states[tl + 1].clone())),
                        );
                    }
                    let mse = sum.expect("non-empty plan") / self.parts.plan.feature.len() as f64;
                    m.feature_mse = scalar(&mse);
                    add(&mut distill, mse * self.parts.cfg.feature_weight);
                }
                if self.parts.cfg.pred_weight > 0.0 {
                    let (mut l1s, mut coss): (Option<Tensor<1>>, Option<Tensor<1>>) = (None, None);
                    for (i, &tl) in self.parts.plan.pred.iter().enumerate() {
                        let p = model.pred_heads[i].forward(pass.last_hidden_state.clone());
                        let (l1, cos) =
                            distilhubert_loss(p, cut(tout.hidden_states[tl + 1].clone()));
                        add(&mut l1s, l1);
                        add(&mut coss, cos);
                    }
                    let n = self.parts.plan.pred.len() as f64;
                    let (l1, cos) = (l1s.expect("non-empty") / n, coss.expect("non-empty") / n);
                    m.pred_l1 = scalar(&l1);
                    m.pred_cos = scalar(&cos);
                    add(
                        &mut distill,
                        (l1 + cos * self.parts.cfg.pred_cos_weight) * self.parts.cfg.pred_weight,
                    );
                }
            }
        }
        let alpha = self.parts.cfg.alpha;
        let mut total: Option<Tensor<1>> = None;
        if let Some(d) = distill {
            m.distill = scalar(&d);
            if alpha > 0.0 {
                add(&mut total, d * alpha);
            }
        }
        if let Some(l) = pass.mlm {
            m.mlm = scalar(&l);
            m.acc_masked = pass.correct_masked as f64 / pass.count_masked.max(1) as f64;
            add(&mut total, l * (1.0 - alpha));
        }
        let total = total.ok_or_else(|| cfg_err("distillation: every loss weight is 0 (alpha, kl_weight, feature_weight, pred_weight, mvq.loss_scale); nothing to train"))?;
        m.loss = scalar(&total);
        if !m.loss.is_finite() {
            return Err(DistillError::Diverged(format!("loss is {}", m.loss)));
        }
        Ok((total, m))
    }

    /// One optimizer update on `micro` batches (`update_freq` of them, each cropped to its
    /// shortest utterance as pretraining batches are): the mean gradient, clipped, FedProx's
    /// proximal term when `prox` is given, then AdamW.
    pub fn step(
        &mut self,
        micro: &[Vec<&Utt>],
        lr: f64,
        seed: u64,
        prox: Option<(&fedhubert_io::Weights, f32)>,
    ) -> Result<DistillMetrics> {
        let label_rate = self.model.student.pretrain.label_rate;
        let max_sample_size = self.parts.train.batch.max_sample_size;
        let mut m = DistillMetrics::default();
        let mut done = 0.0;
        let train = &self.parts.train;
        let upd = Update {
            lr,
            seed,
            dropout_tag: seeds::DISTILL_DROPOUT,
            frozen_prefix: train
                .freeze_feature_extractor
                .then_some(STUDENT_FEATURE_EXTRACTOR),
            prox,
        };
        // The optimizer state is lent to the core while the loss closure reads the trainer.
        let mut opt = std::mem::take(&mut self.opt);
        let result = core::update(
            self.model.clone(),
            micro,
            &self.device,
            &upd,
            &mut opt,
            train,
            |model, utts, rng| {
                let batch = make_batch(utts, max_sample_size, label_rate, rng);
                let codes = self.utt_codes(utts)?.map(|c| (c, &batch.starts[..]));
                let (loss, mi) = self.losses(model, &batch.wavs, &batch.labels, codes, rng)?;
                done += 1.0;
                m.running_mean(&mi, done);
                Ok::<_, DistillError>(loss)
            },
        );
        self.opt = opt;
        let (model, grad_norm) = result?;
        self.model = model;
        m.grad_norm = grad_norm;
        m.lr = lr;
        m.steps = 1;
        Ok(m)
    }

    /// `steps` updates, step k at learning rate `lr(k)`, over `utts` (length-bucketed batches, reshuffled every
    /// epoch from `seed`, `update_freq` micro-batches an update), with FedProx's term when `prox`
    /// is given; returns the mean metrics; `on_step` sees each step's.
    pub fn train_steps(
        &mut self,
        utts: &[Utt],
        steps: u64,
        lr: impl Fn(u64) -> f64,
        seed: u64,
        prox: Option<(&fedhubert_io::Weights, f32)>,
        on_step: impl FnMut(u64, &DistillMetrics),
    ) -> Result<DistillMetrics> {
        let mut plan = StepPlan::new(
            utts,
            &self.parts.train.batch,
            self.parts.train.update_freq,
            seed,
        )?;
        core::run_steps(
            &mut plan,
            0,
            steps,
            |k, micro, step_seed| self.step(micro, lr(k), step_seed, prox),
            on_step,
        )
    }

    /// The losses on `utts` without updating (validation mode, one utterance at a time, cropped to
    /// `max_sample_size`, masks drawn from `seed`); utterance-weighted means.
    pub fn evaluate(&self, utts: &[Utt], seed: u64) -> Result<DistillMetrics> {
        let model = self.model.valid();
        let mut total = DistillMetrics::default();
        let mut n = 0.0;
        for (i, u) in utts.iter().enumerate() {
            if u.wav.len() < self.parts.train.batch.min_sample_size.min(16_000) {
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, &[seeds::EVAL, i as u64]));
            let b = make_batch(
                &[u],
                self.parts.train.batch.max_sample_size,
                model.student.pretrain.label_rate,
                &mut rng,
            );
            let codes = self.utt_codes(&[u])?.map(|c| (c, &b.starts[..]));
            let (_, m) = self.losses(&model, &b.wavs, &b.labels, codes, &mut rng)?;
            n += 1.0;
            total.running_mean(&DistillMetrics { steps: 0, ..m }, n);
        }
        Ok(total)
    }

    /// Optimizer moments and step as weights (for checkpoints).
    pub fn opt_state(&self) -> (fedhubert_io::Weights, fedhubert_io::Weights, u64) {
        let (m, v) = self.opt.moments();
        (m, v, self.opt.step)
    }

    pub fn set_opt_state(
        &mut self,
        m: &fedhubert_io::Weights,
        v: &fedhubert_io::Weights,
        step: u64,
    ) {
        self.opt = AdamState::from_moments(m.clone(), v.clone(), step);
    }
}
