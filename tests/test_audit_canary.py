"""The canary audit: canaries planted in the private set, asked for through the gate, bounded against the ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.audit_log import decode_indices
from client.audit_verify import verify_folder
from client.canary import CanaryViolation, check_bounds, plant_canaries, run_canary_audit
from common.policy import build_policy, write_policy
from common.split import make_split


def _policy(folder: Path, medmnist_dir: Path) -> Path:
    policy = build_policy({
        "hospital": "H0", "device": "cpu", "data": {"dataset": "retinamnist", "data_dir": str(medmnist_dir)},
        "share": {"hospitals": 1, "index": 0}, "selector": {"kind": "none"},
        "teacher": {"epochs": 1, "patience": 1}, "limits": {"max_indices_per_query": 16},
    }, source="test")
    write_policy(folder / "policy.yaml", policy)
    return folder / "policy.yaml"


def test_plant_canaries_keeps_the_proxy_and_adds_only_included_canaries(tiny_config) -> None:
    split = make_split(tiny_config())
    planted, positions, labels, included = plant_canaries(split, 1, m=30, rng=np.random.default_rng(0))
    assert planted.proxy_hash == split.proxy_hash
    np.testing.assert_array_equal(planted.proxy.images, split.proxy.images)
    assert (labels != split.proxy.labels[positions]).all()  # every canary label is wrong
    added = planted.hospital(1)
    assert len(added) == len(split.hospital(1)) + int(included.sum())
    np.testing.assert_array_equal(added.images[-int(included.sum()):], split.proxy.images[positions[included]])
    np.testing.assert_array_equal(added.labels[-int(included.sum()):], labels[included])
    assert len(planted.hospital(0)) == len(split.hospital(0))  # other hospitals untouched


def test_canary_audit_runs_through_the_gate(medmnist_dir: Path, tmp_path: Path) -> None:
    policy = _policy(tmp_path, medmnist_dir)
    result = run_canary_audit(policy, m=40, k_plus=5, k_minus=5, seed=1, work_dir=tmp_path / "canary")
    assert result["guesses"] == 10 and 0 <= result["correct"] <= 10
    assert result["eps_upper_bound"] is None and result["guarantee"] == "no formal DP guarantee"
    assert result["mechanism"] == "none" and result["delta"] == 1e-5 and result["alpha"] == 0.05
    assert result["eps_lower_bound"] >= 0
    scratch = tmp_path / "canary" / "run-1"
    audit = verify_folder(scratch)
    assert audit.ok, audit.findings
    releases = [r for r in audit.records if r["event"] == "release"]
    assert [r["release"]["n_indices"] for r in releases] == [16, 16, 8]  # the policy's 16 per query
    asked = np.concatenate([decode_indices(r["proxy_indices"]) for r in releases])
    assert asked.size == 40 and np.unique(asked).size == 40


@pytest.mark.parametrize(("lower", "upper", "fails"), [(2.5, 2.0, True), (1.9, 2.0, False), (5.0, None, False)])
def test_lower_bound_above_the_ledger_fails_loudly(lower: float, upper: float | None, fails: bool) -> None:
    result = {"eps_lower_bound": lower, "eps_upper_bound": upper, "delta": 1e-5}
    if fails:
        with pytest.raises(CanaryViolation, match="exceeds the ledger's ε 2.0000"):
            check_bounds(result)
    else:
        check_bounds(result)
