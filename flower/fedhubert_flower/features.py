"""HuBERT iteration 2 over Flower: every SuperNode computes the layer features of its own audio
with the iteration-1 model the ServerApp sends it (``fedhubert features --model M --layer L`` on
each node; the features never leave it). Then ``mode="kmeans"`` with ``kmeans-feature="hubert_L"``
learns the codebook of those features and labels them at the model's 50 Hz, and ``mode="pretrain"``
with ``pretraining.label_stem`` / ``label_rate=50`` trains on them.

Run config: ``features-model`` (a fedhubert checkpoint file on the ServerApp's machine, e.g. the
``model.safetensors`` of an iteration-1 run), ``features-layer`` (6 for HuBERT Base),
``features-chunk-seconds`` (long audio runs in pieces that tile its frames exactly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from .messaging import exchange, wait_for_nodes

LAYER_FEATURES = "query.layer_features"


def _say(text: str) -> None:
    print(f"[fedhubert features] {text}", flush=True)


def run_features(grid: Grid, context: Context) -> None:
    rc = context.run_config
    model = Path(str(rc.get("features-model", ""))).expanduser()
    if not model.is_file():
        raise ValueError(
            f"features-model={str(model)!r}: expected a fedhubert checkpoint file on the ServerApp's "
            "machine (the model.safetensors of an iteration-1 run)"
        )
    layer = int(rc.get("features-layer", 6))
    out = Path(str(rc.get("out-dir", "runs/flower"))).expanduser().resolve()
    timeout = float(rc.get("node-wait-s", 300))
    nodes = wait_for_nodes(grid, int(rc.get("min-nodes", 2)), timeout)
    cfg = ConfigRecord({
        "layer": layer,
        "chunk-seconds": float(rc.get("features-chunk-seconds", 100.0)),
        "model": model.read_bytes(),
    })
    _say(f"layer {layer} of {model} ({model.stat().st_size} bytes) to {len(nodes)} nodes")
    sends = [
        (n, Message(RecordDict({"config": cfg}), dst_node_id=n, message_type=LAYER_FEATURES,
                    group_id="features"))
        for n in nodes
    ]
    ok, failed = exchange(grid, sends, timeout, LAYER_FEATURES)
    if failed:
        raise RuntimeError("layer features failed: " +
                           "; ".join(f"node {n}: {why}" for n, why in sorted(failed.items())))
    summary = {"layer": layer, "model": str(model),
               "nodes": {str(n): dict(r.content["info"]) for n, r in sorted(ok.items())}}
    for n, info in summary["nodes"].items():
        _say(f"node {n}: {info['utterances']} utterances, {info['frames']} frames -> "
             f"{info['partition']}/{info['stem']}.npy")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".features_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "features_summary.json")
