"""The audit log under crashes and concurrency: torn records, two writers, a killed hospital, an unwritable log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from client.app import make_client_app
from client.audit_log import AUDIT_LOG, AuditLog, AuditLogError, decode_indices
from client.audit_verify import verify_folder
from common.config import OutputKind, WireDtype
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content
from simulations.run import prepare_hospitals
from tests.audit_helpers import make_gate, release
from tests.conftest import request_message

ROOT = Path(__file__).resolve().parents[1]


def _python(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_release_record_holds_what_left(tmp_path: Path) -> None:
    gate = make_gate(tmp_path)
    reply = release(gate, 3, n=6)
    audit = verify_folder(tmp_path)
    assert audit.ok
    record = audit.records[1]
    assert record["event"] == "release" and record["seq"] == 2
    np.testing.assert_array_equal(decode_indices(record["proxy_indices"]), np.arange(30, 36))
    assert record["proxy_manifest"] == "ab" * 32
    assert record["payload"]["arrays"] == {"outputs.outputs": {"shape": [6, 5], "dtype": "float16"}}
    assert record["release"]["round"] == "3" and record["release"]["status"] == "sent"
    assert record["release"]["privacy"] == "none: no formal DP guarantee"
    from common.payload import wire_bytes
    import hashlib

    sha = hashlib.sha256(wire_bytes(reply)).hexdigest()
    assert record["payload"]["sha256"] == sha == record["release"]["sha256"]
    assert (tmp_path / record["archive"]).read_bytes() == wire_bytes(reply)
    assert json.loads((tmp_path / "outbound.jsonl").read_text())["audit_seq"] == 2


def test_torn_last_record_is_reported_then_recorded_never_dropped(tmp_path: Path) -> None:
    gate = make_gate(tmp_path)
    release(gate, 1)
    torn = b'{"hash":"12ab","record":{"event":"release","seq":4'
    with open(tmp_path / AUDIT_LOG, "ab") as f:
        f.write(torn)  # a crash in the middle of writing record 4
    audit = verify_folder(tmp_path)
    assert [str(f) for f in audit.findings] == [
        f"torn: line 4: incomplete last record ({len(torn)} bytes): a crash during a write (nothing was sent for "
        "it) or a cut file; the next append records it"]
    release(gate, 2)  # the hospital goes on: the torn line is kept, terminated, and acknowledged
    audit = verify_folder(tmp_path)
    assert audit.ok, audit.findings
    assert [str(n) for n in audit.notices] == [
        "torn: line 4: incomplete record from a crash during a write, kept and acknowledged by record 4"]
    assert (tmp_path / AUDIT_LOG).read_bytes().splitlines()[3] == torn
    assert [r["event"] for r in audit.records] == ["genesis", "release", "sent", "recovered", "release", "sent"]


def test_two_processes_appending_keep_one_chain(tmp_path: Path) -> None:
    script = f"""
        import sys
        from pathlib import Path
        from tests.audit_helpers import make_gate, release
        gate = make_gate(Path({str(tmp_path)!r}))
        for r in range(int(sys.argv[1]), int(sys.argv[1]) + 25):
            release(gate, r)
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(start)], env=env, cwd=ROOT)
             for start in (1, 100)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    audit = verify_folder(tmp_path)
    assert audit.ok and not audit.notices, audit.findings
    assert [r["seq"] for r in audit.records] == list(range(1, 102))  # genesis + 50 x (release, sent)
    rounds = sorted(int(r["release"]["round"]) for r in audit.records if r["event"] == "release")
    assert rounds == list(range(1, 26)) + list(range(100, 125))
    assert len([r for r in audit.records if r["event"] == "genesis"]) == 1


def test_hospital_killed_between_log_write_and_send(tmp_path: Path) -> None:
    """SIGKILL after the release record is fsync'd, before the reply is handed on: valid log, record marked unsent."""
    result = _python(f"""
        import os, signal
        from pathlib import Path
        from client.audit_log import AuditLog
        from tests.audit_helpers import make_gate, release
        gate = make_gate(Path({str(tmp_path)!r}))
        release(gate, 1)
        AuditLog.confirm_sent = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        release(gate, 2)
        print("the reply of round 2 was sent")
    """)
    assert result.returncode == -9 and "was sent" not in result.stdout
    audit = verify_folder(tmp_path)
    assert audit.ok, audit.findings
    assert [str(n) for n in audit.notices] == [
        "not_confirmed_sent: record 4: query.logits reply of round 2 was prepared and logged but not confirmed sent "
        "(the hospital stopped between writing the log and sending)"]
    release(make_gate(tmp_path), 3)  # the restarted hospital extends the same chain
    audit = verify_folder(tmp_path)
    assert audit.ok and len(audit.notices) == 1 and audit.records[-1]["seq"] == 6


def test_log_that_cannot_be_written_sends_nothing(tmp_path: Path) -> None:
    (tmp_path / AUDIT_LOG).mkdir()  # the log's path is taken: every append fails
    with pytest.raises(AuditLogError, match="audit log .*nothing is sent"):
        release(make_gate(tmp_path), 1)
    assert not (tmp_path / "outbound.jsonl").exists()


def test_client_app_with_unwritable_log_releases_nothing(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    prepare_hospitals(cfg, tmp_path)
    (tmp_path / "H0" / AUDIT_LOG).mkdir()
    query = Query(round=1, proxy_hash="0" * 64, indices=np.arange(4), temperature=1.0, output=OutputKind.PROBS,
                  dtype=WireDtype.FLOAT16)
    from flwr.app import Context, RecordDict

    context = Context(run_id=1, node_id=10, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = make_client_app(tmp_path)(request_message(make_query_content(query), message_type=QUERY_MESSAGE_TYPE,
                                                      dst_node_id=10), context)
    assert reply.has_error() and "cannot record its outbound traffic; nothing was released" in reply.error.reason
    assert not (tmp_path / "H0" / "outbound.jsonl").exists()


def test_key_rotation_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    gate = make_gate(tmp_path)
    release(gate, 1)
    old = (tmp_path / "audit_key.pem").read_bytes()
    new_id = AuditLog(tmp_path, hospital="H0").rotate_key()
    release(gate, 2)
    audit = verify_folder(tmp_path)
    assert audit.ok, audit.findings
    assert audit.records[3]["event"] == "key_rotation" and audit.records[-1]["key_id"] == new_id
    assert audit.records[1]["key_id"] != new_id
    assert (tmp_path / "audit_key.pem").read_bytes() != old
