"""Sorting one round's replies into accepted and rejected, with a logged reason for each rejection.

A bad reply from one hospital never stops the round: it is rejected here,
and the round goes on with the rest if a quorum remains. Senders are known
by node ID (``expected``: node -> hospital name, from
:mod:`server.identity`); a reply whose self-written name differs from its
node's identity is rejected as an impostor, whichever reply arrives first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

from common.config import QueryConfig
from common.errors import PayloadError
from common.payload import Reply, parse_reply
from server.identity import name_order

logger = logging.getLogger(__name__)

MAX_REASON = 300


@dataclass
class RoundReplies:
    """The outcome of one round's collection."""

    accepted: list[Reply] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # hospital -> reason


def _printable(text: str) -> str:
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= MAX_REASON else clean[: MAX_REASON - 3] + "..."


def judge_reply(reply: Message, *, who: str, n_samples: int, n_classes: int, query: QueryConfig) -> Reply:
    """Validate one reply from the node known as ``who``.

    Raises
    ------
    PayloadError
        For an error reply, a malformed payload, or a claimed name that is not ``who``.
    """
    if reply.has_error():
        raise PayloadError(f"error {int(reply.error.code)}: {_printable(str(reply.error.reason))}")
    parsed = parse_reply(reply.content, n_samples=n_samples, n_classes=n_classes, output=query.output,
                         dtype=query.dtype, simplex_tolerance=query.simplex_tolerance, hospital=who)
    if parsed.hospital != who:
        raise PayloadError(f"claims to be {parsed.hospital!r}, but its node is {who}", field="hospital.name",
                           hospital=who)
    return parsed


def collect_replies(replies: Iterable[Message], *, expected: Mapping[int, str], round: int, n_samples: int,
                    n_classes: int, query: QueryConfig) -> RoundReplies:
    """Validate each reply; reject (and log) errors, malformed payloads, impostors, duplicates and missing replies.

    Parameters
    ----------
    replies: the messages returned by ``grid.send_and_receive``.
    expected: node id -> hospital name for every node queried (identity by node, never by reply content).
    """
    out = RoundReplies()
    seen_nodes: set[int] = set()
    total = len(expected)
    for reply in replies:
        node = -1
        who = "unknown sender"
        try:
            node = int(reply.metadata.src_node_id)
            who = expected.get(node, f"node {node}")
            if node == SUPERLINK_NODE_ID and node not in expected and reply.has_error():
                # the SuperLink answering for a queried node it found unavailable (Flower error code 5): the
                # hospital that did not answer is named below as having sent no reply
                logger.info("round %d: the SuperLink reports a queried hospital unavailable: %s", round,
                            _printable(str(reply.error.reason)))
                continue
            if node not in expected:
                out.rejected[who] = "reply from a node that was not queried"
            elif node in seen_nodes:
                out.rejected[f"{who} (duplicate)"] = "second reply from the same node"
            else:
                out.accepted.append(judge_reply(reply, who=who, n_samples=n_samples, n_classes=n_classes,
                                                query=query))
        except PayloadError as e:
            out.rejected[who] = _printable(e.reason)
        except Exception as e:  # never let one reply stop the round
            logger.exception("unexpected failure while checking a reply from %s (round %d)", who, round)
            out.rejected[who] = f"malformed reply ({type(e).__name__})"
        seen_nodes.add(node)
    for node, who in expected.items():
        if node not in seen_nodes:
            out.rejected[who] = "no reply before the round's timeout"
    out.accepted.sort(key=lambda r: name_order(r.hospital))  # arrival order must not change the aggregate
    for who, reason in out.rejected.items():
        logger.warning("hospital %s reply rejected: %s (round %d); continuing with %d of %d replies",
                       who, reason, round, len(out.accepted), total)
    return out
