"""Split a labelled data set into a public proxy set and per-hospital shards.

Three ways to split the hospitals' share (:class:`PartitionKind`):

* ``iid``: shuffled, equal sizes.
* ``dirichlet``: label skew; each class is spread over the hospitals with
  proportions drawn from ``Dir(alpha)`` (Hsu, Qi and Brown, "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual
  Classification", arXiv:1909.06335, 2019). Lower ``alpha``, more skew.
* ``quantity``: quantity skew; hospital sizes follow ``Dir(alpha)``
  proportions, samples are drawn at random (Li et al., "Federated Learning on
  Non-IID Data Silos: An Experimental Study", ICDE 2022).

All functions are deterministic for a given ``seed`` and return sorted
``int64`` index arrays into ``labels``.
"""

from __future__ import annotations

import difflib
import logging
import math
from enum import StrEnum

import numpy as np

from common.errors import DataError

logger = logging.getLogger(__name__)

_DIRICHLET_MAX_TRIES = 100


class PartitionKind(StrEnum):
    """How hospital shards are drawn (see the module docstring)."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    QUANTITY = "quantity"


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must have shape (N,), got {labels.shape}")
    if labels.size and labels.dtype.kind not in "iu":
        raise DataError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative ``quotas`` (summing to ``total``) to integers that sum to ``total``.

    Each result is ``floor`` or ``ceil`` of its quota; ties go to the lower index.
    """
    counts = np.floor(quotas).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(quotas - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def split_proxy(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a class-stratified proxy set, the rest staying with the hospitals.

    Parameters
    ----------
    labels
        Class ids, ``(N,)``.
    fraction
        Share of the samples put in the proxy set, in ``[0, 1)``. Each class
        contributes ``fraction * count`` samples rounded up or down (largest
        remainder, so the proxy holds ``round(fraction * N)`` samples).
    seed
        Seed of ``np.random.default_rng``.

    Returns
    -------
    proxy_indices, remaining_indices
        Sorted ``int64`` arrays into ``labels``; disjoint, together all of
        ``range(N)``.
    """
    labels = _check_labels(labels)
    _check_seed(seed)
    if not (isinstance(fraction, (int, float, np.floating)) and 0.0 <= float(fraction) < 1.0):
        raise DataError(f"fraction must be in [0, 1), got {fraction!r}")

    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = int(round(float(fraction) * labels.size))
    take = _largest_remainder(float(fraction) * counts, target)
    proxy_parts = []
    for cls, n_take in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        proxy_parts.append(rng.permutation(members)[:n_take])
    proxy = np.sort(np.concatenate(proxy_parts)) if proxy_parts else np.empty(0, np.int64)
    proxy = proxy.astype(np.int64)
    in_proxy = np.zeros(labels.size, dtype=bool)
    in_proxy[proxy] = True
    remaining = np.flatnonzero(~in_proxy).astype(np.int64)
    logger.debug("proxy split: %d proxy, %d remaining (fraction %.3f)", proxy.size, remaining.size, fraction)
    return proxy, remaining


def _parse_kind(kind: PartitionKind | str) -> PartitionKind:
    try:
        return PartitionKind(kind)
    except ValueError:
        choices = [k.value for k in PartitionKind]
        close = difflib.get_close_matches(str(kind).lower(), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown partition kind '{kind}'{hint} Choices: {', '.join(choices)}") from None


def _split_by_sizes(shuffled: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    bounds = np.cumsum(sizes)[:-1]
    return [np.sort(part).astype(np.int64) for part in np.split(shuffled, bounds)]


def _partition_iid(indices: np.ndarray, *, num_hospitals: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(indices), num_hospitals)]


def _partition_dirichlet(
    labels: np.ndarray,
    *,
    indices: np.ndarray,
    num_hospitals: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    sub_labels = labels[indices]
    classes = np.unique(sub_labels)
    best_sizes = np.full(num_hospitals, -1)
    for attempt in range(1, _DIRICHLET_MAX_TRIES + 1):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_hospitals)]
        for cls in classes:
            members = rng.permutation(indices[sub_labels == cls])
            proportions = rng.dirichlet(np.full(num_hospitals, alpha))
            sizes = _largest_remainder(proportions * members.size, members.size)
            for hospital, part in enumerate(np.split(members, np.cumsum(sizes)[:-1])):
                shards[hospital].append(part)
        parts = [np.sort(np.concatenate(s)).astype(np.int64) if s else np.empty(0, np.int64) for s in shards]
        sizes = np.array([p.size for p in parts])
        if sizes.min() >= min_size:
            logger.debug("dirichlet partition (alpha=%s) found on try %d: sizes %s", alpha, attempt, sizes.tolist())
            return parts
        if sizes.min() > best_sizes.min():
            best_sizes = sizes
    worst = int(np.argmin(best_sizes))
    raise DataError(
        f"dirichlet partition with alpha={alpha} over {num_hospitals} hospitals failed after "
        f"{_DIRICHLET_MAX_TRIES} tries: at best hospital {worst} got {int(best_sizes[worst])} samples, "
        f"fewer than min_size={min_size}; use a larger alpha, fewer hospitals or a smaller min_size"
    )


def _partition_quantity(
    indices: np.ndarray,
    *,
    num_hospitals: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    proportions = rng.dirichlet(np.full(num_hospitals, alpha))
    spare = indices.size - num_hospitals * min_size
    sizes = min_size + _largest_remainder(proportions * spare, spare)
    return _split_by_sizes(rng.permutation(indices), sizes)


def partition_indices(
    labels: np.ndarray,
    *,
    indices: np.ndarray,
    num_hospitals: int,
    kind: PartitionKind | str,
    alpha: float = 0.5,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Share ``indices`` out among hospitals.

    Parameters
    ----------
    labels
        Class ids of the whole split, ``(N,)``.
    indices
        The samples to share out, ``(M,)`` distinct indices into ``labels``
        (e.g. ``remaining_indices`` of :func:`split_proxy`).
    num_hospitals
        Number of hospitals, ``>= 1``.
    kind
        :class:`PartitionKind` or its value.
    alpha
        Dirichlet concentration for ``dirichlet`` and ``quantity`` (``> 0``;
        lower means more skew). Ignored for ``iid``.
    seed
        Seed of ``np.random.default_rng``.
    min_size
        Fewest samples any hospital may get (``dirichlet`` resamples up to
        100 times; ``quantity`` reserves it up front).

    Returns
    -------
    list of np.ndarray
        ``num_hospitals`` sorted ``int64`` arrays; disjoint, together exactly
        ``indices``. ``iid`` sizes differ by at most one.

    Raises
    ------
    DataError
        Invalid arguments, too few samples, or no dirichlet draw giving every
        hospital ``min_size`` samples.
    """
    labels = _check_labels(labels)
    kind = _parse_kind(kind)
    _check_seed(seed)
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise DataError(f"indices must be a 1-D integer array, got shape {indices.shape} dtype {indices.dtype}")
    indices = indices.astype(np.int64, copy=False)
    if indices.size and (indices.min() < 0 or indices.max() >= labels.size):
        raise DataError(f"indices must lie in [0, {labels.size}), got range [{indices.min()}, {indices.max()}]")
    if np.unique(indices).size != indices.size:
        raise DataError("indices contain duplicates; each sample can go to one hospital only")
    if isinstance(num_hospitals, bool) or not isinstance(num_hospitals, (int, np.integer)) or num_hospitals < 1:
        raise DataError(f"num_hospitals must be an integer >= 1, got {num_hospitals!r}")
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise DataError(f"min_size must be an integer >= 0, got {min_size!r}")
    if indices.size < num_hospitals * min_size:
        raise DataError(
            f"{indices.size} samples cannot give {num_hospitals} hospitals min_size={min_size} each "
            f"(needs {num_hospitals * min_size}); use fewer hospitals or a smaller min_size"
        )

    rng = np.random.default_rng(seed)
    if kind is PartitionKind.IID:
        parts = _partition_iid(indices, num_hospitals=num_hospitals, rng=rng)
    elif kind is PartitionKind.DIRICHLET:
        parts = _partition_dirichlet(
            labels, indices=indices, num_hospitals=num_hospitals, alpha=float(alpha), min_size=min_size, rng=rng
        )
    else:
        parts = _partition_quantity(
            indices, num_hospitals=num_hospitals, alpha=float(alpha), min_size=min_size, rng=rng
        )
    logger.info(
        "partitioned %d samples over %d hospitals (%s, alpha=%s): sizes %s",
        indices.size, num_hospitals, kind.value, alpha, [int(p.size) for p in parts],
    )
    return parts
