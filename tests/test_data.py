"""Tests for common.data and common.datasets: loading, validation, resolution and download of MedMNIST files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import ImageSplit, MedMNISTData, class_counts, load_medmnist, to_tensor
from common.datasets import MEDMNIST_INFO, default_data_dir, resolve_dataset
from common.errors import DataError
from tests.conftest import MEDMNIST_DIR


def _real_file(name: str) -> Path:
    path = MEDMNIST_DIR / name
    if not path.is_file():
        if os.environ.get("CI", "").lower() == "true":  # in CI, missing data is a failure, not a skip
            pytest.fail(f"real data file {path} is absent; CI must run the data tests")
        pytest.skip(f"real data file {path} is absent (set MEDKD_TEST_DATA to the shared data directory)")
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _tiny_arrays(*, n: int = 4, image_shape: tuple[int, ...] = (28, 28)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n, dtype=np.uint8) % 2).reshape(n, 1)
    return arrays


# --- real files --------------------------------------------------------------

REAL_CASES = [
    # file, n_classes, spatial_dims, in_channels, spatial_shape, (train, val, test)
    ("retinamnist.npz", 5, 2, 3, (28, 28), (1080, 120, 400)),
    ("vesselmnist3d.npz", 2, 3, 1, (28, 28, 28), (1335, 191, 382)),
    ("pneumoniamnist_kaggle.npz", 2, 2, 1, (28, 28), (3882, 524, 624)),
]


@pytest.mark.parametrize(("name", "n_classes", "spatial_dims", "in_channels", "spatial_shape", "sizes"), REAL_CASES)
def test_load_real_file(
    name: str,
    n_classes: int,
    spatial_dims: int,
    in_channels: int,
    spatial_shape: tuple[int, ...],
    sizes: tuple[int, int, int],
) -> None:
    path = _real_file(name)
    data = load_medmnist(path)
    assert isinstance(data, MedMNISTData)
    assert data.name == Path(name).stem
    assert data.n_classes == n_classes
    assert data.spatial_dims == spatial_dims
    assert data.in_channels == in_channels
    assert data.spatial_shape == spatial_shape
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for split, size in zip((data.train, data.val, data.test), sizes):
        assert isinstance(split, ImageSplit)
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert split.labels.shape == (size,)
        assert split.images.shape[0] == size
        assert split.labels.min() >= 0 and split.labels.max() < n_classes
        assert not split.images.flags.writeable


@pytest.mark.parametrize(("name", "expected_counts"), [
    ("retinamnist.npz", [714, 186, 326, 282, 92]),
    ("vesselmnist3d.npz", [1693, 215]),
])
def test_class_counts_match_published_totals(name: str, expected_counts: list[int]) -> None:
    data = load_medmnist(_real_file(name))
    all_labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    counts = class_counts(all_labels, data.n_classes)
    assert counts.dtype == np.int64
    assert counts.tolist() == expected_counts


def test_pneumonia_kaggle_train_is_imbalanced() -> None:
    data = load_medmnist(_real_file("pneumoniamnist_kaggle.npz"))
    assert class_counts(data.train.labels, data.n_classes).tolist() == [388, 3494]


@pytest.mark.parametrize(("name", "expected_md5"), [
    ("retinamnist.npz", MEDMNIST_INFO["retinamnist"][1]),
    ("vesselmnist3d.npz", MEDMNIST_INFO["vesselmnist3d"][1]),
])
def test_official_md5_matches_shared_files(name: str, expected_md5: str) -> None:
    assert _md5(_real_file(name)) == expected_md5


def test_medmnist_info_covers_all_28px_flags() -> None:
    assert len(MEDMNIST_INFO) == 18
    for flag, (url, md5) in MEDMNIST_INFO.items():
        assert url == f"https://zenodo.org/records/10519652/files/{flag}.npz?download=1"
        assert len(md5) == 32 and int(md5, 16) >= 0


def test_load_is_cached_per_file() -> None:
    path = _real_file("retinamnist.npz")
    assert load_medmnist(path) is load_medmnist(path)


@pytest.mark.parametrize(("name", "expected_shape"), [
    ("retinamnist.npz", (5, 3, 28, 28)),
    ("vesselmnist3d.npz", (5, 1, 28, 28, 28)),
    ("pneumoniamnist_kaggle.npz", (5, 1, 28, 28)),
])
def test_to_tensor_real(name: str, expected_shape: tuple[int, ...]) -> None:
    data = load_medmnist(_real_file(name))
    images = data.train.images[:5]
    tensor = to_tensor(images, spatial_dims=data.spatial_dims)
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == expected_shape
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    assert float(tensor.max()) > 0.0
    # Channel-first layout keeps every value in place.
    expected = images.transpose(0, 3, 1, 2) if data.in_channels == 3 else images[:, None]
    np.testing.assert_allclose(tensor.numpy(), expected / 255.0, rtol=1e-6)


def test_to_tensor_range_endpoints() -> None:
    images = np.array([[[0, 255], [128, 1]]], dtype=np.uint8)
    tensor = to_tensor(images, spatial_dims=2)
    assert tensor.shape == (1, 1, 2, 2)
    assert tensor.min().item() == 0.0
    assert tensor.max().item() == 1.0


@pytest.mark.parametrize(("images", "spatial_dims", "message"), [
    (np.zeros((2, 4, 4), dtype=np.float32), 2, "must be uint8"),
    (np.zeros((2, 4, 4), dtype=np.uint8), 3, "do not fit spatial_dims=3"),
    (np.zeros((2, 4, 4, 4), dtype=np.uint8), 2, "do not fit spatial_dims=2"),
    (np.zeros((2, 4, 4), dtype=np.uint8), 1, "spatial_dims must be 2 or 3"),
])
def test_to_tensor_rejects_bad_input(images: np.ndarray, spatial_dims: int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        to_tensor(images, spatial_dims=spatial_dims)


def test_class_counts_rejects_out_of_range_labels() -> None:
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        class_counts(np.array([0, 1, 2]), 2)


# --- bad files ---------------------------------------------------------------

def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="nope.npz"):
        load_medmnist(missing)


def test_load_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="garbage.npz is not a readable .npz file"):
        load_medmnist(path)


def test_load_missing_keys(tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    del arrays["val_labels"], arrays["test_images"]
    path = _write_npz(tmp_path / "partial.npz", **arrays)
    with pytest.raises(DataError, match="lacks the MedMNIST keys val_labels, test_images"):
        load_medmnist(path)


def test_load_wrong_image_dtype(tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
    path = _write_npz(tmp_path / "floaty.npz", **arrays)
    with pytest.raises(DataError, match="train_images must be uint8, got float32"):
        load_medmnist(path)


def test_load_multi_label(tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    arrays["train_labels"] = np.zeros((4, 14), dtype=np.uint8)
    path = _write_npz(tmp_path / "chesty.npz", **arrays)
    with pytest.raises(DataError, match=r"multi-label datasets \(chestmnist\) are not supported"):
        load_medmnist(path)


def test_load_label_count_mismatch(tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    arrays["test_labels"] = arrays["test_labels"][:3]
    path = _write_npz(tmp_path / "short.npz", **arrays)
    with pytest.raises(DataError, match="test: 4 images but 3 labels"):
        load_medmnist(path)


def test_load_bad_image_rank(tmp_path: Path) -> None:
    arrays = _tiny_arrays(image_shape=(2, 3, 4, 5))
    path = _write_npz(tmp_path / "rank5.npz", **arrays)
    with pytest.raises(DataError, match=r"has shape \(4, 2, 3, 4, 5\)"):
        load_medmnist(path)


def test_load_flat_labels_and_grayscale(tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    arrays["val_labels"] = arrays["val_labels"].ravel()
    data = load_medmnist(_write_npz(tmp_path / "ok.npz", **arrays))
    assert data.val.labels.shape == (4,)
    assert (data.spatial_dims, data.in_channels, data.n_classes) == (2, 1, 2)


# --- resolve_dataset ---------------------------------------------------------

def test_default_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDKD_DATA", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"
    monkeypatch.delenv("MEDKD_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "medkd"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "medkd"


def test_resolve_uses_medkd_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "retinamnist.npz").write_bytes(b"user copy")  # existing files are not re-verified
    monkeypatch.setenv("MEDKD_DATA", str(tmp_path))
    assert resolve_dataset("retinamnist", download=False) == tmp_path / "retinamnist.npz"


def test_resolve_path(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "mine.npz", **_tiny_arrays())
    assert resolve_dataset(str(path)) == path
    with pytest.raises(DataError, match="data set file not found: .*absent.npz"):
        resolve_dataset(str(tmp_path / "absent.npz"))


def test_resolve_unknown_flag_suggests() -> None:
    with pytest.raises(DataError, match="did you mean 'retinamnist'.*Known MedMNIST flags: .*pathmnist"):
        resolve_dataset("retinamnsit", download=False)


def test_resolve_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"not found in {tmp_path}.*MEDKD_DATA"):
        resolve_dataset("retinamnist", data_dir=tmp_path, download=False)


# --- download against a local HTTP server ------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def serve_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_from_local_server(serve_dir: tuple[Path, str], tmp_path: Path) -> None:
    root, base_url = serve_dir
    shutil.copyfile(_real_file("retinamnist.npz"), root / "retinamnist.npz")
    data_dir = tmp_path / "cache" / "nested"
    path = resolve_dataset("retinamnist", data_dir=data_dir, base_url=base_url + "/", timeout_s=10)
    assert path == data_dir / "retinamnist.npz"
    assert _md5(path) == MEDMNIST_INFO["retinamnist"][1]
    assert sorted(p.name for p in data_dir.iterdir()) == ["retinamnist.npz"]
    assert load_medmnist(path).n_classes == 5


def test_download_md5_mismatch_leaves_nothing(serve_dir: tuple[Path, str], tmp_path: Path) -> None:
    root, base_url = serve_dir
    corrupted = bytearray(_real_file("retinamnist.npz").read_bytes())
    corrupted[1000:1010] = b"\x00" * 10
    (root / "retinamnist.npz").write_bytes(bytes(corrupted))
    data_dir = tmp_path / "cache"
    expected = MEDMNIST_INFO["retinamnist"][1]
    with pytest.raises(DataError, match=f"md5 mismatch .*expected {expected}, got [0-9a-f]{{32}}"):
        resolve_dataset("retinamnist", data_dir=data_dir, base_url=base_url, timeout_s=10)
    assert list(data_dir.iterdir()) == []


def test_download_http_404(serve_dir: tuple[Path, str], tmp_path: Path) -> None:
    _, base_url = serve_dir
    with pytest.raises(DataError, match="404"):
        resolve_dataset("vesselmnist3d", data_dir=tmp_path / "cache", base_url=base_url, timeout_s=10)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_server_down(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError, match=f"download of {base_url}/retinamnist.npz failed.*put retinamnist.npz in"):
        resolve_dataset("retinamnist", data_dir=tmp_path, base_url=base_url, timeout_s=5)
    assert list(tmp_path.iterdir()) == []


def test_existing_flag_file_skips_download(tmp_path: Path) -> None:
    (tmp_path / "retinamnist.npz").write_bytes(b"already here")
    # An unreachable base_url proves no request is made.
    path = resolve_dataset("retinamnist", data_dir=tmp_path, base_url="http://127.0.0.1:9")
    assert path.read_bytes() == b"already here"


def test_load_cache_sees_file_changes(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "changing.npz", **_tiny_arrays())
    first = load_medmnist(path)
    arrays = _tiny_arrays(n=6)
    _write_npz(path, **arrays)
    os.utime(path, ns=(first.path.stat().st_mtime_ns + 10**9,) * 2)
    second = load_medmnist(path)
    assert second is not first
    assert len(second.train) == 6
