"""Atomic file writes: write to a temporary file beside the target, fsync, then ``os.replace``.

A crash at any point leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (serialised in memory, then written as bytes)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_saved(path: Path, info_type: type, *, what: str) -> tuple[dict[str, Any], Any] | None:
    """Read a checkpoint written by :func:`atomic_torch_save` holding ``{"info": {...}, ...}``.

    Returns ``(saved, info_type(**saved["info"]))``, or None with a warning
    naming ``what`` and the file when it is torn, foreign or of an older
    layout, so that the caller retrains instead of failing.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved, info_type(**saved["info"])
    except Exception as e:  # a torn or foreign file: the caller retrains rather than fails the round
        logger.warning("%s: cannot read %s (%s); retraining", what, path, e)
        return None
