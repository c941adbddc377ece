"""A real study over TLS with node authentication: `medkd server start/run` and 3 `medkd client start` daemons.

Each side runs as separate processes on 127.0.0.1 (free ports), started through the CLI as the deployment
guide says. A fourth hospital whose key was never registered is refused, and the refusal shows in the
coordinator's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.loopback import REPO, Deployment, outbound

pytestmark = pytest.mark.slow


@pytest.fixture
def deployment(tmp_path: Path, medmnist_dir: Path):
    dep = Deployment(root=tmp_path, data_dir=medmnist_dir)
    yield dep
    dep.close()


def test_study_over_tls_with_node_authentication(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    dep.make_certs()
    dep.start_server()
    for i in range(3):
        dep.init_hospital(i)
        dep.register(f"H{i}")
        approved = dep.medkd("client", "approve", str(tmp_path / f"H{i}"), "--app", str(REPO))  # reviewed release
        assert approved.returncode == 0, approved.stderr
    check = dep.medkd("client", "check", str(tmp_path / "H0"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "TLSv1.3, certificate of localhost verified" in check.stdout
    assert check.stdout.strip().splitlines()[-1].startswith("READY")

    rogue = dep.init_hospital(0, name="Rogue")  # same data share, key never registered
    refused = dep.start_hospital("Rogue")
    for i in range(3):
        dep.start_hospital(f"H{i}")
    assert refused.wait(timeout=300) == 3  # refused for good after retrying for rejoin_wait_s
    assert "Failed to activate SuperNode" in dep.output("Rogue")
    assert "the coordinator refused this hospital's key" in dep.output("Rogue")
    log = (dep.coordinator / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in log

    out = tmp_path / "study"
    done = dep.run_study(out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "round 2/2: val AUC" in done.stdout
    doc = dep.metrics(out)
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["replies_ok"] == 3 and sorted(r["bytes_up"]) == ["H0", "H1", "H2"] for r in rounds)  # by name
    assert rounds[-1]["val_auc"] > rounds[0]["val_auc"]  # the student improves
    assert doc["final"]["val_auc"] > 0.6 and doc["final"]["test_auc"] > 0.6
    assert (out / "checkpoint.pt").exists() and (out / "student.pt").exists()
    for i in range(3):  # each hospital released exactly one reply per round, logged with its hash
        sent = [e for e in outbound(tmp_path / f"H{i}") if e["status"] == "sent"]
        assert len(sent) == 2
        assert [e["sha256"] for e in sent] == [r["reply_sha256"][f"H{i}"][0] for r in rounds]
    assert outbound(rogue) == []


def test_an_unapproved_app_never_runs_at_a_hospital(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    dep.make_certs()
    dep.start_server()
    for i in range(3):
        dep.init_hospital(i)
        dep.register(f"H{i}")
    for i in (0, 1):
        assert dep.medkd("client", "approve", str(tmp_path / f"H{i}"), "--app", str(REPO)).returncode == 0
    (tmp_path / "H2" / "approved-apps.txt").write_text("0" * 64 + "  # another release\n")  # H2 approved another
    for i in range(3):
        dep.start_hospital(f"H{i}")
    out = tmp_path / "study"
    done = dep.run_study(out, "rounds=1")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [round_1] = dep.metrics(out)["rounds"]
    assert round_1["replies_ok"] == 2 and list(round_1["rejected"]) == ["H2"]
    assert "is not approved by this hospital" in round_1["rejected"]["H2"]
    assert "refused app bundle" in (tmp_path / "H2" / "hospital.log").read_text()
    assert outbound(tmp_path / "H2") == []  # nothing of the bundle ran, so nothing was released
    assert not list((tmp_path / "H2" / "flwr-home").glob("apps/*"))  # and it was never installed
