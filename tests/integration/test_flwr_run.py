"""Hospital sovereignty under a real `flwr run .` (local SuperLink, simulation runtime, real ClientApps).

The coordinator's run config asks hospitals to switch to FedAvg (so that
weights would leave), to read another data set, to write to another
folder, and raises its query limit to a million. None of it takes effect at
a hospital: each request is refused or ignored with a line in the
hospital's own log, and no weights leave.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from common.processes import processes_mentioning, stop_tree
from simulations.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOCAL_SUPERLINK_PORT = 39091  # where `flwr run` starts its local SuperLink


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def flwr_env(tmp_path: Path):
    """Environment for `flwr run` with its own FLWR_HOME; stops the local SuperLink it starts, by PID."""
    if _port_busy(LOCAL_SUPERLINK_PORT):
        pytest.fail(f"127.0.0.1:{LOCAL_SUPERLINK_PORT} is in use: stop the local SuperLink running there first")
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "MEDKD_HOSPITALS": str(tmp_path / "hospitals")}
    yield env
    for pid in processes_mentioning(str(home)):  # the local SuperLink `flwr run` started, and its children
        stop_tree(pid, whole_tree=True, grace_s=15.0)


def _flwr_run(env: dict[str, str], *, overrides: str, out: Path) -> subprocess.CompletedProcess[str]:
    run_config = f'config="configs/tiny.yaml" set="{overrides}" out="{out}"'
    return subprocess.run(["flwr", "run", str(REPO), "--stream", "--federation-config", "num-supernodes=3",
                           "--run-config", run_config], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=420)


def _log(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "outbound.jsonl").read_text().splitlines()]


def test_coordinator_run_config_cannot_command_a_hospital(flwr_env, medmnist_dir: Path, tmp_path: Path) -> None:
    hospitals = tmp_path / "hospitals"
    assert main(["policies", "--config", str(REPO / "configs" / "tiny.yaml"), "--set",
                 f"data.data_dir={medmnist_dir}", "data.download=false", "teacher.epochs=2",
                 "policy.limits.max_indices_per_query=64", "--hospitals-dir", str(hospitals)]) == 0
    coordinator_data = tmp_path / "coordinator-data"  # a data set path outside the hospitals' data
    coordinator_data.mkdir()
    shutil.copy(medmnist_dir / "retinamnist.npz", coordinator_data / "retinamnist.npz")
    elsewhere = tmp_path / "elsewhere"

    # 1. FedAvg (weights would leave), another data set, another folder, a million indices.
    asks = (f"method=fedavg rounds=1 data.dataset={coordinator_data / 'retinamnist.npz'} "
            f"query.max_indices=1000000 data.download=false")
    done = _flwr_run(flwr_env, overrides=asks, out=elsewhere / "a")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((elsewhere / "a" / "metrics.json").read_text())  # the coordinator's own results
    [round_1] = doc["rounds"]
    assert round_1["replies_ok"] == 0 and sorted(round_1["rejected"]) == ["H0", "H1", "H2"]
    assert all("policy answers.fedavg_weights" in reason for reason in round_1["rejected"].values())
    assert len(round_1["bytes_up"]) == 3 and all(b < 1000 for b in round_1["bytes_up"].values())  # the student alone is ~570 kB: no weights left
    for h in ("H0", "H1", "H2"):
        folder = hospitals / h
        assert [(e["kind"], e["status"]) for e in _log(folder)] == [("train", "error")]
        local = (folder / "hospital.log").read_text()
        assert "refused train (round 1): policy answers.fedavg_weights" in local
        assert f"ignored the coordinator's run_config set='{asks}'" in local
        assert f"ignored the coordinator's run_config out='{elsewhere / 'a'}'" in local
        assert not (folder / "teacher.pt").exists()  # nothing was trained on the coordinator's say-so
    assert not (elsewhere / "a" / "hospitals").exists()  # no hospital wrote into the coordinator's folder

    # 2. A query larger than the hospitals' own limit, with the coordinator's limit raised to a million.
    asks = f"rounds=1 data.data_dir={medmnist_dir} distill.proxy_batch=128 query.max_indices=1000000"
    done = _flwr_run(flwr_env, overrides=asks, out=elsewhere / "b")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [round_1] = json.loads((elsewhere / "b" / "metrics.json").read_text())["rounds"]
    assert round_1["replies_ok"] == 0
    for h in ("H0", "H1", "H2"):
        reason = round_1["rejected"][h]
        assert "policy limits.max_indices_per_query: query asks for 128 samples, more than 64" in reason
        log = _log(hospitals / h)
        assert [(e["kind"], e["status"], e["n_indices"]) for e in log][-1] == ("query.logits", "error", 0)
        assert [e["sha256"] for e in log[-1:]] == round_1["reply_sha256"][h]
