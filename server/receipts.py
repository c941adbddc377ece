"""The coordinator's receipts: each round it signs the audit-log head and reply hash of every hospital that answered.

A query reply carries the head of the hospital's audit log when it left
(``hospital.audit_seq``/``audit_head``, stamped by the hospital's gate). The
coordinator signs, with its own Ed25519 key (``coordinator_key.pem`` in its
output folder, created on first use; the public key in
``coordinator_key.pub``)::

    {"v": 1, "hospital", "round", "audit_seq", "audit_head", "reply_sha256"}

where ``reply_sha256`` is the SHA-256 of the reply's wire bytes as received
(:mod:`server.metering`). It keeps every receipt in ``receipts.jsonl`` in
its output folder and sends each one back with its next query to that
hospital, which checks and stores it (:mod:`client.receipts`). Afterwards
neither side can rewrite history alone: the hospital's chain up to
``audit_seq`` and the payload it released are fixed by the coordinator's
signature, and the coordinator cannot deny what it received. The last
round's receipts stay in the coordinator's file (no further query carries
them); ``medkd audit verify`` on a simulation's output folder checks both.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.signing import canonical, load_or_create_key, public_hex, receipt_hash, sign, RECEIPT_DOMAIN

logger = logging.getLogger(__name__)

COORDINATOR_KEY = "coordinator_key.pem"
COORDINATOR_PUBLIC = "coordinator_key.pub"
COORDINATOR_RECEIPTS = "receipts.jsonl"
class ReceiptSigner:
    """Signs and keeps receipts with the coordinator key in ``out_dir``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._key = load_or_create_key(self.out_dir / COORDINATOR_KEY)
        self.public = public_hex(self._key)
        if not (self.out_dir / COORDINATOR_PUBLIC).exists():
            atomic_write_text(self.out_dir / COORDINATOR_PUBLIC, self.public + "\n")

    def sign(self, *, hospital: str, round: int, audit_seq: int, audit_head: str, reply_sha256: str) -> dict[str, Any]:
        """A signed receipt, also appended (fsync'd) to ``receipts.jsonl``."""
        receipt: dict[str, Any] = {"hospital": hospital, "round": int(round), "audit_seq": int(audit_seq),
                                   "audit_head": audit_head, "reply_sha256": reply_sha256}
        receipt["coordinator_key"] = self.public
        receipt["signature"] = sign(self._key, receipt_hash(receipt), domain=RECEIPT_DOMAIN)
        fd = os.open(self.out_dir / COORDINATOR_RECEIPTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, canonical(receipt) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return receipt


def issue_receipts(signer: ReceiptSigner, accepted: list[Any], *, reply_sha256: Mapping[int, list[str]],
                   names: Mapping[int, str], round: int) -> dict[int, dict[str, Any]]:
    """node -> receipt for each accepted reply that carried an audit head (sent with the node's next query)."""
    nodes = {name: node for node, name in names.items()}
    receipts: dict[int, dict[str, Any]] = {}
    for reply in accepted:
        node = nodes.get(reply.hospital)
        hashes = reply_sha256.get(node, []) if node is not None else []
        if reply.audit_seq is None or reply.audit_head is None or len(hashes) != 1:
            continue  # no head stamped, or not exactly one reply metered from that node: nothing to sign
        receipts[node] = signer.sign(hospital=reply.hospital, round=round, audit_seq=reply.audit_seq,
                                     audit_head=reply.audit_head, reply_sha256=hashes[0])
    logger.debug("round %d: signed %d receipts", round, len(receipts))
    return receipts
