//! The first front-end block's `GELU(GroupNorm(C, C)(z))` on `[B, C, T]` as one pass per
//! (utterance, channel) row, forward and backward.
//!
//! Why fused: that block works on the longest sequence of the model (T = S / 5), where burn's
//! unfused version makes about a dozen full-size temporaries per step (centred, scaled, shifted,
//! activated, and the gradient of each), each a fresh allocation with its page faults. Here the
//! forward writes only the output, and the backward recomputes the row statistics instead of
//! saving them.

use rayon::prelude::*;

/// Shape and epsilon: `rows = B * C` rows of length `t`, channel of row r = `r % c`.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormShape {
    pub batch: usize,
    pub channels: usize,
    pub t: usize,
    pub eps: f64,
}

const LANES: usize = 16;

/// Sum of `f(v)` over `z` in 16 f32 lanes (vectorises), reduced in f64.
#[inline(always)]
fn lane_sum(z: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = z.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v) as f64).sum();
    acc.iter().map(|&v| v as f64).sum::<f64>() + tail
}

#[inline(always)]
fn row_stats(z: &[f32], eps: f64) -> (f32, f32) {
    let n = z.len() as f64;
    let mean = (lane_sum(z, |v| v) / n) as f32;
    let var = lane_sum(z, |v| (v - mean) * (v - mean)) / n;
    (mean, (1.0 / (var + eps).sqrt()) as f32)
}

#[inline(always)]
fn row_forward_body(z: &[f32], y: &mut [f32], u: &mut [f32], g: f32, b: f32, eps: f64) {
    let (mean, rstd) = row_stats(z, eps);
    let (a, c) = (rstd * g, b - mean * rstd * g);
    for (u, &v) in u.iter_mut().zip(z) {
        *u = v * a + c;
    }
    crate::act::gelu_body(u, y);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_backward_body(
    z: &[f32],
    dy: &[f32],
    dz: &mut [f32],
    u: &mut [f32],
    du: &mut [f32],
    g: f32,
    b: f32,
    eps: f64,
    out: &mut [f64; 2],
) {
    let (mean, rstd) = row_stats(z, eps);
    let (a, c) = (rstd * g, b - mean * rstd * g);
    for (u, &v) in u.iter_mut().zip(z) {
        *u = v * a + c;
    }
    // du: the gradient at the affine output; xhat = (z - mean) * rstd.
    crate::act::gelu_grad_body(u, dy, du);
    let n = z.len() as f32;
    let s1 = lane_sum(du, |d| d);
    // sum(du * xhat) through pairs, since lane_sum takes one slice.
    let mut acc = [0f32; LANES];
    let mut tail = 0f64;
    let mut zc = z.chunks_exact(LANES);
    let mut dc = du.chunks_exact(LANES);
    for (zz, dd) in (&mut zc).zip(&mut dc) {
        for i in 0..LANES {
            acc[i] += dd[i] * ((zz[i] - mean) * rstd);
        }
    }
    for (&v, &d) in zc.remainder().iter().zip(dc.remainder()) {
        tail += (d * ((v - mean) * rstd)) as f64;
    }
    let s2 = acc.iter().map(|&v| v as f64).sum::<f64>() + tail;
    let (m1, m2) = (s1 as f32 / n, s2 as f32 / n);
    for ((o, &d), &v) in dz.iter_mut().zip(du.iter()).zip(z) {
        *o = a * (d - m1 - (v - mean) * rstd * m2);
    }
    *out = [s2, s1];
}

crate::act::simd_dispatch!(row_forward, row_forward_body, (z: &[f32], y: &mut [f32], u: &mut [f32], g: f32, b: f32, eps: f64));
crate::act::simd_dispatch!(row_backward, row_backward_body, (z: &[f32], dy: &[f32], dz: &mut [f32], u: &mut [f32], du: &mut [f32], g: f32, b: f32, eps: f64, out: &mut [f64; 2]));

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
            u.resize(s.t, 0.0);
            row_forward(z, y, u, gamma[c], beta[c], s.eps);
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
    let per_row: Vec<[f64; 2]> = dz
        .par_chunks_mut(s.t)
        .zip(z.par_chunks(s.t).zip(dy.par_chunks(s.t)))
        .enumerate()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(u, du), (r, (dz, (z, dy)))| {
                let c = r % s.channels;
                u.resize(s.t, 0.0);
                du.resize(s.t, 0.0);
                let mut out = [0f64; 2];
                row_backward(z, dy, dz, u, du, gamma[c], beta[c], s.eps, &mut out);
                out
            },
        )
        .collect();
    let mut dgamma = vec![0f64; s.channels];
    let mut dbeta = vec![0f64; s.channels];
    for (r, [g, b]) in per_row.into_iter().enumerate() {
        dgamma[r % s.channels] += g;
        dbeta[r % s.channels] += b;
    }
    (
        dgamma.into_iter().map(|v| v as f32).collect(),
        dbeta.into_iter().map(|v| v as f32).collect(),
    )
}
