//! Span masking with fairseq `compute_mask_indices` semantics (static spans, overlap allowed).

use burn::tensor::{Bool, Device, Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::HubertConfig;

/// Parameters of [`compute_mask_indices`].
///
/// The arguments of fairseq `compute_mask_indices` (fairseq
/// 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/data/data_utils.py:L399) that HuBERT
/// sets: `mask_prob` / `mask_length` from fairseq `HubertConfig` (fairseq/models/hubert/hubert.py:
/// L132, L131), `min_masks=2` as passed by `HubertModel.apply_mask` (same file:L354).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskConfig {
    /// Expected fraction of frames that *start* a span, times `mask_length` (fairseq
    /// `mask_prob`, 0.80 for HuBERT).
    pub mask_prob: f64,
    /// Span length (10).
    pub mask_length: usize,
    /// Minimum number of spans per utterance (2).
    pub min_masks: usize,
    /// fairseq `require_same_masks` (default true): every utterance of the batch keeps the same
    /// number of masked frames (the batch minimum, by random subsampling).
    pub require_same_masks: bool,
}

impl MaskConfig {
    /// HuBERT pretraining defaults: 0.80, 10, 2 spans, same counts.
    pub fn hubert() -> Self {
        Self {
            mask_prob: 0.8,
            mask_length: 10,
            min_masks: 2,
            require_same_masks: true,
        }
    }

    /// From the HF fields `mask_time_prob`, `mask_time_length`, `mask_time_min_masks`
    /// (transformers v5.23.0, src/transformers/models/hubert/configuration_hubert.py:L150-L152).
    pub fn from_config(cfg: &HubertConfig) -> Self {
        Self {
            mask_prob: cfg.mask_time_prob,
            mask_length: cfg.mask_time_length,
            min_masks: cfg.mask_time_min_masks,
            require_same_masks: true,
        }
    }
}

/// fairseq `compute_mask_indices(shape=(B, T), padding_mask, mask_prob, mask_length, "static",
/// min_masks=..., no_overlap=False)`.
///
/// `frame_lengths`: valid frames per utterance (`None` = no padding mask, then one span count is
/// drawn for the whole batch, as fairseq does). Returns `B` rows of `T` booleans (true = masked).
/// Span count per utterance is `int(mask_prob * len / mask_length + U[0,1))`, at least
/// `min_masks`; span starts are drawn without replacement from `len - mask_length` positions
/// and spans may overlap.
///
/// Mirrors fairseq `compute_mask_indices` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/data/data_utils.py:L399) as called by `HubertModel.apply_mask`
/// (fairseq/models/hubert/hubert.py:L344). Not transformers' `_compute_mask_indices`
/// (transformers v5.23.0, src/transformers/models/hubert/modeling_hubert.py:L640), which samples
/// differently (one rounding draw per batch, starts from `len - mask_length + 1` positions, no
/// `require_same_masks`).
pub fn compute_mask_indices<R: Rng + ?Sized>(
    batch_size: usize,
    num_frames: usize,
    frame_lengths: Option<&[usize]>,
    cfg: &MaskConfig,
    rng: &mut R,
) -> Vec<Vec<bool>> {
    let mut mask = vec![vec![false; num_frames]; batch_size];
    if batch_size == 0 || num_frames == 0 || cfg.mask_prob <= 0.0 || cfg.mask_length == 0 {
        return mask;
    }
    let draw = |sz: usize, rng: &mut R| -> usize {
        let n = (cfg.mask_prob * sz as f64 / cfg.mask_length as f64 + rng.random::<f64>()) as usize;
        n.max(cfg.min_masks)
    };
    let all_num_mask = draw(num_frames, rng);

    let mut per_utt: Vec<Vec<usize>> = Vec::with_capacity(batch_size);
    for i in 0..batch_size {
        let (sz, num_mask) = match frame_lengths {
            Some(l) => {
                let sz = l[i].min(num_frames);
                (sz, draw(sz, rng))
            }
            None => (num_frames, all_num_mask),
        };
        if sz == 0 || num_mask == 0 {
            per_utt.push(Vec::new());
            continue;
        }
        let mut min_len = cfg.mask_length as i64;
        if sz as i64 - min_len <= num_mask as i64 {
            min_len = sz as i64 - num_mask as i64 - 1;
        }
        let population = (sz as i64 - min_len).max(1) as usize;
        let num_mask = num_mask.min(population);
        let starts = rand::seq::index::sample(rng, population, num_mask).into_vec();
        let mut covered = vec![false; sz];
        for s in starts {
            covered[s..(s + cfg.mask_length).min(sz)].fill(true);
        }
        per_utt.push((0..sz).filter(|&t| covered[t]).collect());
    }

    let min_count = per_utt.iter().map(Vec::len).min().unwrap_or(0);
    for (row, mut idc) in mask.iter_mut().zip(per_utt) {
        if cfg.require_same_masks && idc.len() > min_count {
            let keep = rand::seq::index::sample(rng, idc.len(), min_count).into_vec();
            idc = keep.into_iter().map(|k| idc[k]).collect();
        }
        for t in idc {
            row[t] = true;
        }
    }
    mask
}

/// `B x T` booleans to a `[B, T]` Bool tensor.
pub fn mask_to_tensor(mask: &[Vec<bool>], device: &Device) -> Tensor<2, Bool> {
    let b = mask.len();
    let t = mask.first().map_or(0, Vec::len);
    let data: Vec<bool> = mask.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(data, [b, t]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// ln C(n, k) from a table of ln m!.
    fn ln_choose(lf: &[f64], n: usize, k: usize) -> f64 {
        if k > n {
            return f64::NEG_INFINITY;
        }
        lf[n] - lf[k] - lf[n - k]
    }

    /// Exact expected masked fraction of a T-frame utterance under fairseq semantics
    /// (0.8, span 10, 2 min): k starts without replacement from N = T - 10 positions; frame t
    /// is covered unless none of the w_t starts that cover it is drawn.
    fn expected_fraction(t: usize) -> f64 {
        let mut lf = vec![0.0f64; t + 1];
        for m in 1..=t {
            lf[m] = lf[m - 1] + (m as f64).ln();
        }
        let x = 0.8 * t as f64 / 10.0;
        let (k0, p1) = (x.floor() as usize, x - x.floor());
        let n = t - 10;
        let mut e = 0.0;
        for (k, p) in [(k0.max(2), 1.0 - p1), ((k0 + 1).max(2), p1)] {
            let mut covered = 0.0;
            for f in 0..t {
                let lo = f.saturating_sub(9);
                let hi = f.min(n - 1);
                let w = if hi >= lo { hi - lo + 1 } else { 0 };
                let p_none = (ln_choose(&lf, n - w, k) - ln_choose(&lf, n, k)).exp();
                covered += 1.0 - p_none;
            }
            e += p * covered / t as f64;
        }
        e
    }

    #[test]
    fn masked_fraction_matches_fairseq_expectation() {
        let cfg = MaskConfig::hubert();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut masked, mut total, mut expected) = (0usize, 0usize, 0.0f64);
        let table: Vec<f64> = (0..=400)
            .map(|t| if t >= 100 { expected_fraction(t) } else { 0.0 })
            .collect();
        let n_utts = 4000;
        for i in 0..n_utts {
            let t = 100 + (i * 37) % 301; // 100..=400 frames
            let m = compute_mask_indices(1, t, Some(&[t]), &cfg, &mut rng);
            masked += m[0].iter().filter(|&&b| b).count();
            total += t;
            expected += table[t] * t as f64;
        }
        let frac = masked as f64 / total as f64;
        let exp = expected / total as f64;
        println!("masked fraction {frac:.4}, fairseq expectation {exp:.4}");
        assert!((0.5..0.62).contains(&exp), "expectation {exp}");
        // Std of the empirical fraction over ~1e6 frames is well under 0.002.
        assert!(
            (frac - exp).abs() < 0.004,
            "empirical {frac} vs expected {exp}"
        );
        let e250 = expected_fraction(250);
        assert!((0.55..0.6).contains(&e250), "T=250 expectation {e250}");
    }

    #[test]
    fn spans_respect_lengths_and_same_counts() {
        let cfg = MaskConfig::hubert();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let lens = [200, 120, 57];
        let m = compute_mask_indices(3, 200, Some(&lens), &cfg, &mut rng);
        let counts: Vec<usize> = m.iter().map(|r| r.iter().filter(|&&b| b).count()).collect();
        assert!(
            counts.iter().all(|&c| c == counts[0] && c > 0),
            "{counts:?}"
        );
        for (row, &len) in m.iter().zip(&lens) {
            assert!(row[len..].iter().all(|&b| !b), "mask in padding");
        }
        // Deterministic in the seed.
        let mut rng2 = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(
            m,
            compute_mask_indices(3, 200, Some(&lens), &cfg, &mut rng2)
        );
    }

    #[test]
    fn min_masks_and_contiguous_spans() {
        let cfg = MaskConfig {
            mask_prob: 0.0001,
            ..MaskConfig::hubert()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = compute_mask_indices(1, 300, None, &cfg, &mut rng);
        let c = m[0].iter().filter(|&&b| b).count();
        // Two spans of 10, possibly overlapping.
        assert!((10..=20).contains(&c), "{c}");
        // Every maximal run has length >= 10 (spans never truncated: starts < T - 10).
        let mut run = 0;
        for &b in m[0].iter().chain([false].iter()) {
            if b {
                run += 1;
            } else {
                assert!(run == 0 || run >= 10, "run {run}");
                run = 0;
            }
        }
    }
}
