//! The frozen teacher: loaded from a fedhubert checkpoint or a HuggingFace export, kept in
//! validation mode on a plain (non-autodiff) device, so it has no gradients and no optimizer state.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use fedhubert_model::{HubertForPretraining, HubertModel, PretrainConfig};

use crate::{DistillError, Result};

/// Teacher outputs of one batch, on the teacher's plain device.
pub struct TeacherOutput {
    /// `hidden_states` (`num_hidden_layers + 1` entries of `[B, T, H]`).
    pub hidden_states: Vec<Tensor<3>>,
    /// Class logits `[B * T, K]` when the teacher has a pretraining head and they were asked for.
    pub logits: Option<Tensor<2>>,
    pub frames: usize,
}

/// A frozen teacher.
#[derive(Clone, Debug)]
pub struct Teacher {
    pub model: HubertForPretraining,
    /// Whether the pretraining head came with the weights (else it is random and output
    /// distillation is refused).
    pub has_head: bool,
    device: Device,
}

impl Teacher {
    /// Loads a published fairseq / torchaudio / s3prl checkpoint (with its pretraining head
    /// when it has one), a fedhubert checkpoint file (`HubertForPretraining::save_checkpoint`) or a HF directory
    /// (`HubertForPretraining::from_hf_dir` when it holds `pretraining_head.safetensors`, else
    /// `HubertModel::from_hf_dir` plus a random head). The teacher lives on the plain version of
    /// `device`, in validation mode (no dropout, no LayerDrop).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let plain = device.clone().without_autodiff();
        let (model, has_head) = if fedhubert_model::published::is_pytorch_file(path) {
            fedhubert_model::published::read_published(path)?.for_pretraining(
                &PretrainConfig::default(),
                0,
                &plain,
            )?
        } else if path.is_file() {
            (HubertForPretraining::load_checkpoint(path, &plain)?, true)
        } else if path.is_dir() {
            if path.join("pretraining_head.safetensors").is_file()
                && path.join("pretraining_config.json").is_file()
            {
                (HubertForPretraining::from_hf_dir(path, &plain)?, true)
            } else if path.join("model.safetensors").is_file() {
                let enc = HubertModel::from_hf_dir(path, &plain)?;
                (
                    HubertForPretraining::with_encoder(enc, &PretrainConfig::default(), 0)?,
                    false,
                )
            } else {
                return Err(DistillError::Data(format!(
                    "{}: neither a fedhubert checkpoint nor a HuggingFace directory (no model.safetensors)",
                    path.display()
                )));
            }
        } else {
            return Err(DistillError::Data(format!(
                "teacher {}: no such file or directory",
                path.display()
            )));
        };
        Ok(Self::from_model(model, has_head))
    }

    /// Wraps an in-memory model (moved to a plain device, validation mode).
    pub fn from_model(model: HubertForPretraining, has_head: bool) -> Self {
        let device = model.hubert.masked_spec_embed.device().without_autodiff();
        let model = model.to_device(&device).valid();
        Self {
            model,
            has_head,
            device,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn num_layers(&self) -> usize {
        self.model.hubert.config.num_hidden_layers
    }

    pub fn hidden_size(&self) -> usize {
        self.model.hubert.config.hidden_size
    }

    pub fn num_params(&self) -> usize {
        fedhubert_model::param_shapes(&self.model)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Forward on equal-length waveforms (host), no mask, no gradients.
    pub fn forward(&self, wavs: &[Vec<f32>], with_logits: bool) -> Result<TeacherOutput> {
        let (b, s) = (wavs.len(), wavs[0].len());
        let flat: Vec<f32> = wavs.iter().flat_map(|w| w.iter().copied()).collect();
        let x = Tensor::<2>::from_data(TensorData::new(flat, [b, s]), &self.device);
        let out = self.model.hubert.forward(x, None, None)?;
        let [_, t, h] = out.last_hidden_state.dims();
        let logits = (with_logits && self.has_head).then(|| {
            self.model
                .logits(out.last_hidden_state.clone().reshape([b * t, h]))
        });
        Ok(TeacherOutput {
            hidden_states: out.hidden_states,
            logits,
            frames: t,
        })
    }
}

/// A teacher tensor copied to the student's (autodiff) device as a constant, its frames cut to `t`.
pub fn to_student<const D: usize>(x: Tensor<D>, device: &Device) -> Tensor<D> {
    Tensor::<D>::from_data(x.into_data(), device)
}

impl Teacher {
    /// Frames of teacher layer `layer` (`hidden_states[layer + 1]`) for quantizer training: each
    /// utterance (cropped to its first `max_samples`) in its own forward, then a random subset of
    /// at most `max_frames` frames (seeded). Returns (`frames * H` values, H).
    pub fn layer_frames(
        &self,
        utts: &[fedhubert_train::Utt],
        layer: usize,
        max_samples: usize,
        max_frames: usize,
        seed: u64,
    ) -> Result<(Vec<f32>, usize)> {
        use rand::SeedableRng;
        use rand::seq::index::sample;
        if layer >= self.num_layers() {
            return Err(crate::cfg_err(format!(
                "distillation.mvq.layer: {layer} >= the teacher's num_hidden_layers {}",
                self.num_layers()
            )));
        }
        let h = self.hidden_size();
        let mut all = Vec::new();
        for u in utts {
            let n = u.wav.len().min(max_samples);
            if n < 400 * 2 {
                continue;
            }
            let out = self.forward(&[u.wav[..n].to_vec()], false)?;
            let x: Vec<f32> = out.hidden_states[layer + 1]
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 data");
            all.extend(x);
        }
        let n = all.len() / h;
        if n <= max_frames {
            return Ok((all, h));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut idx = sample(&mut rng, n, max_frames).into_vec();
        idx.sort_unstable();
        let mut out = Vec::with_capacity(max_frames * h);
        for i in idx {
            out.extend_from_slice(&all[i * h..(i + 1) * h]);
        }
        Ok((out, h))
    }
}
