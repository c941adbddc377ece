"""A simulated study is audited like a real one: each hospital's signed log, receipts and payloads under the run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.audit_report import build_report, report_html
from client.audit_verify import verify_tree
from simulations.run import simulate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_simulated_run_verifies_with_receipts_and_reports(tiny_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    simulate(tiny_config(**{"teacher.epochs": 2, "distill.epochs": 1}), out_dir=out)
    audits = verify_tree(out)
    assert [a.folder.name for a in audits] == ["H0", "H1", "H2"]
    for audit in audits:
        assert audit.ok and not audit.notices, audit.findings
        assert [r["event"] for r in audit.records] == ["genesis", "release", "sent", "release", "sent"]
        assert audit.receipts == 1  # round 1's receipt came with round 2's query
    coordinator = [json.loads(x) for x in (out / "receipts.jsonl").read_text().splitlines()]
    assert sorted((r["hospital"], r["round"]) for r in coordinator) == [(h, r) for h in ("H0", "H1", "H2")
                                                                        for r in (1, 2)]
    metrics = json.loads((out / "metrics.json").read_text())
    for receipt in coordinator:  # the coordinator signed the very bytes it metered
        assert receipt["reply_sha256"] in metrics["rounds"][receipt["round"] - 1]["reply_sha256"][receipt["hospital"]]
    reports = build_report(out)
    assert [r["totals"]["proxy_samples"] for r in reports] == [128, 128, 128]
    assert all(r["ledger"]["statement"] == "no privacy ledger: no formal DP guarantee" for r in reports)
    page = report_html(reports, out)
    assert page.count("data:image/png;base64,") == 1 and "All 3 hospital logs verified" in page
    # the CLI: a clean run exits 0; one deleted record exits 1 and names it
    cli = [sys.executable, "-m", "simulations.cli", "audit", "verify", str(out)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    assert subprocess.run(cli, env=env, cwd=ROOT, capture_output=True).returncode == 0
    log = out / "hospitals" / "H1" / "audit_log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3] + lines[4:]))
    done = subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "deleted: record 4: missing from the chain" in done.stdout
