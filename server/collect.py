"""Sorting one round's replies into accepted and rejected, with a logged reason for each rejection.

A bad reply from one hospital never stops the round: it is rejected here,
and the round goes on with the rest if a quorum remains.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message

from common.config import QueryConfig
from common.errors import PayloadError
from common.payload import Reply, parse_reply

logger = logging.getLogger(__name__)


@dataclass
class RoundReplies:
    """The outcome of one round's collection."""

    accepted: list[Reply] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # hospital -> reason


def collect_replies(replies: Iterable[Message], *, expected: Mapping[int, str], round: int, n_samples: int,
                    n_classes: int, query: QueryConfig) -> RoundReplies:
    """Validate each reply; reject (and log) errors, malformed payloads, duplicates and missing replies.

    Parameters
    ----------
    replies: the messages returned by ``grid.send_and_receive``.
    expected: node id -> hospital name (or ``node <id>``) for every node queried.
    """
    out = RoundReplies()
    seen_nodes: set[int] = set()
    seen_names: set[str] = set()
    total = len(expected)
    for reply in replies:
        node = reply.metadata.src_node_id
        who = expected.get(node, f"node {node}")
        if node not in expected:
            out.rejected[who] = "reply from a node that was not queried"
        elif node in seen_nodes:
            out.rejected[f"{who} (duplicate)"] = "second reply from the same node"
        elif reply.has_error():
            out.rejected[who] = f"error {reply.error.code}: {reply.error.reason}"
        else:
            try:
                parsed = parse_reply(reply.content, n_samples=n_samples, n_classes=n_classes, output=query.output,
                                     dtype=query.dtype, simplex_tolerance=query.simplex_tolerance)
                if parsed.hospital in seen_names:
                    raise PayloadError(f"hospital name {parsed.hospital!r} already answered this round")
            except PayloadError as e:
                out.rejected[who] = str(e)
            else:
                seen_names.add(parsed.hospital)
                out.accepted.append(parsed)
        seen_nodes.add(node)
    for node, who in expected.items():
        if node not in seen_nodes:
            out.rejected[who] = "no reply before the round's timeout"
    for who, reason in out.rejected.items():
        logger.warning("hospital %s reply rejected: %s (round %d); continuing with %d of %d replies",
                       who, reason, round, len(out.accepted), total)
    return out
