"""``medkd audit report``: what left, the ledger replayed into a fresh accountant, one self-contained HTML page."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from client.audit_report import build_report, report_html
from client.ledger import PrivacyLedger
from common.accounting import GaussianEvent, SampledGaussianEvent
from simulations.audit_cli import main
from tests.audit_helpers import make_gate, release


def _hospital(folder: Path) -> list:
    gate = make_gate(folder)
    replies = [release(gate, r, n=3 + r) for r in (1, 2)]
    ledger = PrivacyLedger(folder, delta=1e-5, budget_epsilon=10.0)
    ledger.charge(SampledGaussianEvent(noise_multiplier=1.1, sample_rate=0.01, steps=200), mechanism="dp_sgd_teacher",
                  description="teacher training", run_id=1, round=None)
    ledger.charge(GaussianEvent(noise_multiplier=8.0, count=4), mechanism="pate", description="4 answers", run_id=1,
                  round=2)
    return replies


def test_report_totals_values_and_ledger_replay(tmp_path: Path) -> None:
    replies = _hospital(tmp_path / "H0")
    [rep] = build_report(tmp_path, with_values=True)
    assert rep["verified"] and rep["hospital"] == "H0"
    assert rep["totals"]["proxy_samples"] == 4 + 5 and rep["totals"]["unique_proxy_samples"] == 9
    assert rep["totals"]["bytes"] == sum(r["bytes"] for r in rep["releases"])
    assert [r["proxy_indices"] for r in rep["releases"]] == [[10, 11, 12, 13], [20, 21, 22, 23, 24]]
    sent = replies[1].content.array_records["outputs"]["outputs"].numpy()
    np.testing.assert_array_equal(np.asarray(rep["releases"][1]["values"]["outputs.outputs"], dtype=np.float16), sent)
    ledger = rep["ledger"]
    assert ledger["matches"] and ledger["epsilon_recomputed"] == ledger["epsilon_recorded"] > 0
    assert ledger["epsilon_recomputed_rdp"] > ledger["epsilon_recomputed"]  # RDP is the looser cross-check
    assert ledger["mechanisms"] == ["dp_sgd_teacher", "pate"]
    assert [e["event"]["kind"] for e in ledger["entries"]] == ["sampled_gaussian", "gaussian"]


def test_report_without_ledger_says_no_guarantee(tmp_path: Path) -> None:
    make_gate(tmp_path / "H0")
    release(make_gate(tmp_path / "H0"), 1)
    [rep] = build_report(tmp_path)
    assert rep["ledger"]["statement"] == "no privacy ledger: no formal DP guarantee"
    assert rep["totals"]["mechanisms"] == ["none"]


def test_html_is_one_self_contained_file(tmp_path: Path, capsys) -> None:
    _hospital(tmp_path / "H0")
    _hospital(tmp_path / "H1")
    html_path = tmp_path / "report.html"
    assert main(["report", str(tmp_path), "--html", str(html_path)]) == 0
    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == 1
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    assert "All 2 hospital logs verified" in page and "matches" in page
    out = capsys.readouterr().out
    assert "H0: verified; 2 replies" in out and "recorded ε" in out and "matches" in out


def test_report_of_a_tampered_log_exits_non_zero(tmp_path: Path) -> None:
    _hospital(tmp_path / "H0")
    log = tmp_path / "H0" / "audit_log.jsonl"
    log.write_text(log.read_text().replace('"round":"2"', '"round":"7"'))
    assert main(["verify", str(tmp_path)]) == 1
    assert main(["report", str(tmp_path)]) == 1
