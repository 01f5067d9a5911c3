"""ServerApp: fedhubert's federated rounds over Flower's Grid.

The round logic (client sampling, per-client seeds, retries, the strategy, evaluation,
checkpoints, resume, export) is `fedhubert.Server`, the round engine of ``fedhubert pretrain
--simulation``; this file only moves messages: it asks the engine for the next exchange, sends
each listed client the global model and its instructions, hands every reply back, and closes the
exchange. Clients are numbered by their partition folder (``client_K`` -> K), so client K on
Flower gets exactly the seeds and sampling client K gets in the native simulation.

Run config ``mode`` picks the run: ``pretrain`` (default), or ``distill-server``, the rounds of
``fedhubert distill --mode server``: the clients train the student with the self-supervised loss
as in pretraining, and after each aggregation the server distils the frozen ``teacher`` into it
on the ``server-set`` audio (`fedhubert.ServerDistillation`).
"""

from __future__ import annotations

import json
from pathlib import Path

import fedhubert
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from .features import run_features
from .kmeans import run_kmeans
from .messaging import exchange, wait_for_nodes
from .records import arrays_from_record, record_from_arrays

app = ServerApp()


def _say(text: str) -> None:
    print(f"[fedhubert] {text}", flush=True)


def _config(run_file: str, **extra: str) -> ConfigRecord:
    return ConfigRecord({"run-file": run_file, **extra})


def discover_clients(grid: Grid, run_file: str, min_nodes: int, wait_s: float, want: int,
                     partitions: dict[int, str] | None = None) -> tuple[dict[int, int], str]:
    """Waits for the SuperNodes and asks each which client it is: ({client index: node id}, the
    hash of the codebook of every client's labels). Fills `partitions` with each client's
    partition folder as its node reported it. Each node checks its labels when it opens its
    partition (a label_rate its labels were not made at fails here, before round 1), and all
    clients' labels must come from one codebook, as `fedhubert pretrain` checks before it starts."""
    nodes = wait_for_nodes(grid, min_nodes, wait_s)
    sends = [
        (n, Message(RecordDict({"config": _config(run_file)}), dst_node_id=n, message_type=MessageType.QUERY))
        for n in nodes
    ]
    ok, failed = exchange(grid, sends, wait_s, "query")
    by_client: dict[int, int] = {}
    codebooks: dict[int, tuple[str, str]] = {}
    problems = [f"node {n}: {why}" for n, why in sorted(failed.items())]
    for node, r in sorted(ok.items()):
        info = r.content["info"]
        c = int(info["client-id"])
        if c in by_client:
            problems.append(f"nodes {by_client[c]} and {node} both claim client {c} ({info['partition']})")
        by_client[c] = node
        codebooks[c] = (str(info.get("codebook", "")), str(info["partition"]))
        if partitions is not None:
            partitions[c] = str(info["partition"])
        _say(f"node {node} is client {c} ({info['partition']})")
    if problems or not by_client:
        raise RuntimeError("SuperNode discovery failed: " + ("; ".join(problems) or "no nodes"))
    n = want if want > 0 else len(by_client)
    missing = [c for c in range(n) if c not in by_client]
    if missing:
        raise RuntimeError(
            f"clients {missing} have no SuperNode (connected: {sorted(by_client)}); every client_K "
            f"folder 0..{n - 1} of the partition needs a node"
        )
    (cb0, p0) = codebooks[0]
    for c in range(1, n):
        cb, p = codebooks[c]
        if cb != cb0:
            raise RuntimeError(
                f"clients 0 ({p0}) and {c} ({p}) hold labels of different codebooks "
                f"({cb0[:12] or 'none'} and {cb[:12] or 'none'}): a k-means run did not finish for "
                "every client, or labelled each with its own codebook; rerun mode=\"kmeans\" on all "
                "the nodes"
            )
    return {c: by_client[c] for c in range(n)}, cb0


def _send(grid: Grid, plan, node_of, content_for, kind: str, rnd: int, timeout):
    """Sends one message per planned client; returns {client: reply} and {client: failure}."""
    sends = [
        (c, Message(content_for(cfg), dst_node_id=node_of[c], message_type=kind, group_id=str(rnd)))
        for c, cfg in plan
    ]
    return exchange(grid, sends, timeout, kind)


_KIND = {"fit": MessageType.TRAIN, "evaluate": MessageType.EVALUATE}


def _send_global(grid: Grid, server, plan, node_of, run_file: str, kind: str, rnd: int, timeout):
    """The global model and each planned client's instructions, to train or evaluate."""
    arrays = record_from_arrays(server.global_arrays())
    return _send(
        grid,
        plan,
        node_of,
        lambda ins: RecordDict({"arrays": arrays, "config": _config(run_file, instructions=ins)}),
        kind,
        rnd,
        timeout,
    )


def _metrics(rec) -> tuple[int, dict]:
    m = dict(rec.content["metrics"])
    n = int(m.pop("num-examples"))
    return n, m


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _setup(rc) -> tuple[str, "fedhubert.ServerDistillation | None"]:
    """The run file the clients get and, in distill-server mode, the distillation setup (teacher,
    server-side set, student), built before waiting for nodes so bad inputs fail at once."""
    mode = str(rc.get("mode", "pretrain"))
    overrides = [s for s in str(rc.get("set", "")).split() if s]
    config = str(rc.get("config", ""))
    if mode == "pretrain":
        return fedhubert.load_run_file(config or "tiny", overrides), None
    if mode == "distill-server":
        kd = fedhubert.ServerDistillation(
            fedhubert.load_distill_run_file(config or "tiny_student", overrides),
            teacher=str(rc.get("teacher", "")) or None,
            server_set=str(rc.get("server-set", "")) or None,
        )
        for note in kd.notes:
            _say(note)
        return kd.client_run_file, kd
    raise ValueError(f"run config mode={mode!r}: expected pretrain, distill-server, kmeans or features")


def _report(rec: dict) -> None:
    rnd = rec["round"]
    dp = rec.get("privacy")
    dp = f" | epsilon {dp['epsilon']:.3f} (delta {dp['delta']:g})" if dp else ""
    _say(
        f"round {rnd:>3}: train loss {_fmt(rec['train'].get('loss'))} "
        f"acc_masked {_fmt(rec['train'].get('acc_masked'))} | eval loss "
        f"{_fmt(rec['eval'].get('loss'))}{dp} | clients {len(rec['participated'])} ok, "
        f"{len(rec['failures'])} failed | up {rec['bytes_up'] / 1e6:.2f} MB "
        f"down {rec['bytes_down'] / 1e6:.2f} MB | {rec['round_time_s']:.1f} s"
    )
    kd_log = rec.get("server_distill")
    if kd_log:
        first, last = kd_log["first"], kd_log["last"]
        _say(
            f"round {rnd:>3}: server distillation {kd_log['mean']['steps']} steps, loss "
            f"{_fmt(first['loss'])} -> {_fmt(last['loss'])} (kl {_fmt(last['kl'])}, "
            f"feature {_fmt(last['feature_mse'])})"
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if str(rc.get("mode", "pretrain")) == "kmeans":
        run_kmeans(grid, context)
        return
    if str(rc.get("mode", "pretrain")) == "features":
        run_features(grid, context)
        return
    run_file, kd = _setup(rc)
    rf = json.loads(run_file)
    out = Path(str(rc.get("out-dir", "runs/flower"))).expanduser().resolve()
    partitions: dict[int, str] = {}
    node_of, codebook = discover_clients(
        grid,
        run_file,
        int(rc.get("min-nodes", 2)),
        float(rc.get("node-wait-s", 300)),
        int(rf["federated"]["num_clients"]),
        partitions,
    )
    resume = bool(rc.get("resume", False))
    overwrite = bool(rc.get("overwrite", False))
    if kd is None:
        server = fedhubert.Server(run_file, str(out), len(node_of), resume, overwrite)
        # out/labels.json, as `fedhubert pretrain` writes it: a resume over relabelled nodes is
        # refused rather than continued on other targets.
        fedhubert.pin_run_labels(str(out), codebook, run_file, resume)
    else:
        # Where the server and the nodes share a file system (simulation), the server-side set
        # must not be a client's folder: the server never holds client audio.
        mine = Path(kd.server_set).resolve()
        clash = [c for c, p in partitions.items() if Path(p).resolve() == mine]
        if clash:
            raise ValueError(
                f"server-set {kd.server_set} is client {clash[0]}'s partition: the server must "
                "not hold client audio; give a separate folder"
            )
        server = kd.server(str(out), len(node_of), resume, overwrite)
    if server.completed_rounds:
        _say(f"resuming after round {server.completed_rounds} from {out}")
    _say(
        f"{server.mode}: {len(node_of)} clients, {server.num_rounds} rounds, strategy "
        f"{rf['federated']['strategy']}, out {out}"
    )
    timeout = server.round_timeout_s
    while (ex := server.next_exchange()) is not None:
        kind, rnd, plan = ex
        ok, failed = _send_global(grid, server, plan, node_of, run_file, _KIND[kind], rnd, timeout)
        # Plan (client) order: each reply's arrays are handed over and dropped in the order the
        # engine aggregates them, so none waits in its reorder buffer.
        for c, _ in plan:
            if c in failed:
                _say(f"round {rnd}: {kind} on client {c} failed: {failed[c]}")
                server.fail(c, failed[c])
                continue
            reply = ok.pop(c)
            n, m = _metrics(reply)
            if kind == "fit":
                server.deliver_fit(c, arrays_from_record(reply.content["arrays"]), n, m)
            else:
                server.deliver_evaluate(c, n, m)
        status, record = server.close_exchange()
        if status == "round":
            _report(json.loads(record))
        elif status == "retry":
            _say(f"round {rnd}: too few replies, retrying with a fresh sample")
    summary = json.loads(server.export())
    _say(f"done: {json.dumps(summary)}")
