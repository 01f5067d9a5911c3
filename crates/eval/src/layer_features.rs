//! HuBERT iteration 2's k-means input: the frames of one hidden layer of the iteration-1 model
//! at its 50 Hz frame rate, written as a feature shard like the MFCC one, so `kmeans --feature
//! hubert_L` clusters it as it clusters `mfcc`.
//!
//! fairseq `examples/hubert/simple_kmeans/dump_hubert_feature.py` (v0.12.2): the model's
//! `extract_features(output_layer=L)`, i.e. the output of the L-th transformer layer, which is
//! HF `hidden_states[L]`; the waveform normalised when the task normalises (the layer-norm
//! layout, HuBERT Large); long audio in pieces (fairseq `max_chunk` 1,600,000 samples).

use std::path::Path;

use fedhubert_audio::Manifest;
use fedhubert_features::shard::ShardWriter;
use fedhubert_io::provenance::Provenance;
use fedhubert_model::{FeatExtractNorm, HubertModel};

use crate::EvalError;
use crate::features::{hidden_states_in_pieces, normalize_wave};

/// The shard name of layer `layer`'s features (`client_K/hubert_L.npy` + `.len`).
pub fn layer_feature_stem(layer: usize) -> String {
    format!("hubert_{layer}")
}

/// fairseq's `max_chunk`: audio longer than this runs in pieces.
pub const DEFAULT_CHUNK_SAMPLES: usize = 1_600_000;

/// The model at `path` (a fedhubert checkpoint file, an HF directory or a published fairseq,
/// torchaudio or s3prl checkpoint) and the SHA-256 of its
/// weights file, which the features' provenance records.
pub fn load_feature_model(
    path: &Path,
    device: &fedhubert_model::Device,
) -> Result<(HubertModel, String), EvalError> {
    let spec = crate::UpstreamSpec::from_path(path)?;
    let weights = match &spec {
        crate::UpstreamSpec::HfDir(dir) => dir.join("model.safetensors"),
        _ => path.to_path_buf(),
    };
    let model = crate::load_upstream(&spec, device)?;
    let digest =
        fedhubert_io::provenance::sha256_file(&weights).map_err(|e| EvalError::io(&weights, e))?;
    Ok((model, digest))
}

/// What [`extract_layer_features`] wrote.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerFeaturesSummary {
    pub stem: String,
    pub layer: usize,
    pub dims: usize,
    pub frame_rate: f64,
    pub utterances: usize,
    pub frames: u64,
    pub audio_seconds: f64,
}

/// Which model's which layer, and how to record it.
pub struct LayerSource<'a> {
    pub model: &'a HubertModel,
    /// 0 (the encoder's input) ..= num_hidden_layers.
    pub layer: usize,
    /// The model file's content hash, recorded in the features' provenance.
    pub model_digest: String,
    /// The command that remakes these features, for the provenance record's messages.
    pub made_by: String,
    pub chunk_samples: usize,
}

/// Layer `src.layer`'s frames of every utterance of `manifest` (in its order) into
/// `out_dir/hubert_L.{npy,len}` with its provenance record (manifest, model, layer, 50 Hz).
pub fn extract_layer_features(
    src: &LayerSource,
    manifest: &Manifest,
    manifest_path: &Path,
    out_dir: &Path,
) -> Result<LayerFeaturesSummary, EvalError> {
    let stem = layer_feature_stem(src.layer);
    extract_layer_features_as(src, manifest, manifest_path, out_dir, &stem)
}

/// [`extract_layer_features`] into the shard `out_dir/STEM.{npy,len}` (and
/// `STEM.provenance.json`) instead of `hubert_L`: scratch features that must not replace a
/// client's iteration-2 shard (`fedhubert layers`).
pub fn extract_layer_features_as(
    src: &LayerSource,
    manifest: &Manifest,
    manifest_path: &Path,
    out_dir: &Path,
    stem: &str,
) -> Result<LayerFeaturesSummary, EvalError> {
    let cfg = src.model.config();
    if src.layer > cfg.num_hidden_layers {
        return Err(EvalError::Config(format!(
            "--layer {}: the model has {} transformer layers (0 is the encoder's input)",
            src.layer, cfg.num_hidden_layers
        )));
    }
    let dims = cfg.hidden_size;
    let frame_rate = fedhubert_audio::MODEL_SAMPLE_RATE as f64 / cfg.total_stride() as f64;
    let feature_err = |e: fedhubert_features::FeatureError| EvalError::Config(e.to_string());
    let mut writer = ShardWriter::<f32>::create(out_dir, stem, Some(dims)).map_err(feature_err)?;
    let mut summary = LayerFeaturesSummary {
        stem: stem.to_string(),
        layer: src.layer,
        dims,
        frame_rate,
        utterances: 0,
        frames: 0,
        audio_seconds: 0.0,
    };
    for e in &manifest.entries {
        let audio = manifest.load_entry_audio(e)?;
        let wave = match cfg.feat_extract_norm {
            FeatExtractNorm::Layer => normalize_wave(&audio.samples),
            FeatExtractNorm::Group => audio.samples,
        };
        let frames = if cfg.num_frames(wave.len()) == 0 {
            Vec::new()
        } else {
            let (mut hs, _) = hidden_states_in_pieces(src.model, &wave, src.chunk_samples)
                .map_err(|err| EvalError::Config(format!("utterance {}: {err}", e.id)))?;
            std::mem::take(&mut hs[src.layer].data)
        };
        if frames.iter().any(|v| !v.is_finite()) {
            return Err(EvalError::Diverged(format!(
                "utterance {}: layer {} has non-finite values",
                e.id, src.layer
            )));
        }
        writer.push(&frames).map_err(feature_err)?;
        summary.utterances += 1;
        summary.frames += (frames.len() / dims) as u64;
        summary.audio_seconds += wave.len() as f64 / fedhubert_audio::MODEL_SAMPLE_RATE as f64;
    }
    writer.finish().map_err(feature_err)?;
    record(src, &summary, manifest_path, out_dir)?;
    Ok(summary)
}

/// The features' provenance: the manifest and model they come from, and the rate their labels
/// will run at.
fn record(
    src: &LayerSource,
    s: &LayerFeaturesSummary,
    manifest_path: &Path,
    out_dir: &Path,
) -> Result<(), EvalError> {
    let prov_err = |e: fedhubert_io::provenance::ProvenanceError| EvalError::Config(e.to_string());
    let mut rec = Provenance::new("features", &src.made_by)
        .param("feature", s.stem.as_str())
        .param("layer", s.layer)
        .param("dims", s.dims)
        .param("frame_rate", s.frame_rate);
    rec.inputs.insert("model".into(), src.model_digest.clone());
    if manifest_path.is_file() {
        rec = rec
            .input_file("manifest", manifest_path)
            .map_err(prov_err)?;
    }
    rec.write_for_shard(out_dir, &s.stem).map_err(prov_err)
}
