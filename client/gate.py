"""The one outbound path of a hospital: every payload that leaves passes :meth:`OutboundGate.release`.

The gate checks that a payload holds only what its kind allows (teacher
outputs for ``query.logits``; model weights only for the FedAvg *baseline*,
which exists to be compared against), enforces a size limit, and appends
one JSON line per released payload to ``<hospital_dir>/outbound.jsonl``:
round, kind, bytes, SHA-256 of the serialised payload, and the privacy
statement. Later mechanisms (DP noise, the privacy ledger, the signed audit
log) hook in here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from flwr.app import RecordDict

from common.errors import PayloadError

logger = logging.getLogger(__name__)

NO_DP = "none: no formal DP guarantee"
OUTBOUND_LOG = "outbound.jsonl"

# kind -> ArrayRecord names a payload of that kind may carry
_ALLOWED_ARRAYS = {"query.logits": {"outputs"}, "train.fedavg-baseline": {"arrays"}}


class OutboundGate:
    """Checks and records every payload a hospital sends."""

    def __init__(self, *, hospital: str, hospital_dir: Path, max_bytes: int = 64 * 2**20) -> None:
        self.hospital = hospital
        self.hospital_dir = Path(hospital_dir)
        self.max_bytes = max_bytes

    def release(self, content: RecordDict, *, kind: str, round: int, privacy: str = NO_DP) -> RecordDict:
        """Check ``content`` for ``kind``, log it, and hand it back for sending.

        Raises
        ------
        PayloadError
            If the payload carries arrays its kind does not allow, or is too large.
        """
        from flwr.common.serde import recorddict_to_proto

        allowed = _ALLOWED_ARRAYS.get(kind)
        if allowed is None:
            raise PayloadError(f"{self.hospital}: no outbound payload kind {kind!r}; known: {sorted(_ALLOWED_ARRAYS)}")
        extra = set(content.array_records) - allowed
        if extra:
            raise PayloadError(f"{self.hospital}: payload {kind} may not carry arrays {sorted(extra)}")
        wire = recorddict_to_proto(content).SerializeToString()
        if len(wire) > self.max_bytes:
            raise PayloadError(f"{self.hospital}: payload of {len(wire)} bytes exceeds the limit of {self.max_bytes}")
        self._append({
            "time": time.time(), "hospital": self.hospital, "round": round, "kind": kind, "bytes": len(wire),
            "sha256": hashlib.sha256(wire).hexdigest(), "privacy": privacy,
        })
        logger.debug("%s released %s payload of %d bytes (round %d)", self.hospital, kind, len(wire), round)
        return content

    def _append(self, record: dict[str, object]) -> None:
        """Append one line with a single write + fsync (a crash leaves whole lines only)."""
        self.hospital_dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.hospital_dir / OUTBOUND_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
