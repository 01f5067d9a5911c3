//! Greedy k-means++ seeding exactly as scikit-learn's `_kmeans_plusplus`: first centre drawn with
//! probability proportional to the sample weight, then for each next centre `2 + ln(k)` candidates are
//! drawn proportional to `w * D(x)^2` and the one that lowers the potential most is kept.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::kernel::{Packed, all_dists, row_norms};

/// Seeds `k` centres from the rows of `x` (`n x d`, row-major) with optional per-row weights.
/// Returns the `k x d` centres. Requires `n >= 1`; if `k > n` some centres repeat.
pub fn kmeans_plusplus(
    x: &[f32],
    weights: Option<&[f64]>,
    d: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let n = x.len() / d;
    assert!(n > 0 && k > 0);
    let w = |i: usize| weights.map_or(1.0, |w| w[i]);
    let n_trials = 2 + (k as f64).ln() as usize;
    let mut centers = Vec::with_capacity(k * d);

    // First centre: weighted draw.
    let total_w: f64 = (0..n).map(w).sum();
    let first = search_cumsum((0..n).map(w), rng.random::<f64>() * total_w, n);
    centers.extend_from_slice(&x[first * d..(first + 1) * d]);

    let xn = row_norms(x, d);
    let p = Packed::new(&centers[..d], 1, d);
    let mut buf = vec![0f32; n * p.kpad];
    all_dists(&p, x, &xn, &mut buf);
    let mut closest: Vec<f32> = (0..n).map(|i| buf[i * p.kpad]).collect();
    let mut pot: f64 = (0..n).map(|i| w(i) * closest[i] as f64).sum();

    let mut cumsum = vec![0f64; n];
    let mut cand_flat = Vec::with_capacity(n_trials * d);
    for _ in 1..k {
        let mut acc = 0f64;
        for i in 0..n {
            acc += w(i) * closest[i] as f64;
            cumsum[i] = acc;
        }
        let cands: Vec<usize> = (0..n_trials)
            .map(|_| {
                let v = rng.random::<f64>() * pot;
                cumsum.partition_point(|&c| c < v).min(n - 1)
            })
            .collect();
        cand_flat.clear();
        for &c in &cands {
            cand_flat.extend_from_slice(&x[c * d..(c + 1) * d]);
        }
        let p = Packed::new(&cand_flat, n_trials, d);
        buf.resize(n * p.kpad, 0.0);
        all_dists(&p, x, &xn, &mut buf);
        let mut pots = vec![0f64; n_trials];
        for i in 0..n {
            let (wi, ci) = (w(i), closest[i]);
            let row = &buf[i * p.kpad..i * p.kpad + n_trials];
            for (pt, &v) in pots.iter_mut().zip(row) {
                *pt += wi * ci.min(v) as f64;
            }
        }
        let mut best = (f64::INFINITY, 0usize);
        for (t, &s) in pots.iter().enumerate() {
            if s < best.0 {
                best = (s, t);
            }
        }
        let t = best.1;
        pot = best.0;
        for i in 0..n {
            closest[i] = closest[i].min(buf[i * p.kpad + t]);
        }
        centers.extend_from_slice(&x[cands[t] * d..(cands[t] + 1) * d]);
    }
    centers
}

/// numpy `searchsorted(cumsum(vals), v, side="left")`, clipped to `n - 1`.
fn search_cumsum(vals: impl Iterator<Item = f64>, v: f64, n: usize) -> usize {
    let mut acc = 0.0;
    for (i, x) in vals.enumerate() {
        acc += x;
        if acc >= v {
            return i;
        }
    }
    n - 1
}
