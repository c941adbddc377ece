"""Knowledge that knows its limits: per-sample abstention, decided by the hospital on its own data.

A teacher trained on one class says "my class" for every input; what it
knows is *which* inputs resemble its data. Following Selective-FD (Shao et
al., "Selective knowledge sharing for privacy-preserving federated
distillation without a good teacher", Nature Communications 2024), each
hospital scores every queried proxy sample with a selector trained on its
own data only, abstains where the score is below what its own held-out
private samples reach, and (``density_ratio``) sends the score so the
coordinator can weight it:

``density_ratio``
    A small classifier separates the hospital's private training samples
    (label 1) from the public proxy set (label 0) with class-balanced
    cross-entropy, so its logit estimates ``log p_hospital(x) /
    p_proxy(x)``. One temperature, fitted on held-out private and proxy
    samples (balanced log-loss), calibrates it. The ratio (clipped to
    ``exp(±9)``) goes out as one float16 per sample.
``max_softmax``
    The teacher's own top-class probability (Hendrycks and Gimpel, 2017).
    Useless for a one-class teacher, cheap otherwise. Only the mask leaves.

With any selector the hospital also fits one logit bias per class
on its local validation split (:func:`output_bias`), so that what it sends
is its calibrated local posterior, which the density mixture assumes.

The threshold is the ``selector.abstain_quantile`` quantile of the score on
the hospital's held-out private samples: it answers proxy samples at least
as typical as all but that fraction of its own data. The selector is saved
as ``selector.pt`` in the hospital's folder with a fingerprint (teacher,
selector settings, proxy manifest) and retrained when any of them changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.teacher import teacher_fingerprint, teacher_seed
from common.atomic import atomic_torch_save, load_saved
from common.config import ExperimentConfig, SelectorKind, config_to_dict
from common.device import place_model, resolve_device, state_dict_on_cpu
from common.models import build_model
from common.split import FederatedSplit, hospital_name, local_train_val, tensors
from common.training import predict_logits, train_supervised

logger = logging.getLogger(__name__)

SELECTOR_FILE = "selector.pt"
LOG_RATIO_CLIP = 9.0  # ratios beyond exp(9) ~ 8100 carry no more information than the mask
PROXY_HELD_OUT = 0.15  # proxy fraction held out to early-stop and calibrate the density-ratio classifier
_TEMPERATURES = np.geomspace(0.05, 20.0, 61)


@dataclass(frozen=True)
class SelectorInfo:
    """What the hospital records about its selector (its own log; nothing of this is sent)."""

    kind: str
    threshold: float  # score below which the hospital abstains (-inf: never)
    temperature: float  # calibration of the density-ratio logit (1 for max_softmax)
    held_out_auc: float  # density_ratio: private vs proxy AUC on held-out samples (NaN otherwise)
    fingerprint: str


@dataclass
class Selector:
    info: SelectorInfo
    model: nn.Module | None  # the density-ratio classifier (None for max_softmax)
    bias: np.ndarray | None = None  # (C,) logit bias calibrating the teacher's outputs (selector.calibrate)


def output_bias(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, n_classes: int,
                amp: bool = False) -> np.ndarray:
    """One logit bias per class that minimises the teacher's cross-entropy on the hospital's local validation.

    Early stopping on AUC keeps a teacher that *ranks* well, not one whose
    probabilities are calibrated, while the density mixture needs each
    hospital's posterior ``p_h(y|x)``. Fitting ``b`` in ``softmax(z + b)``
    (prior matching, a convex problem in ``C`` numbers) restores the local
    label mix: a one-class hospital says its class with certainty. Biases
    are clipped to ``[-10, 10]`` and centred. Returns ``(C,)`` float64.
    """
    if labels.numel() == 0:
        return np.zeros(n_classes)
    z = predict_logits(teacher, images, amp=amp).double()
    y = labels.long().cpu()
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z + bias.clamp(-10.0, 10.0), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    b = bias.detach().clamp(-10.0, 10.0)
    return (b - b.mean()).numpy()


def selector_fingerprint(cfg: ExperimentConfig, split: FederatedSplit, hospital: int) -> str:
    """SHA-256 over what the selector depends on: the teacher's inputs, the selector settings, the proxy set."""
    h = hashlib.sha256()
    h.update(teacher_fingerprint(cfg, split, hospital).encode())
    h.update(json.dumps(config_to_dict(cfg.selector), sort_keys=True).encode())
    h.update(split.proxy_hash.encode())
    return h.hexdigest()


def _balanced_log_loss(z: np.ndarray, y: np.ndarray) -> float:
    """Mean of the two classes' mean logistic losses for logits ``z`` and labels ``y`` in {0, 1}."""
    losses = np.logaddexp(0.0, -np.where(y == 1, z, -z))
    return float(np.mean([losses[y == c].mean() for c in (0, 1) if (y == c).any()]))


def _fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature, on a fixed grid, that minimises the balanced log-loss of ``z / T`` (1 if degenerate)."""
    if len(np.unique(y)) < 2:
        return 1.0
    losses = [_balanced_log_loss(z / t, y) for t in _TEMPERATURES]
    return float(_TEMPERATURES[int(np.argmin(losses))])


def _log_ratio(model: nn.Module, images: torch.Tensor, temperature: float, amp: bool) -> np.ndarray:
    logits = predict_logits(model, images, amp=amp).numpy().astype(np.float64)
    return np.clip((logits[:, 1] - logits[:, 0]) / temperature, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)


def _max_softmax(teacher: nn.Module, images: torch.Tensor, amp: bool) -> np.ndarray:
    return _confidence(predict_logits(teacher, images, amp=amp))


def _confidence(logits: torch.Tensor) -> np.ndarray:
    """Max softmax probability per row of teacher ``logits`` (N, C), taken in float32."""
    return torch.softmax(logits.float(), dim=1).max(dim=1).values.numpy()


def train_selector(cfg: ExperimentConfig, split: FederatedSplit, hospital: int,
                   teacher: nn.Module | None) -> Selector:
    """Train hospital ``hospital``'s selector on its own private data and the public proxy set.

    ``teacher`` is needed by ``max_softmax`` only (``density_ratio`` trains its own classifier).
    """
    name = hospital_name(hospital)
    kind = cfg.selector.kind
    private = split.hospital(hospital)
    seed = teacher_seed(cfg, hospital)
    train_pos, val_pos = local_train_val(private.labels, val_fraction=cfg.data.local_val_fraction, seed=seed)
    images, _ = tensors(private, spatial_dims=split.data.spatial_dims)
    fingerprint = selector_fingerprint(cfg, split, hospital)
    q = cfg.selector.abstain_quantile
    if kind == SelectorKind.MAX_SOFTMAX:
        if teacher is None:
            raise ValueError("selector max_softmax needs the hospital's teacher")
        own = _max_softmax(teacher, images[val_pos], cfg.amp)
        threshold = float(np.quantile(own, q)) if q > 0 and own.size else -math.inf
        info = SelectorInfo(kind=kind.value, threshold=threshold, temperature=1.0, held_out_auc=math.nan,
                            fingerprint=fingerprint)
        return Selector(info=info, model=None)

    proxy_images, _ = tensors(split.proxy, spatial_dims=split.data.spatial_dims)
    order = np.random.default_rng(seed).permutation(proxy_images.shape[0])
    n_held = max(1, int(round(PROXY_HELD_OUT * order.size)))
    proxy_val, proxy_train = np.sort(order[:n_held]), np.sort(order[n_held:])
    x_train = torch.cat([images[train_pos], proxy_images[proxy_train]])
    y_train = torch.cat([torch.ones(len(train_pos), dtype=torch.int64),
                         torch.zeros(len(proxy_train), dtype=torch.int64)])
    x_val = torch.cat([images[val_pos], proxy_images[proxy_val]])
    y_val = torch.cat([torch.ones(len(val_pos), dtype=torch.int64), torch.zeros(len(proxy_val), dtype=torch.int64)])
    spec = split.model_spec()
    torch.manual_seed(seed + 1)
    model = place_model(build_model("smallcnn", replace(spec, n_classes=2)), resolve_device(cfg.device))
    result = train_supervised(
        model=model, train_images=x_train, train_labels=y_train, val_images=x_val, val_labels=y_val,
        epochs=cfg.selector.epochs, patience=cfg.selector.patience, batch_size=cfg.teacher.batch_size,
        lr=cfg.teacher.lr, weight_decay=cfg.teacher.weight_decay, augment=cfg.teacher.augment, seed=seed + 1,
        class_weighted=True, log_prefix=f"{name} selector ", amp=cfg.amp,
    )
    model.eval()
    raw = predict_logits(model, x_val, amp=cfg.amp).numpy().astype(np.float64)
    temperature = _fit_temperature(raw[:, 1] - raw[:, 0], y_val.numpy())
    own = _log_ratio(model, images[val_pos], temperature, cfg.amp)
    threshold = float(np.quantile(own, q)) if q > 0 and own.size else -math.inf
    info = SelectorInfo(kind=kind.value, threshold=threshold, temperature=temperature,
                        held_out_auc=float(result.val.auc), fingerprint=fingerprint)
    logger.info("%s: density-ratio selector ready (held-out private-vs-proxy AUC %.3f, temperature %.2f, "
                "abstains below log-ratio %.2f)", name, info.held_out_auc, temperature, threshold)
    return Selector(info=info, model=model)


def selection(selector: Selector, teacher: nn.Module | None, images: torch.Tensor, *, amp: bool = False,
              teacher_logits: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask (N,) bool: answer here, density ratios (N,) float32 or None) for proxy ``images``.

    ``max_softmax`` scores the teacher's own (uncalibrated) logits: pass them as ``teacher_logits`` when the
    caller already has them, so that an answer runs the teacher once; ``density_ratio`` runs its own classifier.
    """
    if selector.model is not None:
        log_ratio = _log_ratio(selector.model, images, selector.info.temperature, amp)
        return log_ratio >= selector.info.threshold, np.exp(log_ratio).astype(np.float32)
    if teacher_logits is not None:
        return _confidence(teacher_logits) >= selector.info.threshold, None
    if teacher is None:
        raise ValueError("a max_softmax selector needs the teacher or its logits")
    return _max_softmax(teacher, images, amp) >= selector.info.threshold, None


_CACHE: dict[tuple[str, str, str], Selector] = {}
_CACHE_MAX = 4096


def load_or_train_selector(*, cfg: ExperimentConfig, split: FederatedSplit, hospital: int, hospital_dir: Path,
                           teacher: nn.Module) -> Selector | None:
    """The hospital's selector (None when ``selector.kind`` is none): from memory, ``selector.pt``, or trained."""
    if cfg.selector.kind == SelectorKind.NONE:
        return None
    path = Path(hospital_dir) / SELECTOR_FILE
    fingerprint = selector_fingerprint(cfg, split, hospital)
    key = (str(path.resolve()), fingerprint, cfg.device)
    if key in _CACHE:
        return _CACHE[key]
    selector = None
    loaded = load_saved(path, SelectorInfo, what=f"{hospital_name(hospital)} selector") if path.exists() else None
    if loaded is not None:
        saved, info = loaded
        if info.fingerprint == fingerprint:
            model = None
            if saved.get("state_dict") is not None:
                model = build_model("smallcnn", replace(split.model_spec(), n_classes=2))
                model.load_state_dict(saved["state_dict"])
                model = place_model(model, resolve_device(cfg.device)).eval()
            selector = Selector(info=info, model=model)
    if selector is None:
        selector = train_selector(cfg, split, hospital, teacher)
        atomic_torch_save(path, {"info": asdict(selector.info),
                                 "state_dict": None if selector.model is None else state_dict_on_cpu(selector.model)})
    if selector.bias is None:  # calibrate the teacher's outputs (computed per process; cheap, deterministic)
        # on the first member's held-out split; the other members of a teacher ensemble trained on part of it, so
        # the bias is fitted on outputs slightly more confident there than on unseen data (one number per class)
        private = split.hospital(hospital)
        _, val_pos = local_train_val(private.labels, val_fraction=cfg.data.local_val_fraction,
                                     seed=teacher_seed(cfg, hospital))
        images, labels = tensors(private, spatial_dims=split.data.spatial_dims)
        selector = replace(selector, bias=output_bias(teacher, images[val_pos], labels[val_pos],
                                                      n_classes=split.data.n_classes, amp=cfg.amp))
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = selector
    return selector
