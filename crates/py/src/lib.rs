//! `fedhubert` for Python: what a Flower app needs from the Rust crates, and nothing it could do
//! itself. Weights cross the boundary as `dict[str, numpy.ndarray]` (float32, HF parameter
//! names, in model order); configs and metrics as JSON strings and plain dicts. Training,
//! evaluation, aggregation, checkpoints and export run in Rust with the GIL released.
//!
//! - [`Client`]: one SuperNode's partition (`client_K` folder): local training and evaluation.
//! - [`Server`]: the round loop of `fedhubert pretrain --simulation`, stepped by the ServerApp.
//! - [`kmeans::KmeansClient`], [`kmeans::KmeansServer`]: federated k-means (the global codebook
//!   of the pseudo-labels) across SuperNodes, sums and counts only.
//! - `load_run_file`, `read_checkpoint`, `export_hf`: configuration, checkpoints, HF export.

pub mod client;
pub mod kmeans;
pub mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedhubert_fl::{Compression, EvalRes, FitConfig, Tensor, Weights};
use fedhubert_train::RunFile;
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

pub use client::{LocalClient, index_from_dir};
pub use server::{RoundServer, Upload};

/// Name of the single array a client sends when its update is compressed (f16/int8 bytes).
pub const PAYLOAD_KEY: &str = "__fedhubert_payload__";

/// The configs/tiny.yaml run configuration, selectable by name so a Flower app needs no file.
const TINY_YAML: &str = include_str!("../../../configs/tiny.yaml");

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Train(#[from] fedhubert_train::TrainError),
    #[error(transparent)]
    Fl(#[from] fedhubert_fl::FlError),
    #[error(transparent)]
    Model(#[from] fedhubert_model::ModelError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("client {0}")]
    Client(String),
    #[error("{0}")]
    State(String),
}

impl From<BridgeError> for PyErr {
    fn from(e: BridgeError) -> PyErr {
        match e {
            BridgeError::Config(_) | BridgeError::Train(fedhubert_train::TrainError::Config(_)) => {
                PyValueError::new_err(e.to_string())
            }
            BridgeError::Fl(
                fedhubert_fl::FlError::Config(_) | fedhubert_fl::FlError::Layout(_),
            ) => PyValueError::new_err(e.to_string()),
            _ => PyRuntimeError::new_err(e.to_string()),
        }
    }
}

/// Reads a run configuration (`tiny` for the built-in configs/tiny.yaml, else a YAML path),
/// applies `section.key=value` overrides and validates it.
pub fn run_file(config: &str, overrides: &[String]) -> Result<RunFile, BridgeError> {
    if config == "tiny" {
        let mut f =
            tempfile::NamedTempFile::new().map_err(|e| BridgeError::Io(std::env::temp_dir(), e))?;
        std::io::Write::write_all(&mut f, TINY_YAML.as_bytes())
            .map_err(|e| BridgeError::Io(f.path().to_path_buf(), e))?;
        return Ok(RunFile::load(Some(f.path()), overrides)?);
    }
    let p = Path::new(config);
    if !p.is_file() {
        return Err(BridgeError::Config(format!(
            "run configuration {config}: no such file (give a YAML path like configs/tiny.yaml, or `tiny`)"
        )));
    }
    Ok(RunFile::load(Some(p), overrides)?)
}

fn parse_run_file(json: &str) -> Result<RunFile, BridgeError> {
    let rf: RunFile = serde_json::from_str(json)
        .map_err(|e| BridgeError::Config(format!("run file from the server: {e}")))?;
    rf.model_config()?;
    rf.strategy()?;
    rf.train_config()?.validate()?;
    Ok(rf)
}

fn parse_fit_config(json: &str) -> Result<FitConfig, BridgeError> {
    serde_json::from_str(json)
        .map_err(|e| BridgeError::Config(format!("round config from the server: {e}")))
}

/// `dict[str, ndarray]` → Weights, in dict order. The one copy here is unavoidable: the trainer
/// owns its host tensors.
fn weights_from_py(arrays: &Bound<'_, PyDict>) -> PyResult<Weights> {
    let mut tensors = Vec::with_capacity(arrays.len());
    for (k, v) in arrays.iter() {
        let name: String = k.extract()?;
        let arr = v.cast::<PyArrayDyn<f32>>().map_err(|_| {
            PyValueError::new_err(format!("array {name:?}: expected a float32 numpy array"))
        })?;
        let ro = arr.readonly();
        let shape = ro.shape().to_vec();
        let data = match ro.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => ro.as_array().iter().copied().collect(),
        };
        tensors.push(Tensor { name, shape, data });
    }
    Ok(Weights::new(tensors))
}

/// Weights → `dict[str, ndarray]`; each buffer moves into numpy without a copy.
fn weights_to_py<'py>(py: Python<'py>, w: Weights) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for t in w.tensors {
        let a = t.data.into_pyarray(py).reshape(t.shape)?;
        d.set_item(t.name, a)?;
    }
    Ok(d)
}

fn upload_from_py(arrays: &Bound<'_, PyDict>) -> PyResult<Upload> {
    if arrays.len() == 1
        && let Some(p) = arrays.get_item(PAYLOAD_KEY)?
    {
        let a = p.cast::<PyArrayDyn<u8>>().map_err(|_| {
            PyValueError::new_err(format!("{PAYLOAD_KEY}: expected a uint8 numpy array"))
        })?;
        return Ok(Upload::Payload(
            a.readonly().as_array().iter().copied().collect(),
        ));
    }
    Ok(Upload::Weights(weights_from_py(arrays)?))
}

fn metrics_to_py<'py>(py: Python<'py>, m: &BTreeMap<String, f64>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in m {
        d.set_item(k, v)?;
    }
    Ok(d)
}

fn metrics_from_py(d: &Bound<'_, PyDict>) -> PyResult<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    for (k, v) in d.iter() {
        let k: String = k.extract()?;
        // Flower's MetricRecord also carries ints (num-examples) and lists; keep the numbers.
        if let Ok(x) = v.extract::<f64>() {
            m.insert(k, x);
        }
    }
    Ok(m)
}

/// Reads and validates a run configuration; returns it as JSON (what the server sends clients).
#[pyfunction]
#[pyo3(signature = (config, overrides = Vec::new()))]
fn load_run_file(config: &str, overrides: Vec<String>) -> PyResult<String> {
    let rf = run_file(config, &overrides)?;
    serde_json::to_string(&rf).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// One SuperNode's data and trainer.
#[pyclass(unsendable)]
struct Client {
    // Boxed: burn's device and model types are over-aligned (64 bytes), more than Python's
    // object allocator guarantees for a pyclass's inline contents.
    inner: Box<LocalClient>,
    compression: Compression,
    frozen: Vec<String>,
}

#[pymethods]
impl Client {
    /// `partition`: a `client_K` folder (manifest.csv + labels); `run_file`: the server's JSON.
    #[new]
    fn new(partition: PathBuf, run_file: &str) -> PyResult<Self> {
        let rf = parse_run_file(run_file)?;
        let run_cfg = rf.run_config().map_err(BridgeError::from)?;
        Ok(Self {
            inner: Box::new(LocalClient::new(&partition, &rf)?),
            compression: run_cfg.compression,
            frozen: run_cfg.frozen_prefixes,
        })
    }

    /// K for a `client_K` folder, else None.
    #[getter]
    fn index_from_dir(&self) -> Option<usize> {
        index_from_dir(&self.inner.dir)
    }

    /// Local training from the global weights. Returns (arrays, num_examples, metrics): the
    /// trainable weights, or one uint8 payload under `PAYLOAD_KEY` when compression is on.
    fn fit<'py>(
        &mut self,
        py: Python<'py>,
        arrays: &Bound<'py, PyDict>,
        fit_config: &str,
    ) -> PyResult<(Bound<'py, PyDict>, u64, Bound<'py, PyDict>)> {
        let global = weights_from_py(arrays)?;
        let cfg = parse_fit_config(fit_config)?;
        let inner = &mut self.inner;
        let res = py.detach(|| inner.fit(&global, &cfg))?;
        let frozen = &self.frozen;
        let sent = res
            .weights
            .filter(|n| !frozen.iter().any(|p| n.starts_with(p.as_str())));
        let out = if self.compression == Compression::None {
            weights_to_py(py, sent)?
        } else {
            let current = global.filter(|n| !frozen.iter().any(|p| n.starts_with(p.as_str())));
            let payload = fedhubert_fl::compress::encode(&sent, &current, self.compression)
                .map_err(BridgeError::from)?;
            let d = PyDict::new(py);
            d.set_item(PAYLOAD_KEY, payload.into_pyarray(py))?;
            d
        };
        Ok((out, res.num_examples, metrics_to_py(py, &res.metrics)?))
    }

    /// Evaluation of the global weights on the local validation split: (num_examples, metrics).
    fn evaluate<'py>(
        &mut self,
        py: Python<'py>,
        arrays: &Bound<'py, PyDict>,
        eval_config: &str,
    ) -> PyResult<(u64, Bound<'py, PyDict>)> {
        let global = weights_from_py(arrays)?;
        let cfg = parse_fit_config(eval_config)?;
        let inner = &mut self.inner;
        let res = py.detach(|| inner.evaluate(&global, &cfg))?;
        Ok((res.num_examples, metrics_to_py(py, &res.metrics)?))
    }
}

/// The ServerApp's rounds (see [`RoundServer`]).
#[pyclass(unsendable)]
struct Server {
    // Boxed for the same alignment reason as `Client`.
    inner: Box<RoundServer>,
}

fn plan_to_py(plan: Vec<(usize, FitConfig)>) -> PyResult<Vec<(usize, String)>> {
    plan.into_iter()
        .map(|(c, cfg)| {
            serde_json::to_string(&cfg)
                .map(|s| (c, s))
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
        .collect()
}

#[pymethods]
impl Server {
    /// `run_file`: JSON from `load_run_file`; `out`: checkpoint folder; clients are numbered
    /// 0..num_clients; `resume` continues from `out/checkpoint.safetensors` when it exists.
    #[new]
    fn new(run_file: &str, out: PathBuf, num_clients: usize, resume: bool) -> PyResult<Self> {
        let rf = parse_run_file(run_file)?;
        Ok(Self {
            inner: Box::new(RoundServer::new(rf, &out, num_clients, resume)?),
        })
    }

    #[getter]
    fn num_rounds(&self) -> u64 {
        self.inner.run_cfg.num_rounds
    }

    #[getter]
    fn round_timeout_s(&self) -> Option<f64> {
        self.inner.run_cfg.round_timeout_s
    }

    /// Rounds already completed (restored from the checkpoint on resume).
    #[getter]
    fn completed_rounds(&self) -> usize {
        self.inner.history.len()
    }

    fn next_round(&self) -> Option<u64> {
        self.inner.next_round()
    }

    /// The global weights as numpy arrays (a fresh copy: Flower serialises them).
    fn global_arrays<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        weights_to_py(py, self.inner.global.clone())
    }

    /// Starts an attempt of the next round: [(client, fit config JSON)].
    fn begin_attempt(&mut self) -> PyResult<Vec<(usize, String)>> {
        plan_to_py(self.inner.begin_attempt()?)
    }

    /// One client's reply; call in increasing client order.
    fn accumulate(
        &mut self,
        py: Python<'_>,
        client: usize,
        arrays: &Bound<'_, PyDict>,
        num_examples: u64,
        metrics: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        let up = upload_from_py(arrays)?;
        let m = metrics_from_py(metrics)?;
        let inner = &mut self.inner;
        py.detach(|| inner.accumulate(client, up, num_examples, m))?;
        Ok(())
    }

    fn fail(&mut self, client: usize, why: String) -> PyResult<()> {
        Ok(self.inner.fail(client, why)?)
    }

    /// True when the round is aggregated; False when it must be retried with a fresh sample.
    fn end_attempt(&mut self, py: Python<'_>) -> PyResult<bool> {
        let inner = &mut self.inner;
        Ok(py.detach(|| inner.end_attempt())?)
    }

    /// [(client, eval config JSON)] for this round (empty when it is not an evaluation round).
    fn eval_plan(&self) -> PyResult<Vec<(usize, String)>> {
        plan_to_py(self.inner.eval_plan())
    }

    /// [(client, num_examples, metrics)] in client order → writes the checkpoint, returns the
    /// round's record as JSON (one line of metrics.jsonl).
    fn finish_round(&mut self, py: Python<'_>, evals: &Bound<'_, PyList>) -> PyResult<String> {
        let mut rs = Vec::new();
        for item in evals.iter() {
            let (client, num_examples, metrics): (usize, u64, Bound<'_, PyDict>) =
                item.extract()?;
            rs.push(EvalRes {
                client,
                num_examples,
                metrics: metrics_from_py(&metrics)?,
            });
        }
        let inner = &mut self.inner;
        let rec = py.detach(|| inner.finish_round(rs))?;
        serde_json::to_string(&rec).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Writes model.safetensors, hf/ and summary.json into the output folder; returns the summary JSON.
    fn export(&mut self, py: Python<'_>) -> PyResult<String> {
        // &mut: the strategy is Send but not Sync, so only a unique borrow may leave the GIL.
        let inner = &mut self.inner;
        let s = py.detach(move || inner.export("federated-flower"))?;
        Ok(s.to_string())
    }
}

/// A round checkpoint (`checkpoint.safetensors` of either runner) as a dict: round, seed,
/// strategy (JSON), history (JSON), global (dict of arrays).
#[pyfunction]
fn read_checkpoint<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let ck = py
        .detach(|| fedhubert_fl::rounds::load_checkpoint(&path))
        .map_err(BridgeError::from)?;
    let d = PyDict::new(py);
    d.set_item("round", ck.round)?;
    d.set_item("seed", ck.seed)?;
    d.set_item("strategy", ck.strategy)?;
    d.set_item(
        "history",
        serde_json::to_string(&ck.history).map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
    )?;
    d.set_item("global", weights_to_py(py, ck.global)?)?;
    Ok(d)
}

/// A round checkpoint → a HuggingFace `HubertModel` folder (plus the pretraining head files).
#[pyfunction]
fn export_hf(py: Python<'_>, checkpoint: PathBuf, run_file: &str, out: PathBuf) -> PyResult<()> {
    let rf = parse_run_file(run_file)?;
    py.detach(|| -> Result<(), BridgeError> {
        let ck = fedhubert_fl::rounds::load_checkpoint(&checkpoint)?;
        let dev = fedhubert_model::cpu_device();
        let template = fedhubert_model::HubertForPretraining::new(
            &rf.model_config()?,
            &rf.pretrain_config()?,
            rf.federated.seed,
            &dev,
        )?;
        let model =
            fedhubert_model::load_tensors(template, fedhubert_train::from_weights(&ck.global))?;
        model.save_hf(&out)?;
        Ok(())
    })?;
    Ok(())
}

#[pymodule]
fn fedhubert(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PAYLOAD_KEY", PAYLOAD_KEY)?;
    m.add_function(wrap_pyfunction!(load_run_file, m)?)?;
    m.add_function(wrap_pyfunction!(read_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(export_hf, m)?)?;
    m.add_class::<Client>()?;
    m.add_class::<Server>()?;
    m.add_class::<kmeans::KmeansClient>()?;
    m.add_class::<kmeans::KmeansServer>()?;
    Ok(())
}
