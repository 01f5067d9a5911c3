//! What the server tells a client for one exchange (Flower's per-round `config` dict, typed), and
//! the client's side of the upload: the one place a trained model becomes what is sent.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::compress::{Compression, encode};
use crate::engine::Reply;
use crate::privacy::{ClientPrivacy, clip_update};
use crate::schedule::{LrSchedule, UpdateWindow};
use crate::strategy::FitRes;
use crate::{FlError, Weights};

/// Version of the messages between server and clients ([`ClientInstructions`] and the run file
/// sent with them). A node that receives another version refuses it with an error saying which
/// side to upgrade: data owners upgrade their nodes at different times.
/// Format 3 added the learning-rate schedule and each round's update window.
pub const MESSAGE_FORMAT: u32 = 3;

/// How much local training one round asks for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalWork {
    /// Optimizer updates.
    Steps(u64),
    /// Passes over the client's training split (rounded to whole updates by the client, which
    /// alone knows its data).
    Epochs(f64),
}

/// What every client of a run is told to do locally, the same every round (what changes per round
/// is in [`ClientInstructions`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    /// The schedule's peak learning rate.
    pub learning_rate: f64,
    /// Over the run's global updates (see [`crate::schedule`]); absent in checkpoints written
    /// before the schedule existed, whose clients trained at a fixed rate.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    pub local: LocalWork,
    /// FedProx: clients add `proximal_mu/2 * ||w - w_global||^2` to their loss (0: off). A
    /// client setting that composes with any strategy, not a strategy of its own.
    pub proximal_mu: f32,
    /// Whether a client's local optimizer moments survive from one round to its next.
    #[serde(default)]
    pub local_optimizer_state: LocalOptimizerState,
}

/// A client's local AdamW state between rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalOptimizerState {
    /// Fresh moments every round (FedAvg as McMahan et al. and Flower's examples run it).
    #[default]
    Reset,
    /// A client continues from the moments it ended its previous round with (its step count
    /// too, so bias correction continues); they never leave the client.
    Keep,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            learning_rate: 5e-4,
            lr_schedule: LrSchedule::default(),
            local: LocalWork::Epochs(1.0),
            proximal_mu: 0.0,
            local_optimizer_state: LocalOptimizerState::Reset,
        }
    }
}

impl LocalWork {
    /// Global updates the server plans per round: the local steps, or with local epochs (whose
    /// step count only each client knows) one unit per round, so the schedule counts rounds.
    pub fn planned_updates(&self) -> u64 {
        match *self {
            LocalWork::Steps(n) => n,
            LocalWork::Epochs(_) => 1,
        }
    }
}

impl ClientSettings {
    pub fn updates_per_round(&self) -> u64 {
        self.local.planned_updates()
    }

    /// The learning rate of round `round`'s first and last planned update.
    pub fn lr_range(&self, round: u64) -> (f64, f64) {
        let per = self.updates_per_round();
        let w = UpdateWindow::of_round(round, per);
        let at = |s: u64| {
            self.lr_schedule
                .lr_at(self.learning_rate, w.update_at(s, per))
        };
        (at(0), at(per.saturating_sub(1)))
    }
}

/// What leaves the client, in order: the trained weights minus the frozen tensors, then (with
/// DP, from the instructions) the clipped and possibly noised update, then the update encoding.
/// Transforms of the update before it is encoded are stages of [`prepare_reply`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadPlan {
    /// Tensors whose name starts with one of these are neither sent nor aggregated.
    pub frozen_prefixes: Vec<String>,
    pub compression: Compression,
}

impl UploadPlan {
    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
    }

    /// The part of `w` that travels.
    pub fn trainable(&self, w: &Weights) -> Weights {
        w.filter(|n| !self.is_frozen(n))
    }
}

/// One client's instructions for one exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientInstructions {
    /// [`MESSAGE_FORMAT`] of the server that wrote it.
    pub format: u32,
    pub round: u64,
    /// Seed of the client's local randomness this exchange (crops, masks, dropout).
    pub seed: u64,
    /// The round's share of the run's global updates, for the learning-rate schedule.
    pub updates: UpdateWindow,
    pub settings: ClientSettings,
    pub upload: UploadPlan,
    /// Differential privacy: clip (and with local DP, noise) the update before it is encoded.
    /// Absent without DP; a node too old to know it refuses the instructions (unknown field)
    /// rather than sending an unclipped update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<ClientPrivacy>,
}

impl ClientInstructions {
    /// The learning rate of local step `step` of the client's `steps` this round.
    pub fn lr_at(&self, step: u64, steps: u64) -> f64 {
        let s = &self.settings;
        s.lr_schedule
            .lr_at(s.learning_rate, self.updates.update_at(step, steps))
    }

    /// Parses instructions received from a server, refusing another message format.
    pub fn from_json(json: &str) -> Result<Self, FlError> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| FlError::Config(format!("instructions from the server: {e}")))?;
        check_format(
            v.get("format").and_then(|f| f.as_u64()),
            "instructions from the server",
        )?;
        serde_json::from_value(v)
            .map_err(|e| FlError::Config(format!("instructions from the server: {e}")))
    }
}

/// Errors unless `found` is this build's [`MESSAGE_FORMAT`]; `what` names the message (e.g.
/// "instructions from the server").
pub fn check_format(found: Option<u64>, what: &str) -> Result<(), FlError> {
    match found {
        Some(f) if f == MESSAGE_FORMAT as u64 => Ok(()),
        Some(f) => Err(FlError::Config(format!(
            "{what}: message format {f}, this fedhubert reads format {MESSAGE_FORMAT}: {}",
            if f > MESSAGE_FORMAT as u64 {
                "upgrade fedhubert here"
            } else {
                "upgrade the fedhubert that wrote it"
            }
        ))),
        None => Err(FlError::Config(format!(
            "{what}: no message format (written by a fedhubert older than format {MESSAGE_FORMAT}): upgrade the fedhubert that wrote it"
        ))),
    }
}

/// A client's reply weights, as they travel.
#[derive(Debug, Clone)]
pub enum Upload {
    /// The trainable weights as f32 (no compression).
    Weights(Weights),
    /// [`crate::compress::encode`] of the trainable weights against the global ones.
    Payload(Vec<u8>),
}

/// The client's side of the upload: the trainable part of `trained`, encoded against the trainable
/// part of `global` (what the client received) as `plan` says.
pub fn prepare_upload(
    trained: &Weights,
    global: &Weights,
    plan: &UploadPlan,
) -> Result<Upload, FlError> {
    encode_upload(plan.trainable(trained), global, plan)
}

fn encode_upload(sent: Weights, global: &Weights, plan: &UploadPlan) -> Result<Upload, FlError> {
    if plan.compression == Compression::None {
        // The server checks the layout of what it receives (`RoundEngine::deliver`).
        return Ok(Upload::Weights(sent));
    }
    Ok(Upload::Payload(encode(
        &sent,
        &plan.trainable(global),
        plan.compression,
    )?))
}

/// The client's whole reply to a training exchange, the one place every runner (the native
/// simulation, a Flower node) builds it: the upload, and the example count and metrics. With
/// DP the update is clipped (and noised, locally) before encoding, and the reply carries no
/// training metrics and a unit example count: only whether the update was within the norm.
pub fn prepare_reply(
    res: FitRes,
    global: &Weights,
    ins: &ClientInstructions,
) -> Result<Reply, FlError> {
    let plan = &ins.upload;
    let Some(privacy) = &ins.privacy else {
        return Ok(Reply::Fit {
            upload: prepare_upload(&res.weights, global, plan)?,
            num_examples: res.num_examples,
            metrics: res.metrics,
        });
    };
    let mut sent = plan.trainable(&res.weights);
    let base = plan.trainable(global);
    base.check_layout(&sent, "the trained update")?;
    let metrics: BTreeMap<String, f64> = clip_update(&mut sent, &base, privacy, ins.seed);
    Ok(Reply::Fit {
        upload: encode_upload(sent, global, plan)?,
        num_examples: 1,
        metrics,
    })
}
