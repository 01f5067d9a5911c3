//! Update compression on the uplink: the client sends `weights - global` as f32, f16, or int8
//! with one f32 scale per tensor. Decoding adds the delta back onto the global weights the server
//! sent, so what the strategy aggregates is exactly what survives the wire.

use serde::{Deserialize, Serialize};

use crate::{FlError, Weights};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Full weights as f32.
    #[default]
    #[serde(alias = "f32")]
    None,
    /// Update delta as IEEE half floats.
    #[serde(alias = "float16")]
    F16,
    /// Update delta as int8 with a per-tensor scale max|delta|/127 (round to nearest).
    Int8,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "f32" => Ok(Self::None),
            "f16" | "float16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            _ => Err(format!("compression {s:?}: expected none, f16 or int8")),
        }
    }
}

/// Encodes client weights against the global weights the client received; returns the payload.
pub fn encode(weights: &Weights, global: &Weights, c: Compression) -> Result<Vec<u8>, FlError> {
    global.check_layout(weights, "client update")?;
    let mut out = Vec::new();
    for (t, g) in weights.tensors.iter().zip(&global.tensors) {
        match c {
            Compression::None => t
                .data
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Compression::F16 => t.data.iter().zip(&g.data).for_each(|(v, b)| {
                out.extend_from_slice(&half::f16::from_f32(v - b).to_le_bytes())
            }),
            Compression::Int8 => {
                let maxabs = t
                    .data
                    .iter()
                    .zip(&g.data)
                    .map(|(v, b)| (v - b).abs())
                    .fold(0f32, f32::max);
                let scale = if maxabs > 0.0 { maxabs / 127.0 } else { 1.0 };
                out.extend_from_slice(&scale.to_le_bytes());
                out.extend(
                    t.data
                        .iter()
                        .zip(&g.data)
                        .map(|(v, b)| ((v - b) / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
        }
    }
    Ok(out)
}

/// Decodes a payload made by `encode` back into weights shaped like `global`.
pub fn decode(payload: &[u8], global: &Weights, c: Compression) -> Result<Weights, FlError> {
    let mut w = global.clone();
    let mut pos = 0usize;
    let short = || FlError::layout("client payload is shorter than the model");
    for t in &mut w.tensors {
        let n = t.data.len();
        match c {
            Compression::None => {
                let b = payload.get(pos..pos + 4 * n).ok_or_else(short)?;
                for (v, c) in t.data.iter_mut().zip(b.chunks_exact(4)) {
                    *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                pos += 4 * n;
            }
            Compression::F16 => {
                let b = payload.get(pos..pos + 2 * n).ok_or_else(short)?;
                for (v, c) in t.data.iter_mut().zip(b.chunks_exact(2)) {
                    *v += half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
                pos += 2 * n;
            }
            Compression::Int8 => {
                let s = payload.get(pos..pos + 4).ok_or_else(short)?;
                let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                let b = payload.get(pos + 4..pos + 4 + n).ok_or_else(short)?;
                for (v, &q) in t.data.iter_mut().zip(b) {
                    *v += (q as i8) as f32 * scale;
                }
                pos += 4 + n;
            }
        }
    }
    if pos != payload.len() {
        return Err(FlError::layout(format!(
            "client payload has {} trailing bytes",
            payload.len() - pos
        )));
    }
    Ok(w)
}
