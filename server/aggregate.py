"""Named aggregators that fuse the hospitals' soft labels on the proxy set.

Every hospital (teacher) answers a round with class probabilities for the
same ``N`` proxy samples; the server stacks them into ``probs: (H, N, C)``
and calls :func:`aggregate_outputs` to get one soft label per sample,
``(N, C)``, which the student is then distilled on.

The aggregators, picked by name through :class:`Aggregator`:

``mean``
    Arithmetic mean over hospitals, the ensemble target of FedMD (Li and
    Wang, 2019) and FedDF (Lin et al., 2020).
``weighted``
    Mean weighted by a non-negative per-hospital weight such as the size of
    its private set, as FedAvg (McMahan et al., 2017) weights models.
``era``
    Entropy Reduction Aggregation of DS-FL (Itahara et al., 2021): the
    mean, sharpened by a softmax at a small temperature (0.1).
``certainty``
    Per-sample confidence weighting in the spirit of FedAUX (Sattler et
    al., 2021), using each teacher's own normalised entropy.
``median``
    Coordinate-wise median, robust to a minority of outlier hospitals.

The maths is plain torch and never imports Flower, so it can be tested
without a federation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum

import torch

from common.errors import PayloadError

__all__ = ["Aggregator", "aggregate_outputs", "probs_from_logits"]

#: Largest allowed ``|sum_c p_c - 1|`` for a row of ``probs``.
SIMPLEX_TOLERANCE = 1e-3

#: Added to every certainty score so that all-uniform inputs still average.
CERTAINTY_EPSILON = 1e-6


class Aggregator(StrEnum):
    """Names of the soft-label aggregators understood by :func:`aggregate_outputs`."""

    MEAN = "mean"
    WEIGHTED = "weighted"
    ERA = "era"
    CERTAINTY = "certainty"
    MEDIAN = "median"


def probs_from_logits(logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Turn logits into temperature-softened class probabilities.

    Computes ``softmax(logits / temperature)`` over the last dimension, the
    "soft targets" of Hinton et al., "Distilling the Knowledge in a Neural
    Network" (2015).

    Parameters
    ----------
    logits : torch.Tensor
        ``(..., C)`` floating-point logits.
    temperature : float
        Softmax temperature ``T > 0``; ``T > 1`` softens, ``T < 1`` sharpens.

    Returns
    -------
    torch.Tensor
        ``(..., C)`` probabilities in the dtype of ``logits``; rows sum to 1.

    Raises
    ------
    ValueError
        If ``temperature`` is not a finite number > 0 or ``logits`` is not a
        floating-point tensor.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not torch.is_floating_point(logits):
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    return torch.softmax(logits / temperature, dim=-1)


def aggregate_outputs(
    probs: torch.Tensor,
    *,
    method: Aggregator | str,
    weights: torch.Tensor | None = None,
    era_temperature: float = 0.1,
) -> torch.Tensor:
    """Fuse the hospitals' soft labels into one soft label per proxy sample.

    Parameters
    ----------
    probs : torch.Tensor
        ``(H, N, C)`` floating-point probabilities: ``H >= 1`` hospitals,
        ``N`` proxy samples, ``C`` classes. Every row ``probs[h, i]`` must be
        finite, non-negative and sum to 1 within ``1e-3``.
    method : Aggregator or str
        One of ``"mean"``, ``"weighted"``, ``"era"``, ``"certainty"``,
        ``"median"`` (see the module docstring and the private helpers).
    weights : torch.Tensor or None
        ``(H,)`` non-negative, finite per-hospital weights (for example the
        private-set sizes), normalised internally so only their ratios
        matter. Required by ``"weighted"``; ignored by every other method.
    era_temperature : float
        Softmax temperature of ``"era"`` (> 0). It sharpens the mean only
        when small enough, roughly ``< 1 / C`` (see ``_era``); the DS-FL
        paper and public implementations use 0.1. Ignored otherwise.

    Returns
    -------
    torch.Tensor
        ``(N, C)`` float32 probabilities on the device of ``probs``; every
        row sums to 1.

    Raises
    ------
    PayloadError
        If ``probs`` breaks the contract above, ``method`` is unknown, or
        ``weights`` is missing or invalid for ``"weighted"``. The message
        names the offending hospitals where it can, so the caller may drop
        them and retry with the rest.
    ValueError
        If ``era_temperature`` is not a finite number > 0 (a setting, not a
        payload problem).
    """
    aggregator = _parse_method(method)
    _check_probs(probs)
    # Compute in float64 so that 1e-6 epsilons and renormalisation are exact
    # enough; the result is handed back as float32.
    p = probs.to(torch.float64)

    if aggregator is Aggregator.WEIGHTED:
        fused = _weighted(p, weights=_check_weights(weights, num_hospitals=p.shape[0]))
    elif aggregator is Aggregator.ERA:
        if not (math.isfinite(era_temperature) and era_temperature > 0):
            raise ValueError(
                f"era_temperature must be a finite number > 0, got {era_temperature}"
            )
        fused = _era(p, temperature=era_temperature)
    else:
        fused = _UNWEIGHTED[aggregator](p)

    # Inputs may sum to 1 only within the tolerance: make the output exact.
    fused = fused / fused.sum(dim=-1, keepdim=True)
    return fused.to(torch.float32)


def _mean(p: torch.Tensor) -> torch.Tensor:
    """Arithmetic mean over hospitals: ``(H, N, C) -> (N, C)``."""
    return p.mean(dim=0)


def _weighted(p: torch.Tensor, *, weights: torch.Tensor) -> torch.Tensor:
    """``sum_h w_h p_h / sum_h w_h``: ``(H, N, C), (H,) -> (N, C)``."""
    w = weights.to(device=p.device, dtype=p.dtype)
    return torch.einsum("h,hnc->nc", w / w.sum(), p)


def _era(p: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Entropy Reduction Aggregation: ``softmax(mean_h p_h / T)`` over classes.

    From Itahara et al., "Distillation-Based Semi-Supervised Federated
    Learning for Communication-Efficient Collaborative Training with Non-IID
    Private Data", IEEE Trans. Mobile Computing, 2021 (DS-FL): the server
    averages the clients' softmax outputs and feeds the average, as if it
    were logits, to a softmax at temperature ``T``. Public implementations
    agree, e.g. the DS-FL server of AIJack (Koukyosyumei/AIJack) and the
    DS-FL example of BlazeFL (kitsuyaazuma/BlazeFL) both compute
    ``F.softmax(mean_soft_labels / era_temperature)`` with a default
    ``era_temperature = 0.1``.

    Because the average lies in ``[0, 1]``, the softmax does not always
    sharpen it: ``T = 1`` *flattens* it (one-hot ``(1, 0)`` becomes
    ``(0.73, 0.27)``), and near the uniform distribution ERA sharpens only
    when ``T < 1 / C`` (to first order ``softmax(m / T)_c - 1/C`` is
    ``(m_c - 1/C) / (C T)``). So ``T < 1`` is necessary, not sufficient:
    with ``C = 2``, ``T = 0.5`` maps ``(0.6, 0.4)`` to ``(0.599, 0.401)``.
    DS-FL's ``T = 0.1`` sharpens for up to 10 classes.

    ``(H, N, C) -> (N, C)``.
    """
    return torch.softmax(p.mean(dim=0) / temperature, dim=-1)


def _certainty(p: torch.Tensor) -> torch.Tensor:
    """Weight each hospital's soft label, per sample, by its certainty.

    A FedAUX-style variant (Sattler et al., "FedAUX: Leveraging Unlabeled
    Auxiliary Data in Federated Learning", IEEE TNNLS 2021): FedAUX weights
    each client's soft label on each sample by a certainty score from an
    auxiliary scoring model trained on the client's data; here, instead, the
    score is the teacher's own confidence,

    ``c_hi = 1 - H(p_hi) / log(C) + 1e-6``,

    with ``H`` the Shannon entropy (``0 log 0 = 0``), so a one-hot answer
    scores 1 and a uniform one scores only the epsilon, which keeps
    all-uniform inputs averaging to the mean. The result is
    ``sum_h c_hi p_hi / sum_h c_hi``.

    ``(H, N, C) -> (N, C)``.
    """
    num_classes = p.shape[-1]
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # (H, N)
    # With C = 1 every row is (1,) and its entropy 0: any positive scale works.
    max_entropy = math.log(num_classes) if num_classes > 1 else 1.0
    certainty = (1.0 - entropy / max_entropy).clamp(min=0.0) + CERTAINTY_EPSILON
    return (certainty.unsqueeze(-1) * p).sum(dim=0) / certainty.sum(dim=0).unsqueeze(-1)


def _median(p: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over hospitals, renormalised per row.

    For even ``H`` the median is the mean of the two middle values (as
    ``torch.quantile(p, 0.5, dim=0)``; ``torch.median`` would return the
    lower one). Sorting is used instead of ``torch.quantile``, which refuses
    large inputs. Rows whose medians are all 0 (for example one-hot answers
    that all disagree) fall back to the mean for that row.

    ``(H, N, C) -> (N, C)``.
    """
    num_hospitals = p.shape[0]
    ordered = p.sort(dim=0).values
    middle = num_hospitals // 2
    if num_hospitals % 2 == 1:
        med = ordered[middle]
    else:
        med = 0.5 * (ordered[middle - 1] + ordered[middle])
    row_sum = med.sum(dim=-1, keepdim=True)  # (N, 1)
    has_mass = row_sum > 0
    renormalised = med / torch.where(has_mass, row_sum, torch.ones_like(row_sum))
    return torch.where(has_mass, renormalised, p.mean(dim=0))


_UNWEIGHTED: dict[Aggregator, Callable[[torch.Tensor], torch.Tensor]] = {
    Aggregator.MEAN: _mean,
    Aggregator.CERTAINTY: _certainty,
    Aggregator.MEDIAN: _median,
}


def _valid_names() -> str:
    return ", ".join(repr(a.value) for a in Aggregator)


def _parse_method(method: Aggregator | str) -> Aggregator:
    """Look ``method`` up among the :class:`Aggregator` names."""
    if isinstance(method, Aggregator):
        return method
    if isinstance(method, str):
        try:
            return Aggregator(method)
        except ValueError:
            pass
    raise PayloadError(f"unknown aggregation method {method!r}; expected one of {_valid_names()}")


def _hospitals_where(bad_rows: torch.Tensor) -> list[int]:
    """Indices of hospitals with any ``True`` in ``bad_rows: (H, ...)``."""
    return torch.nonzero(bad_rows.flatten(start_dim=1).any(dim=1)).flatten().tolist()


def _check_probs(probs: torch.Tensor) -> None:
    """Raise :class:`PayloadError` unless ``probs`` is a valid ``(H, N, C)`` stack."""
    if not isinstance(probs, torch.Tensor):
        raise PayloadError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim != 3:
        raise PayloadError(
            f"probs must be 3-D (hospitals, samples, classes), got shape {tuple(probs.shape)}"
        )
    num_hospitals, _, num_classes = probs.shape
    if num_hospitals < 1:
        raise PayloadError("probs holds no hospitals (H = 0); nothing to aggregate")
    if num_classes < 1:
        raise PayloadError(f"probs must have at least one class, got shape {tuple(probs.shape)}")
    if not torch.is_floating_point(probs):
        raise PayloadError(f"probs must be floating point, got dtype {probs.dtype}")
    not_finite = ~torch.isfinite(probs)
    if not_finite.any():
        raise PayloadError(
            f"probs contain NaN or Inf (hospitals {_hospitals_where(not_finite)})"
        )
    negative = probs < 0
    if negative.any():
        raise PayloadError(
            f"probs contain negative values (hospitals {_hospitals_where(negative)})"
        )
    off_simplex = (probs.to(torch.float64).sum(dim=-1) - 1.0).abs() > SIMPLEX_TOLERANCE  # (H, N)
    if off_simplex.any():
        raise PayloadError(
            f"probs rows must sum to 1 within {SIMPLEX_TOLERANCE:g} "
            f"(hospitals {_hospitals_where(off_simplex)}); send probabilities, not logits"
        )


def _check_weights(weights: torch.Tensor | None, *, num_hospitals: int) -> torch.Tensor:
    """Validate the ``(H,)`` weights of ``"weighted"`` and return them as float64."""
    if weights is None:
        raise PayloadError(
            "method 'weighted' needs weights of shape (H,), e.g. private-set sizes; got None"
        )
    try:
        w = torch.as_tensor(weights, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise PayloadError(f"weights must be a tensor of shape ({num_hospitals},): {e}") from e
    if w.shape != (num_hospitals,):
        raise PayloadError(
            f"weights must have shape ({num_hospitals},) to match probs, got {tuple(w.shape)}"
        )
    if not torch.isfinite(w).all():
        raise PayloadError("weights must be finite")
    if (w < 0).any():
        raise PayloadError(f"weights must be non-negative, got {w.tolist()}")
    if not (w.sum() > 0):
        raise PayloadError("weights must not all be zero")
    return w
