//! The learning-rate schedule of a whole run, centralized or federated.
//!
//! fairseq schedules the learning rate over *global updates*; a federated run has no single
//! update counter, so the server plans one: round `r` (1-based) of a run planned at `S` updates per
//! round covers global updates `(r-1)*S .. r*S`, and a client that takes `n != S` local steps (its
//! epoch is longer or shorter) spreads the same window over its own steps. The server sends each
//! round's window ([`UpdateWindow`]) with the instructions; the client applies the schedule per
//! local step. The centralized trainer uses the same function with one window for the whole run.

use serde::{Deserialize, Serialize};

/// fairseq's schedules with their warm-up: `fixed` (fairseq/optim/lr_scheduler/fixed_schedule.py,
/// linear warm-up then the peak) and `polynomial_decay` with power 1 and `end_learning_rate` 0
/// (fairseq/optim/lr_scheduler/polynomial_decay_schedule.py, the HuBERT recipe's scheduler:
/// linear warm-up to the peak, then linear decay to 0 at `total_updates`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum LrSchedule {
    Fixed {
        warmup_updates: u64,
    },
    PolynomialDecay {
        warmup_updates: u64,
        total_updates: u64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self::Fixed { warmup_updates: 0 }
    }
}

impl LrSchedule {
    pub fn warmup_updates(&self) -> u64 {
        match *self {
            Self::Fixed { warmup_updates } | Self::PolynomialDecay { warmup_updates, .. } => {
                warmup_updates
            }
        }
    }

    /// The learning rate of global update `update` (0-based, fractional when a client's steps
    /// subdivide the planned window) for a peak rate `peak`, as fairseq's `step_update` sets it
    /// before that update.
    pub fn lr_at(&self, peak: f64, update: f64) -> f64 {
        let warmup = self.warmup_updates() as f64;
        match *self {
            // fixed_schedule.py: `(num_updates + 1) / warmup_updates` while `num_updates < warmup`.
            Self::Fixed { .. } if update < warmup => peak * (update + 1.0) / warmup,
            Self::Fixed { .. } => peak,
            // polynomial_decay_schedule.py: `num_updates / warmup_updates` while
            // `num_updates <= warmup`, the first update at `1 / warmup_updates` (its __init__).
            Self::PolynomialDecay { .. } if warmup > 0.0 && update <= warmup => {
                peak * update.max(1.0) / warmup
            }
            Self::PolynomialDecay { total_updates, .. } => {
                let total = total_updates as f64;
                if update >= total {
                    return 0.0;
                }
                peak * (1.0 - (update - warmup) / (total - warmup))
            }
        }
    }

    /// Errors naming the offending quantity when the warm-up does not fit in the run.
    pub fn validate(&self) -> Result<(), String> {
        if let Self::PolynomialDecay {
            warmup_updates,
            total_updates,
        } = *self
        {
            if total_updates == 0 {
                return Err("polynomial_decay needs at least one update in the run".into());
            }
            if warmup_updates > total_updates {
                return Err(format!(
                    "the warm-up ({warmup_updates} updates) is longer than the run ({total_updates} updates)"
                ));
            }
        }
        Ok(())
    }
}

/// One round's share of the run's global updates, planned by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateWindow {
    /// Global index of the round's first update.
    pub first: u64,
    /// Updates the server planned for the round.
    pub planned: u64,
}

impl UpdateWindow {
    /// The window of round `round` (1-based) at `per_round` planned updates.
    pub fn of_round(round: u64, per_round: u64) -> Self {
        Self {
            first: round.saturating_sub(1) * per_round,
            planned: per_round,
        }
    }

    /// Global update of local step `step` of `steps`: the window stretched over the client's
    /// own number of steps.
    pub fn update_at(&self, step: u64, steps: u64) -> f64 {
        let scale = self.planned as f64 / steps.max(1) as f64;
        self.first as f64 + step as f64 * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_decay_matches_fairseq() {
        // fairseq PolynomialDecayLRSchedule(lr=1, warmup_updates=4, total_num_update=12,
        // end_learning_rate=0, power=1): step_update(n) for n = 0..=13.
        let s = LrSchedule::PolynomialDecay {
            warmup_updates: 4,
            total_updates: 12,
        };
        let want = [
            0.25, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0,
        ];
        for (n, w) in want.iter().enumerate() {
            assert!((s.lr_at(1.0, n as f64) - w).abs() < 1e-12, "update {n}");
        }
        assert_eq!(
            LrSchedule::Fixed { warmup_updates: 0 }.lr_at(3e-4, 7.0),
            3e-4
        );
        assert_eq!(
            LrSchedule::Fixed { warmup_updates: 10 }.lr_at(1.0, 4.0),
            0.5
        );
        assert_eq!(
            LrSchedule::Fixed { warmup_updates: 10 }.lr_at(1.0, 10.0),
            1.0
        );
        assert!(
            LrSchedule::PolynomialDecay {
                warmup_updates: 6,
                total_updates: 5
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn a_client_stretches_the_window_over_its_own_steps() {
        let w = UpdateWindow::of_round(3, 8);
        assert_eq!(w.first, 16);
        assert_eq!(w.update_at(0, 8), 16.0);
        assert_eq!(w.update_at(7, 8), 23.0);
        // Twice as many local steps: half a planned update each.
        assert_eq!(w.update_at(3, 16), 17.5);
        // Fewer: the window is still covered.
        assert_eq!(w.update_at(1, 2), 20.0);
    }
}
