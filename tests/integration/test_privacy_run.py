"""Privacy in a real Flower simulation on real RetinaMNIST: budgets, ledgers and labels end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from client.ledger import read_entries, replay
from common.accounting import GaussianEvent, epsilon
from simulations.run import simulate

pytestmark = pytest.mark.slow

NO_DP = "no formal DP guarantee"


def test_hospital_exhausts_its_budget_mid_run_and_the_run_goes_on(tiny_config, tmp_path: Path) -> None:
    batch, z = 32, 8.0
    after_two = epsilon([GaussianEvent(z, batch)] * 2, 1e-5)
    after_three = epsilon([GaussianEvent(z, batch)] * 3, 1e-5)
    budget = (after_two + after_three) / 2  # H1 can afford two rounds of fresh answers, not three
    cfg = tiny_config(**{"rounds": 4, "distill.proxy_batch": batch, "federation.min_replies": 2,
                         "policy_per_hospital": {"1": {"privacy": {"mechanism": "hospital_gaussian",
                                                                  "noise_multiplier": z, "budget_epsilon": budget}}}})
    out = tmp_path / "run"
    final = simulate(cfg, out_dir=out)
    doc = json.loads((out / "metrics.json").read_text())
    assert final["test_auc"] is not None and [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4]
    for r in doc["rounds"]:
        assert r["samples_queried"] == batch and r["samples_held"] == 0  # fresh samples every round
    for r in doc["rounds"][:2]:
        assert r["replies_ok"] == 3 and r["privacy"]["H1"]["epsilon"] > 0
    for r in doc["rounds"][2:]:  # refused from round 3 on: named, and the others go on
        assert r["replies_ok"] == 2 and "privacy budget exhausted" in r["rejected"]["H1"]
        assert set(r["privacy"]) == {"H0", "H2"}
    assert doc["privacy_summary"]["H1"]["epsilon"] == pytest.approx(after_two, abs=1e-9)
    assert doc["privacy_summary"]["H0"]["mechanism"] == "none: no formal DP guarantee"
    assert "no formal DP guarantee for H0, H2" in doc["privacy"]

    h1 = out / "hospitals" / "H1"
    entries = read_entries(h1 / "privacy_ledger.jsonl")  # exactly the two releases that happened
    assert [(e.round, e.event) for e in entries] == [(1, GaussianEvent(z, batch)), (2, GaussianEvent(z, batch))]
    assert replay(h1 / "privacy_ledger.jsonl", 1e-5) == entries[-1].epsilon_after == pytest.approx(after_two)
    log = [json.loads(x) for x in (h1 / "outbound.jsonl").read_text().splitlines()]
    assert [(e["round"], e["status"]) for e in log] == [("1", "sent"), ("2", "sent"), ("3", "error"), ("4", "error")]
    assert all(e["error_code"] == 103 and e["n_indices"] == 0 for e in log[2:])


def test_a_run_without_dp_says_so_everywhere(tiny_config, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="server")
    cfg = tiny_config(**{"rounds": 2, "distill.proxy_batch": 32})
    out = tmp_path / "none"
    simulate(cfg, out_dir=out)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["privacy"].startswith(NO_DP)
    for r in doc["rounds"]:  # each reply's own statement, per hospital and round
        assert {p["mechanism"] for p in r["privacy"].values()} == {"none: " + NO_DP}
        assert all(p["epsilon"] is None for p in r["privacy"].values())
    for name, summary in doc["privacy_summary"].items():
        assert NO_DP in summary["mechanism"], name
    for h in ("H0", "H1", "H2"):
        lines = [json.loads(x) for x in (out / "hospitals" / h / "outbound.jsonl").read_text().splitlines()]
        assert lines and all(NO_DP in x["privacy"] for x in lines)
        assert not (out / "hospitals" / h / "privacy_ledger.jsonl").exists()
    round_lines = [r.getMessage() for r in caplog.records if "val AUC" in r.getMessage()]
    assert len(round_lines) == 2 and all(NO_DP in line for line in round_lines)


def test_coordinator_does_not_ask_again_for_samples_it_holds(tiny_config, tmp_path: Path) -> None:
    # RetinaMNIST's proxy set has 270 samples: round 2 wraps around, round 3 holds everything already
    cfg = tiny_config(**{"rounds": 3, "distill.proxy_batch": 200})
    out = tmp_path / "held"
    simulate(cfg, out_dir=out)
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["samples_queried"] for r in doc["rounds"]] == [200, 70, 0]
    assert [r["samples_held"] for r in doc["rounds"]] == [0, 130, 200]
    assert doc["rounds"][2]["bytes_up"] == {} and doc["rounds"][2]["distill_loss"] is not None
    for h in ("H0", "H1", "H2"):
        lines = [json.loads(x) for x in (out / "hospitals" / h / "outbound.jsonl").read_text().splitlines()]
        assert [x["n_indices"] for x in lines] == [200, 70]
    again = tmp_path / "requery"  # asking again gets the same answers, so the student is the same
    simulate(tiny_config(**{"rounds": 3, "distill.proxy_batch": 200, "query.requery_held": True}), out_dir=again)
    redo = json.loads((again / "metrics.json").read_text())
    assert [r["samples_queried"] for r in redo["rounds"]] == [200, 200, 200]
    assert [r["val_auc"] for r in redo["rounds"]] == pytest.approx([r["val_auc"] for r in doc["rounds"]], abs=1e-6)


def test_a_changed_teacher_is_asked_again_and_unchanged_ones_answer_for_free(tiny_config, tmp_path: Path,
                                                                             caplog) -> None:
    from client.daemon import train_hospital_teacher

    caplog.set_level(logging.WARNING, logger="server")
    batch, z = 100, 8.0  # 270 proxy samples: rounds 1-3 cover them all, round 4 only holds samples
    gaussian = {"2": {"privacy": {"mechanism": "hospital_gaussian", "noise_multiplier": z, "budget_epsilon": 1e6}}}
    out = tmp_path / "run"
    simulate(tiny_config(**{"rounds": 2, "distill.proxy_batch": batch, "policy_per_hospital": gaussian}), out_dir=out)
    train_hospital_teacher(out / "hospitals" / "H1", retrain=True)  # `medkd client train-teacher --retrain`
    simulate(tiny_config(**{"rounds": 4, "distill.proxy_batch": batch, "policy_per_hospital": gaussian}), out_dir=out)
    doc = json.loads((out / "metrics.json").read_text())
    # round 3 brings H1's new teacher version: the coordinator forgets what it held, so round 4 asks again
    assert [r["samples_queried"] for r in doc["rounds"]] == [100, 100, 70, 100]
    assert [r["samples_held"] for r in doc["rounds"]] == [0, 0, 30, 0]
    assert any("the teacher of H1 changed since its last reply" in r.getMessage() for r in caplog.records)
    h2 = out / "hospitals" / "H2"  # unchanged H2 answers the repeated samples from its release record: no charge
    assert [(e.round, e.event) for e in read_entries(h2 / "privacy_ledger.jsonl")] == [
        (1, GaussianEvent(z, 100)), (2, GaussianEvent(z, 100)), (3, GaussianEvent(z, 70))]
    lines = [json.loads(x) for x in (h2 / "outbound.jsonl").read_text().splitlines()]
    assert [(x["n_indices"], x["charged"]) for x in lines] == [(100, 1), (100, 1), (70, 1), (100, 0)]
    assert doc["rounds"][3]["privacy"]["H2"]["epsilon"] == doc["rounds"][2]["privacy"]["H2"]["epsilon"]
