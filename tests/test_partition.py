"""Tests for common.partition on the real RetinaMNIST train labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data import load_medmnist
from common.errors import DataError
from common.partition import PartitionKind, partition_indices, split_proxy

N_CLASSES = 5


@pytest.fixture(scope="module")
def labels(medmnist_dir: Path) -> np.ndarray:
    """RetinaMNIST train labels, (1080,) int64."""
    path = medmnist_dir / "retinamnist.npz"
    return load_medmnist(path).train.labels


def _mean_tv_distance(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each hospital's label distribution and the global one."""
    global_dist = np.bincount(labels, minlength=N_CLASSES) / labels.size
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=N_CLASSES) / p.size - global_dist).sum() for p in parts
    ]
    return float(np.mean(distances))


def _size_cv(parts: list[np.ndarray]) -> float:
    sizes = np.array([p.size for p in parts], dtype=float)
    return float(sizes.std() / sizes.mean())


KINDS = list(PartitionKind)
SEEDS = [0, 1, 7]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS)
def test_partition_is_disjoint_complete_sorted(labels: np.ndarray, kind: PartitionKind, seed: int) -> None:
    _, remaining = split_proxy(labels, fraction=0.1, seed=seed)
    parts = partition_indices(labels, indices=remaining, num_hospitals=5, kind=kind, alpha=0.5, seed=seed)
    assert len(parts) == 5
    joined = np.concatenate(parts)
    assert joined.size == remaining.size  # disjoint: no index counted twice
    np.testing.assert_array_equal(np.sort(joined), remaining)  # complete
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
        assert part.size >= 10


@pytest.mark.parametrize("kind", KINDS)
def test_partition_is_deterministic(labels: np.ndarray, kind: PartitionKind) -> None:
    indices = np.arange(labels.size)
    first = partition_indices(labels, indices=indices, num_hospitals=4, kind=kind, seed=3)
    again = partition_indices(labels, indices=indices, num_hospitals=4, kind=kind.value, seed=3)
    other = partition_indices(labels, indices=indices, num_hospitals=4, kind=kind, seed=4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("num_hospitals", [1, 3, 7])
def test_iid_sizes_balanced(labels: np.ndarray, num_hospitals: int) -> None:
    parts = partition_indices(
        labels, indices=np.arange(labels.size), num_hospitals=num_hospitals, kind="iid", seed=0
    )
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == labels.size


def test_dirichlet_skew_decreases_with_alpha(labels: np.ndarray) -> None:
    indices = np.arange(labels.size)
    tv = {
        alpha: np.mean([
            _mean_tv_distance(
                labels,
                partition_indices(labels, indices=indices, num_hospitals=5, kind="dirichlet", alpha=alpha, seed=s),
            )
            for s in SEEDS
        ])
        for alpha in (0.1, 1.0, 100.0)
    }
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 0.3
    assert tv[100.0] < 0.1


def test_iid_has_little_label_skew(labels: np.ndarray) -> None:
    parts = partition_indices(labels, indices=np.arange(labels.size), num_hospitals=5, kind="iid", seed=0)
    assert _mean_tv_distance(labels, parts) < 0.1


def test_quantity_sizes_vary_more_than_iid(labels: np.ndarray) -> None:
    indices = np.arange(labels.size)
    for seed in SEEDS:
        iid = partition_indices(labels, indices=indices, num_hospitals=5, kind="iid", seed=seed)
        quantity = partition_indices(labels, indices=indices, num_hospitals=5, kind="quantity", alpha=0.5, seed=seed)
        assert _size_cv(quantity) > _size_cv(iid) + 0.2
        # Samples are drawn at random, not sorted by label: no big label skew on large shards.
        big = [p for p in quantity if p.size >= 200]
        assert big and _mean_tv_distance(labels, big) < 0.15


@pytest.mark.parametrize(("kind", "num_hospitals", "alpha", "min_size"), [
    (PartitionKind.DIRICHLET, 8, 0.3, 30),
    (PartitionKind.QUANTITY, 10, 0.1, 40),
])
def test_min_size_respected(
    labels: np.ndarray, kind: PartitionKind, num_hospitals: int, alpha: float, min_size: int
) -> None:
    indices = np.arange(labels.size)
    smallest_unconstrained = []
    for seed in SEEDS:
        arguments = {"indices": indices, "num_hospitals": num_hospitals, "kind": kind, "alpha": alpha, "seed": seed}
        parts = partition_indices(labels, min_size=min_size, **arguments)  # type: ignore[arg-type]
        assert min(p.size for p in parts) >= min_size
        free = partition_indices(labels, min_size=0, **arguments)  # type: ignore[arg-type]
        smallest_unconstrained.append(min(p.size for p in free))
    # The constraint actually bites for these settings.
    assert min(smallest_unconstrained) < min_size


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5])
def test_split_proxy_stratified_and_disjoint(labels: np.ndarray, fraction: float) -> None:
    proxy, remaining = split_proxy(labels, fraction=fraction, seed=0)
    assert proxy.dtype == np.int64 and remaining.dtype == np.int64
    assert np.all(np.diff(proxy) > 0) and np.all(np.diff(remaining) > 0)
    assert np.intersect1d(proxy, remaining).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([proxy, remaining])), np.arange(labels.size))
    counts = np.bincount(labels, minlength=N_CLASSES)
    proxy_counts = np.bincount(labels[proxy], minlength=N_CLASSES)
    assert np.all(np.abs(proxy_counts - fraction * counts) <= 1)
    assert abs(proxy.size - fraction * labels.size) <= 1


def test_split_proxy_deterministic(labels: np.ndarray) -> None:
    a, _ = split_proxy(labels, fraction=0.2, seed=5)
    b, _ = split_proxy(labels, fraction=0.2, seed=5)
    c, _ = split_proxy(labels, fraction=0.2, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(("fraction", "message"), [
    (1.0, r"fraction must be in \[0, 1\), got 1.0"),
    (-0.1, r"fraction must be in \[0, 1\), got -0.1"),
])
def test_split_proxy_rejects_bad_fraction(labels: np.ndarray, fraction: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        split_proxy(labels, fraction=fraction, seed=0)


def test_split_proxy_rejects_2d_labels(labels: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"labels must have shape \(N,\)"):
        split_proxy(labels[:, None], fraction=0.1, seed=0)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_hospitals": 0}, "num_hospitals must be an integer >= 1, got 0"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
    ({"alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
    ({"kind": "dirichlett"}, "unknown partition kind 'dirichlett'; did you mean 'dirichlet'"),
    ({"num_hospitals": 200}, r"1080 samples cannot give 200 hospitals min_size=10 each \(needs 2000\)"),
    ({"min_size": -1}, "min_size must be an integer >= 0, got -1"),
    ({"indices": np.array([0, 0, 1])}, "indices contain duplicates"),
    ({"indices": np.array([0, 5000])}, r"indices must lie in \[0, 1080\)"),
])
def test_partition_rejects_bad_arguments(labels: np.ndarray, overrides: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "indices": np.arange(labels.size), "num_hospitals": 5, "kind": "iid", "alpha": 0.5, "seed": 0,
    }
    arguments.update(overrides)
    with pytest.raises(DataError, match=message):
        partition_indices(labels, **arguments)  # type: ignore[arg-type]


def test_dirichlet_impossible_min_size_says_what_to_do(labels: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"hospital \d+ got \d+ samples, fewer than min_size=100; use a larger alpha"):
        partition_indices(
            labels, indices=np.arange(labels.size), num_hospitals=10, kind="dirichlet", alpha=0.05, seed=0,
            min_size=100,
        )


def test_data_error_is_value_error(labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        partition_indices(labels, indices=np.arange(labels.size), num_hospitals=5, kind="iid", alpha=-1, seed=0)
