//! The first front-end block's `GELU(GroupNorm(C, C)(z))` on `[B, C, T]` as one pass per
//! (utterance, channel) row, forward and backward.
//!
//! Why fused: that block works on the longest sequence of the model (T = S / 5), where burn's
//! unfused version makes about a dozen full-size temporaries per step (centred, scaled, shifted,
//! activated, and the gradient of each), each a fresh allocation with its page faults. Here the
//! forward writes only the output, and the backward recomputes the row statistics instead of
//! saving them.

use rayon::prelude::*;

use crate::act::{gelu_chunk, gelu_grad_chunk};

/// Shape and epsilon: `rows = B * C` rows of length `t`, channel of row r = `r % c`.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormShape {
    pub batch: usize,
    pub channels: usize,
    pub t: usize,
    pub eps: f64,
}

fn row_stats(z: &[f32], eps: f64) -> (f32, f32) {
    let n = z.len() as f64;
    let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = z
        .iter()
        .map(|&v| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// `y = gelu((z - mean) * rstd * gamma[c] + beta[c])` per row (biased variance, as torch).
pub fn forward(z: &[f32], gamma: &[f32], beta: &[f32], s: &GroupNormShape, y: &mut [f32]) {
    assert_eq!(z.len(), s.batch * s.channels * s.t);
    assert_eq!(y.len(), z.len());
    assert_eq!(gamma.len(), s.channels);
    assert_eq!(beta.len(), s.channels);
    y.par_chunks_mut(s.t)
        .zip(z.par_chunks(s.t))
        .enumerate()
        .for_each_init(Vec::new, |u, (r, (y, z))| {
            let c = r % s.channels;
            let (mean, rstd) = row_stats(z, s.eps);
            let (a, b) = (rstd * gamma[c], beta[c] - mean * rstd * gamma[c]);
            u.clear();
            u.extend(z.iter().map(|&v| v.mul_add(a, b)));
            gelu_chunk(u, y);
        });
}

/// Gradients of [`forward`] given `dy`: writes `dz` and returns `(dgamma, dbeta)`.
pub fn backward(
    z: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    s: &GroupNormShape,
    dz: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(z.len(), s.batch * s.channels * s.t);
    assert_eq!(dy.len(), z.len());
    assert_eq!(dz.len(), z.len());
    let n = s.t as f32;
    let per_row: Vec<(f64, f64)> = dz
        .par_chunks_mut(s.t)
        .zip(z.par_chunks(s.t).zip(dy.par_chunks(s.t)))
        .enumerate()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(u, du), (r, (dz, (z, dy)))| {
                let c = r % s.channels;
                let (mean, rstd) = row_stats(z, s.eps);
                let g = gamma[c];
                let (a, b) = (rstd * g, beta[c] - mean * rstd * g);
                u.clear();
                u.extend(z.iter().map(|&v| v.mul_add(a, b)));
                du.resize(s.t, 0.0);
                gelu_grad_chunk(u, dy, du);
                // du is the gradient at the affine output; xhat = (z - mean) * rstd.
                let (mut s1, mut s2) = (0f64, 0f64);
                for (&d, &v) in du.iter().zip(z.iter()) {
                    let xhat = (v - mean) * rstd;
                    s1 += d as f64;
                    s2 += (d * xhat) as f64;
                }
                let (m1, m2) = ((s1 as f32) / n, (s2 as f32) / n);
                for ((o, &d), &v) in dz.iter_mut().zip(du.iter()).zip(z.iter()) {
                    let xhat = (v - mean) * rstd;
                    *o = a * (d - m1 - xhat * m2);
                }
                (s2, s1)
            },
        )
        .collect();
    let mut dgamma = vec![0f64; s.channels];
    let mut dbeta = vec![0f64; s.channels];
    for (r, (g, b)) in per_row.into_iter().enumerate() {
        dgamma[r % s.channels] += g;
        dbeta[r % s.channels] += b;
    }
    (
        dgamma.into_iter().map(|v| v as f32).collect(),
        dbeta.into_iter().map(|v| v as f32).collect(),
    )
}
