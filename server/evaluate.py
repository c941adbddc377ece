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
NO_DP_LABEL = "none: no formal DP guarantee"  # what a hospital without a mechanism writes in its replies


def privacy_line(hospitals: dict[str, dict[str, Any]]) -> str:
    """One round's privacy, for the console: ε per hospital under DP, or "no formal DP guarantee"."""
    if not hospitals:
        return "privacy: no replies this round"
    parts = []
    for name, p in sorted(hospitals.items()):
        if p.get("epsilon") is None:
            parts.append(f"{name} no formal DP guarantee")
        else:
            parts.append(f"{name} ε={p['epsilon']:.3f} (δ={p['delta']:g}, {str(p['mechanism']).split(':')[0]})")
    return "privacy: " + ", ".join(parts)


def privacy_summary(rounds: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(the run's privacy statement, per-hospital summary: mechanism, latest ε and δ, ε per round).

    ε figures are each hospital's own, from its ledger (dp-accounting PLD).
    They depend on its private data only through its size where DP-SGD's
    sampling rate does; the size is treated as public by the hospital.
    """
    hospitals: dict[str, dict[str, Any]] = {}
    for r in rounds:
        for name, p in (r.get("privacy") or {}).items():
            entry = hospitals.setdefault(name, {"mechanism": p.get("mechanism"), "epsilon_per_round": {}})
            entry["mechanism"] = p.get("mechanism")
            if p.get("epsilon") is not None:
                entry["epsilon"], entry["delta"] = p["epsilon"], p["delta"]
                entry["epsilon_per_round"][str(r["round"])] = p["epsilon"]
    dp = sorted(n for n, e in hospitals.items() if "epsilon" in e)
    if not dp:
        return NO_DP_STATEMENT, hospitals
    none = sorted(set(hospitals) - set(dp))
    worst = max(hospitals[n]["epsilon"] for n in dp)
    text = (f"differential privacy at {len(dp)} hospital(s), each under its own policy; largest ε spent "
            f"{worst:.4f} (each at its own δ, dp-accounting PLD; see privacy_summary)")
    if none:
        text += f"; no formal DP guarantee for {', '.join(none)}"
    return text, hospitals


def test_tensors(cfg: ExperimentConfig, split: FederatedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test split (optionally capped by ``data.max_test_samples``)."""
    return tensors(split.data.test, spatial_dims=split.data.spatial_dims, limit=cfg.data.max_test_samples)


def evaluate_on_test(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], *, amp: bool = False,
                     tta: bool = False) -> EvalResult:
    """AUC / accuracy / per-class figures of ``model`` on the test split (on the model's device).

    With ``tta``, the mean softmax over every flip of the spatial axes.
    """
    return evaluate_model(model, *test, amp=amp, tta=tta)


def write_metrics(out_dir: Path, *, cfg: ExperimentConfig, rounds: list[dict[str, Any]],
                  final: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<out>/metrics.json`` atomically; ``final`` is None while a run is in progress."""
    doc: dict[str, Any] = {
        "method": cfg.method.value, "aggregator": cfg.aggregator.value if cfg.method.value == "fedkd" else None,
        "dataset": cfg.data.dataset, "hospitals": cfg.federation.hospitals, "partition": cfg.federation.partition.value,
        "alpha": cfg.federation.alpha, "seed": cfg.seed, "privacy": NO_DP_STATEMENT,
        "rounds": rounds, "final": final,
    }
    statement, summary = privacy_summary(rounds)
    doc["privacy"] = statement
    if summary:
        doc["privacy_summary"] = summary
    if extra:
        doc.update(extra)
    path = Path(out_dir) / METRICS_FILE
    atomic_write_json(path, doc)
    return path
