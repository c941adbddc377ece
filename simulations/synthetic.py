"""Generated MedMNIST-format ``.npz`` files for throughput and scale checks (never committed).

Two ways to make one:

- :func:`tile_dataset` grows a real MedMNIST file to any size by repeating
  its training images with random flips and a little noise (labels kept),
  so that 1000 simulated hospitals each get a realistic share;
- :func:`random_dataset` makes class-dependent random images from nothing,
  for machines without the real data (the GPU check), where only speed
  matters.

The files are ordinary MedMNIST ``.npz`` (``{train,val,test}_{images,labels}``,
``uint8``), so every medkd path reads them like a downloaded set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data import load_medmnist


def _save(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (images, labels) in splits.items():
        arrays[f"{name}_images"] = images.astype(np.uint8)
        arrays[f"{name}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def tile_dataset(source: Path, path: Path, *, n_train: int, seed: int = 0) -> Path:
    """Write ``path``: ``source``'s val/test splits and ``n_train`` training images tiled from its train split.

    Each repeat is flipped at random and given uniform noise of +-8 grey levels.
    """
    data = load_medmnist(source)
    rng = np.random.default_rng(seed)
    base_x, base_y = data.train.images, data.train.labels
    pick = np.concatenate([rng.permutation(base_y.size) for _ in range(-(-n_train // base_y.size))])[:n_train]
    images = base_x[pick].astype(np.int16)
    flip = rng.random(n_train) < 0.5
    images[flip] = images[flip][:, :, ::-1]
    images += rng.integers(-8, 9, size=images.shape, dtype=np.int16)
    train = (np.clip(images, 0, 255).astype(np.uint8), base_y[pick])
    return _save(path, {"train": train, "val": (data.val.images, data.val.labels),
                        "test": (data.test.images, data.test.labels)})


def random_dataset(path: Path, *, n_train: int, n_val: int = 512, n_test: int = 512, size: int = 28,
                   channels: int = 3, n_classes: int = 5, seed: int = 0) -> Path:
    """Write ``path``: random ``uint8`` images (N, size, size[, 3]) whose mean brightness depends on the class."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, n_classes, size=n)
        shape = (n, size, size, channels) if channels == 3 else (n, size, size)
        noise = rng.integers(0, 128, size=shape, dtype=np.int16)
        shift = (labels * (127 // max(1, n_classes - 1))).reshape((n,) + (1,) * (len(shape) - 1))
        return (noise + shift).clip(0, 255).astype(np.uint8), labels

    return _save(path, {"train": split(n_train), "val": split(n_val), "test": split(n_test)})
