"""A hospital keeps the coordinator's receipts for its replies (``receipts.jsonl`` in its folder).

A query may carry the coordinator's signed receipt for this hospital's
previous reply (see :mod:`server.receipts`). The hospital checks the
signature and that the receipt names itself and a record its own audit log
holds with that hash, then appends it (one fsync'd line, under a lock). A
receipt that fails a check is noted in the hospital's own log and not
stored; it never stops the hospital from answering.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from client.audit_log import RECEIPTS, read_lines
from common.signing import receipt_valid

logger = logging.getLogger(__name__)


def record_hash(folder: Path, seq: int) -> str | None:
    """The hash of record ``seq`` in the hospital's audit log (None if there is no such line)."""
    lines, _ = read_lines(folder)
    if seq < 1 or seq > len(lines):
        return None
    try:
        doc = json.loads(lines[seq - 1])
        return str(doc["hash"]) if doc["record"]["seq"] == seq else None
    except (ValueError, KeyError, TypeError):
        return None


def store_receipt(folder: Path, receipt: Mapping[str, Any], *, hospital: str, run_id: int) -> str | None:
    """Check and keep ``receipt``; returns None when stored, else why it was not (for the hospital's log)."""
    if receipt.get("hospital") != hospital:
        return f"receipt names hospital {receipt.get('hospital')!r}, not {hospital}"
    if not receipt_valid(receipt):
        return "receipt signature does not verify"
    if receipt["audit_seq"] > 0 and record_hash(folder, int(receipt["audit_seq"])) != receipt["audit_head"]:
        return f"receipt names audit record {receipt['audit_seq']} with a hash this log does not hold"
    line = {**dict(receipt), "run_id": int(run_id),
            "received": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    fd = os.open(Path(folder) / RECEIPTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return None
