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
``density``
    The Bayes mixture ``p(y|x) = sum_h pi_h p_h(x) p_h(y|x) / sum_h pi_h p_h(x)``
    with ``pi_h`` the private-set size and ``p_h(x)`` estimated by each
    hospital's density ratio ``r_h(x) = p_h(x) / p_proxy(x)`` (sent per
    sample by the ``density_ratio`` selector, see client/selector.py). A
    hospital that saw one class is trusted on the samples that look like its
    data, not on all of them: the client-side selector of Selective-FD (Shao
    et al., Nature Communications 2024) used as a weight, not only a mask.
``label_aware``
    Per-class support weighting: hospital ``h``'s probability for class
    ``c`` counts with weight ``n_hc / sum_h' n_h'c`` (its share of the
    federation's examples of ``c``), from label counts the hospitals'
    policies release.

Every aggregator respects per-sample abstention masks ``(H, N)``: an
abstaining hospital is left out of that sample's aggregate. A sample on
which every hospital abstained is flagged by :func:`answered` so that the
caller can drop it; :func:`normalised_entropy` serves the server-side
selector that drops ambiguous aggregates.

The maths is plain torch and never imports Flower, so it can be tested
without a federation.
"""

from __future__ import annotations

import math

import torch

from common.errors import PayloadError
from common.names import AggregatorName

__all__ = ["Aggregator", "aggregate_outputs", "answered", "normalised_entropy", "probs_from_logits"]

#: Largest allowed ``|sum_c p_c - 1|`` for a row of ``probs``.
SIMPLEX_TOLERANCE = 1e-3

#: Added to every certainty score so that all-uniform inputs still average.
CERTAINTY_EPSILON = 1e-6


#: The aggregator names are the config's (one list for both; see :mod:`common.names`).
Aggregator = AggregatorName


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
    mask: torch.Tensor | None = None,
    density: torch.Tensor | None = None,
    class_counts: torch.Tensor | None = None,
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
    mask : torch.Tensor or None
        ``(H, N)`` bool: ``True`` where hospital ``h`` answered sample ``n``,
        ``False`` where it abstained. None: everyone answered everything. A
        sample nobody answered is aggregated over all hospitals (so the
        result stays finite); drop it with :func:`answered`.
    density : torch.Tensor or None
        ``(H, N)`` non-negative density ratios for ``"density"`` (a
        hospital without them counts with ratio 1). Needs ``weights`` too.
    class_counts : torch.Tensor or None
        ``(H, C)`` non-negative per-class counts for ``"label_aware"``;
        required by it.

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
    m = _check_mask(mask, shape=p.shape[:2], device=p.device)

    if aggregator is Aggregator.WEIGHTED:
        w = _check_weights(weights, num_hospitals=p.shape[0]).to(p.device)
        fused = _weighted_mean(p, m * w[:, None])
    elif aggregator is Aggregator.DENSITY:
        w = _check_weights(weights, num_hospitals=p.shape[0]).to(p.device)
        r = _check_density(density, shape=p.shape[:2], device=p.device)
        fused = _weighted_mean(p, m * w[:, None] * r)
    elif aggregator is Aggregator.LABEL_AWARE:
        fused = _label_aware(p, m, _check_counts(class_counts, shape=(p.shape[0], p.shape[2]), device=p.device))
    elif aggregator is Aggregator.ERA:
        if not (math.isfinite(era_temperature) and era_temperature > 0):
            raise ValueError(
                f"era_temperature must be a finite number > 0, got {era_temperature}"
            )
        fused = torch.softmax(_weighted_mean(p, m) / era_temperature, dim=-1)
    elif aggregator is Aggregator.CERTAINTY:
        fused = _weighted_mean(p, m * _certainty_scores(p))
    elif aggregator is Aggregator.MEDIAN:
        fused = _median(p, m)
    else:
        fused = _weighted_mean(p, m)

    # Inputs may sum to 1 only within the tolerance: make the output exact.
    fused = fused / fused.sum(dim=-1, keepdim=True)
    return fused.to(torch.float32)


def answered(mask: torch.Tensor | None, num_samples: int) -> torch.Tensor:
    """``(N,)`` bool: samples at least one hospital answered (all of them when ``mask`` is None)."""
    if mask is None:
        return torch.ones(num_samples, dtype=torch.bool)
    return mask.to(torch.bool).any(dim=0)


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``(N, C) -> (N,)`` Shannon entropy divided by ``log C`` (0: one-hot, 1: uniform)."""
    num_classes = probs.shape[-1]
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    return entropy / (math.log(num_classes) if num_classes > 1 else 1.0)


def _weighted_mean(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_h w_hn p_hn / sum_h w_hn`` per sample: ``(H, N, C), (H, N) -> (N, C)``.

    A sample whose weights are all zero (everyone abstained, or zero density
    everywhere) falls back to the plain mean, so the result stays finite.
    """
    total = w.sum(dim=0)  # (N,)
    fallback = total <= 0
    if fallback.any():
        w = torch.where(fallback[None, :], torch.ones_like(w), w)
        total = w.sum(dim=0)
    return torch.einsum("hn,hnc->nc", w, p) / total[:, None]


def _label_aware(p: torch.Tensor, m: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``p(c|x) ∝ sum_h m_hn s_hc p_h(c|x)`` with ``s_hc = n_hc / sum_h' n_h'c`` (uniform where nobody has c)."""
    total = counts.sum(dim=0, keepdim=True)  # (1, C)
    support = torch.where(total > 0, counts / total.clamp(min=1e-12), torch.full_like(counts, 1.0 / counts.shape[0]))
    fused = torch.einsum("hn,hc,hnc->nc", m, support, p)
    row = fused.sum(dim=-1, keepdim=True)
    return torch.where(row > 0, fused / row.clamp(min=1e-300), _weighted_mean(p, m))


def _certainty_scores(p: torch.Tensor) -> torch.Tensor:
    """FedAUX-style per-sample certainty of each hospital, ``(H, N, C) -> (H, N)``.

    In the spirit of FedAUX (Sattler et al., "FedAUX: Leveraging Unlabeled
    Auxiliary Data in Federated Learning", IEEE TNNLS 2021), which weights
    each client's soft label by a certainty score from an auxiliary model;
    here the score is the teacher's own confidence,
    ``c_hi = 1 - H(p_hi) / log(C) + 1e-6``, so a one-hot answer scores 1
    and a uniform one only the epsilon (all-uniform inputs still average to
    the mean).
    """
    return (1.0 - normalised_entropy(p)).clamp(min=0.0) + CERTAINTY_EPSILON


def _median(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over the hospitals that answered each sample, renormalised per row.

    For an even count the median is the mean of the two middle values (as
    ``torch.quantile(p, 0.5, dim=0)``). Abstentions sort last (as +inf) and
    the middle is taken among the answers only. Rows whose medians are all
    0 (for example one-hot answers that all disagree) fall back to the mean.

    ``(H, N, C), (H, N) -> (N, C)``.
    """
    answered_any = m.sum(dim=0) > 0
    m = torch.where(answered_any[None, :], m, torch.ones_like(m))
    count = m.sum(dim=0).long()  # (N,)
    masked = torch.where(m[..., None] > 0, p, torch.full_like(p, math.inf))
    ordered = masked.sort(dim=0).values  # (H, N, C)
    lower = ((count - 1) // 2)[None, :, None].expand(1, *p.shape[1:])
    upper = (count // 2)[None, :, None].expand(1, *p.shape[1:])
    med = 0.5 * (ordered.gather(0, lower) + ordered.gather(0, upper))[0]
    row_sum = med.sum(dim=-1, keepdim=True)
    has_mass = row_sum > 0
    renormalised = med / torch.where(has_mass, row_sum, torch.ones_like(row_sum))
    return torch.where(has_mass, renormalised, _weighted_mean(p, m))


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


def _check_mask(mask: torch.Tensor | None, *, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(H, N)`` float64 0/1 weights from a bool mask (all ones when None)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.float64, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        raise PayloadError(f"mask must be a tensor of shape {tuple(shape)} (hospitals, samples), got "
                           f"{tuple(getattr(mask, 'shape', ()))}")
    return mask.to(device=device, dtype=torch.bool).to(torch.float64)


def _check_density(density: torch.Tensor | None, *, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(H, N)`` finite, non-negative density ratios as float64 (all ones when None)."""
    if density is None:
        return torch.ones(shape, dtype=torch.float64, device=device)
    r = torch.as_tensor(density, dtype=torch.float64, device=device)
    if tuple(r.shape) != tuple(shape):
        raise PayloadError(f"density must have shape {tuple(shape)}, got {tuple(r.shape)}")
    bad = ~torch.isfinite(r) | (r < 0)
    if bad.any():
        raise PayloadError(f"density ratios must be finite and >= 0 (hospitals {_hospitals_where(bad)})")
    return r


def _check_counts(counts: torch.Tensor | None, *, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(H, C)`` finite, non-negative class counts as float64."""
    if counts is None:
        raise PayloadError("method 'label_aware' needs class_counts of shape (H, C); got None")
    c = torch.as_tensor(counts, dtype=torch.float64, device=device)
    if tuple(c.shape) != tuple(shape):
        raise PayloadError(f"class_counts must have shape {tuple(shape)}, got {tuple(c.shape)}")
    if not torch.isfinite(c).all() or (c < 0).any():
        raise PayloadError("class_counts must be finite and >= 0")
    return c


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
