//! Kaldi-compatible MFCC + deltas: exactly fairseq's HuBERT iteration-1 feature,
//!
//! ```python
//! mfcc = torchaudio.compliance.kaldi.mfcc(waveform, sample_frequency=16000, use_energy=False)  # (T, 13)
//! d1 = torchaudio.functional.compute_deltas(mfcc.T); d2 = torchaudio.functional.compute_deltas(d1)
//! feat = torch.cat([mfcc.T, d1, d2], 0).T                                                    # (T, 39)
//! ```
//!
//! with torchaudio's defaults: 25 ms frames / 10 ms shift with `snip_edges` (T = 1 + (n - 400) / 160),
//! no dither, per-frame DC removal, pre-emphasis 0.97 (`x[i] -= 0.97 x[i-1]`, `x[0] -= 0.97 x[0]`), the
//! povey window (`(0.5 - 0.5 cos(2πi/(N-1)))^0.85`), zero padding to a 512-point FFT, power spectrum,
//! 23 triangular mel filters (Kaldi mel scale `1127 ln(1 + f/700)`, 20 Hz to Nyquist, evaluated on the
//! FFT bin frequencies, Nyquist bin weighted 0), `ln(max(e, f32::EPSILON))`, the first 13 columns of
//! an orthonormal DCT-II whose column 0 is `sqrt(1/23)`, cepstral lifter 22, and regression deltas
//! over ±2 frames with edge replication (denominator 10).
//!
//! Everything that depends only on the configuration (window, mel filters, DCT, lifter, FFT plan) is
//! precomputed in [`Mfcc::new`]; an [`Mfcc`] is `Send + Sync` and is meant to be shared by every
//! thread extracting utterances.

use std::f64::consts::PI;
use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

/// Output dimensions: 13 cepstra, their deltas and delta-deltas.
pub const MFCC_DIM: usize = 39;
/// Frames per second of the feature (10 ms shift).
pub const FRAME_RATE: f64 = 100.0;
/// The exact recipe, recorded next to every shard.
pub const RECIPE: &str = "torchaudio.compliance.kaldi.mfcc(waveform in [-1,1], sample_frequency=16000, \
use_energy=False) defaults (25 ms povey window, 10 ms shift, 23 mel bins, 13 ceps, lifter 22, preemph 0.97, \
dither 0, snip_edges); then torchaudio.functional.compute_deltas twice (win_length 5); concat [mfcc, delta, \
delta2] -> (frames, 39)";

/// The Kaldi / torchaudio options this extractor implements. The defaults are torchaudio's (and so
/// fairseq's); the fields exist so the geometry is explicit, not to emulate every Kaldi switch.
#[derive(Debug, Clone, PartialEq)]
pub struct MfccConfig {
    pub sample_rate: u32,
    /// Frame length in samples (25 ms).
    pub frame_length: usize,
    /// Frame shift in samples (10 ms).
    pub frame_shift: usize,
    pub preemphasis: f32,
    pub num_mel_bins: usize,
    pub num_ceps: usize,
    pub low_freq: f64,
    /// `<= 0` means an offset from Nyquist (torchaudio's convention).
    pub high_freq: f64,
    pub cepstral_lifter: f32,
    /// Regression window of the deltas (torchaudio's `win_length`, odd, >= 3).
    pub delta_win_length: usize,
}

impl Default for MfccConfig {
    fn default() -> Self {
        Self {
            sample_rate: 16_000,
            frame_length: 400,
            frame_shift: 160,
            preemphasis: 0.97,
            num_mel_bins: 23,
            num_ceps: 13,
            low_freq: 20.0,
            high_freq: 0.0,
            cepstral_lifter: 22.0,
            delta_win_length: 5,
        }
    }
}

impl MfccConfig {
    /// Values per output frame: `3 * num_ceps`.
    pub fn dim(&self) -> usize {
        3 * self.num_ceps
    }

    /// Frames of an utterance of `num_samples` samples (`snip_edges`: only whole frames; 0 when
    /// shorter than one frame).
    pub fn num_frames(&self, num_samples: usize) -> usize {
        if num_samples < self.frame_length {
            0
        } else {
            1 + (num_samples - self.frame_length) / self.frame_shift
        }
    }

    /// FFT size: the frame length rounded up to a power of two.
    pub fn fft_size(&self) -> usize {
        self.frame_length.next_power_of_two()
    }
}

/// Precision of the spectral path (framing, FFT, power, mel, log, DCT). f64 costs little here
/// (the FFT is 512 points) and keeps low-energy mel bands exact: in f32, FFT rounding is relative to
/// the frame's total energy, so a band 60-80 dB below the peak carries errors of a few 1e-3 after
/// the log and DCT (torchaudio's own float32 output is off from a float64 run by up to ~6e-3).
type Real = f64;

/// One triangular mel filter, stored sparsely: weights for FFT bins `start..start + weights.len()`.
#[derive(Debug, Clone)]
struct MelFilter {
    start: usize,
    weights: Vec<Real>,
}

/// A configured extractor (precomputed tables + FFT plan). Cheap to share across threads.
pub struct Mfcc {
    cfg: MfccConfig,
    window: Vec<Real>,
    mel: Vec<MelFilter>,
    /// `num_mel_bins x num_ceps`, row-major (torchaudio's layout), lifter folded in.
    dct: Vec<Real>,
    fft: Arc<dyn RealToComplex<Real>>,
}

impl std::fmt::Debug for Mfcc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mfcc")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Default for Mfcc {
    fn default() -> Self {
        Self::new(MfccConfig::default())
    }
}

/// Kaldi's mel scale.
fn mel_scale(f: f64) -> f64 {
    1127.0 * (1.0 + f / 700.0).ln()
}

/// torchaudio's `get_mel_banks` (no VTLN), in float32 like torch, over the `fft_size / 2` bins below
/// Nyquist (the Nyquist bin gets weight 0, as torchaudio pads the bank with a zero column).
fn mel_banks(cfg: &MfccConfig) -> Vec<MelFilter> {
    let n_fft = cfg.fft_size();
    let num_fft_bins = n_fft / 2;
    let sr = cfg.sample_rate as f64;
    let nyquist = 0.5 * sr;
    let high_freq = if cfg.high_freq <= 0.0 {
        cfg.high_freq + nyquist
    } else {
        cfg.high_freq
    };
    assert!(
        0.0 <= cfg.low_freq && cfg.low_freq < high_freq && high_freq <= nyquist,
        "bad mel range {}..{high_freq} Hz",
        cfg.low_freq
    );
    let fft_bin_width = sr / n_fft as f64;
    // Scalars in double (Python floats), tensors in float32, as in torchaudio.
    let mel_low = mel_scale(cfg.low_freq);
    let mel_high = mel_scale(high_freq);
    let delta = (mel_high - mel_low) / (cfg.num_mel_bins + 1) as f64;
    let bin_mel: Vec<f32> = (0..num_fft_bins)
        .map(|i| {
            let f = (fft_bin_width as f32) * i as f32;
            1127.0f32 * (1.0f32 + f / 700.0f32).ln()
        })
        .collect();
    (0..cfg.num_mel_bins)
        .map(|b| {
            let left = (b as f32) * delta as f32 + mel_low as f32;
            let center = ((b as f32) + 1.0) * delta as f32 + mel_low as f32;
            let right = ((b as f32) + 2.0) * delta as f32 + mel_low as f32;
            let w: Vec<f32> = bin_mel
                .iter()
                .map(|&m| {
                    let up = (m - left) / (center - left);
                    let down = (right - m) / (right - center);
                    up.min(down).max(0.0)
                })
                .collect();
            let start = w.iter().position(|&v| v > 0.0).unwrap_or(0);
            let end = w.iter().rposition(|&v| v > 0.0).map_or(start, |e| e + 1);
            // The weights are torch's float32 values, held at the working precision.
            MelFilter {
                start,
                weights: w[start..end].iter().map(|&v| v as Real).collect(),
            }
        })
        .collect()
}

/// torchaudio's `_get_dct_matrix` (orthonormal DCT-II, column 0 set to `sqrt(1/M)`, first `num_ceps`
/// columns) times `_get_lifter_coeffs`, transposed to `num_ceps x num_mel_bins` row-major.
fn dct_lifter(cfg: &MfccConfig) -> Vec<Real> {
    let m = cfg.num_mel_bins;
    let l = cfg.cepstral_lifter as f64;
    // torch computes the lifter in float32.
    let lift = |k: usize| {
        if l != 0.0 {
            (1.0f32 + 0.5f32 * l as f32 * ((PI * k as f64 / l) as f32).sin()) as f64
        } else {
            1.0
        }
    };
    let mut out = Vec::with_capacity(cfg.num_ceps * m);
    for n in 0..m {
        for k in 0..cfg.num_ceps {
            let c = if k == 0 {
                (1.0 / m as f64).sqrt()
            } else {
                (PI / m as f64 * (n as f64 + 0.5) * k as f64).cos() * (2.0 / m as f64).sqrt()
            };
            out.push((c * lift(k)) as Real);
        }
    }
    out
}

/// Reusable per-thread buffers of [`Mfcc::compute_into`].
pub struct MfccScratch {
    frame: Vec<Real>,
    spectrum: Vec<Complex<Real>>,
    fft_scratch: Vec<Complex<Real>>,
    power: Vec<Real>,
    logmel: Vec<Real>,
    ceps: Vec<f32>,
    acc: Vec<Real>,
}

impl Mfcc {
    pub fn new(cfg: MfccConfig) -> Self {
        assert!(
            cfg.frame_length > 0 && cfg.frame_shift > 0,
            "frame length and shift must be positive"
        );
        assert!(
            cfg.num_ceps <= cfg.num_mel_bins,
            "num_ceps must be <= num_mel_bins"
        );
        assert!(
            cfg.delta_win_length >= 3 && cfg.delta_win_length % 2 == 1,
            "delta window must be odd >= 3"
        );
        let n = cfg.frame_length;
        // torch.hann_window(n, periodic=False).pow(0.85), computed in float32 by torch.
        let window = (0..n)
            .map(|i| {
                let a = 2.0 * PI / (n as f64 - 1.0);
                (0.5 - 0.5 * (a * i as f64).cos()).powf(0.85) as Real
            })
            .collect();
        let mel = mel_banks(&cfg);
        let dct = dct_lifter(&cfg);
        let fft = RealFftPlanner::<Real>::new().plan_fft_forward(cfg.fft_size());
        Self {
            cfg,
            window,
            mel,
            dct,
            fft,
        }
    }

    pub fn config(&self) -> &MfccConfig {
        &self.cfg
    }

    /// Output values per frame (39 with the defaults).
    pub fn dim(&self) -> usize {
        self.cfg.dim()
    }

    /// Frames produced for `num_samples` input samples.
    pub fn num_frames(&self, num_samples: usize) -> usize {
        self.cfg.num_frames(num_samples)
    }

    /// Fresh buffers for [`Mfcc::compute_into`] / [`Mfcc::mfcc_into`].
    pub fn scratch(&self) -> MfccScratch {
        let n_fft = self.cfg.fft_size();
        MfccScratch {
            frame: vec![0.0; n_fft],
            spectrum: vec![Complex::default(); n_fft / 2 + 1],
            fft_scratch: self.fft.make_scratch_vec(),
            power: vec![0.0; n_fft / 2 + 1],
            logmel: vec![0.0; self.cfg.num_mel_bins],
            ceps: Vec::new(),
            acc: vec![0.0; self.cfg.num_ceps],
        }
    }

    /// The 39-dim feature (`frames x 39`, row-major: 13 cepstra, 13 deltas, 13 delta-deltas) of a
    /// mono 16 kHz waveform in [-1, 1]. Empty when shorter than one frame (400 samples).
    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        self.compute_into(samples, &mut self.scratch(), &mut out);
        out
    }

    /// [`Mfcc::compute`] into `out` (cleared first), reusing `scratch`.
    pub fn compute_into(&self, samples: &[f32], scratch: &mut MfccScratch, out: &mut Vec<f32>) {
        let nc = self.cfg.num_ceps;
        let mut ceps = std::mem::take(&mut scratch.ceps);
        self.mfcc_into(samples, scratch, &mut ceps);
        let frames = ceps.len() / nc;
        let dim = 3 * nc;
        out.clear();
        out.resize(frames * dim, 0.0);
        let half = (self.cfg.delta_win_length - 1) / 2;
        // Static cepstra into columns 0..nc, deltas of them into nc..2nc, deltas of those into 2nc..3nc.
        for (t, row) in ceps.chunks_exact(nc).enumerate() {
            out[t * dim..t * dim + nc].copy_from_slice(row);
        }
        deltas_strided(out, frames, dim, 0, nc, nc, half);
        deltas_strided(out, frames, dim, nc, 2 * nc, nc, half);
        scratch.ceps = ceps;
    }

    /// The 13 static cepstra only (`frames x 13`): `torchaudio.compliance.kaldi.mfcc` itself.
    pub fn mfcc(&self, samples: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        self.mfcc_into(samples, &mut self.scratch(), &mut out);
        out
    }

    /// [`Mfcc::mfcc`] into `out` (cleared first), reusing `scratch`.
    pub fn mfcc_into(&self, samples: &[f32], scratch: &mut MfccScratch, out: &mut Vec<f32>) {
        let cfg = &self.cfg;
        let frames = cfg.num_frames(samples.len());
        let nc = cfg.num_ceps;
        out.clear();
        out.resize(frames * nc, 0.0);
        for (t, row) in out.chunks_exact_mut(nc).enumerate() {
            self.logmel_frame(self.frame_of(samples, t), scratch);
            // DCT as a sum of columns scaled by each log-mel value: num_ceps independent
            // accumulators (vectorizes) instead of num_ceps serial dot products.
            let MfccScratch { logmel, acc, .. } = &mut *scratch;
            acc.fill(0.0);
            for (&lm, col) in logmel.iter().zip(self.dct.chunks_exact(nc)) {
                for (a, &d) in acc.iter_mut().zip(col) {
                    *a += d * lm;
                }
            }
            for (c, &a) in row.iter_mut().zip(acc.iter()) {
                *c = a as f32;
            }
        }
    }

    /// Kaldi log mel filterbank energies (`torchaudio.compliance.kaldi.fbank` with this
    /// config's framing and `num_mel_bins`), `[frames * num_mel_bins]` row-major.
    pub fn fbank(&self, samples: &[f32]) -> Vec<f32> {
        let mut scratch = self.scratch();
        let nm = self.cfg.num_mel_bins;
        let frames = self.cfg.num_frames(samples.len());
        let mut out = Vec::with_capacity(frames * nm);
        for t in 0..frames {
            self.logmel_frame(self.frame_of(samples, t), &mut scratch);
            out.extend(scratch.logmel.iter().map(|&v| v as f32));
        }
        out
    }

    /// The samples of frame `t` (snip_edges: frames lie wholly inside the signal).
    fn frame_of<'a>(&self, samples: &'a [f32], t: usize) -> &'a [f32] {
        let o = t * self.cfg.frame_shift;
        &samples[o..o + self.cfg.frame_length]
    }

    /// The log mel energies of one frame into `scratch.logmel`: DC removal, pre-emphasis (Kaldi:
    /// x[0] -= pre * x[0]), window, zero padding, power spectrum, mel filters, log.
    fn logmel_frame(&self, x: &[f32], scratch: &mut MfccScratch) {
        let MfccScratch {
            frame,
            spectrum,
            fft_scratch,
            power,
            logmel,
            ..
        } = scratch;
        let len = self.cfg.frame_length;
        let mean = sum_real(x) * (1.0 / len as Real);
        let pre = self.cfg.preemphasis as Real;
        let (head, tail) = frame.split_at_mut(len);
        head[0] = (x[0] as Real - mean) * (1.0 - pre) * self.window[0];
        for i in 1..len {
            head[i] = ((x[i] as Real - mean) - pre * (x[i - 1] as Real - mean)) * self.window[i];
        }
        tail.fill(0.0);
        self.fft
            .process_with_scratch(frame, spectrum, fft_scratch)
            .expect("fft buffer sizes are fixed");
        for (p, c) in power.iter_mut().zip(spectrum.iter()) {
            *p = c.re * c.re + c.im * c.im;
        }
        for (lm, filt) in logmel.iter_mut().zip(&self.mel) {
            let p = &power[filt.start..filt.start + filt.weights.len()];
            let e = dot(p, &filt.weights);
            *lm = e.max(f32::EPSILON as Real).ln();
        }
    }
}

/// Dot product with 4 independent accumulators (breaks the add latency chain).
fn dot(a: &[Real], b: &[Real]) -> Real {
    let mut acc = [0.0 as Real; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Sum with 8 independent accumulators (vectorizes).
fn sum_real(x: &[f32]) -> Real {
    let mut acc = [0.0 as Real; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k] as Real;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rest {
        s += v as Real;
    }
    s
}

/// `torchaudio.functional.compute_deltas` along time for columns `src..src+n` of a `frames x dim`
/// row-major matrix, written to columns `dst..dst+n`: `d[t] = Σ_{k=1..N} k (x[t+k] - x[t-k]) / (2 Σ k²)`
/// with the time index clamped to `[0, frames)` (replicate padding).
fn deltas_strided(
    m: &mut [f32],
    frames: usize,
    dim: usize,
    src: usize,
    dst: usize,
    n: usize,
    half: usize,
) {
    debug_assert!(src + n <= dim && dst + n <= dim && (src + n <= dst || dst + n <= src));
    if frames == 0 {
        return;
    }
    let denom: f32 = (2 * (1..=half).map(|k| k * k).sum::<usize>()) as f32;
    let last = frames as isize - 1;
    let mut acc = vec![0.0f32; n];
    for t in 0..frames {
        acc.fill(0.0);
        // Same summation order as torch's conv1d with the kernel [-N, ..., N].
        for k in -(half as isize)..=(half as isize) {
            let tt = (t as isize + k).clamp(0, last) as usize;
            let x = &m[tt * dim + src..tt * dim + src + n];
            let kf = k as f32;
            for (a, v) in acc.iter_mut().zip(x) {
                *a += kf * v;
            }
        }
        for (o, a) in m[t * dim + dst..t * dim + dst + n].iter_mut().zip(&acc) {
            *o = a / denom;
        }
    }
}

/// `torchaudio.functional.compute_deltas(x, win_length)` for a `frames x dim` row-major matrix,
/// along the frame (time) axis.
pub fn compute_deltas(x: &[f32], dim: usize, win_length: usize) -> Vec<f32> {
    assert!(
        win_length >= 3 && win_length % 2 == 1,
        "win_length must be odd >= 3"
    );
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "input is not a whole number of {dim}-dim frames"
    );
    let frames = x.len() / dim;
    let mut m = vec![0.0f32; frames * 2 * dim];
    for t in 0..frames {
        m[t * 2 * dim..t * 2 * dim + dim].copy_from_slice(&x[t * dim..(t + 1) * dim]);
    }
    deltas_strided(&mut m, frames, 2 * dim, 0, dim, dim, (win_length - 1) / 2);
    m.chunks_exact(2 * dim)
        .flat_map(|r| r[dim..].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_count_follows_snip_edges() {
        let c = MfccConfig::default();
        assert_eq!(c.num_frames(399), 0);
        assert_eq!(c.num_frames(400), 1);
        assert_eq!(c.num_frames(559), 1);
        assert_eq!(c.num_frames(560), 2);
        assert_eq!(c.num_frames(166_960), 1042);
        assert_eq!(c.fft_size(), 512);
        let m = Mfcc::default();
        assert!(m.compute(&[0.1; 399]).is_empty());
        assert_eq!(m.compute(&vec![0.1; 16_000]).len(), 98 * 39);
    }

    #[test]
    fn mel_filters_are_triangles_inside_the_band() {
        let m = Mfcc::default();
        assert_eq!(m.mel.len(), 23);
        for (i, f) in m.mel.iter().enumerate() {
            assert!(!f.weights.is_empty(), "filter {i} is empty");
            assert!(
                f.start + f.weights.len() <= 256,
                "the Nyquist bin must have weight 0"
            );
            assert!(f.weights.iter().all(|&w| (0.0..=1.0).contains(&w)));
        }
        // Lowest filter starts above 20 Hz (bin width 31.25 Hz), filters are ordered.
        assert!(m.mel[0].start >= 1);
        assert!(m.mel.windows(2).all(|w| w[0].start <= w[1].start));
    }

    #[test]
    fn deltas_match_a_hand_computation() {
        // One coefficient over 4 frames: x = [0, 1, 4, 9], padded [0, 0, 0, 1, 4, 9, 9, 9].
        let d = compute_deltas(&[0.0, 1.0, 4.0, 9.0], 1, 5);
        // t=0: (-2*0 - 1*0 + 1*1 + 2*4)/10 = 0.9; t=1: (-2*0 -0 + 4 + 18)/10 = 2.2
        // t=2: (-0 - 1 + 9 + 18)/10 = 2.6;       t=3: (-2 - 4 + 9 + 18)/10 = 2.1
        let want = [0.9, 2.2, 2.6, 2.1];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{d:?}");
        }
    }

    #[test]
    fn silence_hits_the_log_floor() {
        let m = Mfcc::default();
        let f = m.compute(&vec![0.0; 800]);
        assert_eq!(f.len(), 3 * 39);
        // All log-mel energies are ln(eps): c0 = sqrt(23) ln(eps) * lifter(0)=1, others ~0, deltas 0.
        let c0 = (23f32).sqrt() * f32::EPSILON.ln();
        assert!((f[0] - c0).abs() < 1e-3, "{} vs {c0}", f[0]);
        assert!(f[1..13].iter().all(|v| v.abs() < 1e-3));
        assert!(f[13..39].iter().all(|v| v.abs() < 1e-4), "{:?}", &f[..39]);
    }
}
