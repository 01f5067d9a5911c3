//! Results: the confusion matrix (CSV, JSON, PNG heat map) and the `probe.json` summary, all
//! written atomically (temporary file, then rename).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{EvalError, HeadConfig};

/// Side of one confusion-matrix cell in the PNG, in pixels.
pub const CELL_PX: u32 = 16;

/// Rows: true class; columns: predicted class.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfusionMatrix {
    pub classes: Vec<String>,
    pub counts: Vec<Vec<usize>>,
}

impl ConfusionMatrix {
    /// Counts `(true, predicted)` pairs.
    pub fn from_pairs(
        classes: Vec<String>,
        pairs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Self {
        let c = classes.len();
        let mut counts = vec![vec![0; c]; c];
        for (t, p) in pairs {
            counts[t][p] += 1;
        }
        Self { classes, counts }
    }

    pub fn row_sums(&self) -> Vec<usize> {
        self.counts.iter().map(|r| r.iter().sum()).collect()
    }

    /// Trace over total (0 for an empty matrix).
    pub fn accuracy(&self) -> f64 {
        let total: usize = self.row_sums().iter().sum();
        let diag: usize = (0..self.classes.len()).map(|i| self.counts[i][i]).sum();
        if total == 0 {
            0.0
        } else {
            diag as f64 / total as f64
        }
    }

    /// CSV: header `true\predicted,CLASS...`, one row per true class.
    pub fn to_csv(&self) -> String {
        let q = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut out = String::from("true\\predicted");
        for c in &self.classes {
            out.push(',');
            out.push_str(&q(c));
        }
        out.push('\n');
        for (c, row) in self.classes.iter().zip(&self.counts) {
            out.push_str(&q(c));
            for v in row {
                out.push_str(&format!(",{v}"));
            }
            out.push('\n');
        }
        out
    }
}

/// Width and height of [`confusion_png`]'s image for `classes` classes: one `CELL_PX` square per
/// cell plus a one-pixel grid line around every cell.
pub fn confusion_png_size(classes: usize) -> (u32, u32) {
    let s = classes as u32 * CELL_PX + 1;
    (s, s)
}

/// A heat map of the row-normalised confusion matrix (white = 0, dark blue = the whole row),
/// rows = true class top to bottom, columns = predicted class left to right, grey grid lines;
/// rows without clips are light grey. Returns PNG bytes (8-bit RGB).
pub fn confusion_png(cm: &ConfusionMatrix) -> Result<Vec<u8>, String> {
    let c = cm.classes.len();
    let (w, h) = confusion_png_size(c);
    let mut img = vec![0u8; (w * h * 3) as usize];
    let sums = cm.row_sums();
    let lerp = |f: f64| -> [u8; 3] {
        let (a, b) = ([255.0, 255.0, 255.0], [8.0, 48.0, 107.0]);
        [0, 1, 2].map(|k| (a[k] + (b[k] - a[k]) * f.clamp(0.0, 1.0)).round() as u8)
    };
    for y in 0..h {
        for x in 0..w {
            let px = if x % CELL_PX == 0 || y % CELL_PX == 0 {
                [128, 128, 128]
            } else {
                let (r, col) = ((y / CELL_PX) as usize, (x / CELL_PX) as usize);
                if sums[r] == 0 {
                    [230, 230, 230]
                } else {
                    lerp(cm.counts[r][col] as f64 / sums[r] as f64)
                }
            };
            let o = ((y * w + x) * 3) as usize;
            img[o..o + 3].copy_from_slice(&px);
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| e.to_string())?;
        wr.write_image_data(&img).map_err(|e| e.to_string())?;
        wr.finish().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Sizes of the split actually achieved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitSummary {
    pub speaker_disjoint: bool,
    /// Clips in `[train, valid, test]`.
    pub clips: [usize; 3],
    /// Fractions of all clips in `[train, valid, test]`.
    pub fractions: [f64; 3],
    /// Distinct speakers in `[train, valid, test]` (0 without speaker ids).
    pub speakers: [usize; 3],
    /// Test clips per class (= the confusion matrix's row sums).
    pub test_per_class: Vec<usize>,
    pub seed: u64,
}

/// Fine-tuning results, when it ran.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneSummary {
    pub steps: usize,
    pub learning_rate: f64,
    pub valid_accuracy: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
    /// Mean training cross-entropy of each fine-tuning epoch.
    pub epoch_train_loss: Vec<f64>,
    pub confusion: ConfusionMatrix,
}

/// Everything `probe` measured; serialised as `probe.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    pub task: String,
    pub upstream: String,
    pub data: String,
    pub classes: Vec<String>,
    /// Upstream width and number of hidden states (transformer layers + 1).
    pub hidden_size: usize,
    pub num_hidden_states: usize,
    pub head: HeadConfig,
    pub split: SplitSummary,
    pub test_accuracy: f64,
    pub valid_accuracy: f64,
    pub train_accuracy: f64,
    /// Accuracy of always predicting the most frequent training class, on test.
    pub majority_baseline: f64,
    pub best_epoch: usize,
    pub epochs_run: usize,
    /// Learned softmax layer weights, entry 0 = encoder input.
    pub layer_weights: Vec<f32>,
    /// Test confusion matrix of the frozen probe.
    pub confusion: ConfusionMatrix,
    pub extract_seconds: f64,
    pub train_seconds: f64,
    pub finetune: Option<FinetuneSummary>,
    /// k-fold cross-validation of the frozen probe, when asked for.
    #[serde(default)]
    pub cross_validation: Option<CrossValidation>,
    /// Every hidden state probed alone, when asked for.
    #[serde(default)]
    pub per_layer: Vec<crate::LayerProbe>,
}

/// Cross-validated accuracy: every clip tested once, by a head that never saw its speaker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CrossValidation {
    pub folds: usize,
    /// Accuracy over all clips (pooled over the folds).
    pub accuracy: f64,
    pub fold_accuracies: Vec<f64>,
    /// Sample standard deviation of the fold accuracies.
    pub fold_std: f64,
    pub confusion: ConfusionMatrix,
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
fn write(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    fedhubert_io::atomic_write(path, bytes).map_err(|e| EvalError::io(path, e))
}

/// Writes `probe.json`, `confusion.csv`, `confusion.json` and `confusion.png` (and
/// `confusion_finetuned.*` when fine-tuning ran) into `dir`, each atomically.
pub fn write_report(report: &ProbeReport, dir: &Path) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let mut mats = vec![("confusion", &report.confusion)];
    if let Some(f) = &report.finetune {
        mats.push(("confusion_finetuned", &f.confusion));
    }
    for (name, cm) in mats {
        write(&dir.join(format!("{name}.csv")), cm.to_csv().as_bytes())?;
        let json = serde_json::to_string_pretty(cm).expect("confusion matrix serialises");
        write(&dir.join(format!("{name}.json")), json.as_bytes())?;
        let png_path = dir.join(format!("{name}.png"));
        let png = confusion_png(cm).map_err(|why| EvalError::Png {
            path: png_path.clone(),
            why,
        })?;
        write(&png_path, &png)?;
    }
    let json = serde_json::to_string_pretty(report).expect("report serialises");
    write(&dir.join("probe.json"), json.as_bytes())
}
