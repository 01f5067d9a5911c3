"""One round trip to many SuperNodes, with every reply matched to what it answers, and the wait
for them to connect."""

from __future__ import annotations

import time
from typing import Hashable, TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

K = TypeVar("K", bound=Hashable)


def wait_for_nodes(grid: Grid, min_nodes: int, wait_s: float) -> list[int]:
    """The connected SuperNodes' ids, sorted, once at least `min_nodes` are there; an error after
    `wait_s` seconds without them."""
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of min-nodes={min_nodes} SuperNodes connected within "
                f"node-wait-s={wait_s:.0f} s"
            )
        time.sleep(1.0)
    return nodes


def exchange(grid: Grid, sends: list[tuple[K, Message]], timeout: float, kind: str):
    """Sends every message and returns ({key: reply}, {key: why it failed}).

    Replies are matched by the id of the message they answer, not by their source node: when a
    node is gone, the SuperLink answers in its place with an error reply from the SuperLink's own
    node id, and that must count as this node's failure rather than break the round.
    """
    replies = list(grid.send_and_receive([m for _, m in sends], timeout=timeout))
    # send_and_receive gave each message its id when it pushed it.
    key_of = {m.metadata.message_id: k for k, m in sends}
    ok: dict = {}
    failed: dict = {}
    for r in replies:
        k = key_of.get(r.metadata.reply_to_message_id)
        if k is None:
            continue
        if r.has_error():
            failed[k] = f"{kind} failed on the node: {r.error.reason}"
        else:
            ok[k] = r
    for k, _ in sends:
        if k not in ok and k not in failed:
            failed[k] = f"no {kind} reply (timeout {timeout} s)"
    return ok, failed
