"""The federation split on real RetinaMNIST: proxy held by no hospital, hash agreement, local splits."""

from __future__ import annotations

import numpy as np

from common.split import local_train_val, make_split, proxy_manifest_hash


def test_proxy_is_held_by_no_hospital_and_partitions_cover_the_rest(tiny_config) -> None:
    cfg = tiny_config()
    split = make_split(cfg)
    hospitals = np.concatenate(split.hospital_indices)
    assert np.intersect1d(hospitals, split.proxy_indices).size == 0
    n_train = split.data.train.labels.shape[0]
    assert np.array_equal(np.sort(np.concatenate([hospitals, split.proxy_indices])), np.arange(n_train))
    assert split.proxy.images.shape[0] == round(0.25 * n_train)
    rows = split.size_table()
    assert [r["name"] for r in rows] == ["H0", "H1", "H2", "proxy (train)"]
    assert sum(r["size"] for r in rows) == n_train


def test_proxy_hash_changes_with_the_proxy(tiny_config) -> None:
    a = make_split(tiny_config())
    b = make_split(tiny_config(seed=1))
    c = make_split(tiny_config(**{"data.proxy_fraction": 0.2}))
    assert a.proxy_hash == make_split(tiny_config()).proxy_hash
    assert len({a.proxy_hash, b.proxy_hash, c.proxy_hash}) == 3
    assert proxy_manifest_hash(a.proxy.images) == a.proxy_hash


def test_proxy_from_val_leaves_all_train_to_hospitals(tiny_config) -> None:
    split = make_split(tiny_config(**{"data.proxy_source": "val", "data.proxy_fraction": 0.5}))
    assert sum(p.size for p in split.hospital_indices) == split.data.train.labels.shape[0]
    assert split.proxy.images.shape[0] == 60


def test_local_validation_split_is_stratified_and_disjoint() -> None:
    labels = np.array([0] * 20 + [1] * 5 + [2] * 1)
    train, val = local_train_val(labels, val_fraction=0.2, seed=3)
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == labels.size
    assert np.bincount(labels[val], minlength=3).tolist() == [4, 1, 0]
