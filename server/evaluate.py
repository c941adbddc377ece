"""Held-out test evaluation of the student and the ``metrics.json`` every method writes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_write_json
from common.config import ExperimentConfig
from common.metrics import EvalResult
from common.split import FederatedSplit, tensors
from common.training import evaluate_model

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
NO_DP_STATEMENT = "no formal DP guarantee: teacher outputs are released without a differential-privacy mechanism"


def test_tensors(cfg: ExperimentConfig, split: FederatedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test split (optionally capped by ``data.max_test_samples``)."""
    return tensors(split.data.test, spatial_dims=split.data.spatial_dims, limit=cfg.data.max_test_samples)


def evaluate_on_test(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], *, amp: bool = False) -> EvalResult:
    """AUC / accuracy / per-class figures of ``model`` on the test split (on the model's device)."""
    return evaluate_model(model, *test, amp=amp)


def write_metrics(out_dir: Path, *, cfg: ExperimentConfig, rounds: list[dict[str, Any]],
                  final: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<out>/metrics.json`` atomically; ``final`` is None while a run is in progress."""
    doc: dict[str, Any] = {
        "method": cfg.method.value, "aggregator": cfg.aggregator.value if cfg.method.value == "fedkd" else None,
        "dataset": cfg.data.dataset, "hospitals": cfg.federation.hospitals, "partition": cfg.federation.partition.value,
        "alpha": cfg.federation.alpha, "seed": cfg.seed, "privacy": NO_DP_STATEMENT,
        "rounds": rounds, "final": final,
    }
    if extra:
        doc.update(extra)
    path = Path(out_dir) / METRICS_FILE
    atomic_write_json(path, doc)
    return path
