"""One round trip to many SuperNodes, with every reply matched to what it answers."""

from __future__ import annotations

from typing import Hashable, TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

K = TypeVar("K", bound=Hashable)


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
