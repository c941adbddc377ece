"""Each way of tampering with a hospital's audit log is detected and named, with the exact record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.audit_log import AUDIT_LOG, AuditLog
from client.audit_verify import verify_folder
from client.receipts import store_receipt
from common.signing import canonical, digest
from server.receipts import ReceiptSigner
from tests.audit_helpers import make_gate, release

# A log of 4 releases: genesis is record 1, release r is record 2r, its "sent" record 2r + 1 (records 1-9).


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    gate = make_gate(tmp_path / "H0")
    for round_ in range(1, 5):
        release(gate, round_)
    return tmp_path / "H0"


def _lines(folder: Path) -> list[bytes]:
    return (folder / AUDIT_LOG).read_bytes().splitlines(keepends=True)


def _write(folder: Path, lines: list[bytes]) -> None:
    (folder / AUDIT_LOG).write_bytes(b"".join(lines))


def _kinds(folder: Path) -> list[str]:
    return [str(f) for f in verify_folder(folder).findings]


def test_untouched_log_verifies(folder: Path) -> None:
    audit = verify_folder(folder)
    assert audit.ok and not audit.notices
    assert [r["seq"] for r in audit.records] == list(range(1, 10))
    assert [r["event"] for r in audit.records] == ["genesis"] + ["release", "sent"] * 4


def test_edited_record_is_named(folder: Path) -> None:
    lines = _lines(folder)
    doc = json.loads(lines[3])  # record 4: the release of round 2
    doc["record"]["release"]["bytes"] = 1
    lines[3] = canonical(doc) + b"\n"
    _write(folder, lines)
    assert _kinds(folder) == ["edited: record 4 (line 4): its content does not match its hash"]


def test_edited_and_rehashed_record_fails_its_signature(folder: Path) -> None:
    lines = _lines(folder)
    doc = json.loads(lines[3])
    doc["record"]["release"]["n_indices"] = 0
    doc["hash"] = digest(doc["record"])
    lines[3] = canonical(doc) + b"\n"
    _write(folder, lines)
    found = _kinds(folder)
    assert found[0].startswith("edited: record 4 (line 4): its signature does not verify")
    assert len(found) == 1


def test_deleted_record_is_named(folder: Path) -> None:
    lines = _lines(folder)
    del lines[5]  # record 6: round 3's release
    _write(folder, lines)
    assert _kinds(folder) == ["deleted: record 6: missing from the chain (expected after line 5)"]


def test_reordered_records_are_named(folder: Path) -> None:
    lines = _lines(folder)
    lines[3], lines[5] = lines[5], lines[3]  # records 4 and 6 swap places
    _write(folder, lines)
    found = _kinds(folder)
    assert "reordered: record 4 (line 6): comes after record 6" in found
    assert "reordered: record 5 (line 5): comes after record 6" in found


def test_inserted_record_is_named(folder: Path) -> None:
    lines = _lines(folder)
    lines.insert(7, lines[3])  # a copy of record 4 (a valid, signed line) inserted as line 8
    _write(folder, lines)
    assert _kinds(folder) == ["inserted: record 4 (line 8): a second record 4 (the first is at line 4)"]


def test_forged_inserted_record_is_named(folder: Path) -> None:
    lines = _lines(folder)
    doc = json.loads(lines[3])
    doc["record"]["release"]["round"] = "99"
    doc["hash"] = digest(doc["record"])
    lines.insert(8, canonical(doc) + b"\n")  # a made-up record 4, re-hashed, without the hospital's key
    _write(folder, lines)
    found = _kinds(folder)
    assert found[0].startswith("inserted: record 4 (line 9): its signature does not verify")
    assert len(found) == 1


def test_truncated_file_is_named(folder: Path) -> None:
    _write(folder, _lines(folder)[:6])  # the last 3 records cut off at a line boundary
    assert _kinds(folder) == ["truncated: record 9: the signed head names record 9, but the log's last verified "
                              "record is 6"]


def test_swapped_payload_is_named(folder: Path) -> None:
    (folder / "audit_payloads" / "00000004.bin").write_bytes((folder / "audit_payloads" / "00000006.bin").read_bytes())
    found = _kinds(folder)
    assert len(found) == 1
    assert found[0].startswith("swapped_payload: record 4: archived payload audit_payloads/00000004.bin does not hash")


def test_deleted_payload_is_named(folder: Path) -> None:
    (folder / "audit_payloads" / "00000008.bin").unlink()
    assert _kinds(folder) == ["missing_payload: record 8: archived payload audit_payloads/00000008.bin is missing"]


def _receipted(tmp_path: Path) -> tuple[Path, ReceiptSigner]:
    """A hospital whose round-2 reply got a coordinator receipt, delivered with (and stored on) the round-3 query."""
    folder, signer = tmp_path / "H0", ReceiptSigner(tmp_path / "coordinator")
    gate = make_gate(folder)
    release(gate, 1)
    reply = release(gate, 2)
    info = reply.content.config_records["hospital"]
    from common.payload import wire_bytes
    import hashlib

    assert info["audit_seq"] == 3  # genesis, round 1's release and its "sent" record came before
    receipt = signer.sign(hospital="H0", round=2, audit_seq=int(info["audit_seq"]), audit_head=str(info["audit_head"]),
                          reply_sha256=hashlib.sha256(wire_bytes(reply)).hexdigest())
    assert store_receipt(folder, receipt, hospital="H0", run_id=1) is None
    release(gate, 3)
    return folder, signer


def test_receipt_verifies_and_forged_receipt_is_named(tmp_path: Path) -> None:
    folder, signer = _receipted(tmp_path)
    audit = verify_folder(folder, coordinator_key=signer.public)
    assert audit.ok and audit.receipts == 1
    receipts = folder / "receipts.jsonl"
    doc = json.loads(receipts.read_text())
    doc["reply_sha256"] = "0" * 64  # the hospital claims the coordinator acknowledged another payload
    receipts.write_text(json.dumps(doc) + "\n")
    assert [str(f) for f in verify_folder(folder, coordinator_key=signer.public).findings] == [
        "forged_receipt: receipt 1 (round 2): its signature does not verify under the coordinator's key"]


def test_receipt_from_another_key_is_forged(tmp_path: Path) -> None:
    folder, signer = _receipted(tmp_path)
    other = ReceiptSigner(tmp_path / "impostor")
    doc = json.loads((folder / "receipts.jsonl").read_text())
    forged = other.sign(**{k: doc[k] for k in ("hospital", "round", "audit_seq", "audit_head", "reply_sha256")})
    (folder / "receipts.jsonl").write_text(json.dumps(forged) + "\n")
    assert [f.kind for f in verify_folder(folder, coordinator_key=signer.public).findings] == ["forged_receipt"]


def test_rewritten_log_contradicts_a_receipt(tmp_path: Path) -> None:
    """The hospital rewrites its whole chain with its own key: the coordinator's receipt still exposes it."""
    folder, signer = _receipted(tmp_path)
    lines = _lines(folder)
    docs = [json.loads(x) for x in lines]
    docs[0]["record"]["time"] = "2020-01-01T00:00:00+00:00"  # record 1 changed, then the chain re-signed
    from common.signing import load_private_key, sign
    from client.audit_log import DOMAIN

    key = load_private_key(folder / "audit_key.pem")
    prev = "0" * 64
    for doc in docs:
        doc["record"]["prev"] = prev
        doc["hash"] = prev = digest(doc["record"])
        doc["signature"] = sign(key, doc["hash"], domain=DOMAIN)
    _write(folder, [canonical(d) + b"\n" for d in docs])
    AuditLog(folder, hospital="H0")._append("sent", {"confirms": 0, "sha256": "x"})  # refreshes the signed head
    found = [str(f) for f in verify_folder(folder, coordinator_key=signer.public).findings]
    assert found == ["receipt_mismatch: receipt 1 (round 2): names record 3 with another hash: the log was rewritten "
                     "after the coordinator signed"]
