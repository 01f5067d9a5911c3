"""Federated k-means over Flower: the one global codebook of the pseudo-labels, learned across
SuperNodes from per-cluster sums and counts (no frame leaves its node), then every node labels its
own frames with it. The rounds are `fedhubert.KmeansServer`, the state machine that
``fedhubert kmeans --mode federated`` runs in one process, so both give the same codebook.

Run it before pretraining with ``--run-config 'mode="kmeans"'`` (see the README): it writes
``out-dir/codebook.safetensors`` and ``out-dir/kmeans_summary.json`` on the ServerApp's machine and
``km.npy`` + ``km.len`` into each node's partition, ready for ``mode="pretrain"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fedhubert
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from .messaging import exchange, wait_for_nodes
from .records import arrays_from_record, record_from_arrays

# Message types ("query.<action>"): the ClientApp routes them to its k-means handlers.
HELLO = "query.kmeans_hello"
INIT = "query.kmeans_init"
STATS = "query.kmeans_stats"
LABEL = "query.kmeans_label"


def _say(text: str) -> None:
    print(f"[fedhubert kmeans] {text}", flush=True)


def _exchange(grid: Grid, kind: str, targets: dict[int, int], content_for, rnd: int, timeout: float):
    """One message per client {client: node}; returns ({client: reply}, [(client, why)]), each
    failure also printed, since it makes the client a dropout of the round."""
    sends = [
        (c, Message(content_for(c), dst_node_id=node, message_type=kind, group_id=f"kmeans-{rnd}"))
        for c, node in sorted(targets.items())
    ]
    ok, failed = exchange(grid, sends, timeout, kind)
    for c, why in sorted(failed.items()):
        _say(f"client {c}: {why}")
    return ok, sorted(failed.items())


def _discover(grid: Grid, feature: str, min_nodes: int, wait_s: float) -> dict[int, int]:
    nodes = wait_for_nodes(grid, min_nodes, wait_s)
    cfg = ConfigRecord({"feature": feature})
    ok, failed = _exchange(grid, HELLO, dict(enumerate(nodes)),
                           lambda _: RecordDict({"config": cfg}), 0, wait_s)
    problems = [f"node {nodes[i]}: {why}" for i, why in failed]
    node_of: dict[int, int] = {}
    for i, r in sorted(ok.items()):
        info, node = r.content["info"], nodes[i]
        c = int(info["client-id"])
        if c in node_of:
            problems.append(f"nodes {node_of[c]} and {node} both claim client {c}")
        node_of[c] = node
        _say(f"node {node} is client {c} ({info['partition']}, {info['frames']} frames x {info['dim']})")
    missing = [c for c in range(len(node_of)) if c not in node_of]
    if missing:
        problems.append(f"clients {missing} have no SuperNode (got {sorted(node_of)}); clients must be 0..N-1")
    if problems or not node_of:
        raise RuntimeError("SuperNode discovery failed: " + ("; ".join(problems) or "no nodes"))
    return node_of


def run_kmeans(grid: Grid, context: Context) -> None:
    rc = context.run_config
    k = int(rc.get("kmeans-k", 100))
    feature = str(rc.get("kmeans-feature", "mfcc"))
    labels = str(rc.get("kmeans-labels", "km"))
    out = Path(str(rc.get("out-dir", "runs/flower"))).expanduser().resolve()
    timeout = float(rc.get("node-wait-s", 300))
    node_of = _discover(grid, feature, int(rc.get("min-nodes", 2)), timeout)
    server = fedhubert.KmeansServer(
        k,
        len(node_of),
        seed=int(rc.get("kmeans-seed", 0)),
        rounds=int(rc.get("kmeans-rounds", 100)),
        tol=float(rc.get("kmeans-tol", 1e-4)),
    )
    _say(f"k={k} over {len(node_of)} clients, feature `{feature}`")

    def init_msg(c: int) -> RecordDict:
        return RecordDict({"config": ConfigRecord({"feature": feature, "k": k, "seed": server.init_seed(c)})})

    ok, failed = _exchange(grid, INIT, node_of, init_msg, 0, timeout)
    server.init({c: arrays_from_record(r.content["arrays"]) for c, r in ok.items()}, failed)

    def ask(targets: dict[int, int], rnd: int):
        cb = record_from_arrays({"codebook": server.codebook()})
        cfg = ConfigRecord({"feature": feature})
        ok, failed = _exchange(grid, STATS, targets, lambda _: RecordDict({"arrays": cb, "config": cfg}),
                               rnd, timeout)
        return {c: arrays_from_record(r.content["arrays"]) for c, r in ok.items()}, failed

    while (chosen := server.next_round()) is not None:
        rnd = server.round
        replies, failed = ask({c: node_of[c] for c in chosen}, rnd)
        log = json.loads(server.apply(replies, failed))
        _say(f"round {rnd:>3}: {log['replied']}/{log['sampled']} clients, inertia/frame "
             f"{log['inertia'] / max(log['frames'], 1):.4f}, {log['splits']} splits")
    replies, failed = ask(node_of, server.round)
    final = record_from_arrays({"codebook": server.codebook()})
    summary = json.loads(server.finish(replies, str(out), failed))

    cfg = ConfigRecord({"feature": feature, "labels": labels})
    ok, failed = _exchange(grid, LABEL, node_of, lambda _: RecordDict({"arrays": final, "config": cfg}),
                           summary["rounds"] + 1, timeout)
    if failed:
        raise RuntimeError("labelling failed: " + "; ".join(f"client {c}: {why}" for c, why in failed))
    summary["clients"] = {c: dict(ok[c].content["info"]) for c in sorted(ok)}
    tmp = out / ".kmeans_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "kmeans_summary.json")
    _say(f"done: {summary['rounds']} rounds, inertia/frame {summary['inertia'] / max(summary['n_frames'], 1):.4f}, "
         f"{summary['empty_clusters']} empty clusters; codebook {summary['codebook']}; labels `{labels}` on every node")
