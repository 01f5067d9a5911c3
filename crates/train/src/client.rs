//! Simulation clients: each client trains the global model on its own folder (manifest + labels)
//! and returns only weights and metrics.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use fedhubert_fl::{ClientInstructions, ClientPool, EvalRes, FitRes, LocalWork, Weights};
use fedhubert_model::{HubertForPretraining, load_tensors};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::core::Reported;
use crate::data::{BatchConfig, ClientData, Utt, epoch_batches, load_client_dir};
use crate::trainer::{LocalTrainer, TrainConfig, evaluate_model};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Label shard name in each client folder (`km` → km.npy / km.len).
    pub label_stem: String,
    /// Keep decoded client audio in memory between rounds (fine for small corpora; turn off for
    /// many large clients so memory stays bounded by one client).
    pub cache_clients: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            label_stem: "km".into(),
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
    pub fn load(dir: &Path, label_stem: &str) -> Result<Self, crate::TrainError> {
        let d = load_client_dir(dir, label_stem)?;
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
        }
    }

    /// The server evaluates every round's global model on `heldout` (Flower's `evaluate_fn`).
    pub fn with_heldout(mut self, heldout: Heldout) -> Self {
        self.heldout = Some(heldout);
        self
    }

    fn data(&mut self, c: usize) -> Result<Arc<ClientData>, String> {
        let stem = &self.sim.label_stem;
        self.clients.get(c, |dir| load_client_dir(dir, stem))
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
