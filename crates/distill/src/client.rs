//! Client-side distillation (seed 001) and MVQ-KD clients (seed 004): every client holds the
//! frozen teacher and trains the student (and its distillation heads) on its own audio; the server
//! aggregates students only. In MVQ mode the codebook indexes of the teacher's embeddings are
//! computed inside `fit`, where the audio lives, with the quantizer the server trained.

use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::Device;
use fedhubert_fl::{ClientInstructions, ClientPool, EvalRes, FitRes, Weights};
use fedhubert_train::client::{KeptOptimizers, eval_reply, fit_reply, local_updates};
use fedhubert_train::{ClientCache, ClientData, SimConfig};

use crate::codes::CodeTable;
use crate::config::Mode;
use crate::data::load_audio_dir;
use crate::student::DistillStudent;
use crate::trainer::{DistillParts, DistillTrainer};

pub struct DistillClients {
    clients: ClientCache,
    template: DistillStudent,
    parts: DistillParts,
    sim: SimConfig,
    device: Device,
    kept: KeptOptimizers,
}

impl DistillClients {
    /// `template` fixes the architecture (student + heads); its weights are replaced by the global
    /// ones at every call. `parts.mode` is [`Mode::Client`] or [`Mode::Mvq`].
    pub fn new(
        dirs: Vec<PathBuf>,
        template: DistillStudent,
        parts: DistillParts,
        sim: SimConfig,
        device: Device,
    ) -> Self {
        Self {
            clients: ClientCache::new(dirs, sim.cache_clients),
            template,
            parts,
            sim,
            device,
            kept: KeptOptimizers::default(),
        }
    }

    fn data(&mut self, c: usize) -> Result<Arc<ClientData>, String> {
        let labels = &self.sim.labels;
        self.clients.get(c, |dir| load_audio_dir(dir, labels, 0))
    }

    /// The trainer for client `c`: the global weights, and in MVQ mode with
    /// `distillation.mvq.codes` the client's precomputed codes (the teacher then never runs).
    fn trainer(&self, c: usize, global: &Weights) -> Result<DistillTrainer, String> {
        let mut tr = DistillTrainer::new(self.template.clone(), self.parts.clone(), &self.device)
            .map_err(|e| e.to_string())?;
        tr.model = tr
            .model
            .clone()
            .set_weights(global)
            .map_err(|e| e.to_string())?;
        if self.parts.mode == Mode::Mvq && !self.parts.cfg.mvq.codes.is_empty() {
            let q = self
                .parts
                .quantizer
                .as_ref()
                .ok_or("mode mvq needs a quantizer")?;
            let dir = self
                .clients
                .dir(c)
                .ok_or_else(|| format!("no client {c}"))?;
            let table = CodeTable::load(dir, &self.parts.cfg.mvq.codes, q.num_codebooks())
                .map_err(|e| e.to_string())?;
            tr.codes = Some(Arc::new(table));
        }
        Ok(tr)
    }
}

impl ClientPool for DistillClients {
    fn num_clients(&self) -> usize {
        self.clients.len()
    }

    fn fit(
        &mut self,
        c: usize,
        global: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<FitRes, String> {
        let data = self.data(c)?;
        let mut tr = self.trainer(c, global)?;
        let work = &cfg.settings;
        self.kept.start(c, work, &mut tr.opt);
        let steps = local_updates(
            work.local,
            &data.train,
            &self.parts.train.batch,
            self.parts.train.update_freq,
        );
        let prox = (work.proximal_mu > 0.0).then_some((global, work.proximal_mu));
        let m = tr
            .train_steps(
                &data.train,
                steps,
                |k| cfg.lr_at(k, steps),
                cfg.seed,
                prox,
                |_, _| {},
            )
            .map_err(|e| e.to_string())?;
        self.kept.finish(c, &cfg.settings, &tr.opt);
        Ok(fit_reply(c, tr.model.weights(), &m))
    }

    fn client_state(&self) -> std::collections::BTreeMap<String, Weights> {
        self.kept.to_state()
    }

    fn restore_client_state(
        &mut self,
        state: std::collections::BTreeMap<String, Weights>,
    ) -> Result<(), String> {
        self.kept.restore(state)
    }

    fn evaluate(
        &mut self,
        c: usize,
        global: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<EvalRes, String> {
        let data = self.data(c)?;
        eval_reply(c, &data.valid, |valid| {
            let tr = self.trainer(c, global)?;
            tr.evaluate(valid, cfg.seed).map_err(|e| e.to_string())
        })
    }
}
