//! The model card (`README.md`) in every HuggingFace export of a federated run: what the model
//! is, how it was trained, on whose data (owners, hours, manifest hashes), its targets' codebook,
//! and its privacy (epsilon) when the run had any. Hugging Face reads the YAML front matter as
//! the model's metadata; the rest is for people and auditors.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fedhubert_audio::manifest::{Manifest, Split};
use fedhubert_fl::RoundRecord;

use crate::TrainError;

/// Where the run's training data is, as far as the writer of the card knows it.
pub enum CardData<'a> {
    /// The client folders of a simulation: their manifests are read for hours and hashes.
    Partitions(&'a [PathBuf]),
    /// Flower nodes, whose data never reaches the server: only their number is known.
    Nodes(usize),
    /// A run exported afterwards from its folder: the owners are in its records, not here.
    Recorded,
}

/// What a card says about one run.
pub struct ModelCard<'a> {
    /// One line: what the model is ("HuBERT, federated masked-prediction pretraining").
    pub title: &'a str,
    /// The run's resolved configuration (the run file as YAML).
    pub config_yaml: &'a str,
    pub strategy: &'a str,
    pub data: CardData<'a>,
    pub history: &'a [RoundRecord],
    /// The run folder, for `labels.json` (the codebook the targets came from).
    pub run_dir: &'a Path,
}

fn card_err(path: &Path, why: impl std::fmt::Display) -> TrainError {
    TrainError::Data(format!("{}: {why}", path.display()))
}

/// One data owner's line: folder, hours of training audio, manifest SHA-256.
fn owner_line(dir: &Path) -> Result<String, TrainError> {
    let path = dir.join("manifest.csv");
    let m = Manifest::load(&path)?;
    let secs: f64 = m.split(Split::Train).map(|e| e.duration_s()).sum();
    let hash = fedhubert_io::provenance::sha256_file(&path).map_err(|e| card_err(&path, e))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    Ok(format!(
        "| {} | {:.3} | `{hash}` |\n",
        name.unwrap_or_default(),
        secs / 3600.0
    ))
}

impl ModelCard<'_> {
    pub fn render(&self) -> Result<String, TrainError> {
        let mut s = String::new();
        s.push_str("---\nlibrary_name: transformers\npipeline_tag: feature-extraction\n");
        s.push_str(
            "tags:\n- hubert\n- self-supervised-learning\n- federated-learning\n- fedhubert\n",
        );
        if self.history.iter().any(|r| r.privacy.is_some()) {
            s.push_str("- differential-privacy\n");
        }
        s.push_str("---\n\n");
        let _ = writeln!(s, "# {}\n", self.title);
        s.push_str(
            "A `HubertModel` (transformers) trained with fedhubert: the audio stayed with its \
             owners, only model updates travelled. Load it with \
             `HubertModel.from_pretrained(path)`; `preprocessor_config.json` gives the input \
             normalisation.\n\n",
        );
        self.training(&mut s);
        self.data_section(&mut s)?;
        self.targets(&mut s)?;
        self.privacy(&mut s);
        let _ = write!(
            s,
            "## Configuration\n\nThe run file as resolved (every default included):\n\n```yaml\n{}```\n",
            self.config_yaml
        );
        Ok(s)
    }

    fn training(&self, s: &mut String) {
        let h = self.history;
        let rounds = h.len();
        let last = h.last();
        let _ = writeln!(
            s,
            "## Training\n\n- Strategy: {}; {rounds} federated rounds.",
            self.strategy
        );
        if let Some(r) = last {
            if let Some(l) = r.train.get("loss") {
                let _ = writeln!(s, "- Last round's client training loss: {l:.4}.");
            }
            if let Some(a) = r.server_eval.get("acc_masked") {
                let _ = writeln!(s, "- Last round's held-out masked accuracy: {a:.4}.");
            }
        }
        let up: u64 = h.iter().map(|r| r.bytes_up).sum();
        let down: u64 = h.iter().map(|r| r.bytes_down).sum();
        let _ = writeln!(
            s,
            "- Traffic: {:.1} MB up, {:.1} MB down; per round in `metrics.jsonl`.\n",
            up as f64 / 1e6,
            down as f64 / 1e6
        );
    }

    fn data_section(&self, s: &mut String) -> Result<(), TrainError> {
        s.push_str("## Data owners\n\n");
        match self.data {
            CardData::Nodes(n) => {
                let _ = writeln!(
                    s,
                    "{n} Flower nodes. Their data never reached the server, so its hours and manifests are recorded on the nodes only.\n"
                );
            }
            CardData::Recorded => s.push_str(
                "Exported afterwards from the run's folder: its data owners are recorded there (the partition's `partition.json` and manifests), not in the checkpoint.\n\n",
            ),
            CardData::Partitions(dirs) => {
                let _ = writeln!(
                    s,
                    "{} data owners (a simulation over client folders):\n\n| owner | training audio, hours | manifest SHA-256 |\n|---|---:|---|",
                    dirs.len()
                );
                for d in dirs {
                    s.push_str(&owner_line(d)?);
                }
                s.push('\n');
            }
        }
        Ok(())
    }

    fn targets(&self, s: &mut String) -> Result<(), TrainError> {
        let path = self.run_dir.join("labels.json");
        if !path.is_file() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| card_err(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| card_err(&path, e))?;
        let _ = writeln!(
            s,
            "## Targets\n\nMasked prediction of k-means labels `{}` at {} Hz from one global codebook learned federatedly; codebook SHA-256 `{}`.\n",
            v["label_stem"].as_str().unwrap_or("?"),
            v["label_rate"],
            v["codebook"].as_str().unwrap_or("?")
        );
        Ok(())
    }

    fn privacy(&self, s: &mut String) {
        s.push_str("## Privacy\n\n");
        match self.history.last().and_then(|r| r.privacy.as_ref()) {
            None => s.push_str(
                "No differential privacy: the updates the server saw can reveal information about the training audio.\n\n",
            ),
            Some(p) => {
                let _ = writeln!(
                    s,
                    "Client-level differential privacy (DP-FedAvg): **epsilon {:.4} at delta {:e}** after {} accounted training attempts; noise multiplier {:.4}, clipping norm {:.4} in the last round, fixed denominator {}. The `privacy` section of the configuration below says who added the noise.\n",
                    p.epsilon,
                    p.delta,
                    p.attempts_accounted,
                    p.noise_multiplier,
                    p.clipping_norm,
                    p.denominator
                );
            }
        }
    }

    /// Writes the card as `hf/README.md` (atomically), after the model itself.
    pub fn write(&self, hf: &Path) -> Result<(), TrainError> {
        let path = hf.join("README.md");
        fedhubert_io::atomic_write(&path, self.render()?.as_bytes()).map_err(|e| card_err(&path, e))
    }
}

/// The card of a model whose training run is not known here (an imported published checkpoint,
/// a bare checkpoint): what it is, where it came from (path and SHA-256), and `facts`.
pub fn write_source_card(
    hf: &Path,
    title: &str,
    source: &Path,
    facts: &[String],
) -> Result<(), TrainError> {
    let hash = fedhubert_io::provenance::sha256_file(source).map_err(|e| card_err(source, e))?;
    let mut s = String::from(
        "---\nlibrary_name: transformers\npipeline_tag: feature-extraction\ntags:\n- hubert\n- fedhubert\n---\n\n",
    );
    let _ = writeln!(s, "# {title}\n");
    let _ = writeln!(
        s,
        "Converted by fedhubert from `{}` (SHA-256 `{hash}`); the tensors were read back bit-exact. fedhubert did not train it, so its data and privacy are those of its source.\n",
        source.display()
    );
    for f in facts {
        let _ = writeln!(s, "- {f}");
    }
    let path = hf.join("README.md");
    fedhubert_io::atomic_write(&path, s.as_bytes()).map_err(|e| card_err(&path, e))
}
