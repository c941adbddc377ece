"""The teacher version a hospital announces with each reply, so the coordinator knows when to ask again.

The coordinator keeps the soft labels it already holds and does not ask for
the same proxy sample twice (privacy is spent per released answer), *unless
the teacher changed*. To tell, each reply names the hospital's current
answerer with an opaque version token.

The token is random, never derived from private data: a hash of the
teacher's fingerprint (which covers the private records) would let an
adversary who knows all other records test whether one record is present.
The hospital draws a token the first time it answers with a given answerer
(teacher fingerprint, which covers the policy's privacy settings, and the
selector's fingerprint where one is used) and keeps it in
``<hospital>/teacher_versions.json``; the same answerer always announces the
same token, a re-configured one a new one, and a retrained one a new one too
(training a teacher forgets the stored tokens, :func:`forget_versions`). What
the coordinator learns is only that "the answerer changed".
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.atomic import atomic_write_json

__all__ = ["VERSIONS_FILE", "forget_versions", "teacher_version"]

VERSIONS_FILE = "teacher_versions.json"
TOKEN_BYTES = 8  # 16 hex characters on the wire


def teacher_version(folder: Path, *identity: str) -> str:
    """The token naming the answerer identified by ``identity`` (fingerprints) in hospital ``folder``.

    Drawn with :mod:`secrets` on first use and stored (atomic replace under an
    exclusive lock, so two ClientApp processes of one hospital agree).
    """
    key = hashlib.sha256("|".join(identity).encode()).hexdigest()
    path = Path(folder) / VERSIONS_FILE
    with _locked(Path(folder)):
        known = _read(path)
        if key not in known:
            known[key] = secrets.token_hex(TOKEN_BYTES)
            atomic_write_json(path, known)
        return known[key]


def forget_versions(folder: Path) -> None:
    """Forget every stored token of hospital ``folder`` (after its teacher was trained): the next are new."""
    with _locked(Path(folder)):
        (Path(folder) / VERSIONS_FILE).unlink(missing_ok=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{VERSIONS_FILE}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, str]:
    """The stored tokens; an unreadable file is started afresh (a new token only makes the coordinator ask again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
