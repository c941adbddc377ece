"""Real Flower simulations (Ray backend, real ClientApps and messages) on real RetinaMNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.processes import alive, describe, descendants
from simulations.run import simulate

pytestmark = pytest.mark.slow

ROUND_FIELDS = {"round", "val_auc", "test_auc", "test_acc", "bytes_up", "bytes_down", "replies_ok", "replies_rejected", "seconds"}


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_fedkd_three_hospitals_two_rounds(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    out = tmp_path / "fedkd"
    final = simulate(cfg, out_dir=out)
    doc = _metrics(out)
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        assert ROUND_FIELDS <= set(r)
        assert set(r["bytes_up"]) == {"H0", "H1", "H2"} and all(b > 0 for b in r["bytes_up"].values())
        assert r["replies_ok"] == 3 and r["replies_rejected"] == 0
        # 64 samples x 5 classes in float16 is 640 bytes of outputs; the rest is record framing.
        assert all(640 < b < 2000 for b in r["bytes_up"].values())
    assert set(final) >= {"test_auc", "test_acc", "val_auc", "selected_round", "method", "seconds"}
    assert final["method"] == "fedkd"
    assert final["test_auc"] > 0.6, "the student should beat chance (AUC 0.5) clearly"
    # the reported student is the round with the best validation AUC; test figures come from it
    best = max(doc["rounds"], key=lambda r: (r["val_auc"], -r["round"]))
    assert final["selected_round"] == best["round"] and final["test_auc"] == best["test_auc"]
    assert doc["privacy"].startswith("no formal DP guarantee")
    assert (out / "config.yaml").exists() and (out / "student.pt").exists()
    state = torch.load(out / "student.pt", weights_only=True)
    assert state["round"] == final["selected_round"]
    for h in ("H0", "H1", "H2"):
        lines = (out / "hospitals" / h / "outbound.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(json.loads(x)["kind"] == "query.logits" for x in lines)
        assert (out / "hospitals" / h / "policy.yaml").exists()


def test_gate_logs_every_reply_with_the_hash_the_coordinator_received(tiny_config, tmp_path: Path) -> None:
    """Errors and faults included: one log line per reply sent, each hash equal to what arrived."""
    cfg = tiny_config(**{
        "federation.hospitals": 4, "federation.min_replies": 1, "teacher.epochs": 2, "distill.epochs": 1,
        "federation.max_in_flight": 3,  # 3 queries in flight; the fourth goes when a reply comes
        "federation.faults": {"0": "nan", "1": "crash"},
        "policy_per_hospital": {"2": {"limits": {"max_indices_per_query": 8}}},
    })
    out = tmp_path / "gate"
    simulate(cfg, out_dir=out)
    rounds = _metrics(out)["rounds"]
    assert [sorted(r["rejected"]) for r in rounds] == [["H0", "H1", "H2"]] * 2
    for r in rounds:
        assert r["rejected"]["H0"] == "outputs: contain NaN"
        assert "error 101: hospital H1 could not answer query.logits" in r["rejected"]["H1"]
        assert "policy limits.max_indices_per_query: query asks for 64 samples, more than 8" in r["rejected"]["H2"]
        assert "injected crash" not in r["rejected"]["H1"]  # internals stay at the hospital
    for h in ("H0", "H1", "H2", "H3"):
        log = [json.loads(x) for x in (out / "hospitals" / h / "outbound.jsonl").read_text().splitlines()]
        received = [r["reply_sha256"][h] for r in rounds]
        assert len(log) == sum(len(x) for x in received) == 2  # one line per reply the hospital sent
        assert [[e["sha256"]] for e in log] == received  # each logged hash is of the bytes that arrived
        assert [e["status"] for e in log] == (["sent", "sent"] if h in ("H0", "H3") else ["error", "error"])
    assert "injected crash" in (out / "hospitals" / "H1" / "hospital.log").read_text()


def test_a_late_hospital_is_given_up_while_the_window_moves_on(tiny_config, tmp_path: Path) -> None:
    """At most 2 queries in flight; H0 (asked first) answers after 40 s, past the 20 s reply timeout.

    The window sends H2's and H3's queries as soon as H1 and H2 reply, while H0's is still out: with fixed waves
    they would have waited for H0's timeout. The round goes on with the three replies that came. (The timeout
    leaves room for a fresh simulation worker's first answer, which imports torch and loads the teacher.)
    """
    hospitals = tmp_path / "hospitals"
    base = {"federation.hospitals": 4, "federation.min_replies": 1, "teacher.epochs": 2, "distill.epochs": 1,
            "rounds": 1}
    simulate(tiny_config(**base), out_dir=tmp_path / "warm", hospitals_dir=hospitals)  # trains the teachers
    cfg = tiny_config(**base, **{"federation.max_in_flight": 2, "federation.reply_timeout_s": 20.0,
                                 "federation.faults": {"0": "late"}})
    out = tmp_path / "late"
    start = time.time()
    simulate(cfg, out_dir=out, hospitals_dir=hospitals)
    (r,) = _metrics(out)["rounds"]
    assert r["replies_ok"] == 3 and r["rejected"] == {"H0": "no reply before the round's timeout"}
    sent = {}
    for h in ("H1", "H2", "H3"):
        lines = [json.loads(x) for x in (hospitals / h / "outbound.jsonl").read_text().splitlines()]
        (mine,) = [e for e in lines if e["time"] >= start]  # this run's one reply
        assert mine["status"] == "sent"
        sent[h] = mine["time"]
    assert sent["H1"] <= sent["H2"] <= sent["H3"], sent  # queries go out in name order
    assert sent["H3"] - sent["H1"] < 8.0, sent  # long before H0's query (sent with H1's) timed out
    assert r["query_seconds"] < 20.0 + 8.0  # one timeout, not one per wave


def test_faulty_hospital_is_rejected_and_rounds_go_on(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**{"federation.faults": {"0": "nan"}, "teacher.epochs": 12, "teacher.patience": 5})
    out = tmp_path / "faulty"
    final = simulate(cfg, out_dir=out)
    doc = _metrics(out)
    for r in doc["rounds"]:
        assert r["replies_ok"] == 2 and r["replies_rejected"] == 1
        assert r["rejected"] == {"H0": "outputs: contain NaN"}
    assert final["test_auc"] > 0.55  # the student still learned from the two good hospitals


def test_restarted_server_resumes_after_its_last_round(tiny_config, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    simulate(tiny_config(rounds=1, **{"teacher.epochs": 2}), out_dir=out)
    first = _metrics(out)["rounds"]
    simulate(tiny_config(rounds=2, **{"teacher.epochs": 2}), out_dir=out)
    rounds = _metrics(out)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0] == first[0]  # round 1 was not redone


def test_baselines_share_the_metrics_format(tiny_config, tmp_path: Path) -> None:
    hospitals = tmp_path / "hospitals"
    results = {}
    for method in ("fedavg", "centralized", "local"):
        out = tmp_path / method
        final = simulate(tiny_config(method=method, **{"teacher.epochs": 2}), out_dir=out, hospitals_dir=hospitals)
        doc = _metrics(out)
        assert final["method"] == method and 0.0 <= final["test_auc"] <= 1.0
        assert all(ROUND_FIELDS <= set(r) for r in doc["rounds"])
        results[method] = doc
    assert [r["replies_rejected"] for r in results["fedavg"]["rounds"]] == [0, 0]  # averaged weights fit round 2
    fedavg_up = results["fedavg"]["rounds"][0]["bytes_up"]
    assert set(fedavg_up) == {"H0", "H1", "H2"}
    assert min(fedavg_up.values()) > 400_000  # the whole student (~140k float32 parameters) goes up
    assert len(results["local"]["local"]) == 3


def test_same_seed_same_numbers(tiny_config, tmp_path: Path) -> None:
    """Reproducibility: one seed, two fresh runs (teachers, selectors, student): identical figures and reply sizes."""
    settings = {"aggregator": "density", "selector.kind": "density_ratio", "selector.epochs": 2,
                "selector.abstain_quantile": 0.1,
                "teacher.epochs": 2, "distill.epochs": 2}
    docs = []
    for name in ("first", "second"):
        simulate(tiny_config(**settings), out_dir=tmp_path / name)
        docs.append(_metrics(tmp_path / name))
    first, second = docs
    assert first["final"]["test_auc"] == second["final"]["test_auc"]
    for a, b in zip(first["rounds"], second["rounds"], strict=True):
        assert (a["val_auc"], a["test_auc"], a["distill_loss"]) == (b["val_auc"], b["test_auc"], b["distill_loss"])
        # same outputs, same sizes; reply hashes may differ by design: a reply carries the head of the
        # hospital's signed audit chain, whose records hold the time
        assert a["bytes_up"] == b["bytes_up"]
        assert a["abstentions"] == b["abstentions"] and sum(a["abstentions"].values()) > 0


def test_fedavg_same_seed_same_numbers(tiny_config, tmp_path: Path) -> None:
    """FedAvg averages the replies in hospital-name order, not arrival order, so one seed gives one result."""
    hospitals = tmp_path / "hospitals"
    docs = []
    for name in ("first", "second"):
        simulate(tiny_config(method="fedavg", **{"teacher.epochs": 2}), out_dir=tmp_path / name,
                 hospitals_dir=hospitals)
        docs.append(_metrics(tmp_path / name))
    first, second = docs
    assert [(r["val_auc"], r["test_auc"]) for r in first["rounds"]] == \
        [(r["val_auc"], r["test_auc"]) for r in second["rounds"]]
    assert first["final"]["test_auc"] == second["final"]["test_auc"]


def test_label_counts_leave_only_where_the_policy_allows(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**{"aggregator": "label_aware", "policy.answers.label_counts": True, "teacher.epochs": 2,
                         "distill.epochs": 1, "rounds": 1,
                         "policy_per_hospital": {"2": {"answers": {"label_counts": False}}}})
    out = tmp_path / "label"
    final = simulate(cfg, out_dir=out)
    assert 0.0 <= final["test_auc"] <= 1.0
    assert _metrics(out)["rounds"][0]["replies_ok"] == 3
    for h, released in (("H0", True), ("H1", True), ("H2", False)):
        [entry] = [json.loads(x) for x in (out / "hospitals" / h / "outbound.jsonl").read_text().splitlines()]
        assert entry.get("label_counts_released", False) is released
        assert ("label_counts" in entry["fields"]) is released


def test_sigterm_stops_a_console_simulation_cleanly(medmnist_dir: Path, tmp_path: Path) -> None:
    """`medkd simulate` from the console, SIGTERM after round 1: no process left, checkpoint intact, resume hint."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "sim"
    log = tmp_path / "simulate.out"
    with log.open("wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", "--config",
                                 str(repo / "configs" / "tiny.yaml"), "--set", f"data.data_dir={medmnist_dir}",
                                 "rounds=5", "--out", str(out)], cwd=repo, stdout=handle,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(repo)},
                                start_new_session=True)
    seen: set[int] = set()  # every process of the simulation (Ray's included), seen while it runs
    deadline = time.monotonic() + 900
    while not (out / "checkpoint.pt").exists():
        seen.update(descendants(proc.pid))
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    seen.update(descendants(proc.pid))
    assert len(seen) > 3  # the simulation child and Ray's processes
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 5
    while (left := [p for p in seen if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [describe(p) for p in left]
    text = log.read_text()
    assert "medkd simulate stopped (SIGTERM)" in text and "resume with the same command" in text, text[-2000:]
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)  # intact and readable
    assert saved["state"]["round"] >= 1 and f"after round {saved['state']['round']} is intact" in text
