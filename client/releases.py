"""What a hospital has already released, so that a repeated query costs no privacy.

A noisy answer, once released, is public: sending the very same values again
is post-processing and costs no ε, while drawing fresh noise for the same
sample would be a new release. The hospital therefore keeps every charged
answer, keyed by the proxy index and by everything that determines it (the
teachers' fingerprint, the mechanism's parameters, the output kind,
temperature and wire dtype), in ``<hospital>/released/<key>.npz``, and
answers a repeated index from that record.

The record is only extended *after* the ledger has charged the release (see
:class:`client.gate.OutboundGate`), with an atomic replace under an
exclusive lock, so two ClientApp processes of one hospital never lose each
other's entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_bytes

__all__ = ["RELEASED_DIR", "ReleaseCache", "release_key"]

RELEASED_DIR = "released"


def release_key(**parts: object) -> str:
    """A short stable hash of everything that determines an answer (fingerprints, parameters, output format)."""
    text = json.dumps({k: str(v) for k, v in parts.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ReleaseCache:
    """Released answers of one hospital for one key: proxy index -> the values that were sent (C,)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = Path(folder) / RELEASED_DIR
        self.path = self.folder / f"{key}.npz"

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.path.exists():
            return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float64)
        with np.load(self.path, allow_pickle=False) as data:
            return data["indices"].astype(np.int64), data["values"].astype(np.float64)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(held (N,) bool, values (N, C) for the held rows, or None if none is held)."""
        with self._lock():
            known, values = self._read()
        if known.size == 0:
            return np.zeros(len(indices), dtype=bool), None
        order = np.argsort(known)
        pos = np.searchsorted(known[order], indices)
        pos = np.clip(pos, 0, known.size - 1)
        held = known[order][pos] == indices
        out = np.zeros((len(indices), values.shape[1]), dtype=np.float64)
        out[held] = values[order][pos[held]]
        return held, out

    def commit(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Add released ``values`` (K, C) for ``indices`` (K,) (atomic; earlier entries kept)."""
        if len(indices) == 0:
            return
        with self._lock():
            known, old = self._read()
            fresh = ~np.isin(indices, known)
            merged_idx = np.concatenate([known, np.asarray(indices, dtype=np.int64)[fresh]])
            new_rows = np.asarray(values, dtype=np.float64)[fresh]
            merged_val = new_rows if old.size == 0 else np.concatenate([old, new_rows])
            buffer = io.BytesIO()
            np.savez(buffer, indices=merged_idx, values=merged_val)
            atomic_write_bytes(self.path, buffer.getvalue())
