//! Non-learned acoustic baselines, probed exactly as a HuBERT upstream is (frame features
//! mean-pooled per clip, standardised, linear head): the row every downstream table needs so a
//! learned upstream is compared with what plain acoustics already give.

use serde::{Deserialize, Serialize};

use fedhubert_features::{Mfcc, MfccConfig};

use crate::{EvalError, PooledFeatures};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcousticFeature {
    /// The 39-dim MFCC + deltas + delta-deltas the iteration-1 k-means clusters (fairseq's
    /// `dump_mfcc_feature.py`, torchaudio's Kaldi MFCC), 100 frames a second.
    Mfcc,
    /// 80-dim Kaldi log-mel filterbank (`torchaudio.compliance.kaldi.fbank(num_mel_bins=80)`).
    Fbank,
}

impl AcousticFeature {
    pub fn parse(spec: &str) -> Option<Self> {
        match spec {
            "mfcc" => Some(Self::Mfcc),
            "fbank" => Some(Self::Fbank),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Mfcc => "mfcc (39-dim MFCC + deltas, mean-pooled)",
            Self::Fbank => "fbank (80-dim log-mel, mean-pooled)",
        }
    }

    /// The frame-mean of every clip's features: one "layer" of `dim` values per clip.
    pub fn extract_pooled(self, clips: &[&[f32]]) -> Result<PooledFeatures, EvalError> {
        let cfg = match self {
            Self::Mfcc => MfccConfig::default(),
            Self::Fbank => MfccConfig {
                num_mel_bins: 80,
                ..MfccConfig::default()
            },
        };
        let dim = match self {
            Self::Mfcc => cfg.dim(),
            Self::Fbank => cfg.num_mel_bins,
        };
        let ex = Mfcc::new(cfg);
        let mut data = Vec::with_capacity(clips.len() * dim);
        for (i, c) in clips.iter().enumerate() {
            let frames = ex.num_frames(c.len());
            if frames == 0 {
                return Err(EvalError::Config(format!(
                    "clip {i}: {} samples, shorter than one 25 ms frame",
                    c.len()
                )));
            }
            let f = match self {
                Self::Mfcc => ex.compute(c),
                Self::Fbank => ex.fbank(c),
            };
            let mut mean = vec![0f64; dim];
            for row in f.chunks_exact(dim) {
                mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
            }
            data.extend(mean.iter().map(|m| (m / frames as f64) as f32));
        }
        Ok(PooledFeatures {
            n: clips.len(),
            layers: 1,
            dim,
            data,
        })
    }
}
