"""Byte metering of the messages a ServerApp exchanges, identical for every method.

:class:`MeteredGrid` wraps Flower's ``Grid``: every message sent and every
reply received through ``send_and_receive`` is measured as Flower serialises
its content (protobuf), per node. FedKD and the FedAvg baseline both run on
it, so their uplink figures are counted the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from common.payload import payload_bytes


@dataclass
class Traffic:
    """Bytes and reply counts since the last :meth:`MeteredGrid.take`."""

    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    replies_with_content: int = 0
    replies_with_error: int = 0


class MeteredGrid:
    """A ``Grid`` that measures payload bytes per node; everything else is forwarded."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._traffic = Traffic()
        self.node_names: dict[int, str] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            if msg.has_content():
                self._traffic.bytes_down[msg.metadata.dst_node_id] += payload_bytes(msg.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_content():
                self._traffic.bytes_up[node] += payload_bytes(reply.content)
                self._traffic.replies_with_content += 1
                info = reply.content.config_records.get("hospital")
                if info is not None and "name" in info:
                    self.node_names.setdefault(node, str(info["name"]))
            else:
                self._traffic.replies_with_error += 1
        return replies

    def name_of(self, node_id: int) -> str:
        """Hospital name of ``node_id`` once it has replied, else ``node <id>``."""
        return self.node_names.get(node_id, f"node {node_id}")

    def take(self) -> Traffic:
        """Return the traffic counted so far and start counting afresh."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic

    def by_name(self, counts: dict[int, int]) -> dict[str, int]:
        """Per-node counts keyed by hospital name, sorted by name."""
        return dict(sorted((self.name_of(node), int(b)) for node, b in counts.items()))
