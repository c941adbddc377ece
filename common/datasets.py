"""Where a MedMNIST data set file is: a path, or a flag found in the data folder or downloaded (checked by MD5).

A data set is named either by a MedMNIST flag (``"retinamnist"``), looked up
as ``<flag>.npz`` in :func:`default_data_dir` (``$MEDKD_DATA``, else the
user's data folder) and downloaded on demand from the official Zenodo record,
or by a path to an ``.npz`` file. Loading and checking the arrays is
:mod:`common.data`'s job.
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
from pathlib import Path

from common.errors import DataError

__all__ = ["DATA_ENV_VAR", "MEDMNIST_INFO", "default_data_dir", "resolve_dataset"]

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
_CHUNK_BYTES = 1 << 16


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
