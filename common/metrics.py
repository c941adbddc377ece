"""Classification metrics on a held-out split (MONAI's ROC AUC).

AUC follows MedMNIST: the macro average of one-vs-rest AUCs over classes
(for two classes this equals the AUC of the positive-class score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one split."""

    auc: float
    acc: float
    per_class_auc: list[float]
    per_class_acc: list[float]  # recall of each class
    n: int

    def to_dict(self) -> dict[str, object]:
        return {"auc": self.auc, "acc": self.acc, "per_class_auc": self.per_class_auc,
                "per_class_acc": self.per_class_acc, "n": self.n}


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """AUC (macro one-vs-rest, MONAI ``compute_roc_auc``), accuracy and per-class figures.

    Parameters
    ----------
    probs: (N, C) class probabilities.
    labels: (N,) int64 class indices.
    """
    from monai.metrics import compute_roc_auc

    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    n, n_classes = probs.shape
    probs = probs.detach().float().cpu()
    labels = labels.detach().long().cpu()
    onehot = torch.nn.functional.one_hot(labels, n_classes)
    per_class = []
    for c in range(n_classes):
        positives = int(onehot[:, c].sum())
        if positives == 0 or positives == n:
            per_class.append(math.nan)  # undefined for a class absent from (or filling) the split
        else:
            per_class.append(float(compute_roc_auc(probs[:, c], onehot[:, c])))
    defined = [a for a in per_class if not math.isnan(a)]
    auc = float(np.mean(defined)) if defined else math.nan
    pred = probs.argmax(dim=1)
    acc = float((pred == labels).float().mean()) if n else math.nan
    per_class_acc = []
    for c in range(n_classes):
        mask = labels == c
        per_class_acc.append(float((pred[mask] == c).float().mean()) if mask.any() else math.nan)
    return EvalResult(auc=auc, acc=acc, per_class_auc=per_class, per_class_acc=per_class_acc, n=n)
