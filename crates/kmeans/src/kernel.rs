//! Nearest-centroid kernel: the hot loop of every k-means step.
//!
//! Centroids are packed transposed (`d x kpad`, kpad = k rounded up to 8) so a block of 8 points
//! against 8 centroids is 8x8 independent multiply-adds per feature: LLVM keeps the 64 accumulators
//! in vector registers. argmin uses `||c||^2 - 2 x.c` (the `||x||^2` term is constant per point); the
//! returned distance is then recomputed exactly as `sum (x - c)^2` for the chosen centroid, so all
//! reported inertias are exact. Ties go to the lowest centroid index (as numpy's argmin), so labels do
//! not depend on the thread count. AVX2+FMA is used when the CPU has it (runtime detection), with a
//! portable fallback.

use rayon::prelude::*;

pub(crate) const LANES: usize = 8;
const PB: usize = 8;
/// Rows per parallel task.
const CHUNK: usize = 512;

/// A codebook laid out for the kernel.
pub(crate) struct Packed {
    pub d: usize,
    pub kpad: usize,
    /// `ct[f * kpad + j]` = feature `f` of centroid `j` (0 for padding).
    ct: Vec<f32>,
    /// squared norms (padding: +inf so it is never chosen).
    cn: Vec<f32>,
    /// row-major copy, for the exact distance.
    rows: Vec<f32>,
}

impl Packed {
    pub fn new(c: &[f32], k: usize, d: usize) -> Self {
        assert_eq!(c.len(), k * d);
        let kpad = k.div_ceil(LANES) * LANES;
        let mut ct = vec![0f32; d * kpad];
        let mut cn = vec![f32::INFINITY; kpad];
        for j in 0..k {
            let row = &c[j * d..(j + 1) * d];
            for (f, &v) in row.iter().enumerate() {
                ct[f * kpad + j] = v;
            }
            cn[j] = row.iter().map(|v| v * v).sum();
        }
        Self {
            d,
            kpad,
            ct,
            cn,
            rows: c.to_vec(),
        }
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Dot products of PB rows (`x`, exactly PB*d values) with centroids `j..j+LANES`.
#[inline(always)]
fn dots<const FMA: bool>(p: &Packed, x: &[f32], j: usize) -> [[f32; LANES]; PB] {
    let d = p.d;
    let x = &x[..PB * d];
    let mut acc = [[0f32; LANES]; PB];
    for f in 0..d {
        let ct: &[f32; LANES] = p.ct[f * p.kpad + j..f * p.kpad + j + LANES]
            .try_into()
            .unwrap();
        for q in 0..PB {
            let xv = x[q * d + f];
            for l in 0..LANES {
                acc[q][l] = madd::<FMA>(xv, ct[l], acc[q][l]);
            }
        }
    }
    acc
}

#[inline(always)]
fn assign_block<const FMA: bool>(p: &Packed, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    let mut best_v = [[f32::INFINITY; LANES]; PB];
    let mut best_i = [[0u32; LANES]; PB];
    let mut j = 0;
    while j < p.kpad {
        let acc = dots::<FMA>(p, x, j);
        let cn: &[f32; LANES] = p.cn[j..j + LANES].try_into().unwrap();
        for q in 0..PB {
            for l in 0..LANES {
                let v = cn[l] - 2.0 * acc[q][l];
                if v < best_v[q][l] {
                    best_v[q][l] = v;
                    best_i[q][l] = (j + l) as u32;
                }
            }
        }
        j += LANES;
    }
    finish_block::<FMA>(p, x, &best_v, &best_i, labels, dist);
}

/// AVX2 version of [`assign_block`] with an explicit vector compare + blend argmin (LLVM leaves the
/// auto-vectorized argmin scalar, which then costs as much as the multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn assign_block_avx2(p: &Packed, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = p.d;
    let x = &x[..PB * d];
    assert!(p.ct.len() >= d * p.kpad && p.cn.len() >= p.kpad && p.kpad.is_multiple_of(LANES));
    let mut best_v = [_mm256_set1_ps(f32::INFINITY); PB];
    let mut best_i = [_mm256_setzero_si256(); PB];
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let two = _mm256_set1_ps(2.0);
    let mut j = 0;
    while j < p.kpad {
        let mut acc = [_mm256_setzero_ps(); PB];
        for f in 0..d {
            // SAFETY: f * kpad + j + 8 <= d * kpad (asserted above, j < kpad, kpad % 8 == 0).
            let c = unsafe { _mm256_loadu_ps(p.ct.as_ptr().add(f * p.kpad + j)) };
            for q in 0..PB {
                acc[q] = _mm256_fmadd_ps(_mm256_set1_ps(x[q * d + f]), c, acc[q]);
            }
        }
        // SAFETY: j + 8 <= kpad <= cn.len().
        let cn = unsafe { _mm256_loadu_ps(p.cn.as_ptr().add(j)) };
        let jj = _mm256_add_epi32(lane, _mm256_set1_epi32(j as i32));
        for q in 0..PB {
            let v = _mm256_fnmadd_ps(two, acc[q], cn);
            let m = _mm256_cmp_ps::<_CMP_LT_OQ>(v, best_v[q]);
            best_v[q] = _mm256_blendv_ps(best_v[q], v, m);
            best_i[q] = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(best_i[q]),
                _mm256_castsi256_ps(jj),
                m,
            ));
        }
        j += LANES;
    }
    let mut bv = [[0f32; LANES]; PB];
    let mut bi = [[0u32; LANES]; PB];
    for q in 0..PB {
        // SAFETY: each row of bv/bi holds exactly 8 lanes.
        unsafe {
            _mm256_storeu_ps(bv[q].as_mut_ptr(), best_v[q]);
            _mm256_storeu_si256(bi[q].as_mut_ptr() as *mut __m256i, best_i[q]);
        }
    }
    finish_block::<true>(p, x, &bv, &bi, labels, dist);
}

/// Reduces the per-lane minima (ties to the lowest index) and computes the exact distance.
#[inline(always)]
fn finish_block<const FMA: bool>(
    p: &Packed,
    x: &[f32],
    best_v: &[[f32; LANES]; PB],
    best_i: &[[u32; LANES]; PB],
    labels: &mut [u32],
    dist: &mut [f32],
) {
    let d = p.d;
    for q in 0..labels.len() {
        let (mut bv, mut bi) = (best_v[q][0], best_i[q][0]);
        for l in 1..LANES {
            let (v, i) = (best_v[q][l], best_i[q][l]);
            if v < bv || (v == bv && i < bi) {
                bv = v;
                bi = i;
            }
        }
        if !bv.is_finite() {
            bi = 0; // NaN input: fall back to centroid 0 rather than an out-of-range id
        }
        let xr = &x[q * d..(q + 1) * d];
        let cr = &p.rows[bi as usize * d..(bi as usize + 1) * d];
        let mut s = 0f32;
        for f in 0..d {
            let t = xr[f] - cr[f];
            s = madd::<FMA>(t, t, s);
        }
        labels[q] = bi;
        dist[q] = s;
    }
}

#[inline(always)]
fn assign_serial(
    p: &Packed,
    x: &[f32],
    labels: &mut [u32],
    dist: &mut [f32],
    block: impl Fn(&Packed, &[f32], &mut [u32], &mut [f32]),
) {
    let d = p.d;
    let n = labels.len();
    let mut pad = vec![0f32; PB * d];
    let mut i = 0;
    while i < n {
        let m = (n - i).min(PB);
        let xb = if m == PB {
            &x[i * d..(i + PB) * d]
        } else {
            pad[..m * d].copy_from_slice(&x[i * d..(i + m) * d]);
            pad[m * d..].fill(0.0);
            &pad[..]
        };
        block(p, xb, &mut labels[i..i + m], &mut dist[i..i + m]);
        i += m;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn assign_serial_avx2(p: &Packed, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    // The closure inherits this function's target features, so the call is safe here.
    assign_serial(p, x, labels, dist, |p, x, l, d| {
        assign_block_avx2(p, x, l, d)
    })
}

fn assign_dispatch(p: &Packed, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the enabled features (checked just above).
        unsafe { assign_serial_avx2(p, x, labels, dist) };
        return;
    }
    assign_serial(p, x, labels, dist, assign_block::<false>)
}

/// Nearest centroid and exact squared distance for every row of `x` (row-major, `labels.len()` rows).
/// Parallel over rows with rayon (the current pool); the result does not depend on the thread count.
pub(crate) fn assign(p: &Packed, x: &[f32], labels: &mut [u32], dist: &mut [f32]) {
    let d = p.d;
    assert_eq!(x.len(), labels.len() * d);
    assert_eq!(dist.len(), labels.len());
    if labels.len() <= CHUNK {
        assign_dispatch(p, x, labels, dist);
        return;
    }
    x.par_chunks(CHUNK * d)
        .zip(labels.par_chunks_mut(CHUNK).zip(dist.par_chunks_mut(CHUNK)))
        .for_each(|(xc, (lc, dc))| assign_dispatch(p, xc, lc, dc));
}

#[inline(always)]
fn dist_block<const FMA: bool>(p: &Packed, x: &[f32], xn: &[f32], out: &mut [f32]) {
    let m = out.len() / p.kpad;
    let mut j = 0;
    while j < p.kpad {
        let acc = dots::<FMA>(p, x, j);
        for q in 0..m {
            for l in 0..LANES {
                out[q * p.kpad + j + l] = (xn[q] + p.cn[j + l] - 2.0 * acc[q][l]).max(0.0);
            }
        }
        j += LANES;
    }
}

#[inline(always)]
fn dists_serial<const FMA: bool>(p: &Packed, x: &[f32], xn: &[f32], out: &mut [f32]) {
    let d = p.d;
    let n = out.len() / p.kpad;
    let mut pad = vec![0f32; PB * d];
    let mut i = 0;
    while i < n {
        let m = (n - i).min(PB);
        let xb = if m == PB {
            &x[i * d..(i + PB) * d]
        } else {
            pad[..m * d].copy_from_slice(&x[i * d..(i + m) * d]);
            pad[m * d..].fill(0.0);
            &pad[..]
        };
        dist_block::<FMA>(p, xb, &xn[i..i + m], &mut out[i * p.kpad..(i + m) * p.kpad]);
        i += m;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dists_serial_avx2(p: &Packed, x: &[f32], xn: &[f32], out: &mut [f32]) {
    dists_serial::<true>(p, x, xn, out)
}

fn dists_dispatch(p: &Packed, x: &[f32], xn: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the enabled features (checked just above).
        unsafe { dists_serial_avx2(p, x, xn, out) };
        return;
    }
    dists_serial::<false>(p, x, xn, out)
}

/// Squared norms of the rows of `x`.
pub(crate) fn row_norms(x: &[f32], d: usize) -> Vec<f32> {
    x.chunks_exact(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

/// Squared distances (clamped at 0) of every row of `x` to every centroid: `out` is `n x kpad`
/// (columns past `k` are +inf/garbage and must be ignored). `xn`: [`row_norms`] of `x`.
pub(crate) fn all_dists(p: &Packed, x: &[f32], xn: &[f32], out: &mut [f32]) {
    let d = p.d;
    let n = x.len() / d;
    assert_eq!(out.len(), n * p.kpad);
    assert_eq!(xn.len(), n);
    out.par_chunks_mut(CHUNK * p.kpad)
        .zip(x.par_chunks(CHUNK * d).zip(xn.par_chunks(CHUNK)))
        .for_each(|(oc, (xc, nc))| dists_dispatch(p, xc, nc, oc));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_brute_force() {
        let (n, k, d) = (1037, 21, 13);
        let mut s = 1u64;
        let mut r = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
        };
        let x: Vec<f32> = (0..n * d).map(|_| r()).collect();
        let c: Vec<f32> = (0..k * d).map(|_| r()).collect();
        let p = Packed::new(&c, k, d);
        let (mut l, mut dd) = (vec![0u32; n], vec![0f32; n]);
        assign(&p, &x, &mut l, &mut dd);
        let mut all = vec![0f32; n * p.kpad];
        all_dists(&p, &x, &row_norms(&x, d), &mut all);
        for i in 0..n {
            let ds: Vec<f32> = (0..k)
                .map(|j| {
                    (0..d)
                        .map(|f| (x[i * d + f] - c[j * d + f]).powi(2))
                        .sum::<f32>()
                })
                .collect();
            let best = ds.iter().cloned().fold(f32::INFINITY, f32::min);
            assert!((ds[l[i] as usize] - best).abs() < 1e-4, "row {i}");
            assert!((dd[i] - best).abs() < 1e-4);
            for j in 0..k {
                assert!((all[i * p.kpad + j] - ds[j]).abs() < 1e-3);
            }
        }
    }
}
