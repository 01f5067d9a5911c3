"""ClientApp: trains and evaluates the global model on this SuperNode's partition.

The partition is a ``client_K`` folder made by ``fedhubert prepare`` + ``features`` + ``kmeans``.
A deployed SuperNode names it in its node config (``partition="/data/client_3"``); in the
simulation runtime it is ``<run config partitions>/client_<partition-id>``. The run configuration
comes from the ServerApp with every message, so all nodes train the same model the same way.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fedhubert
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .records import arrays_from_record, record_from_arrays

app = ClientApp()

# Decoded audio stays cached in the Rust client between messages when Flower reuses the process
# (simulation); a fresh process (deployment) reloads it.
_CLIENTS: dict[tuple[str, str], fedhubert.Client] = {}


def partition_dir(context: Context) -> Path:
    """This node's ``client_K`` folder, from the node config (or the simulation partition id)."""
    nc = context.node_config
    if "partition" in nc:
        return Path(str(nc["partition"])).expanduser().resolve()
    if "partition-id" in nc:
        root = str(context.run_config.get("partitions", ""))
        if not root:
            raise ValueError(
                "run config `partitions` is empty: in the simulation runtime set it to the folder "
                "holding client_0, client_1, ... (flwr run ... --run-config 'partitions=\"/data/parts\"')"
            )
        return (Path(root).expanduser() / f"client_{int(nc['partition-id'])}").resolve()
    raise ValueError(
        "node config has no `partition`: start the SuperNode with "
        "--node-config 'partition=\"/path/to/client_K\"'"
    )


def client_index(context: Context, client: fedhubert.Client | fedhubert.KmeansClient, part: Path) -> int:
    """The client number K: node config `client-id`, else the folder name `client_K`."""
    if "client-id" in context.node_config:
        return int(context.node_config["client-id"])
    if client.index_from_dir is not None:
        return client.index_from_dir
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    raise ValueError(
        f"partition {part}: the folder is not named client_K; set node config client-id=K"
    )


def _client(context: Context, run_file: str) -> tuple[fedhubert.Client, Path]:
    part = partition_dir(context)
    key = (str(part), run_file)
    if key not in _CLIENTS:
        _CLIENTS.clear()
        # `state-dir`: the node's own folder for what it keeps between rounds (the optimizer
        # moments of `local_optimizer_state: keep`), never the data partition.
        state = context.node_config.get("state-dir")
        _CLIENTS[key] = fedhubert.Client(str(part), run_file, str(state) if state else None)
    return _CLIENTS[key], part


def _run_file(msg: Message) -> str:
    return str(msg.content["config"]["run-file"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is, and the codebook of its labels; opening the partition checks
    it (manifest, labels made from it at the run's label_rate) before round 1."""
    client, part = _client(context, _run_file(msg))
    info = ConfigRecord({"client-id": client_index(context, client, part), "partition": str(part),
                         "codebook": client.codebook})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    client, _ = _client(context, _run_file(msg))
    global_arrays = arrays_from_record(msg.content["arrays"])
    arrays, num_examples, metrics = client.fit(
        global_arrays, str(msg.content["config"]["instructions"])
    )
    del global_arrays
    metrics["num-examples"] = int(num_examples)
    content = RecordDict(
        {"arrays": record_from_arrays(arrays), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client, _ = _client(context, _run_file(msg))
    num_examples, metrics = client.evaluate(
        arrays_from_record(msg.content["arrays"]), str(msg.content["config"]["instructions"])
    )
    metrics["num-examples"] = int(num_examples)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)



# Federated k-means (run config mode="kmeans", see kmeans.py): this node's MFCC frames stay here;
# it sends weighted local centroids once, then per-cluster sums and counts, and finally labels
# its own frames with the global codebook.
_KM: dict[tuple[str, str], fedhubert.KmeansClient] = {}


def _km_client(msg: Message, context: Context) -> tuple[fedhubert.KmeansClient, Path]:
    part = partition_dir(context)
    feature = str(msg.content["config"]["feature"])
    key = (str(part), feature)
    if key not in _KM:
        _KM.clear()
        _KM[key] = fedhubert.KmeansClient(str(part), feature)
    return _KM[key], part


@app.query("kmeans_hello")
def kmeans_hello(msg: Message, context: Context) -> Message:
    client, part = _km_client(msg, context)
    info = ConfigRecord({"client-id": client_index(context, client, part), "partition": str(part),
                         "frames": client.n_frames, "dim": client.dim})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.query("kmeans_init")
def kmeans_init(msg: Message, context: Context) -> Message:
    client, _ = _km_client(msg, context)
    cfg = msg.content["config"]
    summary = client.init_summary(int(cfg["k"]), int(cfg["seed"]))
    return Message(RecordDict({"arrays": record_from_arrays(summary)}), reply_to=msg)


@app.query("kmeans_stats")
def kmeans_stats(msg: Message, context: Context) -> Message:
    client, _ = _km_client(msg, context)
    stats = client.stats(arrays_from_record(msg.content["arrays"])["codebook"])
    return Message(RecordDict({"arrays": record_from_arrays(stats)}), reply_to=msg)


@app.query("kmeans_label")
def kmeans_label(msg: Message, context: Context) -> Message:
    client, part = _km_client(msg, context)
    rep = client.label(arrays_from_record(msg.content["arrays"])["codebook"],
                       str(msg.content["config"]["labels"]))
    info = ConfigRecord({"partition": str(part), "utterances": int(rep["utterances"]),
                         "frames": int(rep["frames"]), "inertia": float(rep["inertia"])})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.query("layer_features")
def layer_features(msg: Message, context: Context) -> Message:
    """HuBERT iteration 2: this node's layer features, with the model the ServerApp sent."""
    part = partition_dir(context)
    cfg = msg.content["config"]
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "model.safetensors"
        model.write_bytes(cfg["model"])
        s = json.loads(fedhubert.extract_layer_features(
            str(part), str(model), int(cfg["layer"]), float(cfg["chunk-seconds"])))
    info = ConfigRecord({"partition": str(part), "stem": s["stem"], "utterances": int(s["utterances"]),
                         "frames": int(s["frames"])})
    return Message(RecordDict({"info": info}), reply_to=msg)
