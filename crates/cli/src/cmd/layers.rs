//! `fedhubert layers`: which layer of the iteration-1 model to cluster for iteration 2. For every
//! layer L (0, the encoder's input, ..= num_hidden_layers) its frames of every client (of
//! `--percent` of its utterances) go into a scratch shard (`client_K/layers_report_L`, its
//! provenance record beside it), one federated k-means codebook is fitted on them
//! and its inertia reported, raw and normalised by the total sum of squares about the global
//! mean (computed from per-client sums, as the k-means itself: no frame leaves a client); the
//! scratch shards are deleted afterwards. With `--probe-data`, every layer is also probed alone
//! on a labelled clip folder. Writes `layers.json` and `layers.md` into `--out`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedhubert_audio::{Manifest, ManifestOptions};
use fedhubert_eval::{
    DEFAULT_CHUNK_SAMPLES, LayerSource, LoadConfig, ProbeReport, Upstream, UpstreamSpec,
    extract_layer_features_as, load_feature_model, load_labelled_dir, write_report,
};
use fedhubert_kmeans::{
    ClientStats, Codebook, FederatedConfig, FrameSource, InProcessClient, KmClient, ShardSource,
    fit_federated, sample_utterances,
};
use fedhubert_model::HubertModel;
use serde::{Deserialize, Serialize};

use super::features::client_manifests;
use super::probe::ProbeRequest;
use crate::common::FolderLock;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The iteration-1 model: a fedhubert checkpoint, an HF directory or a published fairseq,
    /// torchaudio or s3prl `.pt` file.
    #[arg(long, value_name = "CKPT|HF_DIR|PT")]
    pub model: PathBuf,
    /// Partition folder: every DIR/client_*/manifest.csv is a client.
    #[arg(long, value_name = "DIR")]
    pub clients: PathBuf,
    /// Clusters of each layer's federated k-means (as `kmeans --k`).
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Fit on this fraction of each client's utterances, drawn at --seed as `kmeans --percent`
    /// draws them; only those are featurized.
    #[arg(long, default_value_t = 1.0, value_parser = super::kmeans::parse_percent)]
    pub percent: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also probe every layer alone on this labelled clip folder (as `probe --data`, e.g.
    /// assets/speech-commands-sample).
    #[arg(long, value_name = "CLIPS_DIR")]
    pub probe_data: Option<PathBuf>,
    /// With --probe-data: speaker-disjoint cross-validation folds (0: the single split only).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Output folder: layers.json, layers.md (and probe/ with --probe-data).
    #[arg(long, value_name = "OUTDIR")]
    pub out: PathBuf,
}

/// One layer report: which model, which clients, how each layer is clustered and probed.
#[derive(Clone, Debug)]
pub struct LayersRequest {
    pub model: PathBuf,
    pub clients: PathBuf,
    pub out: PathBuf,
    /// Fraction of each client's utterances each fit sees (1: all).
    pub percent: f64,
    /// Every layer's federated fit; its `k` and `seed` are the run's.
    pub kmeans: FederatedConfig,
    /// The per-layer probe's clip folder and folds.
    pub probe: Option<(PathBuf, usize)>,
}

impl LayersRequest {
    /// `k` clusters per layer at `seed`, every utterance, no probe.
    pub fn new(model: PathBuf, clients: PathBuf, k: usize, out: PathBuf, seed: u64) -> Self {
        Self {
            model,
            clients,
            out,
            percent: 1.0,
            kmeans: FederatedConfig {
                k,
                seed,
                ..Default::default()
            },
            probe: None,
        }
    }
}

impl TryFrom<&Args> for LayersRequest {
    type Error = anyhow::Error;

    fn try_from(a: &Args) -> Result<Self> {
        if a.folds > 0 && a.folds < 3 {
            bail!("--folds {}: expected 0 (off) or at least 3", a.folds);
        }
        let mut req = Self::new(
            a.model.clone(),
            a.clients.clone(),
            a.k,
            a.out.clone(),
            a.seed,
        );
        req.percent = a.percent;
        req.probe = a.probe_data.clone().map(|d| (d, a.folds));
        Ok(req)
    }
}

/// `layers.json`: one row per layer, and which layer each criterion prefers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayersReport {
    pub model: PathBuf,
    pub clients_dir: PathBuf,
    /// Clients whose frames the fits saw (clients without frames are skipped).
    pub clients: usize,
    pub k: usize,
    pub percent: f64,
    pub seed: u64,
    pub num_hidden_layers: usize,
    pub probe_data: Option<PathBuf>,
    pub folds: Option<usize>,
    pub layers: Vec<LayerRow>,
    /// The layer whose k-means leaves the smallest fraction of its variance unexplained.
    pub lowest_normalised_inertia: usize,
    /// The layer with the best probe accuracy (with --probe-data).
    pub best_probe: Option<usize>,
    pub time_s: f64,
}

/// One layer's k-means (and probe).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerRow {
    /// HF `hidden_states[L]`: 0 is the encoder's input, L the output of the L-th layer.
    pub layer: usize,
    pub dims: usize,
    /// Frames the fit saw (`--percent` of every client's utterances).
    pub frames: u64,
    /// Sum of squared distances of those frames to their nearest centroid.
    pub inertia: f64,
    pub inertia_per_frame: f64,
    /// Sum of squared distances of the same frames to their global mean.
    pub total_sum_of_squares: f64,
    /// inertia / total_sum_of_squares: the fraction of variance k-means leaves unexplained.
    pub normalised_inertia: f64,
    /// Federated k-means rounds.
    pub rounds: usize,
    /// This layer alone, probed: cross-validated accuracy with folds, else single-split test.
    pub probe_accuracy: Option<f64>,
    /// Std of the fold accuracies.
    pub probe_fold_std: Option<f64>,
}

pub fn run(args: Args) -> Result<()> {
    let req = LayersRequest::try_from(&args)?;
    let r = layers(&req)?;
    print_table(&r);
    println!(
        "{}\nwrote {}, {}",
        verdict(&r),
        req.out.join("layers.json").display(),
        req.out.join("layers.md").display()
    );
    Ok(())
}

/// The scratch shard stem of layer `layer` in every client folder.
pub fn scratch_stem(layer: usize) -> String {
    format!("layers_report_{layer}")
}

/// Fits (and probes) every layer of the model and writes `layers.json` and `layers.md`.
pub fn layers(req: &LayersRequest) -> Result<LayersReport> {
    let t0 = Instant::now();
    let k = req.kmeans.k;
    if k == 0 || k > u16::MAX as usize + 1 {
        bail!("--k {k}: must be between 1 and 65536");
    }
    let clients = load_clients(req)?;
    // The scratch shards go into the client folders, the report into --out.
    let mut _locks = vec![FolderLock::acquire(&req.clients, "layers")?];
    if !crate::common::same_dir(&req.clients, &req.out) {
        _locks.push(FolderLock::acquire(&req.out, "layers")?);
    }
    let dev = fedhubert_model::cpu_device();
    let (model, model_digest) = load_feature_model(&req.model, &dev)
        .with_context(|| format!("--model {}", req.model.display()))?;
    let n_layers = model.config().num_hidden_layers;
    let probe = match &req.probe {
        Some((data, folds)) => Some(probe_layers(req, &model, data, *folds)?),
        None => None,
    };
    let mut src = LayerSource {
        model: &model,
        layer: 0,
        model_digest,
        made_by: format!("fedhubert layers --model {}", req.model.display()),
        chunk_samples: DEFAULT_CHUNK_SAMPLES,
    };
    let mut rows = Vec::new();
    let mut fitted = 0;
    for layer in 0..=n_layers {
        src.layer = layer;
        let (mut row, n) = layer_row(req, &src, &clients)?;
        if let Some(p) = probe.as_ref().and_then(|p| p.per_layer.get(layer)) {
            row.probe_accuracy = Some(p.cv_accuracy.unwrap_or(p.test_accuracy));
            row.probe_fold_std = p.cv_fold_std;
        }
        tracing::info!(
            "layer {layer}: normalised inertia {:.4}",
            row.normalised_inertia
        );
        rows.push(row);
        fitted = n;
    }
    let report = LayersReport {
        model: req.model.clone(),
        clients_dir: req.clients.clone(),
        clients: fitted,
        k,
        percent: req.percent,
        seed: req.kmeans.seed,
        num_hidden_layers: n_layers,
        probe_data: req.probe.as_ref().map(|(d, _)| d.clone()),
        folds: req.probe.as_ref().map(|(_, f)| *f),
        lowest_normalised_inertia: argbest(&rows, |r| Some(-r.normalised_inertia)).unwrap_or(0),
        best_probe: argbest(&rows, |r| r.probe_accuracy),
        layers: rows,
        time_s: t0.elapsed().as_secs_f64(),
    };
    write_outputs(&req.out, &report)?;
    Ok(report)
}

/// The layer of the row with the largest finite `key` (the first on ties).
fn argbest(rows: &[LayerRow], key: impl Fn(&LayerRow) -> Option<f64>) -> Option<usize> {
    rows.iter()
        .filter_map(|r| key(r).filter(|v| v.is_finite()).map(|v| (r.layer, v)))
        .fold(None, |best: Option<(usize, f64)>, (l, v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((l, v)),
        })
        .map(|(l, _)| l)
}

/// Every layer probed alone on `data` (the probe command's defaults, `folds` folds), written
/// to `out/probe`.
fn probe_layers(
    req: &LayersRequest,
    model: &HubertModel,
    data: &Path,
    folds: usize,
) -> Result<ProbeReport> {
    let clips = load_labelled_dir(data, &LoadConfig::default())
        .with_context(|| format!("--probe-data {}", data.display()))?;
    let spec = UpstreamSpec::from_path(&req.model)
        .with_context(|| format!("--model {}", req.model.display()))?;
    let dir = req.out.join("probe");
    let mut cfg = ProbeRequest::new(spec, data.to_path_buf(), dir.clone(), req.kmeans.seed).config;
    cfg.folds = folds;
    cfg.per_layer = true;
    let r = fedhubert_eval::probe(Upstream::Hubert(model), &clips, &cfg)
        .with_context(|| format!("per-layer probe on --probe-data {}", data.display()))?;
    write_report(&r, &dir)?;
    Ok(r)
}

/// Scratch shards of one stem in some client folders, removed (with their provenance records)
/// when dropped, whether the layer's fit succeeded or not.
struct Scratch {
    dirs: Vec<PathBuf>,
    stem: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for d in &self.dirs {
            let (npy, len) = fedhubert_features::shard::shard_paths(d, &self.stem);
            let record = fedhubert_io::provenance::record_path(d, &self.stem);
            for p in [npy, len, record] {
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!("cannot remove scratch shard {}: {e}", p.display())
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One client folder and the utterances of its manifest that the fits see.
struct ClientData {
    dir: PathBuf,
    manifest_path: PathBuf,
    manifest: Manifest,
}

/// Every client's manifest, cut to `req.percent` of its utterances drawn at seed + i (client i
/// in folder order): the utterances `kmeans --percent` fits on ([`sample_utterances`]), so only
/// those are featurized.
fn load_clients(req: &LayersRequest) -> Result<Vec<ClientData>> {
    let paths = client_manifests(&req.clients)
        .with_context(|| format!("--clients {}", req.clients.display()))?;
    let mut out = Vec::new();
    for (i, m) in paths.into_iter().enumerate() {
        let mut manifest = Manifest::load_with(&m, None, ManifestOptions::default())
            .with_context(|| format!("cannot load manifest {}", m.display()))?;
        if req.percent < 1.0 {
            let seed = req.kmeans.seed.wrapping_add(i as u64);
            let keep = sample_utterances(manifest.entries.len(), req.percent, seed)?;
            let all = std::mem::take(&mut manifest.entries);
            manifest.entries = keep.into_iter().map(|u| all[u].clone()).collect();
        }
        out.push(ClientData {
            dir: m.parent().expect("client_*/manifest.csv").to_path_buf(),
            manifest_path: m,
            manifest,
        });
    }
    Ok(out)
}

/// Layer `src.layer`: its frames of every client into scratch shards, one federated k-means
/// fit on them, its inertia and the frames' total sum of squares; the scratch shards removed.
/// Also returns the number of clients the fit saw.
fn layer_row(
    req: &LayersRequest,
    src: &LayerSource,
    clients: &[ClientData],
) -> Result<(LayerRow, usize)> {
    let (layer, stem) = (src.layer, scratch_stem(src.layer));
    let _scratch = Scratch {
        dirs: clients.iter().map(|c| c.dir.clone()).collect(),
        stem: stem.clone(),
    };
    for c in clients {
        extract_layer_features_as(src, &c.manifest, &c.manifest_path, &c.dir, &stem)
            .with_context(|| format!("{}: layer {layer} features", c.dir.display()))?;
    }
    let fit_clients = fit_clients(req, clients, &stem)?;
    let dims = src.model.config().hidden_size;
    let total = pooled_spread(&fit_clients, dims)?;
    let k = req.kmeans.k;
    if (k as u64) > total.n_frames {
        bail!(
            "--k {k} is larger than the {} frames of layer {layer} the fit sees (lower --k or raise --percent)",
            total.n_frames
        );
    }
    let n_clients = fit_clients.len();
    let boxed: Vec<Box<dyn KmClient>> = fit_clients
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn KmClient>)
        .collect();
    let fit = fit_federated(&boxed, &req.kmeans)
        .with_context(|| format!("layer {layer}: federated k-means"))?;
    let tss = total_sum_of_squares(&total);
    let row = LayerRow {
        layer,
        dims,
        frames: fit.n_frames,
        inertia: fit.inertia,
        inertia_per_frame: fit.inertia / fit.n_frames.max(1) as f64,
        total_sum_of_squares: tss,
        normalised_inertia: fit.inertia / tss,
        rounds: fit.rounds,
        probe_accuracy: None,
        probe_fold_std: None,
    };
    Ok((row, n_clients))
}

/// One federated k-means client per client folder with frames in its `stem` scratch shard.
fn fit_clients(
    req: &LayersRequest,
    clients: &[ClientData],
    stem: &str,
) -> Result<Vec<InProcessClient>> {
    let mut out = Vec::new();
    for c in clients {
        let shard = ShardSource::open(&c.dir, stem)
            .with_context(|| format!("cannot open scratch shard {}/{stem}.npy", c.dir.display()))?;
        if shard.n_frames() == 0 {
            tracing::warn!("{}: no frames, client skipped", c.dir.display());
            continue;
        }
        let name = c.dir.file_name().map(|n| n.to_string_lossy().into_owned());
        out.push(InProcessClient::new(
            name.unwrap_or_default(),
            Box::new(shard),
        ));
    }
    if out.is_empty() {
        bail!(
            "--clients {}: no client has any frames",
            req.clients.display()
        );
    }
    Ok(out)
}

/// The frames' total sum of squares about their global mean, from each client's ordinary
/// k-means reply (`KmClient::stats`) to a one-centre codebook at the origin: its per-dimension
/// Σx and Σx² and its frame count, sums only, as in every k-means round.
fn pooled_spread(clients: &[InProcessClient], dim: usize) -> Result<ClientStats> {
    let origin = Codebook::new(1, dim, vec![0.0; dim])?;
    let mut total = ClientStats::zeros(1, dim);
    for c in clients {
        total.add(&c.stats(0, &origin)?);
    }
    Ok(total)
}

/// Σ‖x − mean‖² = Σ‖x‖² − ‖Σx‖² / n, from one-centre statistics ([`pooled_spread`]).
fn total_sum_of_squares(s: &ClientStats) -> f64 {
    let n = s.n_frames.max(1) as f64;
    let sq: f64 = s.sumsq.iter().sum();
    (sq - s.sums.iter().map(|v| v * v).sum::<f64>() / n).max(0.0)
}

/// `acc ± std`, `acc` alone, or `-`.
fn probe_cell(r: &LayerRow) -> String {
    match (r.probe_accuracy, r.probe_fold_std) {
        (Some(a), Some(s)) => format!("{a:.3} ± {s:.3}"),
        (Some(a), None) => format!("{a:.3}"),
        _ => "-".into(),
    }
}

/// The table `fedhubert layers` prints.
pub fn print_table(r: &LayersReport) {
    println!(
        "layers of {}: federated k-means k={} over {} clients ({} % of their utterances){}",
        r.model.display(),
        r.k,
        r.clients,
        r.percent * 100.0,
        match r.folds {
            Some(f) if f > 0 => format!("; probe {f}-fold cross-validated"),
            Some(_) => "; probe on a single split".into(),
            None => String::new(),
        }
    );
    println!(
        "{:>5} {:>6} {:>9} {:>14} {:>11} {:>15}",
        "layer", "dims", "frames", "inertia/frame", "normalised", "probe acc"
    );
    for l in &r.layers {
        println!(
            "{:>5} {:>6} {:>9} {:>14.4} {:>11.4} {:>15}",
            l.layer,
            l.dims,
            l.frames,
            l.inertia_per_frame,
            l.normalised_inertia,
            probe_cell(l)
        );
    }
}

/// Which layer each criterion prefers, and the recipe's choice.
pub fn verdict(r: &LayersReport) -> String {
    let lowest = &r.layers[r.lowest_normalised_inertia];
    let mut s = format!(
        "Lowest normalised inertia: layer {} ({:.4})",
        lowest.layer, lowest.normalised_inertia
    );
    if let Some(b) = r.best_probe {
        s += &format!("; best probe: layer {b} ({})", probe_cell(&r.layers[b]));
    }
    s + ". fairseq takes layer 6 of HuBERT Base's 12 for iteration 2."
}

/// `layers.md`: the table in markdown and the verdict.
pub fn markdown(r: &LayersReport) -> String {
    let mut md = String::from(
        "| layer | dims | frames | inertia / frame | normalised inertia | probe accuracy ± fold std |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for l in &r.layers {
        md += &format!(
            "| {} | {} | {} | {:.4} | {:.4} | {} |\n",
            l.layer,
            l.dims,
            l.frames,
            l.inertia_per_frame,
            l.normalised_inertia,
            probe_cell(l)
        );
    }
    md += &format!(
        "\nFederated k-means with k={} on {} % of each client's utterances (seed {}); normalised inertia = inertia / total sum of squares about the global mean, the fraction of a layer's variance the codebook leaves unexplained (comparable across layers of different scale). Layer 0 is the encoder's input, layer L the output of the L-th transformer layer (HF `hidden_states[L]`).\n\n{}\n",
        r.k,
        r.percent * 100.0,
        r.seed,
        verdict(r)
    );
    md
}

fn write_outputs(out: &Path, r: &LayersReport) -> Result<()> {
    let json = out.join("layers.json");
    crate::common::write_json(&json, r)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let md_path = out.join("layers.md");
    let md = format!("# Layers of {}\n\n{}", r.model.display(), markdown(r));
    fedhubert_io::atomic_write(&md_path, md.as_bytes())
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_sum_of_squares_is_the_spread_about_the_pooled_mean() {
        // Two clients: {0, 2} and {4}: mean 2, squares 4 + 0 + 4.
        let mut a = ClientStats::zeros(1, 1);
        a.add(&ClientStats {
            sums: vec![2.0],
            sumsq: vec![4.0],
            counts: vec![2],
            inertia: 4.0,
            n_frames: 2,
        });
        a.add(&ClientStats {
            sums: vec![4.0],
            sumsq: vec![16.0],
            counts: vec![1],
            inertia: 16.0,
            n_frames: 1,
        });
        assert!((total_sum_of_squares(&a) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn new_has_the_command_line_defaults() {
        let args: Args = crate::common::parse_args(&[
            "--model",
            "m",
            "--clients",
            "parts",
            "--k",
            "20",
            "--out",
            "o",
            "--seed",
            "3",
        ]);
        let want = LayersRequest::new("m".into(), "parts".into(), 20, "o".into(), 3);
        assert_eq!(
            format!("{:?}", LayersRequest::try_from(&args).unwrap()),
            format!("{want:?}")
        );
    }
}
