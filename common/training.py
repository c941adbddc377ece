"""Plain-torch training loops shared by teachers, the student and the baselines.

No Flower here: these functions take tensors and a model and can be tested
without a federation.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.device import autocast, place_batch
from common.metrics import EvalResult, classification_metrics

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG and return a dedicated generator for sampling."""
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips along each spatial axis, independently per sample.

    x: (N, C, *spatial) on any device; the draws come from the CPU generator
    ``gen``, so a run's augmentation is the same on every device.
    Returns a new tensor of the same shape.
    """
    out = x
    for axis in range(2, x.dim()):
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
        if flip.any():
            out = out.clone() if out is x else out
            out[flip] = out[flip].flip(axis)
    return out


def mixup_pairs(n: int, alpha: float, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    """Mixup's draws for a batch of ``n``: (lam ~ Beta(alpha, alpha), a permutation (n,) of the batch), from ``gen``."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam, torch.randperm(n, generator=gen)


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and batch-norm statistics (torch's AveragedModel).

    The first update copies the model; later ones move the average ``1 - decay`` of the way towards it.
    """
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def model_device(model: nn.Module) -> torch.device:
    """The device ``model``'s parameters live on (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def predict_logits(model: nn.Module, images: torch.Tensor, *, amp: bool = False,
                   batch_size: int | None = None) -> torch.Tensor:
    """Logits of ``model`` in eval mode, on the model's device. images: (N, C, *spatial) -> (N, n_classes) float32 CPU.

    Batches of 256 on the CPU (as always), 4096 on a GPU; bf16 autocast on CUDA when ``amp``.
    """
    device = model_device(model)
    batch_size = batch_size or (4096 if device.type == "cuda" else 256)
    model.eval()
    chunks = []
    with torch.inference_mode(), autocast(device, amp=amp):
        for i in range(0, images.shape[0], batch_size):
            chunks.append(model(place_batch(images[i:i + batch_size], device)).float())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks).cpu()


def flip_views(images: torch.Tensor) -> list[torch.Tensor]:
    """Every flip of the spatial axes of ``images`` (N, C, *spatial): 2**d views, the identity first."""
    axes = list(range(2, images.dim()))
    views = []
    for mask in range(2 ** len(axes)):
        flipped = [axis for bit, axis in enumerate(axes) if mask >> bit & 1]
        views.append(images.flip(flipped) if flipped else images)
    return views


def predict_probs(model: nn.Module, images: torch.Tensor, *, amp: bool = False, tta: bool = False) -> torch.Tensor:
    """Softmax of ``model`` on images (N, C, *spatial) -> (N, n_classes) float32 CPU.

    With ``tta``, the mean softmax over every flip of the spatial axes (:func:`flip_views`), the
    flips that training augmentation draws from.
    """
    views = flip_views(images) if tta else [images]
    return torch.stack([torch.softmax(predict_logits(model, v, amp=amp), dim=1) for v in views]).mean(dim=0)


def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, amp: bool = False,
                   tta: bool = False) -> EvalResult:
    """AUC / accuracy of ``model`` on (images (N, C, *spatial), labels (N,)); flip TTA with ``tta``."""
    return classification_metrics(predict_probs(model, images, amp=amp, tta=tta), labels.cpu())


def run_epoch(*, model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int,
              gen: torch.Generator, augment: bool, amp: bool = False, mixup_alpha: float = 0.0,
              after_step: Callable[[], None] | None = None) -> float:
    """One shuffled pass over ``images``; ``loss_fn(logits, batch_index)`` gives the loss.

    ``images`` should already be on the model's device (see :func:`to_model_device`);
    ``batch_index`` is on that device too. The shuffling, augmentation and mixup draws come
    from the CPU generator ``gen``. With ``mixup_alpha`` > 0 each batch is mixed with a
    shuffled copy of itself, weight ``lam ~ Beta(alpha, alpha)``, and the loss is
    ``lam * loss_fn(logits, idx) + (1 - lam) * loss_fn(logits, idx[perm])`` (mixup, Zhang et
    al., ICLR 2018; for soft-label KD this equals the loss on mixed targets up to a constant).
    ``after_step`` runs after every optimizer step (e.g. a weight average's update).
    Returns the mean training loss.
    """
    model.train()
    device = model_device(model)
    n = images.shape[0]
    order = torch.randperm(n, generator=gen)
    total = torch.zeros((), device=device)
    count = 0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if idx.numel() < 2 and n >= 2:
            continue  # batch norm needs two samples; the sample recurs in another epoch
        idx = idx.to(images.device)
        x = place_batch(images[idx], device)
        if augment:
            x = augment_batch(x, gen)
        mix = mixup_pairs(idx.numel(), mixup_alpha, gen) if mixup_alpha > 0 else None
        if mix is not None:
            lam, perm = mix
            perm = perm.to(idx.device)
            x = lam * x + (1.0 - lam) * x[perm.to(x.device)]
        with autocast(device, amp=amp):
            logits = model(x)
            loss = loss_fn(logits, idx) if mix is None else lam * loss_fn(logits, idx) + (1.0 - lam) * loss_fn(
                logits, idx[perm])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.detach().float() * idx.numel()
        count += idx.numel()
    return float(total) / max(count, 1)


def to_model_device(model: nn.Module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copy whole training tensors to ``model``'s device once (MedMNIST-sized sets fit a GPU easily)."""
    device = model_device(model)
    return [t if t.device == device else t.to(device) for t in tensors]


@dataclass(frozen=True)
class SupervisedResult:
    """Outcome of :func:`train_supervised`."""

    best_epoch: int
    epochs_run: int
    val: EvalResult


def train_supervised(*, model: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                     val_images: torch.Tensor, val_labels: torch.Tensor, epochs: int, patience: int,
                     batch_size: int, lr: float, weight_decay: float, augment: bool, seed: int,
                     class_weighted: bool = False, log_prefix: str = "", amp: bool = False,
                     ema_decay: float = 0.0) -> SupervisedResult:
    """Cross-entropy training with early stopping on validation AUC; keeps the best weights.

    With ``ema_decay`` > 0 the weights that are validated, kept and returned are an exponential
    moving average of the trained ones over every step (torch's ``AveragedModel``; batch-norm
    statistics averaged too).

    Trains on the device ``model`` is on (place it first, see
    :func:`common.device.place_model`). With ``class_weighted``, the loss
    uses inverse-frequency class weights. ``patience`` 0 turns early stopping
    off: every epoch runs and the last weights are kept (the canary audit's
    audit-mode training, :mod:`client.canary`); ``best_epoch`` is then ``epochs``.
    """
    gen = seed_everything(seed)
    train_images, train_labels = to_model_device(model, train_images, train_labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_classes = int(max(int(train_labels.max()), int(val_labels.max())) + 1) if train_labels.numel() else 1
    weight = None
    if class_weighted:
        counts = torch.bincount(train_labels, minlength=n_classes).float()
        weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
        weight = weight.to(train_labels.device)
    best_score, best_state, best_epoch, since_best = -math.inf, None, 0, 0
    best_val: EvalResult | None = None
    average = weight_average(model, ema_decay) if ema_decay > 0 else None
    kept = model if average is None else average.module  # what is validated and returned
    epoch = 0
    for epoch in range(1, epochs + 1):
        loss = run_epoch(
            model=model, optimizer=optimizer, images=train_images, batch_size=batch_size, gen=gen, augment=augment,
            loss_fn=lambda logits, idx: F.cross_entropy(logits.float(), train_labels[idx], weight=weight), amp=amp,
            after_step=None if average is None else (lambda: average.update_parameters(model)),
        )
        val = evaluate_model(kept, val_images, val_labels, amp=amp)
        score = val.auc if not math.isnan(val.auc) else val.acc
        logger.debug("%sepoch %d loss %.4f val auc %.4f acc %.4f", log_prefix, epoch, loss, val.auc, val.acc)
        if patience == 0:  # no early stopping: the last epoch's weights are the result
            best_epoch, best_val = epoch, val
        elif score > best_score:
            best_score, best_epoch, since_best, best_val = score, epoch, 0, val
            best_state = copy.deepcopy(kept.state_dict())
        else:
            since_best += 1
            if since_best >= patience:
                break
    if best_state is None and average is not None:
        best_state = average.module.state_dict()  # no early stopping: the last average
    if best_state is not None:
        model.load_state_dict(best_state)
    if best_val is None:
        best_val = evaluate_model(model, val_images, val_labels, amp=amp)
    return SupervisedResult(best_epoch=best_epoch, epochs_run=epoch, val=best_val)
