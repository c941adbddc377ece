"""Fault tolerance of a deployed study: real daemons on 127.0.0.1, each fault made by signalling a process by PID.

- a hospital SIGKILLed mid-round: the round completes with the quorum; restarted, the hospital rejoins;
- the coordinator SIGKILLed mid-round and restarted: the study resumes from the last checkpoint (same student,
  same server state), and no hospital releases twice for the same round;
- a straggler (its ClientApp frozen with SIGSTOP past the round timeout, its daemon online) is left out of that round only;
- a hospital replying garbage (its teacher's weights corrupted to NaN) is rejected, by name, every round.

Teachers are trained once per module (``medkd client train-teacher``) and copied into each test's hospitals.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.processes import alive, crash, describe, descendants, processes_in_folder
from simulations.loopback import Deployment, clientapp_pids, outbound

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory, medmnist_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    dep = Deployment(root=root, data_dir=medmnist_dir)
    dep.make_certs()
    paths = {}
    for i in range(3):
        folder = dep.init_hospital(i)
        done = dep.medkd("client", "train-teacher", str(folder))
        assert done.returncode == 0, done.stderr
        paths[f"H{i}"] = folder / "teacher.pt"
    return paths


@pytest.fixture
def deployment(tmp_path: Path, medmnist_dir: Path):
    dep = Deployment(root=tmp_path, data_dir=medmnist_dir)
    yield dep
    dep.close()


def _sent_rounds(folder: Path) -> list[str]:
    return [e["round"] for e in outbound(folder) if e["status"] == "sent" and e["kind"] == "query.logits"]


def test_hospital_killed_mid_round_then_rejoins(deployment: Deployment, teachers: dict[str, Path],
                                                tmp_path: Path) -> None:
    dep = deployment
    dep.federation(teachers=teachers)
    out = tmp_path / "study"
    # enough rounds for the restart: the SuperLink lets the new H2 in only once the crashed node's heartbeats
    # expired, which takes about a minute, and an idle machine runs a round in ~15 s
    study = dep.spawn_study(out, "rounds=10", "federation.reply_timeout_s=45")
    dep.wait_for("study", "round 2/10: querying")
    clientapp_pids(dep.processes["H2"].pid)  # H2 has taken round 2's query and is answering it
    crash(dep.processes["H2"].pid)  # SIGKILL the daemon, its SuperNode and its ClientApp at once, mid-round
    dep.start_hospital("H2")  # restarted at once, same folder and key (it retries until the coordinator lets it in)
    assert study.wait(timeout=1800) == 0, dep.output("study")[-4000:]
    rounds = dep.metrics(out)["rounds"]
    assert rounds[0]["replies_ok"] == 3
    assert rounds[1]["replies_ok"] == 2 and set(rounds[1]["rejected"]) == {"H2"}  # the quorum of 2 was met
    assert rounds[1]["distill_loss"] is not None  # and the round updated the student
    back = next((r["round"] for r in rounds[2:] if r["replies_ok"] == 3), None)  # H2 rejoined in a later round
    assert back is not None, [(r["round"], r["replies_ok"], r["rejected"]) for r in rounds]
    assert all(r["replies_ok"] == 3 and not r["rejected"] for r in rounds[back - 1:])  # and stayed
    assert all(r["replies_ok"] == 2 for r in rounds[1:back - 1])  # the others went on without it meanwhile
    sent = _sent_rounds(tmp_path / "H2")
    assert sent[0] == "1" and "2" not in sent and sent[-1] == "10" and str(back) in sent


def test_coordinator_killed_and_restarted_resumes(deployment: Deployment, teachers: dict[str, Path],
                                                  tmp_path: Path) -> None:
    dep = deployment
    dep.federation(teachers=teachers)
    out = tmp_path / "study"
    dep.spawn_study(out, "rounds=3", "federation.reply_timeout_s=60")
    dep.wait_for("study", "round 2/3: querying")
    time.sleep(2)  # the queries are out; the hospitals are answering
    before = (out / "checkpoint.pt").read_bytes()
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    round_1 = dep.metrics(out)["rounds"][0]
    crash(dep.processes["study"].pid)
    crash(dep.processes["coordinator"].pid)  # the supervisor, the SuperLink and the ServerApp, at once
    assert (out / "checkpoint.pt").read_bytes() == before  # the last checkpoint is intact

    dep.start_server()  # same folder: same database, same registered hospitals
    done = dep.run_study(out, "rounds=3", "federation.reply_timeout_s=60")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "resuming from" in done.stdout and "after round 1" in done.stdout
    assert "round 2 was interrupted by a coordinator stop" in done.stdout
    doc = dep.metrics(out)
    assert [r["round"] for r in doc["rounds"]] == [1, 3]
    same = {k: v for k, v in round_1.items() if k not in ("test_auc", "test_acc")}  # filled in at the end
    assert {k: doc["rounds"][0][k] for k in same} == same  # the server state from before the kill
    assert doc["rounds"][1]["replies_ok"] == 3 and doc["final"]["test_auc"] is not None
    resumed = saved["state"]
    assert resumed["round"] == 1 and resumed["history"][0] == round_1
    for i in range(3):  # nobody answered any round twice
        counts = Counter(_sent_rounds(tmp_path / f"H{i}"))
        assert counts["1"] == 1 and counts["3"] == 1 and all(n == 1 for n in counts.values()), counts


def test_straggler_left_out_of_that_round_only(deployment: Deployment, teachers: dict[str, Path],
                                               tmp_path: Path) -> None:
    dep = deployment
    dep.federation(teachers=teachers)
    out = tmp_path / "study"
    study = dep.spawn_study(out, "rounds=3", "federation.reply_timeout_s=30")
    dep.wait_for("study", "round 1/3: querying")
    slow = clientapp_pids(dep.processes["H2"].pid)
    for pid in slow:  # H2's computation stalls; its daemon stays online
        os.kill(pid, signal.SIGSTOP)
    dep.wait_for("study", "round 1/3: val AUC")
    for pid in slow:
        os.kill(pid, signal.SIGCONT)
    assert study.wait(timeout=600) == 0, dep.output("study")[-4000:]
    rounds = dep.metrics(out)["rounds"]
    assert rounds[0]["replies_ok"] == 2
    assert rounds[0]["rejected"] == {"H2": "no reply before the round's timeout"}
    assert [r["replies_ok"] for r in rounds[1:]] == [3, 3]


def test_garbage_reply_rejected_and_named(deployment: Deployment, teachers: dict[str, Path],
                                          tmp_path: Path) -> None:
    broken = tmp_path / "broken-teacher.pt"
    saved = torch.load(teachers["H2"], map_location="cpu", weights_only=True)
    saved["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in saved["state_dict"].items()}
    torch.save(saved, broken)  # same fingerprint, so the hospital uses it: it answers NaN
    dep = deployment
    dep.federation(teachers={**teachers, "H2": broken})
    out = tmp_path / "study"
    done = dep.run_study(out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for r in dep.metrics(out)["rounds"]:
        assert r["replies_ok"] == 2 and list(r["rejected"]) == ["H2"]
        assert "NaN" in r["rejected"]["H2"]
    assert "hospital H2 reply rejected: outputs" in done.stdout


def _stop_cleanly(dep: Deployment, name: str, folder: Path, *, exclude: set[int]) -> None:
    """SIGTERM daemon ``name``: it exits 0, and within 5 s nothing it started (or that runs in ``folder``) is left."""
    proc = dep.processes[name]
    tree = {proc.pid, *descendants(proc.pid)}
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, dep.output(name)[-3000:]
    deadline = time.monotonic() + 5
    while (left := {p for p in tree if alive(p)} | set(processes_in_folder(folder)) - exclude) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [describe(p) for p in left]
    assert "nothing of it is left running" in dep.output(name), dep.output(name)[-2000:]


def test_sigterm_stops_each_daemon_and_everything_it_started(deployment: Deployment, teachers: dict[str, Path],
                                                             tmp_path: Path) -> None:
    dep = deployment
    dep.federation(teachers=teachers)
    out = tmp_path / "study"
    study = dep.spawn_study(out, "rounds=4", "federation.reply_timeout_s=60")
    dep.wait_for("study", "round 2/4: querying")
    clientapp_pids(dep.processes["H0"].pid)  # H0 is answering round 2: a ClientApp runs under its SuperNode
    _stop_cleanly(dep, "H0", tmp_path / "H0", exclude=set())
    study_tree = {study.pid, *descendants(study.pid)}  # `server run` runs in the coordinator's folder too
    _stop_cleanly(dep, "coordinator", tmp_path / "coordinator", exclude=study_tree)  # its ServerApp mid-round
    for name in ("H1", "H2"):
        _stop_cleanly(dep, name, tmp_path / name, exclude=set())
    assert study.wait(timeout=60) != 0  # the study did not finish; the command says how to resume
    assert "run the same command to resume" in dep.output("study"), dep.output("study")[-2000:]
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)  # intact and readable
    assert saved["state"]["round"] == dep.metrics(out)["rounds"][-1]["round"] >= 1
