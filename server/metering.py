"""Byte metering and reply fingerprints of the messages a ServerApp exchanges, keyed by node.

:class:`MeteredGrid` wraps Flower's ``Grid``: every message sent and every
reply received through ``send_and_receive`` is measured as Flower
serialises its content (protobuf), per node ID, and each reply's SHA-256
over the same deterministic wire bytes that the hospital's gate logged
before it left (:func:`common.payload.wire_bytes`). FedKD and the FedAvg
baseline both run on it, so their figures are counted the same way. Names
come from :mod:`server.identity`, never from what a reply writes.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from common.payload import payload_bytes, wire_bytes

logger = logging.getLogger(__name__)


@dataclass
class Traffic:
    """Bytes, reply counts and reply fingerprints since the last :meth:`MeteredGrid.take`."""

    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    reply_sha256: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    replies_with_content: int = 0
    replies_with_error: int = 0


class MeteredGrid:
    """A ``Grid`` that measures payload bytes and fingerprints replies per node; everything else is forwarded."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._traffic = Traffic()

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        sizes: dict[int, int] = {}  # a round shares one query payload among all its messages: measure it once
        for msg in messages:
            if msg.has_content():
                size = sizes.get(id(msg.content))
                if size is None:
                    size = sizes[id(msg.content)] = payload_bytes(msg.content)
                self._traffic.bytes_down[msg.metadata.dst_node_id] += size
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            try:
                node = int(reply.metadata.src_node_id)
                wire = wire_bytes(reply)
            except Exception as e:  # metering must never stop a round; collect() rejects the reply
                logger.warning("could not meter a reply (%s)", type(e).__name__)
                continue
            self._traffic.reply_sha256[node].append(hashlib.sha256(wire).hexdigest())
            self._traffic.bytes_up[node] += len(wire)  # error replies are bytes that came up too
            if reply.has_content():
                self._traffic.replies_with_content += 1
            else:
                self._traffic.replies_with_error += 1
        return replies

    def take(self) -> Traffic:
        """Return the traffic counted so far and start counting afresh."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic


def by_name(counts: Mapping[int, object], names: Mapping[int, str]) -> dict[str, object]:
    """Per-node values keyed by hospital name (``node <id>`` for an unknown node), sorted by name."""
    return dict(sorted((names.get(node, f"node {node}"), value) for node, value in counts.items()))
