//! A multi-codebook vector quantizer for MVQ-KD (after k2-fsa `multi_quantization`).
//!
//! Direct-sum quantization: a frame `x` is approximated by `x̂ = Σ_b C_b[i_b]` over `B` codebooks
//! of 256 entries, so each frame is stored as `B` bytes.
//!
//! Training keeps the two-phase structure of `multi_quantization` but replaces its gradient-trained
//! parts by closed-form steps (the "simpler faithful variant"):
//! 1. phase 1, `2B` codebooks of 16 entries: residual k-means initialisation (codebook `b` is
//!    k-means of what codebooks `0..b` left unexplained), then `refine_iters` rounds of
//!    alternating greedy re-encoding (each codebook's index re-chosen with the others fixed) and
//!    least-squares centre updates (each codebook's entries set to the mean residual of their
//!    frames, which is the exact minimiser with the other codebooks fixed);
//! 2. pairs of codebooks merged by outer sum, `C'_j[16a + c] = C_{2j}[a] + C_{2j+1}[c]`, giving `B`
//!    codebooks of 256 entries with the same reconstruction, then `refine_iters` more rounds.
//!
//! Every step is a coordinate-descent step, so the training error never increases.
//! Encoding replaces the learned `to_logits` + argmax initialisation with a greedy residual pass
//! (codebook by codebook, the nearest entry to what is left), followed, as in `multi_quantization`,
//! by greedy refinement passes (`encode_passes`).

// Per-frame kernels index several parallel arrays by the codebook index.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::path::Path;

use fedhubert_model::{HostTensor, Weights, read_safetensors, write_safetensors};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::MvqConfig;
use crate::{DistillError, Result};

/// Entries per codebook after merging (one byte per codebook).
pub const CODEBOOK_SIZE: usize = 256;
const PHASE1_SIZE: usize = 16;

/// `b` codebooks of `k` entries of dimension `d`, flattened `[b][k][d]`.
#[derive(Clone, Debug, PartialEq)]
struct Books {
    b: usize,
    k: usize,
    d: usize,
    c: Vec<f32>,
}

impl Books {
    fn entry(&self, b: usize, k: usize) -> &[f32] {
        let o = (b * self.k + k) * self.d;
        &self.c[o..o + self.d]
    }

    fn norms(&self) -> Vec<f32> {
        self.c
            .chunks_exact(self.d)
            .map(|e| e.iter().map(|v| v * v).sum())
            .collect()
    }

    /// Nearest entry of codebook `b` to `r`: argmin ||c||² - 2 r·c.
    fn nearest(&self, b: usize, r: &[f32], norms: &[f32]) -> usize {
        let mut best = (f32::INFINITY, 0);
        for k in 0..self.k {
            let e = self.entry(b, k);
            let dot: f32 = e.iter().zip(r).map(|(a, c)| a * c).sum();
            let s = norms[b * self.k + k] - 2.0 * dot;
            if s < best.0 {
                best = (s, k);
            }
        }
        best.1
    }

    fn reconstruct_into(&self, codes: &[u16], out: &mut [f32]) {
        out.iter_mut().for_each(|v| *v = 0.0);
        for (b, &i) in codes.iter().enumerate() {
            for (o, c) in out.iter_mut().zip(self.entry(b, i as usize)) {
                *o += c;
            }
        }
    }

    /// Greedy encoding of every frame: with `init`, a residual pass first (codebook by codebook);
    /// then `passes` refinement passes re-choosing each codebook's index with the others fixed.
    fn encode(&self, x: &[f32], codes: &mut [u16], passes: usize, init: bool) {
        let norms = self.norms();
        let d = self.d;
        x.par_chunks_exact(d)
            .zip(codes.par_chunks_exact_mut(self.b))
            .for_each(|(xf, cf)| {
                let mut recon = vec![0f32; d];
                let mut r = vec![0f32; d];
                if init {
                    for b in 0..self.b {
                        for j in 0..d {
                            r[j] = xf[j] - recon[j];
                        }
                        let k = self.nearest(b, &r, &norms);
                        cf[b] = k as u16;
                        for (o, c) in recon.iter_mut().zip(self.entry(b, k)) {
                            *o += c;
                        }
                    }
                } else {
                    self.reconstruct_into(cf, &mut recon);
                }
                for _ in 0..passes {
                    for b in 0..self.b {
                        let old = self.entry(b, cf[b] as usize);
                        for j in 0..d {
                            r[j] = xf[j] - recon[j] + old[j];
                        }
                        let k = self.nearest(b, &r, &norms);
                        if k != cf[b] as usize {
                            let new = self.entry(b, k);
                            for j in 0..d {
                                recon[j] += new[j] - old[j];
                            }
                            cf[b] = k as u16;
                        }
                    }
                }
            });
    }

    /// Least-squares centre update, one codebook at a time with the others fixed: each entry
    /// becomes the mean of `x - (x̂ - C_b[i_b])` over its frames (unused entries are kept).
    fn ls_update(&mut self, x: &[f32], codes: &[u16]) {
        let (d, n) = (self.d, x.len() / self.d);
        let mut recon = vec![0f32; n * d];
        recon
            .par_chunks_exact_mut(d)
            .zip(codes.par_chunks_exact(self.b))
            .for_each(|(r, c)| self.reconstruct_into(c, r));
        for b in 0..self.b {
            let mut sums = vec![0f64; self.k * d];
            let mut counts = vec![0usize; self.k];
            for f in 0..n {
                let i = codes[f * self.b + b] as usize;
                counts[i] += 1;
                let old = self.entry(b, i);
                for j in 0..d {
                    sums[i * d + j] += (x[f * d + j] - recon[f * d + j] + old[j]) as f64;
                }
            }
            let before = self.c[b * self.k * d..(b + 1) * self.k * d].to_vec();
            for k in 0..self.k {
                if counts[k] > 0 {
                    for j in 0..d {
                        self.c[(b * self.k + k) * d + j] =
                            (sums[k * d + j] / counts[k] as f64) as f32;
                    }
                }
            }
            for f in 0..n {
                let i = codes[f * self.b + b] as usize;
                for j in 0..d {
                    recon[f * d + j] += self.c[(b * self.k + i) * d + j] - before[i * d + j];
                }
            }
        }
    }

    fn rel_error(&self, x: &[f32], codes: &[u16]) -> f64 {
        let d = self.d;
        let (num, den) = x
            .par_chunks_exact(d)
            .zip(codes.par_chunks_exact(self.b))
            .map(|(xf, cf)| {
                let mut r = vec![0f32; d];
                self.reconstruct_into(cf, &mut r);
                let e: f64 = xf
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let s: f64 = xf.iter().map(|a| (*a as f64).powi(2)).sum();
                (e, s)
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        num / den.max(1e-30)
    }
}

/// Lloyd's k-means of `n` frames of dimension `d` into `k` centres (initialised on distinct random
/// frames; an emptied centre restarts on a random frame). Returns (centres, assignment).
fn kmeans(
    x: &[f32],
    d: usize,
    k: usize,
    iters: usize,
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, Vec<u16>) {
    let n = x.len() / d;
    let mut c = vec![0f32; k * d];
    for (j, i) in sample(rng, n, k.min(n)).into_iter().enumerate() {
        c[j * d..(j + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
    }
    let mut assign = vec![0u16; n];
    for it in 0..=iters {
        let books = Books {
            b: 1,
            k,
            d,
            c: c.clone(),
        };
        let norms = books.norms();
        assign
            .par_iter_mut()
            .enumerate()
            .for_each(|(f, a)| *a = books.nearest(0, &x[f * d..(f + 1) * d], &norms) as u16);
        if it == iters {
            break;
        }
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for f in 0..n {
            let a = assign[f] as usize;
            counts[a] += 1;
            for j in 0..d {
                sums[a * d + j] += x[f * d + j] as f64;
            }
        }
        for j in 0..k {
            if counts[j] > 0 {
                for q in 0..d {
                    c[j * d + q] = (sums[j * d + q] / counts[j] as f64) as f32;
                }
            } else {
                let i = rng.random_range(0..n);
                c[j * d..(j + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
            }
        }
    }
    (c, assign)
}

/// What training measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantizerReport {
    pub frames: usize,
    pub dim: usize,
    pub num_codebooks: usize,
    /// Relative reconstruction error `Σ||x - x̂||² / Σ||x||²` on the training frames after the
    /// residual k-means initialisation, after phase 1 (2B x 16) and after phase 2 (B x 256).
    pub rel_error_init: f64,
    pub rel_error_phase1: f64,
    pub rel_error: f64,
    pub bytes_per_frame: usize,
    /// `4 * dim / bytes_per_frame`: f32 embeddings vs codes.
    pub compression_ratio: f64,
}

/// A trained quantizer.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantizer {
    books: Books,
    /// Teacher layer whose output it quantizes.
    pub layer: usize,
    pub encode_passes: usize,
}

impl Quantizer {
    pub fn dim(&self) -> usize {
        self.books.d
    }

    pub fn num_codebooks(&self) -> usize {
        self.books.b
    }

    /// Trains on `x` (`n` frames of `dim` values, frame-major).
    pub fn train(
        x: &[f32],
        dim: usize,
        cfg: &MvqConfig,
        layer: usize,
        seed: u64,
    ) -> Result<(Self, QuantizerReport)> {
        if dim == 0 || !x.len().is_multiple_of(dim) {
            return Err(DistillError::Data(format!(
                "quantizer: {} values are not whole frames of dim {dim}",
                x.len()
            )));
        }
        let n = x.len() / dim;
        if n < CODEBOOK_SIZE {
            return Err(DistillError::Data(format!(
                "quantizer: {n} training frames, need at least {CODEBOOK_SIZE}; add audio to the server-side set"
            )));
        }
        if n < 4 * CODEBOOK_SIZE {
            tracing::warn!(
                "quantizer: only {n} training frames for codebooks of {CODEBOOK_SIZE} entries; the training error is optimistic, add audio to the server-side set"
            );
        }
        let b = cfg.num_codebooks;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Phase 1: residual k-means init of 2B codebooks of 16.
        let b1 = 2 * b;
        let mut c1 = Vec::with_capacity(b1 * PHASE1_SIZE * dim);
        let mut codes1 = vec![0u16; n * b1];
        let mut resid = x.to_vec();
        for j in 0..b1 {
            let (c, a) = kmeans(&resid, dim, PHASE1_SIZE, cfg.kmeans_iters, &mut rng);
            for f in 0..n {
                let e = &c[a[f] as usize * dim..(a[f] as usize + 1) * dim];
                for q in 0..dim {
                    resid[f * dim + q] -= e[q];
                }
                codes1[f * b1 + j] = a[f];
            }
            c1.extend_from_slice(&c);
        }
        let mut books1 = Books {
            b: b1,
            k: PHASE1_SIZE,
            d: dim,
            c: c1,
        };
        let rel_error_init = books1.rel_error(x, &codes1);
        for _ in 0..cfg.refine_iters {
            books1.encode(x, &mut codes1, 1, false);
            books1.ls_update(x, &codes1);
        }
        let rel_error_phase1 = books1.rel_error(x, &codes1);
        // Merge pairs by outer sum: 2B x 16 -> B x 256.
        let mut c2 = vec![0f32; b * CODEBOOK_SIZE * dim];
        for j in 0..b {
            for a in 0..PHASE1_SIZE {
                for c in 0..PHASE1_SIZE {
                    let (ea, ec) = (books1.entry(2 * j, a), books1.entry(2 * j + 1, c));
                    let o = (j * CODEBOOK_SIZE + a * PHASE1_SIZE + c) * dim;
                    for q in 0..dim {
                        c2[o + q] = ea[q] + ec[q];
                    }
                }
            }
        }
        let mut codes = vec![0u16; n * b];
        for f in 0..n {
            for j in 0..b {
                codes[f * b + j] =
                    codes1[f * b1 + 2 * j] * PHASE1_SIZE as u16 + codes1[f * b1 + 2 * j + 1];
            }
        }
        let mut books = Books {
            b,
            k: CODEBOOK_SIZE,
            d: dim,
            c: c2,
        };
        for _ in 0..cfg.refine_iters {
            books.encode(x, &mut codes, 1, false);
            books.ls_update(x, &codes);
        }
        let rel_error = books.rel_error(x, &codes);
        let report = QuantizerReport {
            frames: n,
            dim,
            num_codebooks: b,
            rel_error_init,
            rel_error_phase1,
            rel_error,
            bytes_per_frame: b,
            compression_ratio: (4 * dim) as f64 / b as f64,
        };
        Ok((
            Self {
                books,
                layer,
                encode_passes: cfg.encode_passes,
            },
            report,
        ))
    }

    /// Encodes frames (`n * dim` values) into `n * B` bytes, frame-major.
    pub fn encode(&self, x: &[f32]) -> Result<Vec<u8>> {
        let d = self.books.d;
        if !x.len().is_multiple_of(d) {
            return Err(DistillError::Data(format!(
                "quantizer: {} values are not whole frames of dim {d}",
                x.len()
            )));
        }
        let mut codes = vec![0u16; x.len() / d * self.books.b];
        self.books.encode(x, &mut codes, self.encode_passes, true);
        Ok(codes.into_iter().map(|c| c as u8).collect())
    }

    /// `x̂` of every frame.
    pub fn decode(&self, codes: &[u8]) -> Vec<f32> {
        let (b, d) = (self.books.b, self.books.d);
        let mut out = vec![0f32; codes.len() / b * d];
        let c16: Vec<u16> = codes.iter().map(|&c| c as u16).collect();
        out.par_chunks_exact_mut(d)
            .zip(c16.par_chunks_exact(b))
            .for_each(|(o, c)| self.books.reconstruct_into(c, o));
        out
    }

    /// `Σ||x - x̂||² / Σ||x||²`.
    pub fn rel_error(&self, x: &[f32], codes: &[u8]) -> f64 {
        let c16: Vec<u16> = codes.iter().map(|&c| c as u16).collect();
        self.books.rel_error(x, &c16)
    }

    /// Writes `centers [B, 256, D]` with the layer and encode passes in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let t = HostTensor {
            name: "centers".into(),
            shape: vec![self.books.b, self.books.k, self.books.d],
            data: self.books.c.clone(),
        };
        let meta = HashMap::from([
            ("format".to_string(), "fedhubert-mvq-v1".to_string()),
            ("layer".to_string(), self.layer.to_string()),
            ("encode_passes".to_string(), self.encode_passes.to_string()),
        ]);
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| DistillError::Data(format!("{}: {e}", dir.display())))?;
        }
        write_safetensors(path, &Weights::new(vec![t]), meta)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let (mut tensors, meta) = read_safetensors(path)?;
        let bad = |why: &str| DistillError::Data(format!("{}: {why}", path.display()));
        if meta.get("format").map(String::as_str) != Some("fedhubert-mvq-v1") {
            return Err(bad(
                "not a fedhubert MVQ quantizer (metadata `format` is not fedhubert-mvq-v1)",
            ));
        }
        let t = tensors
            .remove("centers")
            .ok_or_else(|| bad("no `centers` tensor"))?;
        if t.shape.len() != 3 || t.shape[1] != CODEBOOK_SIZE {
            return Err(bad(&format!(
                "centers has shape {:?}, expected [B, 256, D]",
                t.shape
            )));
        }
        let layer = meta
            .get("layer")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("metadata `layer` missing"))?;
        let encode_passes = meta
            .get("encode_passes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        Ok(Self {
            books: Books {
                b: t.shape[0],
                k: t.shape[1],
                d: t.shape[2],
                c: t.data,
            },
            layer,
            encode_passes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Frames drawn from a sum of 4 hidden 256-entry codebooks plus noise: a quantizer with enough
    /// codebooks must reconstruct them far better than the trivial (zero) code, and its error must
    /// fall from the residual k-means init through both phases.
    #[test]
    fn quantizer_learns_direct_sum_structure() {
        let (n, d) = (3000, 16);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let hidden: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                (0..16 * d)
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect()
            })
            .collect();
        let mut x = vec![0f32; n * d];
        for f in 0..n {
            for h in &hidden {
                let k = rng.random_range(0..16);
                for q in 0..d {
                    x[f * d + q] += h[k * d + q];
                }
            }
            for q in 0..d {
                x[f * d + q] += 0.01 * (rng.random::<f32>() - 0.5);
            }
        }
        let cfg = MvqConfig {
            num_codebooks: 2,
            kmeans_iters: 8,
            refine_iters: 3,
            encode_passes: 2,
            ..Default::default()
        };
        let (q, rep) = Quantizer::train(&x, d, &cfg, 0, 7).unwrap();
        assert!(rep.rel_error < rep.rel_error_init + 1e-9, "{rep:?}");
        assert!(rep.rel_error <= rep.rel_error_phase1 + 1e-9, "{rep:?}");
        assert!(rep.rel_error < 0.05, "{rep:?}");
        let codes = q.encode(&x).unwrap();
        assert_eq!(codes.len(), n * 2);
        let e = q.rel_error(&x, &codes);
        assert!(e < 0.1, "encode error {e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.safetensors");
        q.save(&p).unwrap();
        let q2 = Quantizer::load(&p).unwrap();
        assert_eq!(q2, q);
        assert_eq!(q2.encode(&x).unwrap(), codes);
    }
}
