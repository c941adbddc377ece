"""MedMNIST data sets: verify and load ``.npz`` files (finding or downloading them: :mod:`common.datasets`).

A data set file is in the MedMNIST layout (keys ``train_images``,
``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``; images ``uint8``, labels of shape ``(N, 1)``).

MedMNIST v2/v3: Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark
for 2D and 3D biomedical image classification", Scientific Data 10, 41 (2023).
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import DataError

logger = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test")
_KEYS = tuple(f"{split}_{part}" for split in _SPLITS for part in ("images", "labels"))
_CHUNK_BYTES = 1 << 16
_CACHE_MAX_ENTRIES = 8


@dataclass(frozen=True)
class ImageSplit:
    """One split of an image classification data set.

    Attributes
    ----------
    images
        ``uint8``, ``(N, H, W)``, ``(N, H, W, 3)`` or ``(N, D, H, W)`` as stored
        in the file; read-only.
    labels
        ``int64``, ``(N,)``; read-only.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MedMNISTData:
    """A loaded MedMNIST-style data set (see :func:`load_medmnist`)."""

    name: str
    path: Path
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    n_classes: int
    spatial_dims: int
    in_channels: int
    spatial_shape: tuple[int, ...]
    sha256: str


# (resolved path, mtime_ns, size) -> loaded data; the arrays are read-only, so
# sharing one object between callers is safe.
_LOAD_CACHE: dict[tuple[Path, int, int], MedMNISTData] = {}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with the MedMNIST keys")
    with npz:
        missing = [key for key in _KEYS if key not in npz.files]
        if missing:
            raise DataError(
                f"{path} lacks the MedMNIST keys {', '.join(missing)} (found: {', '.join(npz.files) or 'none'})"
            )
        try:
            return {key: npz[key] for key in _KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: cannot read arrays: {e}") from e


def _image_layout(shape: tuple[int, ...], *, where: str) -> tuple[int, int, tuple[int, ...]]:
    """Return (spatial_dims, in_channels, spatial_shape) for a stored image batch shape."""
    if len(shape) == 3:
        return 2, 1, tuple(shape[1:])
    if len(shape) == 4 and shape[-1] == 3:
        return 2, 3, tuple(shape[1:3])
    if len(shape) == 4:
        return 3, 1, tuple(shape[1:])
    raise DataError(
        f"{where} has shape {shape}; expected (N, H, W), (N, H, W, 3) or (N, D, H, W)"
    )


def _check_split(images: np.ndarray, labels: np.ndarray, *, where: str) -> ImageSplit:
    if images.dtype != np.uint8:
        raise DataError(f"{where}_images must be uint8, got {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{where}_labels has shape {labels.shape}: multi-label datasets (chestmnist) are not supported"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where}_labels has shape {labels.shape}; expected (N, 1) or (N,)")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}_labels must hold integers, got {labels.dtype}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{where}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}_labels contains negative class ids")
    labels = labels.astype(np.int64)
    images = np.ascontiguousarray(images)
    images.flags.writeable = False
    labels.flags.writeable = False
    return ImageSplit(images=images, labels=labels)


def load_medmnist(path: Path) -> MedMNISTData:
    """Load and validate a MedMNIST-style ``.npz`` file.

    Parameters
    ----------
    path
        The ``.npz`` file (see :func:`common.datasets.resolve_dataset`).

    Returns
    -------
    MedMNISTData
        Splits with images as stored (``uint8``; ``(N, H, W)`` grayscale,
        ``(N, H, W, 3)`` RGB or ``(N, D, H, W)`` volumes) and ``int64`` labels
        ``(N,)``. Repeated loads of an unchanged file in one process return the
        same object, whose arrays are read-only.

    Raises
    ------
    DataError
        Missing or unreadable file, missing keys, wrong dtype or shape,
        multi-label data, or splits that disagree on the image shape.
    """
    path = Path(path).expanduser()
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError as e:
        raise DataError(f"data set file not found or unreadable: {path} ({e})") from e
    if not resolved.is_file():
        raise DataError(f"data set path is not a file: {path}")
    key = (resolved, stat.st_mtime_ns, stat.st_size)
    cached = _LOAD_CACHE.get(key)
    if cached is not None:
        return cached

    arrays = _read_arrays(resolved)
    splits: dict[str, ImageSplit] = {}
    layouts = {}
    for split in _SPLITS:
        where = f"{path}: {split}"
        splits[split] = _check_split(arrays[f"{split}_images"], arrays[f"{split}_labels"], where=where)
        layouts[split] = _image_layout(splits[split].images.shape, where=f"{where}_images")
    if len(set(layouts.values())) != 1:
        shapes = ", ".join(f"{s}: {splits[s].images.shape[1:]}" for s in _SPLITS)
        raise DataError(f"{path}: splits disagree on the image shape ({shapes})")
    if len(splits["train"]) == 0:
        raise DataError(f"{path}: the train split is empty")
    spatial_dims, in_channels, spatial_shape = layouts["train"]
    n_classes = 1 + max(int(s.labels.max()) for s in splits.values() if len(s))

    data = MedMNISTData(
        name=resolved.stem,
        path=resolved,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        n_classes=n_classes,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        spatial_shape=spatial_shape,
        sha256=_file_sha256(resolved),
    )
    logger.info(
        "loaded %s: %d/%d/%d train/val/test, %d classes, %dD, %d channel(s), shape %s",
        data.name, len(data.train), len(data.val), len(data.test),
        n_classes, spatial_dims, in_channels, spatial_shape,
    )
    if len(_LOAD_CACHE) >= _CACHE_MAX_ENTRIES:
        _LOAD_CACHE.pop(next(iter(_LOAD_CACHE)))
    _LOAD_CACHE[key] = data
    return data


def to_tensor(images: np.ndarray, *, spatial_dims: int) -> torch.Tensor:
    """Convert stored ``uint8`` images to a channel-first ``float32`` tensor in ``[0, 1]``.

    Parameters
    ----------
    images
        ``uint8``: ``(N, H, W)`` or ``(N, H, W, 3)`` when ``spatial_dims == 2``;
        ``(N, D, H, W)`` when ``spatial_dims == 3``.
    spatial_dims
        2 or 3.

    Returns
    -------
    torch.Tensor
        ``float32`` ``(N, C, H, W)`` (C = 1 or 3) or ``(N, 1, D, H, W)``.
    """
    if spatial_dims not in (2, 3):
        raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}")
    tensor = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    if spatial_dims == 2 and images.ndim == 3:
        return tensor.unsqueeze(1)
    if spatial_dims == 2 and images.ndim == 4 and images.shape[-1] == 3:
        return tensor.permute(0, 3, 1, 2).contiguous()
    if spatial_dims == 3 and images.ndim == 4:
        return tensor.unsqueeze(1)
    raise DataError(
        f"images of shape {images.shape} do not fit spatial_dims={spatial_dims}; expected "
        + ("(N, H, W) or (N, H, W, 3)" if spatial_dims == 2 else "(N, D, H, W)")
    )


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Count samples per class.

    Parameters
    ----------
    labels
        Integer class ids, ``(N,)``, each in ``[0, n_classes)``.
    n_classes
        Number of classes.

    Returns
    -------
    np.ndarray
        ``int64``, ``(n_classes,)``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if n_classes < 1:
        raise DataError(f"n_classes must be >= 1, got {n_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"labels must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return np.bincount(labels.astype(np.int64), minlength=n_classes).astype(np.int64)
