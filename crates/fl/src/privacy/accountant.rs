//! Rényi-DP accounting of the subsampled Gaussian mechanism, composed over rounds and converted
//! to (epsilon, delta) as Opacus' `RDPAccountant` and Google's `dp_accounting.rdp.RdpAccountant`
//! do (checked against both on a table of cases: `bench/make_dp_fixture.py`,
//! `crates/fl/tests/accountant.rs`). No maintained Rust crate computes this (opendp amplifies
//! pure and approximate DP only), so it is written here from the papers:
//!
//! - Poisson sampling with rate q (add-or-remove-one neighbours): Mironov, Talwar and Zhang 2019,
//!   "Rényi Differential Privacy of the Sampled Gaussian Mechanism" (arXiv 1908.10530), sec. 3.3:
//!   A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k) / (2 z^2)) for integer orders, and the erfc
//!   series for fractional ones; eps_RDP(a) = log(A_a) / (a - 1).
//! - Sampling a fixed-size subset without replacement (replace-one neighbours): Wang, Balle and
//!   Kasiviswanathan 2019, "Subsampled Rényi Differential Privacy and Analytical Moments
//!   Accountant", Theorem 27 (forward differences of the Gaussian's cumulant generating
//!   function), interpolated between integer orders by their Corollary 10.
//! - q = 1 is the Gaussian mechanism itself: a / (2 z^2).
//! - Conversion: eps = min_a [eps_RDP(a) + log(1 - 1/a) - log(delta a) / (a - 1)] (Balle et al.
//!   2020, Theorem 21), the bound both reference accountants use.

use serde::{Deserialize, Serialize};

/// How the clients of a round are drawn, as the accountant assumes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Each client independently with probability q (`federated.client_fraction`); the
    /// neighbouring relation is add-or-remove-one client.
    #[default]
    Poisson,
    /// A subset of fixed size (Flower's rule: `max(int(n * fraction), min_fit_clients)`) without
    /// replacement; the neighbouring relation is replace-one client.
    Fixed,
}

/// The orders the ledger tracks: dp_accounting's defaults (1.1 to 10.9 by tenths, 11 to 63,
/// then 128, 256, 512, 1024), a superset of Opacus' except for 11.
pub fn orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    o.extend((11..64).map(|x| x as f64));
    o.extend([128.0, 256.0, 512.0, 1024.0]);
    o
}

/// log(exp(a) + exp(b)).
fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// log C(n, k) for real n >= k >= 0.
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log(erfc(x)), accurate where erfc underflows (its asymptotic series there).
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 0.0 && x < 25.0 {
        return r.ln();
    }
    let x2 = x * x;
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
        - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

/// log(A_a) of the Poisson-subsampled Gaussian at integer order `a`, 0 < q < 1.
fn log_a_int(q: f64, z: f64, a: u64) -> f64 {
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    (0..=a).fold(f64::NEG_INFINITY, |acc, k| {
        let k = k as f64;
        let a = a as f64;
        log_add(
            acc,
            log_comb(a, k) + k * lq + (a - k) * l1q + (k * k - k) / (2.0 * z * z),
        )
    })
}

/// log(exp(a) - exp(b)), None when that would be negative.
fn log_sub(a: f64, b: f64) -> Option<f64> {
    if a < b {
        return None;
    }
    if b == f64::NEG_INFINITY {
        return Some(a);
    }
    if a == b {
        return Some(f64::NEG_INFINITY);
    }
    Some((a - b).exp_m1().ln() + b)
}

/// log|C(a, i)| and its sign for real a > 0 (negative for some i > a + 1).
fn log_comb_signed(a: f64, i: f64) -> (f64, bool) {
    let (top, _) = libm::lgamma_r(a + 1.0);
    let (bottom, sign) = libm::lgamma_r(a - i + 1.0);
    (top - libm::lgamma(i + 1.0) - bottom, sign > 0)
}

/// log(A_a) at fractional order `a`: the two integrals split at z0 (MTZ19 sec. 3.3), each a
/// series with the signed binomial coefficients of a real order, summed until both terms are
/// below e^-30. Opacus sums the signed series as here; dp_accounting adds the coefficients'
/// magnitudes with a 1000-term cap, a looser bound that drops the order when it does not
/// converge (its log warns), so its epsilon can be larger (BENCHMARKS.md, "Privacy").
fn log_a_frac(q: f64, z: f64, a: f64) -> f64 {
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let half = 0.5f64.ln();
    let s2z = std::f64::consts::SQRT_2 * z;
    for i in 0..100_000 {
        let i = i as f64;
        let j = a - i;
        let (coef, positive) = log_comb_signed(a, i);
        let s0 =
            coef + i * lq + j * l1q + (i * i - i) / (2.0 * z * z) + half + log_erfc((i - z0) / s2z);
        let s1 =
            coef + j * lq + i * l1q + (j * j - j) / (2.0 * z * z) + half + log_erfc((z0 - j) / s2z);
        let next = if positive {
            Some((log_add(a0, s0), log_add(a1, s1)))
        } else {
            log_sub(a0, s0).zip(log_sub(a1, s1))
        };
        // A negative partial sum is numerical breakdown: leave the order out.
        let Some((n0, n1)) = next else {
            return f64::INFINITY;
        };
        (a0, a1) = (n0, n1);
        if s0.max(s1) < -30.0 {
            return log_add(a0, a1);
        }
    }
    // Not converged: this order is left out of the minimum.
    f64::INFINITY
}

/// The cases both samplings share: nobody sampled (0), no noise or an infinite order (infinite),
/// everybody sampled (the Gaussian mechanism itself, a / (2 z^2)); None otherwise.
fn unsampled_rdp(q: f64, z: f64, a: f64) -> Option<f64> {
    if q == 0.0 {
        Some(0.0)
    } else if z == 0.0 || a.is_infinite() {
        Some(f64::INFINITY)
    } else if q == 1.0 {
        Some(a / (2.0 * z * z))
    } else {
        None
    }
}

/// RDP at order `a` of the Gaussian mechanism with noise multiplier `z`, each participant
/// sampled with probability `q` (Poisson).
pub fn rdp_poisson(q: f64, z: f64, a: f64) -> f64 {
    if let Some(r) = unsampled_rdp(q, z, a) {
        return r;
    }
    let log_a = if a.fract() == 0.0 {
        log_a_int(q, z, a as u64)
    } else {
        log_a_frac(q, z, a)
    };
    log_a / (a - 1.0)
}

/// A real number as (is it >= 0, log of its magnitude), for differences of huge exponentials.
#[derive(Clone, Copy)]
struct LogSigned {
    positive: bool,
    log: f64,
}

impl LogSigned {
    /// `self - other`.
    fn minus(self, other: LogSigned) -> LogSigned {
        if self.positive != other.positive {
            // x - y with opposite signs: the magnitudes add, the sign is x's.
            return LogSigned {
                positive: self.positive,
                log: log_add(self.log, other.log),
            };
        }
        let (big, small, larger_is_self) = if self.log >= other.log {
            (self.log, other.log, true)
        } else {
            (other.log, self.log, false)
        };
        let log = if big == small {
            f64::NEG_INFINITY
        } else {
            big + (-(small - big).exp()).ln_1p()
        };
        // Same sign s: x - y = s (|x| - |y|).
        LogSigned {
            positive: larger_is_self == self.positive,
            log,
        }
    }
}

/// log|Δ^(k+1) s| at 0 for k = 0..=n, where s = (1, exp(f(0)), exp(f(1)), ..., exp(f(n+1))).
fn log_forward_diffs(f: impl Fn(f64) -> f64, n: usize) -> Vec<f64> {
    let mut v: Vec<LogSigned> = std::iter::once(0.0)
        .chain((0..n + 2).map(|i| f(i as f64)))
        .map(|log| LogSigned {
            positive: true,
            log,
        })
        .collect();
    let mut out = Vec::with_capacity(n + 2);
    for order in 0..n + 2 {
        for j in 0..(n + 2 - order) {
            v[j] = v[j + 1].minus(v[j]);
        }
        out.push(v[0].log);
    }
    out
}

/// (a - 1) eps_RDP(a) of fixed-size sampling without replacement at integer order `a`
/// (WBK19 Theorem 27, exact below order 256 and with the Stirling-free cruder term above).
fn wor_log_a_int(q: f64, z: f64, a: u64) -> f64 {
    if a <= 1 {
        return 0.0;
    }
    let cgf = |x: f64| x * (x + 1.0) / (2.0 * z * z);
    let rdp_gauss = |x: f64| x / (2.0 * z * z);
    let (ln2, ln4, lq) = (2f64.ln(), 4f64.ln(), q.ln());
    let af = a as f64;
    let f2 = rdp_gauss(2.0);
    let log_f2m1 = f2 + (-(-f2).exp()).ln_1p();
    let second = 2.0 * lq + log_comb(af, 2.0) + (ln4 + log_f2m1).min(f2 + ln2);
    let exact = a <= 256;
    let deltas = if exact {
        log_forward_diffs(cgf, a as usize)
    } else {
        Vec::new()
    };
    let mut log_a = log_add(0.0, second);
    for i in 3..=a {
        let fi = i as f64;
        let bound = ln2 + cgf(fi - 1.0);
        let s = if exact {
            let lo = deltas[(2 * (i / 2)) as usize - 1];
            let hi = deltas[(2 * i.div_ceil(2)) as usize - 1];
            (ln4 + 0.5 * (lo + hi)).min(bound)
        } else {
            bound
        };
        log_a = log_add(log_a, s + fi * lq + log_comb(af, fi));
    }
    log_a
}

/// RDP at order `a` of the Gaussian mechanism on a subset of fraction q = m/n drawn without
/// replacement.
pub fn rdp_without_replacement(q: f64, z: f64, a: f64) -> f64 {
    if let Some(r) = unsampled_rdp(q, z, a) {
        return r;
    }
    if a.fract() == 0.0 {
        return wor_log_a_int(q, z, a as u64) / (a - 1.0);
    }
    let (lo, hi) = (a.floor(), a.ceil());
    let t = a - lo;
    ((1.0 - t) * wor_log_a_int(q, z, lo as u64) + t * wor_log_a_int(q, z, hi as u64)) / (a - 1.0)
}

/// The RDP curve of one application at every order of [`orders`].
pub fn rdp_curve(sampling: Sampling, q: f64, z: f64) -> Vec<f64> {
    orders()
        .into_iter()
        .map(|a| match sampling {
            Sampling::Poisson => rdp_poisson(q, z, a),
            Sampling::Fixed => rdp_without_replacement(q, z, a),
        })
        .collect()
}

/// (epsilon, the order that attains it) for `delta` from an RDP curve over `orders`.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, 0.0);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            // Below numerical noise, or already below the KL bound delta <= sqrt(1 - e^-r).
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// One kind of round, applied `count` times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub sampling: Sampling,
    /// Sampling rate (Poisson) or sampled fraction m/n (fixed size).
    pub q: f64,
    /// Noise standard deviation over the sensitivity.
    pub noise_multiplier: f64,
    pub count: u64,
}

/// The privacy spent so far: the events composed, replayable exactly (a resumed run continues the
/// same ledger from its checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    pub events: Vec<Event>,
}

impl Ledger {
    /// Adds `count` applications; consecutive identical ones share an event.
    pub fn compose(&mut self, sampling: Sampling, q: f64, noise_multiplier: f64, count: u64) {
        if let Some(e) = self.events.last_mut()
            && e.sampling == sampling
            && e.q == q
            && e.noise_multiplier == noise_multiplier
        {
            e.count += count;
            return;
        }
        self.events.push(Event {
            sampling,
            q,
            noise_multiplier,
            count,
        });
    }

    pub fn rdp(&self) -> Vec<f64> {
        let mut total = vec![0.0; orders().len()];
        for e in &self.events {
            for (t, r) in total
                .iter_mut()
                .zip(rdp_curve(e.sampling, e.q, e.noise_multiplier))
            {
                *t += e.count as f64 * r;
            }
        }
        total
    }

    /// Epsilon at `delta` of everything composed so far (0 for an empty ledger).
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.events.is_empty() {
            return 0.0;
        }
        epsilon_from_rdp(&orders(), &self.rdp(), delta).0
    }

    /// Epsilon were `more` further rounds of `event`'s kind composed.
    pub fn epsilon_after(&self, sampling: Sampling, q: f64, z: f64, more: u64, delta: f64) -> f64 {
        let mut l = self.clone();
        l.compose(sampling, q, z, more);
        l.epsilon(delta)
    }
}

/// The smallest noise multiplier (to 1e-4 relative) whose `rounds` applications stay within
/// `target_epsilon` at `delta`; an error when none below 1e4 does.
pub fn noise_for_epsilon(
    target_epsilon: f64,
    sampling: Sampling,
    q: f64,
    rounds: u64,
    delta: f64,
) -> Result<f64, String> {
    let eps = |z: f64| Ledger::default().epsilon_after(sampling, q, z, rounds, delta);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while eps(hi) > target_epsilon {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return Err(format!(
                "no noise multiplier up to 1e4 reaches epsilon {target_epsilon} in {rounds} rounds at delta {delta}"
            ));
        }
    }
    while hi - lo > 1e-4 * hi {
        let mid = 0.5 * (lo + hi);
        if eps(mid) > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}
