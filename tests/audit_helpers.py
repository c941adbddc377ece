"""Helpers for the audit tests: a hospital gate releasing real query replies into a real audit log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Message

from client.gate import OutboundGate
from common.config import OutputKind, WireDtype
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content, make_reply_content
from tests.conftest import finite_probs, request_message

PROXY_HASH = "ab" * 32
NO_DP = "none: no formal DP guarantee"


def make_gate(folder: Path, *, hospital: str = "H0", archive: bool = True) -> OutboundGate:
    return OutboundGate(hospital=hospital, folder=folder, run_id=1, archive_payloads=archive)


def release(gate: OutboundGate, round: int, *, n: int = 4, receipt: dict | None = None) -> Message:
    """Release one query reply of ``n`` samples (indices 10*round ...) for ``round`` through ``gate``."""
    query = Query(round=round, proxy_hash=PROXY_HASH, indices=np.arange(n, dtype=np.int64) + 10 * round,
                  temperature=1.0, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16, receipt=receipt)
    request = request_message(make_query_content(query), message_type=QUERY_MESSAGE_TYPE, dst_node_id=5,
                              round=round, message_id=f"m-{round}")
    content = make_reply_content(outputs=finite_probs(n, 5, seed=round), dtype=WireDtype.FLOAT16,
                                 hospital=gate.hospital, model="densenet", privacy=NO_DP, num_private=100,
                                 val_auc=0.7)
    return gate.release(request, Message(content, reply_to=request))
