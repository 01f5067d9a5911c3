//! Federated k-means over any transport: the client's side ([`KmeansClient`]: init summary,
//! per-round sums and counts, labelling with the final codebook) and the server's rounds
//! ([`KmeansServer`], the same state machine `fedhubert kmeans --mode federated` runs in one
//! process). Only what `fedhubert_kmeans::federated` says a client reveals crosses the wire:
//! weighted local centroids at init, then per-cluster sums, sums of squares and counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedhubert_kmeans::{
    ClientStats, Codebook, CodebookMeta, FederatedConfig, InProcessClient, KmClient,
    KmeansServer as Rounds, LocalSummary, ServerUpdate, ShardSource, label_client, server_init,
};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::client::index_from_dir;

fn km_err(e: fedhubert_kmeans::KmError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn array<'py, T: numpy::Element + Copy>(
    d: &Bound<'py, PyDict>,
    key: &str,
    what: &str,
) -> PyResult<(Vec<T>, Vec<usize>)> {
    let v = d
        .get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("{what}: array `{key}` missing")))?;
    let a = v.cast::<PyArrayDyn<T>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: array `{key}` must be a numpy array of {}",
            std::any::type_name::<T>()
        ))
    })?;
    let ro = a.readonly();
    let shape = ro.shape().to_vec();
    Ok((ro.as_array().iter().copied().collect(), shape))
}

/// A shard name from the server's message must stay a file name inside the partition: another
/// organisation's ServerApp must not make this node write or read anywhere else.
fn plain_stem(what: &str, stem: &str) -> PyResult<()> {
    let ok = !stem.is_empty()
        && stem != "."
        && stem != ".."
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{what} {stem:?}: expected a plain shard name (letters, digits, _ - .), not a path"
        )))
    }
}

fn codebook_from_py(a: &Bound<'_, PyArrayDyn<f32>>) -> PyResult<Codebook> {
    let ro = a.readonly();
    let shape = ro.shape().to_vec();
    if shape.len() != 2 {
        return Err(PyValueError::new_err(format!(
            "codebook must be a [k, dim] float32 array, got shape {shape:?}"
        )));
    }
    Codebook::new(shape[0], shape[1], ro.as_array().iter().copied().collect()).map_err(km_err)
}

fn codebook_to_py<'py>(py: Python<'py>, c: Codebook) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    Ok(c.centroids.into_pyarray(py).reshape(vec![c.k, c.dim])?)
}

fn stats_to_py<'py>(
    py: Python<'py>,
    s: ClientStats,
    k: usize,
    d: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("sums", s.sums.into_pyarray(py).reshape(vec![k, d])?)?;
    out.set_item("sumsq", s.sumsq.into_pyarray(py).reshape(vec![k, d])?)?;
    let counts: Vec<i64> = s.counts.iter().map(|&c| c as i64).collect();
    out.set_item("counts", counts.into_pyarray(py))?;
    out.set_item("inertia", vec![s.inertia].into_pyarray(py))?;
    out.set_item("n_frames", vec![s.n_frames as i64].into_pyarray(py))?;
    Ok(out)
}

/// A client's reply as [`ClientStats`], checked against the codebook's shape.
fn stats_from_py(d: &Bound<'_, PyDict>, k: usize, dim: usize, who: &str) -> PyResult<ClientStats> {
    let (sums, _) = array::<f64>(d, "sums", who)?;
    let (sumsq, _) = array::<f64>(d, "sumsq", who)?;
    let (counts, _) = array::<i64>(d, "counts", who)?;
    let (inertia, _) = array::<f64>(d, "inertia", who)?;
    let (n_frames, _) = array::<i64>(d, "n_frames", who)?;
    if sums.len() != k * dim || sumsq.len() != k * dim || counts.len() != k {
        return Err(PyValueError::new_err(format!(
            "{who}: statistics are not for k = {k}, dim = {dim} ({} sums, {} counts)",
            sums.len(),
            counts.len()
        )));
    }
    if counts.iter().any(|&c| c < 0) || inertia.len() != 1 || n_frames.len() != 1 || n_frames[0] < 0
    {
        return Err(PyValueError::new_err(format!(
            "{who}: malformed statistics (negative counts, or inertia/n_frames not one value)"
        )));
    }
    Ok(ClientStats {
        sums,
        sumsq,
        counts: counts.iter().map(|&c| c as u64).collect(),
        inertia: inertia[0],
        n_frames: n_frames[0] as u64,
    })
}

/// One SuperNode's feature shard (`client_K/FEATURE.npy` + `.len`, from `fedhubert features`).
#[pyclass(module = "fedhubert")]
pub struct KmeansClient {
    dir: PathBuf,
    feature: String,
    inner: InProcessClient,
}

#[pymethods]
impl KmeansClient {
    #[new]
    #[pyo3(signature = (partition, feature = "mfcc"))]
    fn new(partition: &str, feature: &str) -> PyResult<Self> {
        plain_stem("feature", feature)?;
        let dir = PathBuf::from(partition);
        let src = ShardSource::open(&dir, feature).map_err(|e| {
            PyValueError::new_err(format!(
                "partition {partition}: cannot open the `{feature}` feature shard ({e}); run `fedhubert features` on it first"
            ))
        })?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| partition.to_string());
        Ok(Self {
            inner: InProcessClient::new(name, Box::new(src)),
            feature: feature.to_string(),
            dir,
        })
    }

    /// K of a folder named `client_K`, else None.
    #[getter]
    fn index_from_dir(&self) -> Option<usize> {
        index_from_dir(&self.dir)
    }

    #[getter]
    fn n_frames(&self) -> usize {
        self.inner.n_frames()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// The init message: local k-means centroids `[m, dim]` (float32) and their weights `[m]`
    /// (float64, cluster sizes), small clusters left out.
    fn init_summary<'py>(
        &self,
        py: Python<'py>,
        k: usize,
        seed: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = py
            .detach(|| self.inner.init_summary(k, seed))
            .map_err(km_err)?;
        let m = s.weights.len();
        let out = PyDict::new(py);
        out.set_item(
            "centroids",
            s.centroids.into_pyarray(py).reshape(vec![m, s.dim])?,
        )?;
        out.set_item("weights", s.weights.into_pyarray(py))?;
        Ok(out)
    }

    /// One round's reply: per-cluster `sums`, `sumsq` `[k, dim]` (float64), `counts` `[k]`
    /// (int64), `inertia` and `n_frames` (one value each) of this client's frames against `codebook`.
    fn stats<'py>(
        &self,
        py: Python<'py>,
        codebook: &Bound<'py, PyArrayDyn<f32>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let cb = codebook_from_py(codebook)?;
        let (k, d) = (cb.k, cb.dim);
        let s = py.detach(|| self.inner.stats(0, &cb)).map_err(km_err)?;
        stats_to_py(py, s, k, d)
    }

    /// Labels every frame with the nearest centroid of `codebook` and writes `LABELS.npy` +
    /// `LABELS.len` into the partition (what `fedhubert kmeans` writes). Returns
    /// `{"utterances", "frames", "inertia"}`.
    #[pyo3(signature = (codebook, labels = "km"))]
    fn label<'py>(
        &self,
        py: Python<'py>,
        codebook: &Bound<'py, PyArrayDyn<f32>>,
        labels: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        plain_stem("labels", labels)?;
        let cb = codebook_from_py(codebook)?;
        let rep = py
            .detach(|| label_client(&self.dir, &self.feature, &cb, Some(labels), None))
            .map_err(km_err)?;
        let out = PyDict::new(py);
        out.set_item("utterances", rep.utterances)?;
        out.set_item("frames", rep.frames)?;
        out.set_item("inertia", rep.inertia)?;
        Ok(out)
    }
}

/// The server's rounds of federated k-means, stepped by the caller (Flower's ServerApp):
/// `init_seed`/`init` → (`next_round` → `codebook` → `apply`)* → `finish`.
#[pyclass(module = "fedhubert")]
pub struct KmeansServer {
    cfg: FederatedConfig,
    n_clients: usize,
    server: Option<Rounds>,
    dropouts: Vec<String>,
}

impl KmeansServer {
    fn state(&mut self) -> PyResult<&mut Rounds> {
        self.server
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("call init() with the clients' summaries first"))
    }

    /// The replies in client order (the order the native loop adds them in, so the float sums
    /// agree bit for bit), failures recorded as dropouts.
    fn aggregate(
        &mut self,
        replies: &Bound<'_, PyDict>,
        failures: Vec<(usize, String)>,
    ) -> PyResult<(ClientStats, usize)> {
        let (k, d, round) = {
            let s = self.state()?;
            let cb = s.codebook().map_err(km_err)?;
            (cb.k, cb.dim, s.round())
        };
        let mut by_client = BTreeMap::new();
        for (c, v) in replies.iter() {
            let c: usize = c.extract()?;
            if c >= self.n_clients {
                return Err(PyValueError::new_err(format!(
                    "reply from client {c}, but there are {} clients",
                    self.n_clients
                )));
            }
            let d = v.cast::<PyDict>().map_err(|_| {
                PyValueError::new_err(format!("client {c}: the reply must be a dict of arrays"))
            })?;
            by_client.insert(c, d.clone());
        }
        let mut agg = ClientStats::zeros(k, d);
        let mut replied = 0;
        for (c, v) in &by_client {
            let who = format!("client {c}, round {round}");
            match stats_from_py(v, k, d, &who) {
                Ok(s) => {
                    agg.add(&s);
                    replied += 1;
                }
                Err(e) => {
                    tracing::warn!("{who}: malformed reply ignored ({e})");
                    self.dropouts.push(format!("client_{c}"));
                }
            }
        }
        for (c, why) in failures {
            tracing::warn!(
                client = c,
                round,
                "no reply ({why}); aggregating the others"
            );
            self.dropouts.push(format!("client_{c}"));
        }
        Ok((agg, replied))
    }
}

#[pymethods]
impl KmeansServer {
    /// Same settings and defaults as `fedhubert kmeans --mode federated`.
    #[new]
    #[pyo3(signature = (k, n_clients, seed = 0, rounds = 100, tol = 1e-4, update = "lloyd", clients_per_round = None))]
    fn new(
        k: usize,
        n_clients: usize,
        seed: u64,
        rounds: usize,
        tol: f64,
        update: &str,
        clients_per_round: Option<usize>,
    ) -> PyResult<Self> {
        if k == 0 || k > u16::MAX as usize + 1 {
            return Err(PyValueError::new_err(format!(
                "k = {k}: must be between 1 and 65536 (labels are u16)"
            )));
        }
        if n_clients == 0 {
            return Err(PyValueError::new_err("n_clients must be at least 1"));
        }
        let update = match update {
            "lloyd" => ServerUpdate::Lloyd,
            "mini-batch" | "minibatch" => ServerUpdate::MiniBatch,
            other => {
                return Err(PyValueError::new_err(format!(
                    "update {other:?}: expected \"lloyd\" or \"mini-batch\""
                )));
            }
        };
        Ok(Self {
            cfg: FederatedConfig {
                k,
                rounds,
                tol,
                update,
                clients_per_round,
                seed,
                ..Default::default()
            },
            n_clients,
            server: None,
            dropouts: Vec::new(),
        })
    }

    /// The seed client `c` uses for its init summary (as the native loop gives it).
    fn init_seed(&self, client: usize) -> u64 {
        self.cfg.seed.wrapping_add(1 + client as u64)
    }

    /// Server init from the clients' summaries `{client: {"centroids", "weights"}}` (clients
    /// that sent none are dropouts); returns the first codebook `[k, dim]`.
    #[pyo3(signature = (summaries, failures = Vec::new()))]
    fn init<'py>(
        &mut self,
        py: Python<'py>,
        summaries: &Bound<'py, PyDict>,
        failures: Vec<(usize, String)>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let mut by_client = BTreeMap::new();
        for (c, v) in summaries.iter() {
            let c: usize = c.extract()?;
            let who = format!("client {c}, init");
            let d = v
                .cast::<PyDict>()
                .map_err(|_| PyValueError::new_err(format!("{who}: expected a dict of arrays")))?;
            let (centroids, shape) = array::<f32>(d, "centroids", &who)?;
            let (weights, _) = array::<f64>(d, "weights", &who)?;
            if shape.len() != 2 || shape[0] != weights.len() {
                return Err(PyValueError::new_err(format!(
                    "{who}: centroids {shape:?} do not match {} weights",
                    weights.len()
                )));
            }
            by_client.insert(
                c,
                LocalSummary {
                    dim: shape[1],
                    centroids,
                    weights,
                },
            );
        }
        for (c, why) in failures {
            tracing::warn!(client = c, "no init summary ({why})");
            self.dropouts.push(format!("client_{c}"));
        }
        let summaries: Vec<LocalSummary> = by_client.into_values().collect();
        if let Some(s) = summaries.iter().find(|s| s.dim != summaries[0].dim) {
            return Err(PyValueError::new_err(format!(
                "clients sent {}-dim and {}-dim centroids",
                summaries[0].dim, s.dim
            )));
        }
        let cfg = self.cfg.clone();
        let centers = py
            .detach(|| server_init(&summaries, cfg.k, &cfg))
            .map_err(km_err)?;
        let d = summaries[0].dim;
        let init = Codebook::new(cfg.k, d, centers).map_err(km_err)?;
        self.server = Some(Rounds::new(&cfg, init.clone(), self.n_clients).map_err(km_err)?);
        codebook_to_py(py, init)
    }

    /// The clients to ask this round (sorted), or None when the rounds are over.
    fn next_round(&mut self) -> PyResult<Option<Vec<usize>>> {
        self.state()?.next_round().map_err(km_err)
    }

    /// The round about to run (the evaluation round after the last).
    #[getter]
    fn round(&mut self) -> PyResult<usize> {
        Ok(self.state()?.round())
    }

    /// The current codebook `[k, dim]` (float32), to send to the clients.
    fn codebook<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let cb = self.state()?.codebook().map_err(km_err)?;
        codebook_to_py(py, cb)
    }

    /// Closes the round with `{client: stats}` replies and `[(client, why)]` failures; returns
    /// the round's log (`round`, `sampled`, `replied`, `inertia`, `frames`, `splits`) as JSON.
    #[pyo3(signature = (replies, failures = Vec::new()))]
    fn apply(
        &mut self,
        replies: &Bound<'_, PyDict>,
        failures: Vec<(usize, String)>,
    ) -> PyResult<String> {
        let (agg, replied) = self.aggregate(replies, failures)?;
        let s = self.state()?;
        s.apply(&agg, replied).map_err(km_err)?;
        serde_json::to_string(s.history().last().expect("apply logs the round"))
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Ends the fit with the evaluation round's replies (every client, final codebook), writes
    /// `OUT/codebook.safetensors` (as `fedhubert kmeans`) and returns a JSON summary.
    #[pyo3(signature = (replies, out, failures = Vec::new()))]
    fn finish(
        &mut self,
        replies: &Bound<'_, PyDict>,
        out: &str,
        failures: Vec<(usize, String)>,
    ) -> PyResult<String> {
        let (agg, replied) = self.aggregate(replies, failures)?;
        // On a failure (no replies, a bad out folder) the state stays, so the caller can retry.
        let server = self.state()?.clone();
        let fit = server
            .finish(&agg, replied, self.dropouts.clone())
            .map_err(km_err)?;
        let path = Path::new(out).join("codebook.safetensors");
        let meta = CodebookMeta {
            mode: "federated".into(),
            seed: self.cfg.seed,
            inertia: fit.inertia,
            n_frames: fit.n_frames,
        };
        fit.codebook.save(&path, &meta).map_err(km_err)?;
        self.server = None;
        self.dropouts.clear();
        let empty = fit.counts.iter().filter(|&&c| c == 0).count();
        Ok(serde_json::json!({
            "codebook": path,
            "k": fit.codebook.k,
            "dim": fit.codebook.dim,
            "rounds": fit.rounds,
            "inertia": fit.inertia,
            "n_frames": fit.n_frames,
            "empty_clusters": empty,
            "dropouts": fit.dropouts,
            "history": fit.history,
        })
        .to_string())
    }
}
