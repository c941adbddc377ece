"""Approved code only: a hospital runs an app bundle (FAB) only if its SHA-256 is in ``DIR/approved-apps.txt``.

Flower's own ``flower-supernode --trusted-entities`` accepts only bundles signed through Flower Hub (the
SuperLink attaches the Hub's signatures; a bundle submitted with ``flwr run`` from a folder carries none, and
is refused); a study that runs offline needs another pin. Flower builds bundles reproducibly (fixed file dates,
sorted entries), so a hospital can review a source release, build its bundle itself and pin the hash::

    medkd client approve DIR --app /path/to/reviewed/medkd     # appends the bundle's SHA-256

``medkd client start`` then puts a ``flwr-clientapp`` launcher first on the SuperNode's ``PATH``
(``DIR/flwr-home/bin``): Flower's executor starts it for each message, and before the received bundle is
installed or any of its code is imported, the launcher hashes the bundle's bytes and refuses one that is not
approved, with an error reply naming the hash (and a line in ``hospital.log``). The launcher's code comes from
the hospital's installed medkd, never from the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from common.errors import MedkdError

APPROVED_FILE = "approved-apps.txt"
APPROVED_ENV = "MEDKD_APPROVED_APPS"
LAUNCHER_DIR = Path("flwr-home") / "bin"


class AppNotApproved(MedkdError, PermissionError):
    """The app bundle a coordinator sent is not in this hospital's approved list."""


def app_hash(app_dir: Path) -> str:
    """SHA-256 of the bundle Flower builds from ``app_dir`` (what ``flwr run`` would send)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir).resolve())).hexdigest()


def approved_hashes(path: Path) -> set[str]:
    """The approved SHA-256 hashes in ``path`` (one per line; ``#`` starts a comment)."""
    hashes = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            if len(word) != 64 or any(c not in "0123456789abcdef" for c in word):
                raise MedkdError(f"{path}: {word[:70]!r} is not a SHA-256 hex digest")
            hashes.add(word)
    return hashes


def approve_app(folder: Path, *, app_dir: Path, note: str = "") -> str:
    """Append the hash of the bundle built from ``app_dir`` to ``DIR/approved-apps.txt``; returns it."""
    digest = app_hash(app_dir)
    path = Path(folder) / APPROVED_FILE
    if path.exists() and digest in approved_hashes(path):
        return digest
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with path.open("a", encoding="utf-8") as f:
        f.write(f"{digest}  # approved {stamp} from {Path(app_dir).resolve()}{' ' + note if note else ''}\n")
    return digest


def write_launcher(folder: Path) -> Path:
    """Write ``DIR/flwr-home/bin/flwr-clientapp`` (runs :func:`run_flwr_clientapp`); returns its folder."""
    bin_dir = Path(folder) / LAUNCHER_DIR
    bin_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    launcher = bin_dir / "flwr-clientapp"
    launcher.write_text(f"#!{sys.executable}\n# written by medkd client start: checks the app bundle's hash first\n"
                        f"import sys\nsys.path.insert(0, {str(root)!r})\n"
                        "from client.approval import run_flwr_clientapp\nsys.exit(run_flwr_clientapp())\n")
    launcher.chmod(0o755)
    return bin_dir


def check_bundle(content: bytes, *, approved: set[str], log_file: Path | None = None) -> None:
    """Refuse ``content`` unless its SHA-256 is approved (noting the refusal in ``log_file``)."""
    digest = hashlib.sha256(content).hexdigest()
    if digest in approved:
        return
    if log_file is not None:
        with log_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "event": "refused app bundle", "sha256": digest}) + "\n")
    raise AppNotApproved(f"app bundle sha256 {digest} is not approved by this hospital; nothing of it was run")


def run_flwr_clientapp() -> int:
    """``flwr-clientapp`` with a hash check before the received bundle is installed (see the module docstring)."""
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    path = Path(os.environ[APPROVED_ENV])
    approved = approved_hashes(path)
    install = run_clientapp.install_from_fab

    def checked_install(content: bytes, *args: object, **kwargs: object) -> object:
        check_bundle(content, approved=approved, log_file=path.parent / "hospital.log")
        return install(content, *args, **kwargs)

    run_clientapp.install_from_fab = checked_install
    flwr_clientapp()
    return 0
