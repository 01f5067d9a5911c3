"""Reply matching of `exchange` without Flower processes: a grid double that answers like a
SuperLink does, including the error reply it makes itself for a node that is gone."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the app folder, as `flwr run` sees it
from fedhubert_flower.messaging import exchange  # noqa: E402

SUPERLINK_NODE_ID = 1  # what the SuperLink puts as the source of the replies it makes itself


def send(dst: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, message_id=""))


def reply(to, src: int, error: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=src, reply_to_message_id=to.metadata.message_id),
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
    )


class Grid:
    """Gives each pushed message an id (as Flower's grids do), then: node 11 answers, node 12 is
    gone (the SuperLink answers for it), node 13 never answers."""

    def send_and_receive(self, messages, timeout):
        for i, m in enumerate(messages):
            m.metadata.message_id = f"id-{i}"
        by_dst = {m.metadata.dst_node_id: m for m in messages}
        return [
            reply(by_dst[11], src=11),
            reply(by_dst[12], src=SUPERLINK_NODE_ID, error="node 12 is unavailable"),
            SimpleNamespace(  # a reply to a message of another round: ignored
                metadata=SimpleNamespace(src_node_id=11, reply_to_message_id="stale"),
                has_error=lambda: False,
            ),
        ]


def test_replies_are_matched_by_the_message_they_answer():
    ok, failed = exchange(Grid(), [(0, send(11)), (1, send(12)), (2, send(13))], 5.0, "train")
    assert list(ok) == [0]
    assert failed == {
        1: "train failed on the node: node 12 is unavailable",
        2: "no train reply (timeout 5.0 s)",
    }
