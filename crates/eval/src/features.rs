//! The frozen-upstream cache: every hidden layer of every clip, mean-pooled over frames.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use fedhubert_model::{FeatExtractNorm, HubertModel};

use crate::EvalError;

/// Mean-pooled hidden states, `[N, layers, dim]` row-major (`layers` = num_hidden_layers + 1:
/// entry 0 is the encoder input, as HF `hidden_states`).
#[derive(Debug, Clone, PartialEq)]
pub struct PooledFeatures {
    pub n: usize,
    pub layers: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl PooledFeatures {
    /// Layer `l` of clip `i`, `[dim]`.
    pub fn get(&self, i: usize, l: usize) -> &[f32] {
        let o = (i * self.layers + l) * self.dim;
        &self.data[o..o + self.dim]
    }

    /// Layer `l` alone, as a one-layer cache (for per-layer probes).
    pub fn layer(&self, l: usize) -> Self {
        Self {
            n: self.n,
            layers: 1,
            dim: self.dim,
            data: (0..self.n).flat_map(|i| self.get(i, l).to_vec()).collect(),
        }
    }

    /// All layers of clip `i`, `[layers * dim]`.
    pub fn clip(&self, i: usize) -> &[f32] {
        let s = self.layers * self.dim;
        &self.data[i * s..(i + 1) * s]
    }
}

/// Zero mean, unit variance per utterance (HF `do_normalize`, used by layer-norm upstreams).
pub fn normalize_wave(x: &[f32]) -> Vec<f32> {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-7).sqrt();
    x.iter()
        .map(|&v| ((v as f64 - mean) * inv) as f32)
        .collect()
}

/// Runs `model` (frozen, on its own device) over every clip and keeps the frame-mean of each
/// hidden layer. Clips of equal length are batched (up to `batch_size`), so no padding ever
/// enters the conv front-end's GroupNorm or the attention; the result is in input order.
/// Waveforms are normalised per utterance for layer-norm (`do_normalize`) upstreams.
pub fn extract_pooled(
    model: &HubertModel,
    clips: &[&[f32]],
    batch_size: usize,
) -> Result<PooledFeatures, EvalError> {
    let cfg = model.config();
    let (layers, dim) = (cfg.num_hidden_layers + 1, cfg.hidden_size);
    let device = model.masked_spec_embed.device();
    let normalize = cfg.feat_extract_norm == FeatExtractNorm::Layer;
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, c) in clips.iter().enumerate() {
        by_len.entry(c.len()).or_default().push(i);
    }
    let mut data = vec![0f32; clips.len() * layers * dim];
    for (len, idx) in by_len {
        for chunk in idx.chunks(batch_size.max(1)) {
            let b = chunk.len();
            let mut flat = Vec::with_capacity(b * len);
            for &i in chunk {
                if normalize {
                    flat.extend(normalize_wave(clips[i]));
                } else {
                    flat.extend_from_slice(clips[i]);
                }
            }
            let wav = Tensor::<2>::from_data(TensorData::new(flat, [b, len]), &device);
            let out = model.forward(wav, None, None)?;
            if out.hidden_states.len() != layers {
                return Err(EvalError::Config(format!(
                    "upstream returned {} hidden states, expected {layers}",
                    out.hidden_states.len()
                )));
            }
            for (l, h) in out.hidden_states.into_iter().enumerate() {
                let pooled = h
                    .mean_dim(1)
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .map_err(|e| {
                        EvalError::Config(format!("cannot read hidden state {l}: {e:?}"))
                    })?;
                for (k, &i) in chunk.iter().enumerate() {
                    let o = (i * layers + l) * dim;
                    data[o..o + dim].copy_from_slice(&pooled[k * dim..(k + 1) * dim]);
                }
            }
        }
    }
    if data.iter().any(|v| !v.is_finite()) {
        return Err(EvalError::Diverged(
            "upstream produced non-finite hidden states".into(),
        ));
    }
    Ok(PooledFeatures {
        n: clips.len(),
        layers,
        dim,
        data,
    })
}

/// Every hidden state of one utterance, as `transformers`' `HubertModel(input_values,
/// output_hidden_states=True)` returns them: `hidden_states` (`num_hidden_layers + 1` tensors
/// `[1, T, H]`), then `last_hidden_state`. `wave` is used as given (normalise it first for
/// `do_normalize` upstreams).
pub fn hidden_states(
    model: &HubertModel,
    wave: &[f32],
) -> Result<
    (
        Vec<fedhubert_model::HostTensor>,
        fedhubert_model::HostTensor,
    ),
    EvalError,
> {
    let device = model.masked_spec_embed.device();
    let wav = Tensor::<2>::from_data(TensorData::new(wave.to_vec(), [1, wave.len()]), &device);
    let out = model.forward(wav, None, None)?;
    let host = |t: Tensor<3>| -> Result<fedhubert_model::HostTensor, EvalError> {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| EvalError::Config(format!("cannot read a hidden state: {e:?}")))?;
        Ok(fedhubert_model::HostTensor {
            name: String::new(),
            shape,
            data,
        })
    };
    let hs = out
        .hidden_states
        .into_iter()
        .map(host)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((hs, host(out.last_hidden_state)?))
}

/// [`hidden_states`] piece by piece, for audio too long to attend over at once: pieces start
/// every `chunk_samples` (rounded down to a multiple of the conv stride) and reach one
/// receptive field further, so piece k's frames are frames `k*chunk/stride ..` of the whole
/// file and together they are exactly its `num_frames` (as `mvq encode` tiles them). The
/// transformer attends within a piece, so frames near the pieces' edges differ from a
/// whole-file forward; with `chunk_samples` >= the audio this is [`hidden_states`].
pub fn hidden_states_in_pieces(
    model: &HubertModel,
    wave: &[f32],
    chunk_samples: usize,
) -> Result<
    (
        Vec<fedhubert_model::HostTensor>,
        fedhubert_model::HostTensor,
    ),
    EvalError,
> {
    let cfg = model.config();
    let stride = cfg.total_stride();
    let chunk = (chunk_samples / stride).max(1) * stride;
    let span = chunk + cfg.receptive_field() - stride;
    let mut acc: Option<(
        Vec<fedhubert_model::HostTensor>,
        fedhubert_model::HostTensor,
    )> = None;
    for start in (0..wave.len()).step_by(chunk) {
        let piece = &wave[start..(start + span).min(wave.len())];
        if cfg.num_frames(piece.len()) == 0 {
            continue;
        }
        let (hs, last) = hidden_states(model, piece)?;
        acc = Some(match acc {
            None => (hs, last),
            Some((mut all, mut all_last)) => {
                for (a, h) in all.iter_mut().zip(hs) {
                    append_frames(a, h);
                }
                append_frames(&mut all_last, last);
                (all, all_last)
            }
        });
    }
    let want = cfg.num_frames(wave.len());
    match acc {
        Some(a) if a.1.shape[1] == want => Ok(a),
        Some(a) => Err(EvalError::Config(format!(
            "pieces gave {} frames, the whole audio has {want}",
            a.1.shape[1]
        ))),
        None => Err(EvalError::Config(format!(
            "{} samples: too short for one frame ({} needed)",
            wave.len(),
            cfg.receptive_field()
        ))),
    }
}

/// Appends `more`'s frames to `x` (both `[1, T, H]`, row-major: frames are contiguous).
fn append_frames(x: &mut fedhubert_model::HostTensor, more: fedhubert_model::HostTensor) {
    x.shape[1] += more.shape[1];
    x.data.extend(more.data);
}
