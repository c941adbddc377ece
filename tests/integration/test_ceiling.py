"""The teachers' aggregate evaluated directly (simulations/ceiling.py) is what the coordinator distils."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client.teacher import load_or_train_teacher
from common.config import AggregatorName
from common.split import hospital_name, make_split, tensors
from server.app import aggregate_replies
from simulations.ceiling import hospital_replies, no_aggregate_reason
from simulations.run import simulate

pytestmark = pytest.mark.slow

DENSITY = {"aggregator": "density", "selector.kind": "density_ratio", "selector.epochs": 2, "teacher.epochs": 2,
           "distill.epochs": 1, "rounds": 1}


def test_aggregate_equals_the_soft_labels_the_coordinator_banked(tiny_config, tmp_path: Path) -> None:
    """Hospitals' answers recomputed on the banked proxy samples and fused: the run's soft labels, to float32.

    The default wire dtype (float16) rounds both alike, since the recomputed answers cross the same wire format.
    """
    cfg = tiny_config(**DENSITY)
    hospitals = tmp_path / "hospitals"
    simulate(cfg, out_dir=tmp_path / "fedkd", hospitals_dir=hospitals)
    state = torch.load(tmp_path / "fedkd" / "checkpoint.pt", weights_only=False)["state"]
    indices, banked = state["bank_indices"], state["bank_probs"]
    assert indices.numel() == cfg.distill.proxy_batch

    split = make_split(cfg)
    loaded = [load_or_train_teacher(cfg=cfg, split=split, hospital=h, hospital_dir=hospitals / hospital_name(h))
              for h in range(cfg.federation.hospitals)]
    images, _ = tensors(split.proxy, spatial_dims=split.data.spatial_dims)
    replies = hospital_replies(cfg=cfg, split=split, hospitals_dir=hospitals, teachers=[t for t, _ in loaded],
                               infos=[i for _, i in loaded], images=images[indices])
    assert all(r.density is not None and r.mask is not None for r in replies)
    fused, _ = aggregate_replies(replies, cfg, split.data.n_classes)
    assert torch.allclose(fused, banked, atol=1e-5)
    # the density weighting matters here: the plain size-weighted mean is a different target
    plain, _ = aggregate_replies(replies, replace(cfg, aggregator=AggregatorName.WEIGHTED), split.data.n_classes)
    assert (plain - banked).abs().max() > 1e-3

    # the local baseline on the same teachers reports the aggregate on validation and test
    final = simulate(tiny_config(method="local", **DENSITY), out_dir=tmp_path / "local", hospitals_dir=hospitals)
    doc = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert doc["final"]["aggregate_test_auc"] == final["aggregate_test_auc"]
    assert 0.55 < final["aggregate_val_auc"] <= 1.0 and 0.55 < final["aggregate_test_auc"] <= 1.0
    assert final["aggregate"].startswith("density aggregate of the teachers' answers (selector density_ratio")


def test_no_aggregate_under_a_dp_mechanism(tiny_config) -> None:
    assert no_aggregate_reason(tiny_config()) is None
    cfg = tiny_config(**{"policy.privacy.mechanism": "dp_sgd_teacher"})
    reason = no_aggregate_reason(cfg)
    assert reason is not None and "dp_sgd_teacher" in reason

