//! `fedhubert` for Python: what a Flower app needs from the Rust crates, and nothing it could do
//! itself. Weights cross the boundary as `dict[str, numpy.ndarray]` (float32, HF parameter
//! names, in model order); configs and metrics as JSON strings and plain dicts. Training,
//! evaluation, aggregation, checkpoints and export run in Rust with the GIL released.
//!
//! - [`Client`]: one SuperNode's partition (`client_K` folder): local training and evaluation.
//! - [`Server`]: the round engine of `fedhubert pretrain --simulation`; the ServerApp moves its
//!   exchanges' messages.
//! - [`ServerDistillation`]: `fedhubert distill --mode server` (the server distils a teacher into
//!   the aggregate after every round), whose `server()` is a [`Server`] like pretraining's.
//! - [`kmeans::KmeansClient`], [`kmeans::KmeansServer`]: federated k-means (the global codebook
//!   of the pseudo-labels) across SuperNodes, sums and counts only.
//! - `load_run_file`, `load_distill_run_file`, `read_checkpoint`, `export_hf`: configuration,
//!   checkpoints, HF export.

pub mod client;
pub mod distill;
pub mod kmeans;
pub mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedhubert_fl::instructions::check_format;
use fedhubert_fl::{
    ClientInstructions, EvalRes, Exchange, MESSAGE_FORMAT, Progress, Reply, Tensor, Upload,
    Weights, prepare_reply,
};
use fedhubert_train::RunFile;
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub use client::{LocalClient, NodeState, index_from_dir};
pub use distill::{DistillServer, ServerDistillation, distill_run_file};
pub use server::RoundServer;

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
    Tensor(#[from] fedhubert_fl::TensorError),
    #[error(transparent)]
    Model(#[from] fedhubert_model::ModelError),
    #[error(transparent)]
    Distill(#[from] fedhubert_distill::DistillError),
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
                fedhubert_fl::FlError::Config(_)
                | fedhubert_fl::FlError::Tensor(fedhubert_fl::TensorError::Layout(_)),
            )
            | BridgeError::Tensor(fedhubert_fl::TensorError::Layout(_)) => {
                PyValueError::new_err(e.to_string())
            }
            // Bad configuration values and missing or malformed input files (teacher, server set).
            BridgeError::Distill(
                fedhubert_distill::DistillError::Config(_)
                | fedhubert_distill::DistillError::Data(_)
                | fedhubert_distill::DistillError::Train(fedhubert_train::TrainError::Config(_)),
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

/// A run file (or distillation run file) as it goes to the clients: its JSON with the message
/// format beside the sections.
fn wire_json(rf: &impl serde::Serialize) -> Result<String, BridgeError> {
    let mut v = serde_json::to_value(rf).map_err(|e| BridgeError::Config(e.to_string()))?;
    v["format"] = MESSAGE_FORMAT.into();
    Ok(v.to_string())
}

/// The sections of a run file received from the server, after checking its message format.
fn from_wire<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T, BridgeError> {
    let mut v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| BridgeError::Config(format!("{what}: {e}")))?;
    let format = v.as_object_mut().and_then(|m| m.remove("format"));
    check_format(format.and_then(|f| f.as_u64()), what)?;
    serde_json::from_value(v).map_err(|e| BridgeError::Config(format!("{what}: {e}")))
}

fn parse_run_file(json: &str) -> Result<RunFile, BridgeError> {
    let rf: RunFile = from_wire(json, "run file from the server")?;
    rf.validate()?;
    Ok(rf)
}

fn parse_distill_run_file(json: &str) -> Result<fedhubert_distill::DistillRunFile, BridgeError> {
    let rf: fedhubert_distill::DistillRunFile = from_wire(json, "distillation run file")?;
    rf.validate()?;
    Ok(rf)
}

fn parse_instructions(json: &str) -> Result<ClientInstructions, BridgeError> {
    Ok(ClientInstructions::from_json(json)?)
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
    Ok(wire_json(&run_file(config, &overrides)?)?)
}

/// Reads and validates a distillation configuration (`tiny_student` for the built-in
/// configs/tiny_student.yaml, or a YAML path with `federated:`, `pretraining:` and
/// `distillation:` sections); returns it as JSON (for `ServerDistillation`).
#[pyfunction]
#[pyo3(signature = (config, overrides = Vec::new()))]
fn load_distill_run_file(config: &str, overrides: Vec<String>) -> PyResult<String> {
    Ok(wire_json(&distill_run_file(config, &overrides)?)?)
}

/// One SuperNode's data and trainer.
#[pyclass(unsendable)]
struct Client {
    // Boxed: burn's device and model types are over-aligned (64 bytes), more than Python's
    // object allocator guarantees for a pyclass's inline contents.
    inner: Box<LocalClient>,
}

#[pymethods]
impl Client {
    /// `partition`: a `client_K` folder (manifest.csv + labels); `run_file`: the server's JSON.
    /// `state_dir`: the node's own folder for what it keeps between rounds (needed by
    /// `local_optimizer_state: keep`).
    #[new]
    #[pyo3(signature = (partition, run_file, state_dir = None))]
    fn new(partition: PathBuf, run_file: &str, state_dir: Option<PathBuf>) -> PyResult<Self> {
        let rf = parse_run_file(run_file)?;
        let state = state_dir.as_deref().map(NodeState::new).transpose()?;
        Ok(Self {
            inner: Box::new(LocalClient::new(&partition, &rf, state)?),
        })
    }

    /// K for a `client_K` folder, else None.
    #[getter]
    fn index_from_dir(&self) -> Option<usize> {
        index_from_dir(&self.inner.dir)
    }

    /// Hash of the codebook this partition's labels come from (their provenance record; empty
    /// for a record without one): every client of a run must report the same.
    #[getter]
    fn codebook(&self) -> &str {
        &self.inner.codebook
    }

    /// Local training from the global weights as the instructions (JSON from the server) say.
    /// Returns (arrays, num_examples, metrics): the trainable weights, or one uint8 payload
    /// under `PAYLOAD_KEY` when compression is on (`fedhubert_fl::prepare_reply`, which also
    /// clips the update under DP and then sends no training metrics).
    fn fit<'py>(
        &mut self,
        py: Python<'py>,
        arrays: &Bound<'py, PyDict>,
        instructions: &str,
    ) -> PyResult<(Bound<'py, PyDict>, u64, Bound<'py, PyDict>)> {
        let global = weights_from_py(arrays)?;
        let ins = parse_instructions(instructions)?;
        let inner = &mut self.inner;
        let reply = py.detach(|| -> Result<_, BridgeError> {
            let res = inner.fit(&global, &ins)?;
            Ok(prepare_reply(res, &global, &ins)?)
        })?;
        let Reply::Fit {
            upload,
            num_examples,
            metrics,
        } = reply
        else {
            return Err(BridgeError::Config("a training reply was expected".into()).into());
        };
        let out = match upload {
            Upload::Weights(w) => weights_to_py(py, w)?,
            Upload::Payload(p) => {
                let d = PyDict::new(py);
                d.set_item(PAYLOAD_KEY, p.into_pyarray(py))?;
                d
            }
        };
        Ok((out, num_examples, metrics_to_py(py, &metrics)?))
    }

    /// Evaluation of the global weights on the local validation split: (num_examples, metrics).
    fn evaluate<'py>(
        &mut self,
        py: Python<'py>,
        arrays: &Bound<'py, PyDict>,
        instructions: &str,
    ) -> PyResult<(u64, Bound<'py, PyDict>)> {
        let global = weights_from_py(arrays)?;
        let ins = parse_instructions(instructions)?;
        let inner = &mut self.inner;
        let res = py.detach(|| inner.evaluate(&global, &ins))?;
        Ok((res.num_examples, metrics_to_py(py, &res.metrics)?))
    }
}

/// The ServerApp's rounds (see [`RoundServer`]): pretraining, or server-side distillation (from
/// `ServerDistillation.server`).
#[pyclass(unsendable)]
struct Server {
    // Boxed for the same alignment reason as `Client`.
    inner: Box<Rounds>,
}

enum Rounds {
    Pretrain(RoundServer),
    Distill(DistillServer),
}

impl Server {
    fn rounds(&self) -> &RoundServer {
        match &*self.inner {
            Rounds::Pretrain(r) => r,
            Rounds::Distill(d) => &d.rounds,
        }
    }

    fn rounds_mut(&mut self) -> &mut RoundServer {
        match &mut *self.inner {
            Rounds::Pretrain(r) => r,
            Rounds::Distill(d) => &mut d.rounds,
        }
    }
}

fn json_value(x: &impl serde::Serialize) -> PyResult<serde_json::Value> {
    serde_json::to_value(x).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// An exchange for Python: (kind "fit" or "evaluate", round, [(client, instructions JSON)]).
type PyExchange = (String, u64, Vec<(usize, String)>);

fn exchange_to_py(ex: Exchange) -> PyResult<PyExchange> {
    let kind = match ex.kind {
        fedhubert_fl::ExchangeKind::Fit => "fit",
        fedhubert_fl::ExchangeKind::Evaluate => "evaluate",
    };
    let clients = ex
        .clients
        .into_iter()
        .map(|(c, ins)| {
            serde_json::to_string(&ins)
                .map(|s| (c, s))
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
        .collect::<PyResult<_>>()?;
    Ok((kind.to_string(), ex.round, clients))
}

/// The ServerApp's `resume` / `overwrite` run-config keys as a start.
fn start_of(resume: bool, overwrite: bool) -> PyResult<fedhubert_fl::store::Start> {
    use fedhubert_fl::store::Start;
    match (resume, overwrite) {
        (true, true) => Err(PyValueError::new_err(
            "resume and overwrite: give one of them (resume continues the checkpoint in out-dir, overwrite discards it)",
        )),
        (true, false) => Ok(Start::Resume),
        (false, true) => Ok(Start::Overwrite),
        (false, false) => Ok(Start::Fresh),
    }
}

#[pymethods]
impl Server {
    /// `run_file`: JSON from `load_run_file`; `out`: checkpoint folder, locked while this
    /// server lives; clients are numbered 0..num_clients; `resume` continues from
    /// `out/checkpoint.safetensors` when it exists; `overwrite` discards it. With neither, an
    /// existing checkpoint is an error.
    #[new]
    #[pyo3(signature = (run_file, out, num_clients, resume, overwrite=false))]
    fn new(
        run_file: &str,
        out: PathBuf,
        num_clients: usize,
        resume: bool,
        overwrite: bool,
    ) -> PyResult<Self> {
        let rf = parse_run_file(run_file)?;
        Ok(Self {
            inner: Box::new(Rounds::Pretrain(RoundServer::new(
                rf,
                &out,
                num_clients,
                start_of(resume, overwrite)?,
            )?)),
        })
    }

    #[getter]
    fn num_rounds(&self) -> u64 {
        self.rounds().engine().config().num_rounds
    }

    #[getter]
    fn round_timeout_s(&self) -> Option<f64> {
        self.rounds().engine().config().round_timeout_s
    }

    /// Rounds already completed (restored from the checkpoint on resume).
    #[getter]
    fn completed_rounds(&self) -> usize {
        self.rounds().history().len()
    }

    /// The round in progress (or next), None when the run is complete.
    fn next_round(&self) -> Option<u64> {
        self.rounds().next_round()
    }

    /// The global weights as numpy arrays (a fresh copy: Flower serialises them).
    fn global_arrays<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        weights_to_py(py, self.rounds().global().clone())
    }

    /// The open exchange (opening the next one), or None when the run is complete: (kind,
    /// round, [(client, instructions JSON)]); send each client the global model and its
    /// instructions, then `deliver_fit`/`deliver_evaluate`/`fail` each reply as it arrives.
    fn next_exchange(&mut self, py: Python<'_>) -> PyResult<Option<PyExchange>> {
        let inner = self.rounds_mut();
        let ex = py.detach(|| inner.next_exchange())?;
        ex.map(exchange_to_py).transpose()
    }

    /// A client's training reply, in any order.
    fn deliver_fit(
        &mut self,
        py: Python<'_>,
        client: usize,
        arrays: &Bound<'_, PyDict>,
        num_examples: u64,
        metrics: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        let reply = Reply::Fit {
            upload: upload_from_py(arrays)?,
            num_examples,
            metrics: metrics_from_py(metrics)?,
        };
        let inner = self.rounds_mut();
        py.detach(|| inner.deliver(client, reply))?;
        Ok(())
    }

    /// A client's evaluation reply, in any order.
    fn deliver_evaluate(
        &mut self,
        client: usize,
        num_examples: u64,
        metrics: &Bound<'_, PyDict>,
    ) -> PyResult<()> {
        let reply = Reply::Evaluate(EvalRes {
            client,
            num_examples,
            metrics: metrics_from_py(metrics)?,
        });
        Ok(self.rounds_mut().deliver(client, reply)?)
    }

    /// A client of the open exchange that failed (error reply, lost node, no reply in time).
    fn fail(&mut self, client: usize, why: String) -> PyResult<()> {
        Ok(self.rounds_mut().deliver(client, Reply::Failed(why))?)
    }

    /// Closes the open exchange: ("retry", None) when too few clients trained (the next
    /// exchange samples afresh), ("aggregated", None) when an evaluation exchange follows, or
    /// ("round", record JSON) when the round is complete and its checkpoint written (one line of
    /// metrics.jsonl; in distillation with what the server's distillation did).
    fn close_exchange(&mut self, py: Python<'_>) -> PyResult<(String, Option<String>)> {
        let (progress, kd) = match &mut *self.inner {
            Rounds::Pretrain(r) => (py.detach(|| r.close_exchange())?, None),
            Rounds::Distill(d) => {
                let (p, kd) = py.detach(|| d.close_exchange())?;
                (p, Some(kd))
            }
        };
        let rec = match progress {
            Progress::Retry => return Ok(("retry".into(), None)),
            Progress::Aggregated => return Ok(("aggregated".into(), None)),
            Progress::RoundDone(rec) => rec,
        };
        let mut v = json_value(&rec)?;
        if let Some(kd) = kd {
            v["server_distill"] = json_value(&kd)?;
        }
        Ok(("round".into(), Some(v.to_string())))
    }

    /// Writes the final model, hf/ and summary.json into the output folder (pretraining:
    /// model.safetensors; distillation: student.safetensors, as `fedhubert distill`); returns the
    /// summary JSON.
    fn export(&mut self, py: Python<'_>) -> PyResult<String> {
        // &mut: the strategy is Send but not Sync, so only a unique borrow may leave the GIL.
        let s = match &mut *self.inner {
            Rounds::Pretrain(r) => py.detach(move || r.export("federated-flower"))?,
            Rounds::Distill(d) => py.detach(move || d.export())?,
        };
        Ok(s.to_string())
    }

    /// `pretrain` or `distill-server`.
    #[getter]
    fn mode(&self) -> &'static str {
        match &*self.inner {
            Rounds::Pretrain(_) => "pretrain",
            Rounds::Distill(_) => "distill-server",
        }
    }

    /// The run file the clients train with, as JSON.
    #[getter]
    fn client_run_file(&self) -> PyResult<String> {
        Ok(wire_json(&self.rounds().rf)?)
    }

    /// Server-side distillation's log so far as JSON (one entry per round: the first, mean and
    /// last step's losses); `[]` for pretraining.
    fn server_log(&self) -> PyResult<String> {
        let log = match &*self.inner {
            Rounds::Pretrain(_) => vec![],
            Rounds::Distill(d) => d.server_log(),
        };
        serde_json::to_string(&log).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }
}

/// Server-side distillation (`fedhubert distill --mode server`) before its rounds: loads the
/// teacher, the server-side set and the initial student; `server()` then makes the round loop.
#[pyclass(unsendable, name = "ServerDistillation")]
struct PyServerDistillation {
    // Boxed for the same alignment reason as `Client`; None once `server()` took it.
    inner: Option<Box<ServerDistillation>>,
    client_run_file: String,
    notes: Vec<String>,
    server_set: PathBuf,
}

#[pymethods]
impl PyServerDistillation {
    /// `distill_run_file`: JSON from `load_distill_run_file`; `teacher` and `server_set` replace
    /// `distillation.teacher` / `distillation.server_set` when given (as `--teacher` and
    /// `--server-set` do for `fedhubert distill`).
    #[new]
    #[pyo3(signature = (distill_run_file, teacher = None, server_set = None))]
    fn new(
        py: Python<'_>,
        distill_run_file: &str,
        teacher: Option<PathBuf>,
        server_set: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut rf = parse_distill_run_file(distill_run_file)?;
        if teacher.is_some() {
            rf.distillation.teacher = teacher;
        }
        if server_set.is_some() {
            rf.distillation.server_set = server_set;
        }
        let sd = py.detach(|| ServerDistillation::new(rf))?;
        let client_run_file =
            wire_json(&sd.client_run_file()).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Self {
            notes: sd.setup.notes.clone(),
            client_run_file,
            server_set: sd.rf.distillation.server_set.clone().unwrap_or_default(),
            inner: Some(Box::new(sd)),
        })
    }

    /// The run file (JSON) to give the clients: the student, its head following the teacher's.
    #[getter]
    fn client_run_file(&self) -> String {
        self.client_run_file.clone()
    }

    /// The server-side audio set (a folder with manifest.csv).
    #[getter]
    fn server_set(&self) -> PathBuf {
        self.server_set.clone()
    }

    /// What the setup changed from the configuration (student head, initialisation), for the log.
    #[getter]
    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    /// The round loop over clients 0..num_clients, checkpointing into `out`; `resume` and
    /// `overwrite` as for `Server`. Once per ServerDistillation.
    #[pyo3(signature = (out, num_clients, resume, overwrite=false))]
    fn server(
        &mut self,
        py: Python<'_>,
        out: PathBuf,
        num_clients: usize,
        resume: bool,
        overwrite: bool,
    ) -> PyResult<Server> {
        let start = start_of(resume, overwrite)?;
        let sd = self.inner.take().ok_or_else(|| {
            PyRuntimeError::new_err("ServerDistillation.server() was already called")
        })?;
        let d = py.detach(move || sd.server(&out, num_clients, start))?;
        Ok(Server {
            inner: Box::new(Rounds::Distill(d)),
        })
    }
}

/// A round checkpoint (`checkpoint.safetensors` of either runner) as a dict: round, seed,
/// strategy (JSON), history (JSON), global (dict of arrays), state (the strategy's state, e.g.
/// server optimizer moments or server distillation's heads: {name: dict of arrays}).
#[pyfunction]
fn read_checkpoint<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let ck = py
        .detach(|| fedhubert_fl::store::load_checkpoint(&path))
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
    let state = PyDict::new(py);
    for (k, w) in ck.state {
        state.set_item(k, weights_to_py(py, w)?)?;
    }
    d.set_item("state", state)?;
    Ok(d)
}

/// HuBERT iteration 2 on a node: layer `layer` of the model at `model` (a fedhubert checkpoint,
/// an HF folder or a published fairseq / torchaudio / s3prl `.pt`) for every utterance of
/// `partition/manifest.csv`, into `partition/hubert_L.{npy,len}` with its provenance record,
/// exactly as `fedhubert features --model --layer` writes them; the summary as JSON. The
/// features never leave the node.
#[pyfunction]
#[pyo3(signature = (partition, model, layer, chunk_seconds = 100.0))]
fn extract_layer_features(
    py: Python<'_>,
    partition: PathBuf,
    model: PathBuf,
    layer: usize,
    chunk_seconds: f64,
) -> PyResult<String> {
    if !(chunk_seconds.is_finite() && chunk_seconds >= 1.0) {
        return Err(PyValueError::new_err(format!(
            "chunk_seconds {chunk_seconds}: expected at least 1"
        )));
    }
    let err = |e: String| PyRuntimeError::new_err(e);
    py.detach(|| -> Result<String, String> {
        let dev = fedhubert_model::cpu_device();
        let (m, digest) = fedhubert_eval::load_feature_model(&model, &dev)
            .map_err(|e| format!("model {}: {e}", model.display()))?;
        let src = fedhubert_eval::LayerSource {
            model: &m,
            layer,
            model_digest: digest,
            made_by: format!("flower mode=features (features-layer={layer})"),
            chunk_samples: (chunk_seconds * 16_000.0) as usize,
        };
        let mpath = partition.join("manifest.csv");
        let manifest = fedhubert_audio::Manifest::load(&mpath).map_err(|e| e.to_string())?;
        let s = fedhubert_eval::extract_layer_features(&src, &manifest, &mpath, &partition)
            .map_err(|e| format!("{}: {e}", partition.display()))?;
        serde_json::to_string(&s).map_err(|e| e.to_string())
    })
    .map_err(err)
}

/// Pins the labels a pretraining run in `out` trains on (`out/labels.json`: the clients'
/// codebook hash and the run file's label stem and rate), as `fedhubert pretrain` does; on
/// resume, refuses labels other than those the run started with (a relabelled partition).
#[pyfunction]
fn pin_run_labels(out: PathBuf, codebook: &str, run_file: &str, resume: bool) -> PyResult<()> {
    let rf = parse_run_file(run_file)?;
    fedhubert_train::pin_run_labels(&out, codebook, &rf.label_spec(), resume)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// A round checkpoint → a HuggingFace `HubertModel` folder (plus the pretraining head files).
#[pyfunction]
fn export_hf(py: Python<'_>, checkpoint: PathBuf, run_file: &str, out: PathBuf) -> PyResult<()> {
    let rf = parse_run_file(run_file)?;
    py.detach(|| -> Result<(), BridgeError> {
        let ck = fedhubert_fl::store::load_checkpoint(&checkpoint)?;
        let dev = fedhubert_model::cpu_device();
        let template = fedhubert_model::HubertForPretraining::new(
            &rf.model_config()?,
            &rf.pretrain_config()?,
            rf.federated.run.seed,
            &dev,
        )?;
        let model = fedhubert_model::load_tensors(template, ck.global)?;
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
    m.add_function(wrap_pyfunction!(load_distill_run_file, m)?)?;
    m.add_function(wrap_pyfunction!(read_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(export_hf, m)?)?;
    m.add_function(wrap_pyfunction!(extract_layer_features, m)?)?;
    m.add_function(wrap_pyfunction!(pin_run_labels, m)?)?;
    m.add_class::<Client>()?;
    m.add_class::<Server>()?;
    m.add_class::<PyServerDistillation>()?;
    m.add_class::<kmeans::KmeansClient>()?;
    m.add_class::<kmeans::KmeansServer>()?;
    Ok(())
}
