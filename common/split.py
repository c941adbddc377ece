"""The federation's view of a data set: public proxy set, hospital partitions, test split.

Both the server and every hospital derive the same split from the config
and the seed, so no index list has to travel. The proxy manifest hash
(SHA-256 over the proxy images) lets them check that they agree before a
hospital answers a query.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch

from common.config import ExperimentConfig, ProxySource
from common.data import ImageSplit, MedMNISTData, class_counts, load_medmnist, to_tensor
from common.datasets import resolve_dataset
from common.device import ResidentImages
from common.models import ModelSpec
from common.partition import partition_indices, split_proxy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederatedSplit:
    """Who holds what.

    proxy_indices index ``data.<proxy_source>``; every array in
    ``hospital_indices`` indexes ``data.train``. No hospital holds a proxy sample.
    """

    data: MedMNISTData
    proxy_source: ProxySource
    proxy_indices: np.ndarray
    hospital_indices: list[np.ndarray]
    proxy_hash: str

    @cached_property
    def proxy(self) -> ImageSplit:
        """The public proxy set (built once per split; every query indexes into it)."""
        src = self.data.train if self.proxy_source == ProxySource.TRAIN else self.data.val
        return ImageSplit(images=src.images[self.proxy_indices], labels=src.labels[self.proxy_indices])

    def proxy_on(self, device: torch.device) -> ResidentImages:
        """The proxy images where queries are answered: kept on ``device`` once per process when it is a GPU."""
        key = str(device)
        cache = self.__dict__.setdefault("_proxy_resident", {})
        if key not in cache:
            cache.clear()  # one device per process in practice; never two copies
            cache[key] = ResidentImages(self.proxy.images, spatial_dims=self.data.spatial_dims, device=device)
        return cache[key]

    def hospital(self, index: int) -> ImageSplit:
        idx = self.hospital_indices[index]
        return ImageSplit(images=self.data.train.images[idx], labels=self.data.train.labels[idx])

    def model_spec(self) -> ModelSpec:
        return ModelSpec(spatial_dims=self.data.spatial_dims, in_channels=self.data.in_channels,
                         n_classes=self.data.n_classes, spatial_size=int(self.data.spatial_shape[0]))

    def size_table(self) -> list[dict[str, object]]:
        """One row per holder (hospitals, then proxy): name, size, class counts."""
        n_classes = self.data.n_classes
        rows: list[dict[str, object]] = []
        for h in range(len(self.hospital_indices)):
            labels = self.hospital(h).labels
            rows.append({"name": hospital_name(h), "size": int(labels.shape[0]),
                         "class_counts": class_counts(labels, n_classes).tolist()})
        proxy_labels = self.proxy.labels
        rows.append({"name": f"proxy ({self.proxy_source.value})", "size": int(proxy_labels.shape[0]),
                     "class_counts": class_counts(proxy_labels, n_classes).tolist()})
        return rows


def class_warnings(name: str, counts: list[int], *, below: int) -> list[str]:
    """Warnings about a hospital's label counts: a single class, or fewer than ``below`` examples of a class."""
    present = [c for c, n in enumerate(counts) if n > 0]
    if len(present) <= 1:
        only = f"class {present[0]}" if present else "no samples"
        return [f"hospital {name} holds a single class ({only}; counts {counts}): its teacher cannot tell classes "
                "apart, only which samples resemble its data (consider selector.kind: density_ratio)"]
    thin = [c for c, n in enumerate(counts) if n < below]
    if thin:
        return [f"hospital {name} has fewer than {below} examples of class(es) {thin} (counts {counts})"]
    return []


def hospital_name(index: int) -> str:
    """Display name of hospital ``index`` (``H0``, ``H1``, ...)."""
    return f"H{index}"


def proxy_manifest_hash(images: np.ndarray) -> str:
    """SHA-256 over the proxy images' shape, dtype and bytes, in order."""
    h = hashlib.sha256()
    h.update(repr((images.shape, str(images.dtype))).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def load_dataset(cfg: ExperimentConfig) -> MedMNISTData:
    """Resolve (download if allowed) and load ``cfg.data.dataset``."""
    data_dir = Path(cfg.data.data_dir).expanduser() if cfg.data.data_dir else None
    path = resolve_dataset(cfg.data.dataset, data_dir=data_dir, download=cfg.data.download)
    return load_medmnist(path)


def make_split(cfg: ExperimentConfig) -> FederatedSplit:
    """Deterministic proxy / hospital split for ``cfg`` (cached per process)."""
    return _make_split_cached(
        cfg.data.dataset, cfg.data.data_dir, cfg.data.download, cfg.data.proxy_source, cfg.data.proxy_fraction,
        cfg.federation.hospitals, cfg.federation.partition, cfg.federation.alpha, cfg.federation.min_samples,
        cfg.seed,
    )


@lru_cache(maxsize=8)
def _make_split_cached(dataset: str, data_dir: str | None, download: bool, proxy_source: ProxySource,
                       proxy_fraction: float, hospitals: int, partition: str, alpha: float, min_samples: int,
                       seed: int) -> FederatedSplit:
    path = resolve_dataset(dataset, data_dir=Path(data_dir).expanduser() if data_dir else None, download=download)
    data = load_medmnist(path)
    if proxy_source == ProxySource.TRAIN:
        proxy_idx, private_idx = split_proxy(data.train.labels, fraction=proxy_fraction, seed=seed)
    else:
        proxy_idx, _ = split_proxy(data.val.labels, fraction=proxy_fraction, seed=seed)
        private_idx = np.arange(data.train.labels.shape[0], dtype=np.int64)
    parts = partition_indices(data.train.labels, indices=private_idx, num_hospitals=hospitals, kind=partition,
                              alpha=alpha, seed=seed, min_size=min_samples)
    src = data.train if proxy_source == ProxySource.TRAIN else data.val
    digest = proxy_manifest_hash(src.images[proxy_idx])
    return FederatedSplit(data=data, proxy_source=proxy_source, proxy_indices=proxy_idx,
                          hospital_indices=parts, proxy_hash=digest)


def local_train_val(labels: np.ndarray, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a hospital's private positions into (train, val), stratified where a class allows it.

    Every class with at least two samples gets at least one validation sample.
    Returns sorted int64 positions into ``labels``.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        rng.shuffle(pos)
        n_val = int(round(val_fraction * pos.size))
        if pos.size >= 2:
            n_val = min(max(n_val, 1), pos.size - 1)
        else:
            n_val = 0
        val.append(pos[:n_val])
        train.append(pos[n_val:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)


def tensors(split: ImageSplit, *, spatial_dims: int, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, *spatial) float32 in [0, 1], labels (N,) int64), optionally the first ``limit``."""
    images, labels = split.images, split.labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    return to_tensor(images, spatial_dims=spatial_dims), torch.tensor(labels, dtype=torch.int64)
