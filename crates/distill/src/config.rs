//! Distillation settings (`distillation:` section of the run YAML) and the run file that adds
//! them to the pretraining run file's `federated:` and `pretraining:` sections.

use std::path::{Path, PathBuf};

use fedhubert_fl::PrivacyConfig;
use fedhubert_train::RunFile;
use fedhubert_train::config::{self, FederatedSection, PretrainingSection};
use serde::{Deserialize, Serialize};

use crate::{Result, cfg_err};

/// Which federated distillation method runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Clients pretrain; the server distils after aggregation (seed 000).
    Server,
    /// Clients distil from their own frozen teacher copy (seed 001).
    Client,
    /// Clients predict multi-codebook VQ indexes of the teacher's embeddings (seed 004).
    Mvq,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "server" => Ok(Mode::Server),
            "client" => Ok(Mode::Client),
            "mvq" => Ok(Mode::Mvq),
            o => Err(format!("mode {o:?}: expected server, client or mvq")),
        }
    }
}

/// How the student starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StudentInit {
    /// Fresh initialisation.
    Random,
    /// DistilHuBERT: conv front-end, feature projection, positional conv and the first
    /// `init_layers` transformer layers copied from the teacher where the shapes match.
    Teacher,
}

/// Multi-codebook VQ settings (icefall `multi_quantization`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MvqConfig {
    /// Teacher layer whose output is quantized (`hidden_states[layer + 1]`); default: the last.
    pub layer: Option<usize>,
    /// Codebooks B (bytes per frame); each has 256 entries.
    pub num_codebooks: usize,
    /// Scale of the codebook cross-entropy inside the distillation loss.
    pub loss_scale: f64,
    /// Lloyd iterations of the residual k-means that initialises each 16-entry codebook.
    pub kmeans_iters: usize,
    /// Alternating greedy re-encoding / least-squares centre passes per phase.
    pub refine_iters: usize,
    /// Greedy refinement passes when encoding.
    pub encode_passes: usize,
    /// Frames used to train the quantizer at most (random subset).
    pub max_frames: usize,
    /// Precomputed codes in each client folder (`STEM.u8` + `STEM.len`, from `fedhubert mvq
    /// encode --stem STEM`): the clients then never run the teacher. Empty: clients compute the
    /// codes from the frozen teacher at every step.
    pub codes: String,
}

impl Default for MvqConfig {
    fn default() -> Self {
        Self {
            layer: None,
            num_codebooks: 8,
            loss_scale: 1.0,
            kmeans_iters: 10,
            refine_iters: 4,
            encode_passes: 2,
            max_frames: 50_000,
            codes: String::new(),
        }
    }
}

/// Distillation hyper-parameters; defaults follow seed 000 (T = 4, layers 0,1,2 -> 3,7,11) and
/// the task's alpha 0.7.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// Teacher: a fedhubert checkpoint file or an exported HuggingFace directory.
    pub teacher: Option<PathBuf>,
    /// Softmax temperature of output distillation.
    pub temperature: f64,
    /// `total = alpha * distill + (1 - alpha) * mlm`.
    pub alpha: f64,
    /// Weight of the output KL.
    pub kl_weight: f64,
    /// Weight of the hidden-state MSE.
    pub feature_weight: f64,
    /// Weight of the DistilHuBERT prediction-head loss.
    pub pred_weight: f64,
    /// DistilHuBERT's weight of `-log sigmoid(cos)` next to the L1 term.
    pub pred_cos_weight: f64,
    /// Feature distillation pairs `[student_layer, teacher_layer]` (0-based layer indexes).
    pub feature_layers: Vec<[usize; 2]>,
    /// Teacher layers regressed by the DistilHuBERT heads.
    pub pred_layers: Vec<usize>,
    /// Out-of-range layers: true = drop pairs whose student layer does not exist and clamp teacher
    /// layers to the last one (with a warning); false = error naming the field.
    pub clamp_layers: bool,
    /// random or teacher.
    pub student_init: StudentInit,
    /// Transformer layers copied from the teacher with `student_init: teacher` (default: all).
    pub init_layers: Option<usize>,
    /// Server-side audio set (a folder with `manifest.csv`, labels optional): server distillation
    /// and quantizer training. Never a client's folder.
    pub server_set: Option<PathBuf>,
    /// Server distillation steps after each aggregation.
    pub server_steps: u64,
    pub server_learning_rate: f64,
    /// Use at most this many server-set utterances (0 = all).
    pub server_max_utterances: usize,
    pub mvq: MvqConfig,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            teacher: None,
            temperature: 4.0,
            alpha: 0.7,
            kl_weight: 1.0,
            feature_weight: 1.0,
            pred_weight: 0.0,
            pred_cos_weight: 1.0,
            feature_layers: vec![[0, 3], [1, 7], [2, 11]],
            pred_layers: vec![3, 7, 11],
            clamp_layers: true,
            student_init: StudentInit::Random,
            init_layers: None,
            server_set: None,
            server_steps: 20,
            server_learning_rate: 1e-4,
            server_max_utterances: 0,
            mvq: MvqConfig::default(),
        }
    }
}

/// Layer mappings resolved against the actual student / teacher depths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    /// `(student_layer, teacher_layer)` pairs of feature distillation.
    pub feature: Vec<(usize, usize)>,
    /// Teacher layers of the prediction heads.
    pub pred: Vec<usize>,
    /// Teacher layer of the quantizer.
    pub mvq: usize,
}

impl DistillConfig {
    /// Checks the values; errors name the field (`distillation.NAME`).
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(cfg_err(format!("distillation.{f}: {why}")));
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("must be > 0, got {}", self.temperature),
            );
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad("alpha", format!("must be in [0, 1], got {}", self.alpha));
        }
        for (f, v) in [
            ("kl_weight", self.kl_weight),
            ("feature_weight", self.feature_weight),
            ("pred_weight", self.pred_weight),
            ("pred_cos_weight", self.pred_cos_weight),
            ("mvq.loss_scale", self.mvq.loss_scale),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(f, format!("must be a finite number >= 0, got {v}"));
            }
        }
        if self.server_learning_rate.is_nan() || self.server_learning_rate <= 0.0 {
            return bad(
                "server_learning_rate",
                format!("must be > 0, got {}", self.server_learning_rate),
            );
        }
        if self.mvq.num_codebooks == 0 || self.mvq.num_codebooks > 64 {
            return bad(
                "mvq.num_codebooks",
                format!("must be in 1..=64, got {}", self.mvq.num_codebooks),
            );
        }
        if self.mvq.max_frames < 256 {
            return bad(
                "mvq.max_frames",
                format!(
                    "must be >= 256 (one frame per codebook entry), got {}",
                    self.mvq.max_frames
                ),
            );
        }
        Ok(())
    }

    /// Resolves the layer mappings for a student of `n_s` and a teacher of `n_t` layers.
    pub fn layer_plan(&self, n_s: usize, n_t: usize) -> Result<LayerPlan> {
        let mut feature = Vec::new();
        for &[s, t] in &self.feature_layers {
            if s >= n_s {
                if self.clamp_layers {
                    tracing::warn!(
                        "distillation.feature_layers: student layer {s} does not exist (student has {n_s} layers); pair [{s}, {t}] dropped"
                    );
                    continue;
                }
                return Err(cfg_err(format!(
                    "distillation.feature_layers: student layer {s} >= the student's num_hidden_layers {n_s}"
                )));
            }
            let t2 = self.clamp_teacher("feature_layers", t, n_t)?;
            feature.push((s, t2));
        }
        if self.feature_weight > 0.0 && feature.is_empty() {
            return Err(cfg_err(
                "distillation.feature_layers: no usable pair while feature_weight > 0",
            ));
        }
        let mut pred = Vec::new();
        for &t in &self.pred_layers {
            let t2 = self.clamp_teacher("pred_layers", t, n_t)?;
            if !pred.contains(&t2) {
                pred.push(t2);
            }
        }
        if self.pred_weight > 0.0 && pred.is_empty() {
            return Err(cfg_err(
                "distillation.pred_layers: empty while pred_weight > 0",
            ));
        }
        let mvq = match self.mvq.layer {
            None => n_t - 1,
            Some(l) => self.clamp_teacher("mvq.layer", l, n_t)?,
        };
        Ok(LayerPlan { feature, pred, mvq })
    }

    fn clamp_teacher(&self, field: &str, t: usize, n_t: usize) -> Result<usize> {
        if t < n_t {
            return Ok(t);
        }
        if self.clamp_layers {
            tracing::warn!(
                "distillation.{field}: teacher layer {t} does not exist (teacher has {n_t} layers); clamped to {}",
                n_t - 1
            );
            Ok(n_t - 1)
        } else {
            Err(cfg_err(format!(
                "distillation.{field}: teacher layer {t} >= the teacher's num_hidden_layers {n_t}"
            )))
        }
    }
}

/// The distillation run file: the pretraining run file's sections (`federated:` for the rounds,
/// `pretraining:` for the student architecture and local training) plus `distillation:`.
/// `pretraining.preset` defaults to `student` (384/3) here.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DistillRunFile {
    pub federated: FederatedSection,
    pub pretraining: PretrainingSection,
    pub distillation: DistillConfig,
    /// Client-level DP of the student's client updates (the pretraining run file's section).
    pub privacy: PrivacyConfig,
}

impl DistillRunFile {
    /// Reads a YAML file (or nothing), applies `section.key=value` overrides (nested keys with
    /// dots, e.g. `distillation.mvq.num_codebooks=4`), and validates. Unknown keys are errors
    /// naming the key.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        type V = serde_yaml_ng::Value;
        let text = path.map(config::read_run_text).transpose()?;
        let mut tree = match (path, &text) {
            (Some(p), Some(t)) => config::parse_run_tree(p, t)?,
            _ => V::Mapping(Default::default()),
        };
        let root = tree
            .as_mapping_mut()
            .ok_or_else(|| cfg_err("config root must be a mapping"))?;
        let pre = root
            .entry(V::String("pretraining".into()))
            .or_insert_with(|| V::Mapping(Default::default()));
        if let Some(m) = pre.as_mapping_mut() {
            m.entry(V::String("preset".into()))
                .or_insert_with(|| V::String("student".into()));
        }
        let rf: DistillRunFile = config::typed_run_file(tree, path, text.as_deref(), overrides)?;
        rf.validate()?;
        Ok(rf)
    }

    /// The resolved configuration as YAML, defaults included.
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml_ng::to_string(self).map_err(|e| cfg_err(format!("writing the run file: {e}")))
    }

    /// The distillation section and the student's run file (see [`RunFile::validate`]).
    pub fn validate(&self) -> Result<()> {
        self.distillation.validate()?;
        Ok(self.run_file().validate()?)
    }

    /// The pretraining run file (federated + student sections), for its derived configs.
    pub fn run_file(&self) -> RunFile {
        RunFile {
            federated: self.federated.clone(),
            pretraining: self.pretraining.clone(),
            privacy: self.privacy.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_for_student_of_base() {
        let c = DistillConfig::default();
        let p = c.layer_plan(3, 12).unwrap();
        assert_eq!(p.feature, vec![(0, 3), (1, 7), (2, 11)]);
        assert_eq!(p.pred, vec![3, 7, 11]);
        assert_eq!(p.mvq, 11);
    }

    #[test]
    fn clamping_and_strict_errors_name_the_field() {
        let c = DistillConfig::default();
        let p = c.layer_plan(2, 2).unwrap();
        assert_eq!(p.feature, vec![(0, 1), (1, 1)]);
        assert_eq!(p.pred, vec![1]);
        let strict = DistillConfig {
            clamp_layers: false,
            ..Default::default()
        };
        let e = strict.layer_plan(3, 4).unwrap_err().to_string();
        assert!(e.contains("distillation.feature_layers"), "{e}");
        let strict = DistillConfig {
            clamp_layers: false,
            feature_layers: vec![[0, 1]],
            pred_layers: vec![9],
            ..Default::default()
        };
        let e = strict.layer_plan(3, 4).unwrap_err().to_string();
        assert!(e.contains("distillation.pred_layers"), "{e}");
        let bad = DistillConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("distillation.temperature")
        );
    }

    #[test]
    fn run_file_overrides_nested_and_rejects_unknown() {
        let rf = DistillRunFile::load(
            None,
            &[
                "distillation.mvq.num_codebooks=4".into(),
                "distillation.alpha=1.0".into(),
            ],
        )
        .unwrap();
        assert_eq!(rf.distillation.mvq.num_codebooks, 4);
        assert_eq!(rf.distillation.alpha, 1.0);
        assert_eq!(rf.pretraining.preset, fedhubert_train::Preset::Student);
        let e = DistillRunFile::load(None, &["distillation.temprature=2".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("temprature"), "{e}");
    }
}
