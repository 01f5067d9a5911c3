//! Every random stream of a run, named once. A stream's seed is [`mix`] of the run seed with the
//! stream's tag and its indexes (round, attempt, client, step, ...), never a generator threaded
//! through the run: a run resumed at round k, or a client trained on another machine, then draws
//! exactly what an uninterrupted single-process run draws.
//!
//! The tag values are part of the checkpoint format: changing one changes every result.

/// SplitMix64-style mixing of a seed with stream identifiers.
pub fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut z = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        z = z.wrapping_add(p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// Which clients train in (round, attempt): `mix(seed, [SAMPLE_FIT, round, attempt])`.
pub const SAMPLE_FIT: u64 = 0x5A4D;
/// A training client's local seed: `mix(seed, [CLIENT_FIT, round, attempt, client])`.
pub const CLIENT_FIT: u64 = 0xC11E;
/// Evaluation: the clients are sampled with run seed `seed ^ EVAL` (Flower-style fresh stream),
/// a client's masks come from `mix(seed, [EVAL, round, client])`, and utterance i of an
/// evaluation pass from `mix(client_seed, [EVAL, i])`.
pub const EVAL: u64 = 0xE7A1;
/// The order of batches in epoch e of a local training: `mix(seed, [EPOCH_PLAN, e])`.
pub const EPOCH_PLAN: u64 = 0xE90C;
/// Local step k's crops and masks: `mix(seed, [STEP, k])`.
pub const STEP: u64 = 0x57E9;
/// The engine's dropout generator at a pretraining step: `mix(step_seed, [PRETRAIN_DROPOUT])`.
pub const PRETRAIN_DROPOUT: u64 = 0xD80F;
/// The engine's dropout generator at a distillation step: `mix(step_seed, [DISTILL_DROPOUT])`.
pub const DISTILL_DROPOUT: u64 = 0xD15;
/// Server-side distillation's steps after round r: `mix(seed, [SERVER_DISTILL, r])`.
pub const SERVER_DISTILL: u64 = 0x5E4D;
/// Differential privacy's noise with `privacy.noise: seeded` (never by default): the server's
/// `mix(seed, [DP_NOISE, round, attempt, what])` (what 0: the update, 1: the clipped count),
/// a client's local noise `mix(client_seed, [DP_NOISE])`.
pub const DP_NOISE: u64 = 0xD9D9;
