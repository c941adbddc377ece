"""Student training on the soft-labelled proxy bank (Hinton et al. 2015 KD at temperature T)."""

from __future__ import annotations

import torch
from torch import nn

from common.config import DistillConfig
from common.losses import kd_loss
from common.training import run_epoch, to_model_device


def distill_student(*, student: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    target_probs: torch.Tensor, cfg: DistillConfig, gen: torch.Generator,
                    labels: torch.Tensor | None = None, amp: bool = False) -> float:
    """Run ``cfg.epochs`` passes of KD over the bank on the student's device; returns the last epoch's mean loss.

    images: (M, C, *spatial) proxy samples; target_probs: (M, n_classes)
    aggregated teacher probabilities at temperature ``cfg.temperature``;
    labels: (M,) proxy labels, used only when ``cfg.ce_weight > 0``. They
    are copied to the student's device once per call.
    """
    loss = 0.0
    use_labels = labels if cfg.ce_weight > 0 else None
    images, target_probs = to_model_device(student, images, target_probs)
    if use_labels is not None:
        (use_labels,) = to_model_device(student, use_labels)
    for _ in range(cfg.epochs):
        loss = run_epoch(
            model=student, optimizer=optimizer, images=images, batch_size=cfg.batch_size, gen=gen,
            augment=cfg.augment, amp=amp,
            loss_fn=lambda logits, idx: kd_loss(
                logits.float(), target_probs[idx], temperature=cfg.temperature,
                labels=None if use_labels is None else use_labels[idx], ce_weight=cfg.ce_weight,
            ),
        )
    return loss
