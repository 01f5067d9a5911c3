//! Simulation clients: each client trains the global model on its own folder (manifest + labels)
//! and returns only weights and metrics.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use fedhubert_fl::{
    ClientInstructions, ClientPool, ClientSettings, EvalRes, FitRes, LocalOptimizerState,
    LocalWork, Weights,
};
use fedhubert_model::{HubertForPretraining, load_tensors};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::core::{AdamState, Reported};
use crate::data::{BatchConfig, ClientData, LabelSpec, Utt, epoch_batches, load_client_dir};
use crate::trainer::{LocalTrainer, TrainConfig, evaluate_model};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Label shard in each client folder (`km` → km.npy / km.len) and its rate.
    pub labels: LabelSpec,
    /// Keep decoded client audio in memory between rounds (fine for small corpora; turn off for
    /// many large clients so memory stays bounded by one client).
    pub cache_clients: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            labels: LabelSpec::default(),
            cache_clients: true,
        }
    }
}

/// The clients' folders and, with `cache_clients`, their decoded data between rounds.
pub struct ClientCache {
    dirs: Vec<PathBuf>,
    keep: bool,
    loaded: HashMap<usize, Arc<ClientData>>,
}

impl ClientCache {
    pub fn new(dirs: Vec<PathBuf>, keep: bool) -> Self {
        Self {
            dirs,
            keep,
            loaded: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Client `c`'s folder.
    pub fn dir(&self, c: usize) -> Option<&Path> {
        self.dirs.get(c).map(PathBuf::as_path)
    }

    /// Client `c`'s data: from memory when kept, else read from its folder with `load`.
    pub fn get<E: std::fmt::Display>(
        &mut self,
        c: usize,
        load: impl FnOnce(&Path) -> Result<ClientData, E>,
    ) -> Result<Arc<ClientData>, String> {
        if let Some(d) = self.loaded.get(&c) {
            return Ok(d.clone());
        }
        let dir = self.dirs.get(c).ok_or_else(|| format!("no client {c}"))?;
        let d = Arc::new(load(dir).map_err(|e| e.to_string())?);
        if self.keep {
            self.loaded.insert(c, d.clone());
        }
        Ok(d)
    }
}

/// Updates a round's [`LocalWork`] asks of a client with `utts`: steps as given, or epochs times
/// the client's own updates per epoch (at least one).
pub fn local_updates(
    work: LocalWork,
    utts: &[Utt],
    batch: &BatchConfig,
    update_freq: usize,
) -> u64 {
    match work {
        LocalWork::Steps(s) => s,
        LocalWork::Epochs(e) => {
            let batches = epoch_batches(utts, batch, &mut ChaCha8Rng::seed_from_u64(0)).len();
            ((batches / update_freq).max(1) as f64 * e).round() as u64
        }
    }
}

/// A client's training reply.
pub fn fit_reply(client: usize, weights: Weights, m: &impl Reported) -> FitRes {
    FitRes {
        client,
        weights,
        num_examples: m.utterances(),
        metrics: m.to_map(),
    }
}

/// A client's evaluation reply: `eval` on its validation split, or no examples without one.
pub fn eval_reply<M: Reported>(
    client: usize,
    valid: &[Utt],
    eval: impl FnOnce(&[Utt]) -> Result<M, String>,
) -> Result<EvalRes, String> {
    if valid.is_empty() {
        return Ok(EvalRes {
            client,
            num_examples: 0,
            metrics: Default::default(),
        });
    }
    let m = eval(valid)?;
    Ok(EvalRes {
        client,
        num_examples: m.utterances(),
        metrics: m.to_map(),
    })
}

/// Data the server holds for its own evaluation of the global model: utterances of speakers no
/// client has (an unseen-speaker validation set), with the rate a model that always predicts the
/// most frequent cluster would score on it.
pub struct Heldout {
    pub utts: Vec<Utt>,
    pub majority_rate: f64,
}

impl Heldout {
    /// Every utterance (both splits) of a client-layout folder: manifest, features and labels.
    pub fn load(dir: &Path, labels: &LabelSpec) -> Result<Self, crate::TrainError> {
        let d = load_client_dir(dir, labels)?;
        let utts: Vec<Utt> = d.train.into_iter().chain(d.valid).collect();
        Ok(Self {
            majority_rate: majority_rate(&utts),
            utts,
        })
    }

    /// Masked-prediction metrics of `model` on the held-out utterances, plus `majority_rate`;
    /// masks from `seed`, the same every round so rounds compare.
    pub fn evaluate(
        &self,
        model: &HubertForPretraining,
        batch: &BatchConfig,
        seed: u64,
    ) -> Result<BTreeMap<String, f64>, crate::TrainError> {
        let mut m = evaluate_model(model, &self.utts, batch, seed)?.to_map();
        m.insert("majority_rate".into(), self.majority_rate);
        Ok(m)
    }
}

/// A client's AdamW state as host tensors: `m/NAME`, `v/NAME` and the step count `step`.
pub fn adam_to_weights(opt: &AdamState) -> Weights {
    let (m, v) = opt.moments();
    let mut w = Weights::default();
    for (prefix, part) in [("m/", m), ("v/", v)] {
        w.tensors.extend(part.tensors.into_iter().map(|mut t| {
            t.name = format!("{prefix}{}", t.name);
            t
        }));
    }
    // Two f32 halves: a step count above 2^24 must survive exactly.
    let (hi, lo) = ((opt.step >> 24) as f32, (opt.step & 0xFF_FFFF) as f32);
    w.tensors.push(fedhubert_io::Tensor {
        name: "step".into(),
        shape: vec![2],
        data: vec![hi, lo],
    });
    w
}

/// The inverse of [`adam_to_weights`].
pub fn adam_from_weights(w: Weights) -> Result<AdamState, String> {
    let (mut m, mut v, mut step) = (Weights::default(), Weights::default(), None);
    for mut t in w.tensors {
        if t.name == "step" && t.data.len() == 2 {
            step = Some(((t.data[0] as u64) << 24) | t.data[1] as u64);
        } else if let Some(n) = t.name.strip_prefix("m/") {
            t.name = n.to_string();
            m.tensors.push(t);
        } else if let Some(n) = t.name.strip_prefix("v/") {
            t.name = n.to_string();
            v.tensors.push(t);
        } else {
            return Err(format!("unexpected optimizer tensor `{}`", t.name));
        }
    }
    let step = step.ok_or("no optimizer step count")?;
    Ok(AdamState::from_moments(m, v, step))
}

/// Share of label frames that carry the most frequent label.
pub fn majority_rate(utts: &[Utt]) -> f64 {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut total = 0usize;
    for l in utts.iter().flat_map(|u| &u.labels) {
        *counts.entry(*l).or_default() += 1;
        total += 1;
    }
    counts.values().max().copied().unwrap_or(0) as f64 / total.max(1) as f64
}

pub struct HubertClients {
    clients: ClientCache,
    template: HubertForPretraining,
    train: TrainConfig,
    sim: SimConfig,
    device: Device,
    heldout: Option<Heldout>,
    kept: KeptOptimizers,
}

/// `local_optimizer_state: keep`: each client's AdamW state at the end of its last round, held
/// by the simulation (and saved in its round checkpoints) as a node would hold its own.
#[derive(Default)]
pub struct KeptOptimizers(BTreeMap<usize, AdamState>);

impl KeptOptimizers {
    /// Client `c`'s state to start this round from: its kept one when `settings` say keep.
    pub fn start(&self, c: usize, settings: &ClientSettings, opt: &mut AdamState) {
        if let Some(kept) = self.0.get(&c).filter(|_| keeps(settings)) {
            *opt = kept.clone();
        }
    }

    /// Keeps client `c`'s state after its round when `settings` say keep.
    pub fn finish(&mut self, c: usize, settings: &ClientSettings, opt: &AdamState) {
        if keeps(settings) {
            self.0.insert(c, opt.clone());
        }
    }

    /// For [`ClientPool::client_state`].
    pub fn to_state(&self) -> BTreeMap<String, Weights> {
        (self.0.iter())
            .map(|(c, opt)| (c.to_string(), adam_to_weights(opt)))
            .collect()
    }

    /// For [`ClientPool::restore_client_state`].
    pub fn restore(&mut self, state: BTreeMap<String, Weights>) -> Result<(), String> {
        self.0.clear();
        for (c, w) in state {
            let c: usize = c
                .parse()
                .map_err(|_| format!("client `{c}` is not a number"))?;
            let opt = adam_from_weights(w).map_err(|e| format!("client {c}: {e}"))?;
            self.0.insert(c, opt);
        }
        Ok(())
    }
}

fn keeps(settings: &ClientSettings) -> bool {
    settings.local_optimizer_state == LocalOptimizerState::Keep
}

impl HubertClients {
    /// `template` fixes the architecture; its weights are replaced by the global ones each call.
    pub fn new(
        dirs: Vec<PathBuf>,
        template: HubertForPretraining,
        train: TrainConfig,
        sim: SimConfig,
        device: Device,
    ) -> Self {
        Self {
            clients: ClientCache::new(dirs, sim.cache_clients),
            template,
            train,
            sim,
            device,
            heldout: None,
            kept: KeptOptimizers::default(),
        }
    }

    /// The server evaluates every round's global model on `heldout` (Flower's `evaluate_fn`).
    pub fn with_heldout(mut self, heldout: Heldout) -> Self {
        self.heldout = Some(heldout);
        self
    }

    fn data(&mut self, c: usize) -> Result<Arc<ClientData>, String> {
        let labels = &self.sim.labels;
        self.clients.get(c, |dir| load_client_dir(dir, labels))
    }
}

impl ClientPool for HubertClients {
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
        let mut tr = LocalTrainer::new(self.template.clone(), self.train.clone(), &self.device)
            .map_err(|e| e.to_string())?;
        tr.set_weights(global).map_err(|e| e.to_string())?;
        let work = &cfg.settings;
        self.kept.start(c, work, &mut tr.opt);
        let steps = local_updates(
            work.local,
            &data.train,
            &self.train.batch,
            self.train.update_freq,
        );
        let prox = (work.proximal_mu > 0.0).then_some((global, work.proximal_mu));
        let m = tr
            .train(
                &data.train,
                0,
                steps,
                |k| cfg.lr_at(k, steps),
                cfg.seed,
                prox,
                |_, _| {},
            )
            .map_err(|e| e.to_string())?;
        self.kept.finish(c, &cfg.settings, &tr.opt);
        Ok(fit_reply(c, tr.weights(), &m))
    }

    fn evaluate(
        &mut self,
        c: usize,
        global: &Weights,
        cfg: &ClientInstructions,
    ) -> Result<EvalRes, String> {
        let data = self.data(c)?;
        eval_reply(c, &data.valid, |valid| {
            let model =
                load_tensors(self.template.clone(), global.clone()).map_err(|e| e.to_string())?;
            evaluate_model(&model, valid, &self.train.batch, cfg.seed).map_err(|e| e.to_string())
        })
    }

    fn client_state(&self) -> BTreeMap<String, Weights> {
        self.kept.to_state()
    }

    fn restore_client_state(&mut self, state: BTreeMap<String, Weights>) -> Result<(), String> {
        self.kept.restore(state)
    }

    fn evaluate_global(
        &mut self,
        _round: u64,
        global: &Weights,
    ) -> Option<Result<BTreeMap<String, f64>, String>> {
        let h = self.heldout.as_ref()?;
        Some(
            load_tensors(self.template.clone(), global.clone())
                .map_err(|e| e.to_string())
                .and_then(|model| {
                    h.evaluate(&model, &self.train.batch, self.train.seed)
                        .map_err(|e| e.to_string())
                }),
        )
    }
}
