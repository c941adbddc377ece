"""``medkd audit verify``: check a hospital's audit log, its archived payloads and its receipts.

Every problem is a :class:`Finding` naming the record (sequence number and
line) and its kind:

``edited``            a record whose content no longer matches its hash, or
                      whose signature does not verify (re-hashed after editing);
``deleted``           a sequence number missing from the chain;
``reordered``         a record placed after a later one;
``inserted``          a second record with a sequence number already taken,
                      or one that does not link to its predecessor;
``truncated``         the signed head (``audit_head.json``) or a receipt names
                      a record past the end of the file;
``torn``              an incomplete last line (a crash during a write) that no
                      ``recovered`` record acknowledges yet;
``swapped_payload``   an archived payload whose SHA-256 differs from its record;
``missing_payload``   an archived payload that is gone;
``forged_receipt``    a receipt whose signature does not verify under the
                      coordinator's key;
``receipt_mismatch``  a validly signed receipt the log contradicts (the log
                      was rewritten after the coordinator signed it).

What is not tampering is a :class:`Finding` with ``tampering=False`` in
``notices``: a release prepared but not confirmed sent (the hospital stopped
between writing the log and sending), or a torn line that a ``recovered``
record acknowledges.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.audit_log import AUDIT_HEAD, AUDIT_LOG, DOMAIN, HEAD_DOMAIN, RECEIPTS, read_lines
from common.signing import digest, key_id, receipt_valid, verify_signature

COORDINATOR_PUBLIC = "coordinator_key.pub"
COORDINATOR_RECEIPTS = "receipts.jsonl"


@dataclass(frozen=True)
class Finding:
    """One problem (or, with ``tampering=False``, one notice) about a named record."""

    kind: str
    where: str
    message: str
    tampering: bool = True

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.message}"


@dataclass
class HospitalAudit:
    """The outcome of verifying one hospital folder; ``records`` are the verified records in seq order."""

    folder: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notices: list[Finding] = field(default_factory=list)
    receipts: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, kind: str, where: str, message: str) -> None:
        self.findings.append(Finding(kind, where, message))

    def note(self, kind: str, where: str, message: str) -> None:
        self.notices.append(Finding(kind, where, message, tampering=False))


@dataclass
class _Line:
    number: int
    body: dict[str, Any] | None
    hash: str | None
    signature: str | None
    good: bool = False

    @property
    def seq(self) -> int | None:
        seq = self.body.get("seq") if self.body else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    @property
    def where(self) -> str:
        return f"record {self.seq} (line {self.number})" if self.seq is not None else f"line {self.number}"


def _parse(number: int, raw: bytes) -> _Line:
    try:
        doc = json.loads(raw.decode("utf-8"))
        body = doc["record"]
        if not isinstance(body, dict):
            raise TypeError("record is not an object")
        return _Line(number, body, str(doc["hash"]), str(doc["signature"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return _Line(number, None, None, None)


def verify_folder(folder: Path, *, coordinator_key: str | None = None,
                  coordinator_receipts: list[dict[str, Any]] | None = None) -> HospitalAudit:
    """Verify the audit log, payload archive and receipts in one hospital folder."""
    audit = HospitalAudit(Path(folder))
    raw_lines, torn = read_lines(folder)
    lines = [_parse(n, raw) for n, raw in enumerate(raw_lines, start=1)]
    if not lines and not torn:
        audit.add("deleted", str(Path(folder) / AUDIT_LOG), "no audit log (or an empty one)")
        return audit
    keys = _check_records(audit, lines)
    _check_order(audit, lines)
    good = {line.seq: line for line in lines if line.good}
    _check_torn(audit, lines, raw_lines, torn, good)
    _check_head(audit, Path(folder), good, keys)
    audit.records = [good[s].body for s in sorted(good)]  # type: ignore[misc]
    _check_sent(audit)
    _check_payloads(audit, Path(folder))
    receipts = _read_jsonl(Path(folder) / RECEIPTS)
    audit.receipts = len(receipts)
    _check_receipts(audit, receipts, good, label="receipt", coordinator_key=coordinator_key)
    hospital = next((r.get("hospital") for r in audit.records), None)
    theirs = [r for r in coordinator_receipts or [] if r.get("hospital") == hospital]
    _check_receipts(audit, theirs, good, label="coordinator receipt", coordinator_key=coordinator_key)
    return audit


def _check_records(audit: HospitalAudit, lines: list[_Line]) -> dict[str, str]:
    """Hash and signature of each line (keys walked from genesis through rotations); returns key_id -> key."""
    counts = Counter(line.seq for line in lines if line.seq is not None)
    keys: dict[str, str] = {}
    current: str | None = None
    for line in lines:
        body = line.body
        duplicate = line.seq is not None and counts[line.seq] > 1
        if body is None:
            continue  # torn or garbled: judged in _check_torn
        if body.get("event") == "genesis" and line.seq == 1 and current is None:
            current = str(body.get("public_key", ""))
        if digest(body) != line.hash:
            audit.add("inserted" if duplicate else "edited", line.where, "its content does not match its hash")
            continue
        if current is None or not verify_signature(current, line.signature, str(line.hash), domain=DOMAIN):
            audit.add("inserted" if duplicate else "edited", line.where,
                      "its signature does not verify under the hospital's audit key (forged, or re-hashed after "
                      "editing)")
            continue
        line.good = True
        keys[key_id(current)] = current
        if body.get("event") == "key_rotation":
            current = str(body.get("public_key", ""))
            keys[key_id(current)] = current
    return keys


def _check_order(audit: HospitalAudit, lines: list[_Line]) -> None:
    """Deleted, reordered and inserted records, and links between consecutive records."""
    present = [line for line in lines if line.seq is not None]
    seqs = Counter(line.seq for line in present)
    if not present:
        return
    for seq in range(1, max(seqs) + 1):
        if seq not in seqs:
            after = max((line.number for line in present if line.seq < seq), default=0)  # type: ignore[operator]
            audit.add("deleted", f"record {seq}", f"missing from the chain (expected after line {after})")
    highest = 0
    for line in present:
        if line.seq < highest and seqs[line.seq] == 1:  # type: ignore[operator]
            audit.add("reordered", line.where, f"comes after record {highest}")
        highest = max(highest, line.seq)  # type: ignore[arg-type]
    good = [line for line in present if line.good]
    by_seq: dict[int, list[_Line]] = {}
    for line in good:
        by_seq.setdefault(line.seq, []).append(line)  # type: ignore[arg-type]
    for seq, same in by_seq.items():
        for extra in same[1:]:
            audit.add("inserted", extra.where, f"a second record {seq} (the first is at line {same[0].number})")
            extra.good = False
    for seq, same in by_seq.items():
        line, before = same[0], by_seq.get(seq - 1)
        expected = "0" * 64 if seq == 1 else (before[0].hash if before and before[0].good else None)
        if expected is not None and line.body.get("prev") != expected:  # type: ignore[union-attr]
            audit.add("inserted", line.where, f"does not link to record {seq - 1} (its prev hash differs)")


def _check_torn(audit: HospitalAudit, lines: list[_Line], raw: list[bytes], torn: bytes,
                good: dict[int | None, _Line]) -> None:
    recovered = {int(line.body.get("torn_line", -1)): line for line in good.values()
                 if line.body and line.body.get("event") == "recovered"}
    for line in lines:
        if line.body is not None:
            continue
        marker = recovered.get(line.number)
        if marker is not None and marker.body.get("torn_sha256") == hashlib.sha256(raw[line.number - 1]).hexdigest():
            audit.note("torn", f"line {line.number}", f"incomplete record from a crash during a write, kept and "
                       f"acknowledged by record {marker.seq}")
        else:
            audit.add("edited", f"line {line.number}", "not a readable record")
    if torn:
        audit.add("torn", f"line {len(lines) + 1}", f"incomplete last record ({len(torn)} bytes): a crash during "
                  "a write (nothing was sent for it) or a cut file; the next append records it")


def _check_head(audit: HospitalAudit, folder: Path, good: dict[int | None, _Line], keys: dict[str, str]) -> None:
    path = folder / AUDIT_HEAD
    try:
        head = json.loads(path.read_text())
        seq, hash_ = int(head["seq"]), str(head["hash"])
        key = keys.get(str(head["key_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        audit.add("truncated", str(path), "the signed head is missing or unreadable")
        return
    if key is None or not verify_signature(key, head.get("signature"), hash_, domain=HEAD_DOMAIN):
        audit.add("edited", str(path), "the head's signature does not verify")
        return
    last = max((s for s in good if s is not None), default=0)
    if seq > last:
        audit.add("truncated", f"record {seq}", f"the signed head names record {seq}, but the log's last verified "
                  f"record is {last}")
    elif seq in good and good[seq].hash != hash_:
        audit.add("edited", good[seq].where, "differs from the signed head")


def _check_sent(audit: HospitalAudit) -> None:
    confirmed = {r.get("confirms") for r in audit.records if r.get("event") == "sent"}
    for record in audit.records:
        if record.get("event") == "release" and record["seq"] not in confirmed:
            release = record.get("release", {})
            audit.note("not_confirmed_sent", f"record {record['seq']}", f"{release.get('kind')} reply of round "
                       f"{release.get('round')} was prepared and logged but not confirmed sent (the hospital "
                       "stopped between writing the log and sending)")


def _check_payloads(audit: HospitalAudit, folder: Path) -> None:
    for record in audit.records:
        name = record.get("archive")
        if record.get("event") != "release" or not name:
            continue
        path = folder / str(name)
        try:
            data = path.read_bytes()
        except OSError:
            audit.add("missing_payload", f"record {record['seq']}", f"archived payload {name} is missing")
            continue
        want = record.get("payload", {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != want:
            audit.add("swapped_payload", f"record {record['seq']}", f"archived payload {name} does not hash to the "
                      f"recorded {str(want)[:16]}...")


def _check_receipts(audit: HospitalAudit, receipts: list[dict[str, Any]], good: dict[int | None, _Line], *,
                    label: str, coordinator_key: str | None) -> None:
    keys_by_run: dict[object, str] = {}
    for number, receipt in enumerate(receipts, start=1):
        where = f"{label} {number} (round {receipt.get('round')})"
        key = coordinator_key or keys_by_run.setdefault(receipt.get("run_id"), str(receipt.get("coordinator_key")))
        if receipt.get("coordinator_key") != key or not receipt_valid(receipt, coordinator_key=key):
            audit.add("forged_receipt", where, "its signature does not verify under the coordinator's key")
            continue
        seq = receipt.get("audit_seq")
        if isinstance(seq, int) and seq > 0:
            line = good.get(seq)
            if line is None:
                audit.add("truncated" if seq > max((s for s in good if s is not None), default=0) else
                          "receipt_mismatch", where, f"names record {seq}, which the log does not hold")
                continue
            if line.hash != receipt.get("audit_head"):
                audit.add("receipt_mismatch", where, f"names record {seq} with another hash: the log was rewritten "
                          "after the coordinator signed")
                continue
        released = [line.body for s, line in good.items() if s is not None and s > (seq or 0) and line.body
                    and line.body.get("event") == "release"
                    and line.body.get("payload", {}).get("sha256") == receipt.get("reply_sha256")]
        if not released:
            audit.add("receipt_mismatch", where, "the reply it acknowledges is not in the log after record "
                      f"{seq} (deleted or rewritten)")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({})  # an unreadable receipt: its signature check fails and names it
    return out


def hospital_folders(directory: Path) -> list[Path]:
    """The hospital folders under ``directory``: itself, ``hospitals/*`` of a run folder, or its subfolders."""
    directory = Path(directory)
    if (directory / AUDIT_LOG).exists():
        return [directory]
    for root in (directory / "hospitals", directory):
        found = sorted(p for p in root.glob("*") if (p / AUDIT_LOG).exists())
        if found:
            return found
    return []


def verify_tree(directory: Path, *, coordinator_key: str | None = None) -> list[HospitalAudit]:
    """Verify every hospital folder under ``directory`` (a run folder also cross-checks its coordinator's receipts)."""
    directory = Path(directory)
    if coordinator_key is None and (directory / COORDINATOR_PUBLIC).exists():
        coordinator_key = (directory / COORDINATOR_PUBLIC).read_text().strip()
    theirs = _read_jsonl(directory / COORDINATOR_RECEIPTS) if (directory / COORDINATOR_PUBLIC).exists() else []
    return [verify_folder(folder, coordinator_key=coordinator_key, coordinator_receipts=theirs)
            for folder in hospital_folders(directory)]
