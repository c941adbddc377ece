"""Student training on the soft-labelled proxy bank (Hinton et al. 2015 KD at temperature T).

Options (all off by default): mixup on proxy samples (``distill.mixup_alpha``), a cosine
learning-rate schedule over the run's distillation epochs (``distill.lr_schedule``), and an
exponential moving average of the student's weights (``distill.ema_decay``, built with
:func:`make_weight_average`), which is what gets validated and snapshotted when on.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from common.config import DistillConfig
from common.losses import kd_loss
from common.names import LrSchedule
from common.training import run_epoch, to_model_device, weight_average


def make_weight_average(student: nn.Module, cfg: DistillConfig) -> AveragedModel | None:
    """The EMA of ``student``'s weights that ``distill.ema_decay`` asks for (:func:`common.training.weight_average`),
    or None when off (Polyak and Juditsky 1992; as in Tarvainen and Valpola 2017's mean teacher)."""
    return weight_average(student, cfg.ema_decay) if cfg.ema_decay > 0 else None


def scheduled_lr(cfg: DistillConfig, *, epoch: int, total_epochs: int) -> float:
    """Learning rate of 0-based distillation epoch ``epoch`` of ``total_epochs`` in the whole run."""
    if cfg.lr_schedule == LrSchedule.COSINE and total_epochs > 0:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, total_epochs) / total_epochs))
    return cfg.lr


def distill_student(*, student: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    target_probs: torch.Tensor, cfg: DistillConfig, gen: torch.Generator,
                    labels: torch.Tensor | None = None, amp: bool = False, average: AveragedModel | None = None,
                    rnd: int = 1, rounds: int = 1) -> float:
    """Run ``cfg.epochs`` passes of KD over the bank on the student's device; returns the last epoch's mean loss.

    images: (M, C, *spatial) proxy samples; target_probs: (M, n_classes)
    aggregated teacher probabilities at temperature ``cfg.temperature``;
    labels: (M,) proxy labels, used only when ``cfg.ce_weight > 0``. They
    are copied to the student's device once per call. ``average`` (from
    :func:`make_weight_average`) is updated after every step; ``rnd`` of
    ``rounds`` (1-based) places this call's epochs in the learning-rate schedule.
    """
    loss = 0.0
    use_labels = labels if cfg.ce_weight > 0 else None
    images, target_probs = to_model_device(student, images, target_probs)
    if use_labels is not None:
        (use_labels,) = to_model_device(student, use_labels)
    after_step = None if average is None else (lambda: average.update_parameters(student))
    for epoch in range(cfg.epochs):
        if cfg.lr_schedule != LrSchedule.CONSTANT:
            lr = scheduled_lr(cfg, epoch=(rnd - 1) * cfg.epochs + epoch, total_epochs=rounds * cfg.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = run_epoch(
            model=student, optimizer=optimizer, images=images, batch_size=cfg.batch_size, gen=gen,
            augment=cfg.augment, amp=amp, mixup_alpha=cfg.mixup_alpha, after_step=after_step,
            loss_fn=lambda logits, idx: kd_loss(
                logits.float(), target_probs[idx], temperature=cfg.temperature,
                labels=None if use_labels is None else use_labels[idx], ce_weight=cfg.ce_weight,
            ),
        )
    return loss
