"""The canary audit: canaries planted in the private set, asked for through the gate, bounded against the ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.audit_log import decode_indices
from client.audit_verify import verify_folder
from client.canary import (CanaryError, CanaryPool, CanaryViolation, audit_policy, canary_candidates, check_bounds,
                           grid_bounds, plant_canaries, run_canary_audit)
from common.policy import build_policy, hospital_experiment, load_policy, write_policy
from common.split import make_split, proxy_manifest_hash


def _policy(folder: Path, medmnist_dir: Path) -> Path:
    policy = build_policy({
        "hospital": "H0", "device": "cpu", "data": {"dataset": "retinamnist", "data_dir": str(medmnist_dir)},
        "share": {"hospitals": 1, "index": 0}, "selector": {"kind": "none"},
        "teacher": {"epochs": 1, "patience": 1, "ensemble": 1}, "limits": {"max_indices_per_query": 16},
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


def test_heldout_canaries_are_appended_to_the_proxy_and_asked_for_there(tiny_config) -> None:
    split = make_split(tiny_config())
    pool = canary_candidates(split, CanaryPool.HELDOUT)
    n_proxy = len(split.proxy)
    assert len(pool) == n_proxy + len(split.data.test) + len(split.data.val)  # train-sourced proxy: all of val
    planted, positions, labels, included = plant_canaries(split, 1, m=300, rng=np.random.default_rng(0),
                                                          pool=CanaryPool.HELDOUT)
    n_extra = int((positions >= n_proxy).sum())
    assert n_extra > 0 and len(planted.proxy) == n_proxy + n_extra
    np.testing.assert_array_equal(planted.proxy.images[:n_proxy], split.proxy.images)  # old positions unchanged
    assert planted.proxy_hash == proxy_manifest_hash(planted.proxy.images) != split.proxy_hash
    assert np.unique(positions).size == 300
    assert (labels != planted.proxy.labels[positions]).all()  # wrong labels, against the true (public) ones
    added = planted.hospital(1)
    np.testing.assert_array_equal(added.images[-int(included.sum()):], planted.proxy.images[positions[included]])
    np.testing.assert_array_equal(added.labels[-int(included.sum()):], labels[included])
    assert len(planted.hospital(0)) == len(split.hospital(0))
    assert not set(planted.hospital_indices[1].tolist()) & set(planted.proxy_indices.tolist())  # never both
    with pytest.raises(CanaryError, match="size of canary pool 'proxy'"):
        plant_canaries(split, 1, m=n_proxy + 1, rng=np.random.default_rng(0))


def test_audit_mode_changes_only_the_training_recipe(medmnist_dir: Path, tmp_path: Path) -> None:
    policy = load_policy(_policy(tmp_path, medmnist_dir))
    assert audit_policy(policy, audit_mode=False, epochs=None) is policy
    audited = audit_policy(policy, audit_mode=True, epochs=7)
    assert (audited.teacher.epochs, audited.teacher.patience, audited.teacher.augment) == (7, 0, False)
    assert audited.teacher.lr == policy.teacher.lr and audited.privacy == policy.privacy
    with pytest.raises(CanaryError, match="audit-mode"):
        audit_policy(policy, audit_mode=False, epochs=7)
    with pytest.raises(CanaryError, match="at most m=10; got 6:6, 11:0"):  # refused before any training
        run_canary_audit(tmp_path / "policy.yaml", m=10, k_plus=6, k_minus=6, work_dir=tmp_path / "c",
                         k_grid=((5, 5), (11, 0)))


def test_grid_bounds_report_every_entry_and_the_bonferroni_level() -> None:
    included = np.arange(100) % 2 == 0
    scores = np.where(included, 1.0, 0.0) + np.linspace(0, 0.5, 100)  # perfectly separated
    rows = grid_bounds([scores], [included], m_total=100, k_grid=((10, 10), (20, 0)), delta=1e-5, alpha=0.05)
    assert [(r["k_plus"], r["k_minus"], r["guesses"], r["correct"]) for r in rows] == [(10, 10, 20, 20), (20, 0, 20, 20)]
    for r in rows:
        assert 0 < r["eps_lower_bound_bonferroni"] < r["eps_lower_bound"]


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


def test_heldout_audit_mode_canaries_go_through_the_gate(medmnist_dir: Path, tmp_path: Path) -> None:
    policy = _policy(tmp_path, medmnist_dir)
    result = run_canary_audit(policy, m=30, k_plus=3, k_minus=3, seed=2, work_dir=tmp_path / "canary",
                              reference=False, pool=CanaryPool.HELDOUT, audit_mode=True, epochs=1,
                              k_grid=((3, 3), (6, 0)))
    assert result["training"].startswith("audit-mode training: 1 epochs, no early stopping")
    assert result["per_run"][0]["teacher"]["epochs_run"] == 1
    assert [(g["k_plus"], g["k_minus"], g["guesses"]) for g in result["k_grid"]] == [(3, 3, 6), (6, 0, 6)]
    assert result["eps_lower_bound_grid_bonferroni"] >= 0
    audit = verify_folder(tmp_path / "canary" / "run-1")
    assert audit.ok, audit.findings
    asked = np.concatenate([decode_indices(r["proxy_indices"]) for r in audit.records if r["event"] == "release"])
    n_proxy = len(make_split(hospital_experiment(load_policy(policy))).proxy)
    assert asked.size == 30 and np.unique(asked).size == 30 and asked.max() >= n_proxy  # appended canaries asked


@pytest.mark.parametrize(("lower", "upper", "fails"), [(2.5, 2.0, True), (1.9, 2.0, False), (5.0, None, False)])
def test_lower_bound_above_the_ledger_fails_loudly(lower: float, upper: float | None, fails: bool) -> None:
    result = {"eps_lower_bound": lower, "eps_upper_bound": upper, "delta": 1e-5}
    if fails:
        with pytest.raises(CanaryViolation, match="exceeds the ledger's ε 2.0000"):
            check_bounds(result)
    else:
        check_bounds(result)


@pytest.mark.slow
def test_non_dp_teacher_in_audit_mode_shows_a_positive_lower_bound(medmnist_dir: Path, tmp_path: Path) -> None:
    """The README's non-DP audit: RetinaMNIST, one hospital, 500 held-out canaries, 80 audit-mode epochs
    (about 4 minutes on one free CPU core; a half share with 200 canaries and 60 epochs gave only 26 of 40)."""
    policy = build_policy({
        "hospital": "H0", "device": "cpu", "threads": 1,
        "data": {"dataset": "retinamnist", "data_dir": str(medmnist_dir)},
        "share": {"hospitals": 1, "index": 0}, "selector": {"kind": "none"},
        "teacher": {"ensemble": 1},  # the README figure is for one network (an ensemble of 5 takes 5x as long)
    }, source="test")
    write_policy(tmp_path / "policy.yaml", policy)
    result = run_canary_audit(tmp_path / "policy.yaml", m=500, k_plus=50, k_minus=50, seed=0,
                              work_dir=tmp_path / "canary", reference=False, pool=CanaryPool.HELDOUT,
                              audit_mode=True, epochs=80)
    assert result["eps_upper_bound"] is None and result["guesses"] == 100
    assert result["eps_lower_bound"] > 0.5, {k: result[k] for k in ("guesses", "correct", "eps_lower_bound")}
