"""MedMNIST data sets: locate, download, verify and load ``.npz`` files.

A data set is named either by a MedMNIST flag (``"retinamnist"``), looked up
as ``<flag>.npz`` in :func:`default_data_dir` and downloaded on demand, or by a
path to an ``.npz`` file in the MedMNIST layout (keys ``train_images``,
``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``; images ``uint8``, labels of shape ``(N, 1)``).

MedMNIST v2/v3: Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark
for 2D and 3D biomedical image classification", Scientific Data 10, 41 (2023).
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import DataError

logger = logging.getLogger(__name__)

_ZENODO = "https://zenodo.org/records/10519652/files"

#: flag -> (official download URL, MD5 of the file) for the 28-pixel MedMNIST
#: files, copied from ``medmnist.INFO`` of medmnist 3.0.2 (Zenodo record
#: 10519652; ``medmnist/info.py`` in github.com/MedMNIST/MedMNIST).
MEDMNIST_INFO: dict[str, tuple[str, str]] = {
    flag: (f"{_ZENODO}/{flag}.npz?download=1", md5)
    for flag, md5 in (
        ("pathmnist", "a8b06965200029087d5bd730944a56c1"),
        ("chestmnist", "02c8a6516a18b556561a56cbdd36c4a8"),
        ("dermamnist", "0744692d530f8e62ec473284d019b0c7"),
        ("octmnist", "c68d92d5b585d8d81f7112f81e2d0842"),
        ("pneumoniamnist", "28209eda62fecd6e6a2d98b1501bb15f"),
        ("retinamnist", "bd4c0672f1bba3e3a89f0e4e876791e4"),
        ("breastmnist", "750601b1f35ba3300ea97c75c52ff8f6"),
        ("bloodmnist", "7053d0359d879ad8a5505303e11de1dc"),
        ("tissuemnist", "ebe78ee8b05294063de985d821c1c34b"),
        ("organamnist", "68e3f8846a6bd62f0c9bf841c0d9eacc"),
        ("organcmnist", "b9ceb9546e10131b32923c5bbeaea2b1"),
        ("organsmnist", "9ab87b696fb54e2a387ebe992d6ed5f1"),
        ("organmnist3d", "a0c5a1ff56af4f155c46d46fbb45a2fe"),
        ("nodulemnist3d", "8755a7e9e05a4d9ce80a24c3e7a256f3"),
        ("adrenalmnist3d", "bbd3c5a5576322bc4cdfea780653b1ce"),
        ("fracturemnist3d", "6aa7b0143a6b42da40027a9dda61302f"),
        ("vesselmnist3d", "b41fd4f7e7e2feedddb201585ecafa1b"),
        ("synapsemnist3d", "1235b78a3cd6280881dd7850a78eadb6"),
    )
}

DATA_ENV_VAR = "MEDKD_DATA"
_SPLITS = ("train", "val", "test")
_KEYS = tuple(f"{split}_{part}" for split in _SPLITS for part in ("images", "labels"))
_CHUNK_BYTES = 1 << 16
_CACHE_MAX_ENTRIES = 8


def default_data_dir() -> Path:
    """Return the directory where MedMNIST files are looked up and downloaded.

    Returns
    -------
    Path
        ``$MEDKD_DATA`` if set, else ``$XDG_DATA_HOME/medkd``, else
        ``~/.local/share/medkd``. The directory is not created.
    """
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "medkd"


def _is_path_like(dataset: str) -> bool:
    return "/" in dataset or os.sep in dataset or dataset.endswith(".npz")


def _unknown_flag_message(dataset: str) -> str:
    known = sorted(MEDMNIST_INFO)
    close = difflib.get_close_matches(dataset.lower(), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown data set '{dataset}'{hint} Known MedMNIST flags: {', '.join(known)}; "
        "or pass a path to an .npz file"
    )


def resolve_dataset(
    dataset: str,
    *,
    data_dir: Path | None = None,
    download: bool = True,
    base_url: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Return the path of a data set's ``.npz`` file, downloading it if needed.

    Parameters
    ----------
    dataset
        A path to an ``.npz`` file (anything containing ``/`` or ending in
        ``.npz``; a relative path is tried in the current folder, then in
        ``data_dir``), or a MedMNIST flag from :data:`MEDMNIST_INFO`.
    data_dir
        Where ``<flag>.npz`` is looked up and downloaded to; defaults to
        :func:`default_data_dir`.
    download
        Download a missing flag file from its official URL.
    base_url
        Download from ``f"{base_url}/{flag}.npz"`` instead of the official URL
        (a mirror); the official MD5 is still checked.
    timeout_s
        Socket timeout of the download, in seconds.

    Returns
    -------
    Path
        The ``.npz`` file. Existing files are not re-verified (they may be
        user copies); downloaded files always match the official MD5.

    Raises
    ------
    DataError
        Unknown flag, missing file, failed download or MD5 mismatch.
    """
    if _is_path_like(dataset):
        path = Path(dataset).expanduser()
        if path.is_file():
            return path
        in_data_dir = (data_dir or default_data_dir()) / path
        if not path.is_absolute() and in_data_dir.is_file():
            return in_data_dir
        where = f" (nor {in_data_dir})" if not path.is_absolute() else ""
        raise DataError(f"data set file not found: {path}{where}")

    flag = dataset.lower()
    if flag not in MEDMNIST_INFO:
        raise DataError(_unknown_flag_message(dataset))

    directory = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    path = directory / f"{flag}.npz"
    if path.is_file():
        logger.debug("using existing %s (MD5 not re-verified)", path)
        return path
    if not download:
        raise DataError(
            f"{flag}.npz not found in {directory} and download is disabled; "
            f"put {flag}.npz in {directory} or set {DATA_ENV_VAR} to a directory holding it"
        )

    official_url, expected_md5 = MEDMNIST_INFO[flag]
    url = official_url if base_url is None else f"{base_url.rstrip('/')}/{flag}.npz"
    _download(url=url, dest=path, expected_md5=expected_md5, timeout_s=timeout_s)
    return path


def _download(*, url: str, dest: Path, expected_md5: str, timeout_s: float) -> None:
    """Stream ``url`` to a temp file next to ``dest``, check its MD5, then move it in place."""
    manual = (
        f"to use the file without a download, put {dest.name} in {dest.parent} "
        f"or set {DATA_ENV_VAR} to a directory holding it"
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {dest.parent}: {e}") from e

    logger.info("downloading %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp_path = Path(tmp_name)
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:
                    total = int(response.headers.get("Content-Length") or 0)
                    done = 0
                    next_report = 0.1
                    while chunk := response.read(_CHUNK_BYTES):
                        out.write(chunk)
                        md5.update(chunk)
                        done += len(chunk)
                        if total and done / total >= next_report:
                            logger.info("%s: %.0f%% of %d bytes", dest.name, 100 * done / total, total)
                            next_report = (int(10 * done / total) + 1) / 10
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                raise DataError(f"download of {url} failed: {e}; {manual}") from e
            out.flush()
            os.fsync(out.fileno())
        actual_md5 = md5.hexdigest()
        if actual_md5 != expected_md5:
            raise DataError(
                f"md5 mismatch for {url}: expected {expected_md5}, got {actual_md5}; "
                f"the download was discarded; {manual}"
            )
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    logger.info("saved %s (md5 %s)", dest, actual_md5)


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
        The ``.npz`` file (see :func:`resolve_dataset`).

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
