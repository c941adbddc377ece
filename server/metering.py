"""Byte metering and reply fingerprints of the messages a ServerApp exchanges, keyed by node.

:class:`MeteredGrid` wraps Flower's ``Grid``: every message sent and every
reply received (through ``send_and_receive``, or ``push_messages`` and
``pull_messages``) is measured as Flower
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

from flwr.app import Message, RecordDict
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
        self._sizes: dict[int, tuple[RecordDict, int]] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._meter_down(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._meter_up(replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._meter_down(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._meter_up(replies)
        return replies

    def _meter_down(self, messages: list[Message]) -> None:
        for msg in messages:
            if msg.has_content():
                self._traffic.bytes_down[msg.metadata.dst_node_id] += self._size(msg.content)

    def _size(self, content: RecordDict) -> int:
        """Payload bytes of ``content``; a round shares one query payload among its messages: measured once."""
        held = self._sizes.get(id(content))
        if held is None or held[0] is not content:  # the content is kept, so its id cannot be reused meanwhile
            held = self._sizes[id(content)] = (content, payload_bytes(content))
        return held[1]

    def _meter_up(self, replies: list[Message]) -> None:
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

    def take(self) -> Traffic:
        """Return the traffic counted so far and start counting afresh."""
        traffic, self._traffic = self._traffic, Traffic()
        self._sizes.clear()
        return traffic


def by_name(counts: Mapping[int, object], names: Mapping[int, str]) -> dict[str, object]:
    """Per-node values keyed by hospital name (``node <id>`` for an unknown node), sorted by name."""
    return dict(sorted((names.get(node, f"node {node}"), value) for node, value in counts.items()))
