//! scikit-learn's `MiniBatchKMeans.fit` (as called by fairseq's HuBERT `learn_kmeans.py`), streaming.
//!
//! 1. `init_size = min(3 * batch_size, n)` (unless given); a validation sample of `init_size` rows is
//!    drawn once; each of the `n_init` restarts seeds k-means++ on its own fresh sample of `init_size`
//!    rows; the restart with the lowest inertia on the validation sample wins.
//! 2. `n_steps = max_iter * n / batch_size` mini-batch steps; each draws `batch_size` rows with
//!    replacement, assigns them, and moves every hit centre with its own learning rate
//!    `c += (mean_batch - c) * batch_count / total_count` (`_mini_batch_step`).
//! 3. Early stop when the exponentially weighted average of the per-row batch inertia has not improved
//!    for `max_no_improvement` steps (`_mini_batch_convergence`; tol = 0, no reassignment).
//! 4. A final pass over all frames gives the inertia and cluster sizes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::codebook::Codebook;
use crate::kernel::{Packed, assign};
use crate::kmeanspp::kmeans_plusplus;
use crate::source::FrameSource;
use crate::{KmError, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MiniBatchConfig {
    pub k: usize,
    pub batch_size: usize,
    /// Passes over the data (sklearn semantics).
    pub max_iter: usize,
    pub n_init: usize,
    /// Default `3 * batch_size`, capped by the number of frames.
    pub init_size: Option<usize>,
    /// `None` disables early stopping.
    pub max_no_improvement: Option<usize>,
    pub seed: u64,
}

impl Default for MiniBatchConfig {
    fn default() -> Self {
        // fairseq simple_kmeans/learn_kmeans.py defaults.
        Self {
            k: 100,
            batch_size: 10000,
            max_iter: 100,
            n_init: 20,
            init_size: None,
            max_no_improvement: Some(100),
            seed: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MiniBatchFit {
    pub codebook: Codebook,
    /// Sum of squared distances of every frame to its nearest centroid (final pass).
    pub inertia: f64,
    pub n_frames: usize,
    /// Mini-batch steps run, and passes over the data they amount to (sklearn `n_steps_`, `n_iter_`).
    pub n_steps: usize,
    pub n_iter: usize,
    /// Frames per cluster in the final pass.
    pub counts: Vec<u64>,
    /// Inertia of the chosen k-means++ init on the validation sample.
    pub init_inertia: f64,
}

#[derive(Clone, Debug)]
pub struct Evaluation {
    pub inertia: f64,
    pub n_frames: usize,
    pub counts: Vec<u64>,
}

impl Evaluation {
    pub fn mean_inertia(&self) -> f64 {
        self.inertia / self.n_frames.max(1) as f64
    }
    pub fn empty_clusters(&self) -> usize {
        self.counts.iter().filter(|&&c| c == 0).count()
    }
}

/// One pass over all frames: inertia and cluster sizes.
pub fn evaluate(src: &dyn FrameSource, codebook: &Codebook) -> Result<Evaluation> {
    if src.dim() != codebook.dim {
        return Err(KmError::Invalid(format!(
            "frames are {}-dim, codebook is {}-dim",
            src.dim(),
            codebook.dim
        )));
    }
    let p = codebook.packed();
    let mut counts = vec![0u64; codebook.k];
    let mut inertia = 0f64;
    let mut n = 0;
    let (mut l, mut dd) = (Vec::new(), Vec::new());
    src.for_each_chunk(&mut |_, x| {
        let m = x.len() / p.d;
        l.resize(m, 0);
        dd.resize(m, 0.0);
        assign(&p, x, &mut l, &mut dd);
        for (&li, &di) in l.iter().zip(&dd) {
            counts[li as usize] += 1;
            inertia += di as f64;
        }
        n += m;
        Ok(())
    })?;
    Ok(Evaluation {
        inertia,
        n_frames: n,
        counts,
    })
}

fn sample_rows(
    src: &dyn FrameSource,
    m: usize,
    rng: &mut ChaCha8Rng,
    out: &mut Vec<f32>,
) -> Result<()> {
    let n = src.n_frames();
    let mut idx: Vec<usize> = (0..m).map(|_| rng.random_range(0..n)).collect();
    // Row order does not change a mini-batch step (or k-means++ beyond tie-breaking); sorted reads are
    // cache- and disk-friendly and make every source give identical results.
    idx.sort_unstable();
    src.gather(&idx, out)
}

fn sample_rows_all(src: &dyn FrameSource, out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    src.for_each_chunk(&mut |_, x| {
        out.extend_from_slice(x);
        Ok(())
    })
}

pub fn fit_minibatch(src: &dyn FrameSource, cfg: &MiniBatchConfig) -> Result<MiniBatchFit> {
    let n = src.n_frames();
    let d = src.dim();
    let k = cfg.k;
    if k == 0 || cfg.batch_size == 0 || cfg.n_init == 0 {
        return Err(KmError::Invalid(
            "k, batch_size and n_init must be positive".into(),
        ));
    }
    if n < k {
        return Err(KmError::Invalid(format!(
            "k = {k} clusters but only {n} frames"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let batch = cfg.batch_size.min(n);
    let init_size = cfg.init_size.unwrap_or(3 * cfg.batch_size).min(n).max(k);

    let mut valid = Vec::new();
    sample_rows(src, init_size, &mut rng, &mut valid)?;
    let mut sample = Vec::new();
    let (mut l, mut dd) = (vec![0u32; init_size], vec![0f32; init_size]);
    let mut best: Option<(f64, Vec<f32>)> = None;
    for r in 0..cfg.n_init {
        if init_size < n {
            sample_rows(src, init_size, &mut rng, &mut sample)?;
        } else if sample.is_empty() {
            // sklearn seeds on the whole data when init_size >= n.
            sample_rows_all(src, &mut sample)?;
        }
        let c = kmeans_plusplus(&sample, None, d, k, &mut rng);
        assign(&Packed::new(&c, k, d), &valid, &mut l, &mut dd);
        let inertia: f64 = dd.iter().map(|&v| v as f64).sum();
        tracing::debug!(init = r, inertia, "k-means++ restart");
        if best.as_ref().is_none_or(|b| inertia < b.0) {
            best = Some((inertia, c));
        }
    }
    let (init_inertia, mut centers) = best.unwrap();
    drop((valid, sample));

    let n_steps = (cfg.max_iter * n / batch).max(1);
    let mut totals = vec![0f64; k];
    let mut sums = vec![0f64; k * d];
    let mut bcount = vec![0f64; k];
    let (mut l, mut dd) = (vec![0u32; batch], vec![0f32; batch]);
    let mut xb = Vec::new();
    let (mut ewa, mut ewa_min): (Option<f64>, Option<f64>) = (None, None);
    let mut no_improvement = 0;
    let mut steps_run = 0;
    for step in 0..n_steps {
        sample_rows(src, batch, &mut rng, &mut xb)?;
        assign(&Packed::new(&centers, k, d), &xb, &mut l, &mut dd);
        let batch_inertia: f64 = dd.iter().map(|&v| v as f64).sum();
        sums.fill(0.0);
        bcount.fill(0.0);
        for (i, &li) in l.iter().enumerate() {
            let li = li as usize;
            bcount[li] += 1.0;
            for (s, &x) in sums[li * d..(li + 1) * d]
                .iter_mut()
                .zip(&xb[i * d..(i + 1) * d])
            {
                *s += x as f64;
            }
        }
        for j in 0..k {
            if bcount[j] > 0.0 {
                let old = totals[j];
                totals[j] += bcount[j];
                for f in 0..d {
                    let c = &mut centers[j * d + f];
                    *c = ((*c as f64 * old + sums[j * d + f]) / totals[j]) as f32;
                }
            }
        }
        steps_run = step + 1;
        // sklearn _mini_batch_convergence (the first step is ignored).
        if step == 0 {
            continue;
        }
        let bi = batch_inertia / batch as f64;
        ewa = Some(match ewa {
            None => bi,
            Some(e) => {
                let alpha = (batch as f64 * 2.0 / (n as f64 + 1.0)).min(1.0);
                e * (1.0 - alpha) + bi * alpha
            }
        });
        if ewa_min.is_none_or(|m| ewa.unwrap() < m) {
            no_improvement = 0;
            ewa_min = ewa;
        } else {
            no_improvement += 1;
        }
        if cfg.max_no_improvement.is_some_and(|m| no_improvement >= m) {
            tracing::debug!(step, "mini-batch k-means: no improvement, stopping early");
            break;
        }
    }
    let codebook = Codebook::new(k, d, centers)?;
    let ev = evaluate(src, &codebook)?;
    Ok(MiniBatchFit {
        codebook,
        inertia: ev.inertia,
        n_frames: ev.n_frames,
        n_steps: steps_run,
        n_iter: (steps_run * batch).div_ceil(n),
        counts: ev.counts,
        init_inertia,
    })
}
