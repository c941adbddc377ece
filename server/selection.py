"""Honest model selection: every choice on validation data, the test split read once at the end.

The coordinator holds a small labelled validation set: the official ``val``
split (less any proxy samples carved from it), never ``test``. After each
round :class:`RoundSelection` evaluates the student on it and keeps a
snapshot of the student's weights in ``<out>/rounds/``. The student that
is reported and saved is the one of the round with the best validation AUC
(the earliest on ties); ``early_stop_rounds`` stops a run whose validation
AUC has not improved for that many rounds.

Only :meth:`RoundSelection.finish` opens the test split, once, after every
choice has been made: it evaluates the selected student for the final
figures and each round's snapshot for the test-AUC-per-round curve, which
is a report, never an input to a choice.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from common.atomic import atomic_torch_save
from common.config import ExperimentConfig, ProxySource
from common.data import ImageSplit
from common.device import state_dict_on_cpu
from common.metrics import EvalResult
from common.split import FederatedSplit, tensors
from common.training import evaluate_model
from server.checkpoint import STUDENT_FILE
from server.evaluate import test_tensors

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = "rounds"


def validation_split(cfg: ExperimentConfig, split: FederatedSplit) -> ImageSplit:
    """The coordinator's validation set: the official val split, less the proxy samples drawn from it."""
    val = split.data.val
    keep = np.arange(val.labels.shape[0])
    if split.proxy_source == ProxySource.VAL:
        keep = np.setdiff1d(keep, split.proxy_indices)
    if cfg.data.max_val_samples:
        keep = keep[:cfg.data.max_val_samples]
    return ImageSplit(images=val.images[keep], labels=val.labels[keep])


def validation_tensors(cfg: ExperimentConfig, split: FederatedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of :func:`validation_split`."""
    return tensors(validation_split(cfg, split), spatial_dims=split.data.spatial_dims)


def score(result: EvalResult) -> float:
    """What selection maximises: AUC, or accuracy where AUC is undefined."""
    return result.auc if not math.isnan(result.auc) else result.acc


class RoundSelection:
    """Per-round validation, snapshots, best-round choice, and the single test evaluation at the end."""

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, split: FederatedSplit) -> None:
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.split = split
        self.val = validation_tensors(cfg, split)
        if self.val[1].numel() == 0:
            logger.warning("the validation split is empty: every round counts as best, the last one is kept")

    def snapshot(self, rnd: int) -> Path:
        return self.out_dir / SNAPSHOT_DIR / f"student-r{rnd:04d}.pt"

    def record(self, rnd: int, model: nn.Module) -> EvalResult:
        """Evaluate ``model`` on validation data and keep its weights as round ``rnd``'s snapshot."""
        result = evaluate_model(model, *self.val, amp=self.cfg.amp, tta=self.cfg.tta)
        atomic_torch_save(self.snapshot(rnd), state_dict_on_cpu(model))
        return result

    def restore(self, rnd: int, average: AveragedModel) -> None:
        """Resume a weight average from round ``rnd``'s snapshot (what :meth:`record` saved of it)."""
        average.module.load_state_dict(torch.load(self.snapshot(rnd), map_location="cpu", weights_only=True))
        average.n_averaged.fill_(1)

    @staticmethod
    def best_round(history: list[dict[str, Any]]) -> int:
        """Round with the best validation score (earliest on ties); the last round if none has one."""
        best, best_score = history[-1]["round"], -math.inf
        for row in history:
            value = row.get("val_score")
            if value is not None and not math.isnan(value) and value > best_score:
                best, best_score = row["round"], value
        return int(best)

    def should_stop(self, history: list[dict[str, Any]]) -> bool:
        """True when ``early_stop_rounds`` rounds have passed since the best one."""
        patience = self.cfg.early_stop_rounds
        return patience > 0 and history[-1]["round"] - self.best_round(history) >= patience

    def finish(self, model: nn.Module, history: list[dict[str, Any]], *, method: str,
               seconds: float) -> dict[str, Any]:
        """Load the best round's weights into ``model``, read the test split once, and return the final block.

        Fills ``test_auc``/``test_acc`` of every round that has a snapshot
        (the reported curve) and writes the selected student to ``student.pt``.
        """
        test = test_tensors(self.cfg, self.split)
        best = self.best_round(history)
        for row in history:
            path = self.snapshot(row["round"])
            if path.exists():
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                result = evaluate_model(model, *test, amp=self.cfg.amp, tta=self.cfg.tta)
                row["test_auc"], row["test_acc"] = result.auc, result.acc
        model.load_state_dict(torch.load(self.snapshot(best), map_location="cpu", weights_only=True))
        final_test = evaluate_model(model, *test, amp=self.cfg.amp, tta=self.cfg.tta)
        selected = next(row for row in history if row["round"] == best)
        atomic_torch_save(self.out_dir / STUDENT_FILE, {"model": self.cfg.student.model,
                                                        "state_dict": state_dict_on_cpu(model), "round": best})
        logger.info("selected round %d by validation AUC %.4f; its test AUC %.4f (the test split was read once, "
                    "now)", best, selected.get("val_auc", math.nan), final_test.auc)
        return {"test_auc": final_test.auc, "test_acc": final_test.acc, "val_auc": selected.get("val_auc"),
                "selected_round": best, "rounds_run": len(history), "method": method, "seconds": seconds,
                "per_class_auc": final_test.per_class_auc, "per_class_acc": final_test.per_class_acc,
                "selection": "best validation AUC over rounds (official val split); test read once at the end"}
