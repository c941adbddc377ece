"""A hospital's privacy ledger: every DP release it makes, charged against its own budget.

The ledger is the JSON-lines file ``privacy_ledger.jsonl`` in the hospital
folder, one line per charged release (sequence number, time, mechanism, the
serialised :mod:`common.accounting` event, description, run, round, δ and the
ε spent after it under PLD and RDP). ε is never stored as running state: it
is recomputed by replaying every event, in file order, into a fresh
``dp-accounting`` accountant, so the file alone is the record and
:func:`replay` reproduces the last line's ``epsilon_after`` exactly.

Durability and concurrency:

* a charge appends its line with a single ``os.write`` and ``fsync`` on an
  ``O_APPEND`` file (as ``client/gate.py`` does for ``outbound.jsonl``), so a
  crash leaves whole lines only, or at worst one torn last line;
* a torn or otherwise unreadable line is reported as a :class:`LedgerError`
  naming the file and the line, never skipped: the ledger is then neither
  read nor extended until someone repairs it;
* ``charge`` holds an exclusive ``fcntl.flock`` on the ledger file from
  reading the entries to the fsync of the new line, so two ClientApp
  processes of one hospital cannot both charge past the budget; readers take
  a shared lock. The file is appended in place (never replaced), which is
  what keeps the lock on one inode. ``flock`` is advisory and local: it does
  not protect a ledger on a network file system shared by several machines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import numbers
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from common.accounting import (Accountant, AccountingError, GaussianEvent, PrivacyEvent, SampledGaussianEvent,
                               check_delta, epsilon, event_from_dict)
from common.errors import MedkdError

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.jsonl"

_FIELDS = ("sequence", "time", "mechanism", "event", "description", "run_id", "round", "delta", "epsilon_after",
           "epsilon_after_rdp")


class BudgetExhausted(MedkdError, RuntimeError):
    """A release would take the hospital's ε past its budget; nothing was released or recorded."""

    def __init__(self, *, spent: float, would_be: float, budget: float, delta: float, mechanism: str) -> None:
        self.spent = spent
        self.would_be = would_be
        self.budget = budget
        self.delta = delta
        self.mechanism = mechanism
        super().__init__(f"privacy budget exhausted: {mechanism} refused, ε spent {spent:.4f}, this release would "
                         f"bring it to {would_be:.4f}, over the budget {budget:g} (δ={delta:g}); nothing was released "
                         f"or recorded")


class LedgerError(MedkdError, ValueError):
    """The ledger file is unreadable or corrupt (for example a torn last line); the message names file and line."""


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class LedgerEntry:
    """One charged release: one line of ``privacy_ledger.jsonl``.

    ``epsilon_after`` is the hospital's PLD ε at ``delta`` after composing
    every entry up to and including this one, in file order;
    ``epsilon_after_rdp`` the RDP cross-check (``None`` where RDP gives no
    finite bound). ``round`` is ``None`` for releases outside a federated
    round (for example DP training of the local teacher).
    """

    sequence: int
    time: str
    mechanism: str
    event: PrivacyEvent
    description: str
    run_id: int
    round: int | None
    delta: float
    epsilon_after: float
    epsilon_after_rdp: float | None

    def to_json(self) -> dict[str, object]:
        """The entry as a plain JSON object (the event serialised with its ``to_dict``)."""
        return {"sequence": self.sequence, "time": self.time, "mechanism": self.mechanism,
                "event": self.event.to_dict(), "description": self.description, "run_id": self.run_id,
                "round": self.round, "delta": self.delta, "epsilon_after": self.epsilon_after,
                "epsilon_after_rdp": self.epsilon_after_rdp}

    @classmethod
    def from_json(cls, data: object) -> LedgerEntry:
        """The entry :meth:`to_json` wrote; :class:`ValueError` names the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = [f for f in _FIELDS if f not in data]
        unknown = sorted(set(data) - set(_FIELDS))
        if missing or unknown:
            raise ValueError("; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                       + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
        return cls(
            sequence=_int(data["sequence"], "sequence", minimum=1),
            time=_text(data["time"], "time"),
            mechanism=_text(data["mechanism"], "mechanism"),
            event=event_from_dict(data["event"]),
            description=_text(data["description"], "description", empty=True),
            run_id=_int(data["run_id"], "run_id", minimum=0),
            round=None if data["round"] is None else _int(data["round"], "round", minimum=0),
            delta=check_delta(data["delta"]),
            epsilon_after=_epsilon(data["epsilon_after"], "epsilon_after"),
            epsilon_after_rdp=(None if data["epsilon_after_rdp"] is None
                               else _epsilon(data["epsilon_after_rdp"], "epsilon_after_rdp")),
        )


def _int(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _text(value: object, name: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ValueError(f"{name} must be a {'' if empty else 'non-empty '}string, got {value!r}")
    return value


def _epsilon(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def parse_ledger(path: Path, data: bytes) -> list[LedgerEntry]:
    """The entries in ``data``, the bytes of the ledger at ``path``.

    Raises :class:`LedgerError` naming ``path`` and the line for a torn last
    line (no newline at the end), a line that is not a valid entry, or a
    sequence number out of order: nothing is skipped.
    """
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1]:
        raise LedgerError(f"{path}: line {len(lines)} is incomplete (no newline at the end: a torn write); the "
                          f"ledger is neither read nor extended until it is repaired")
    entries: list[LedgerEntry] = []
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            entry = LedgerEntry.from_json(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and AccountingError are ValueErrors
            raise LedgerError(f"{path}: line {number} is not a valid ledger entry: {e}") from e
        if entry.sequence != number:
            raise LedgerError(f"{path}: line {number} has sequence {entry.sequence}, expected {number} "
                              f"(lines missing, duplicated or reordered)")
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------- file access


@contextmanager
def _exclusive(path: Path) -> Iterator[int]:
    """An O_APPEND fd on ``path`` (created if absent) under an exclusive ``flock``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # also releases the lock


@contextmanager
def _shared(path: Path) -> Iterator[int | None]:
    """A read-only fd on ``path`` under a shared ``flock``, or None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_entries(path: Path) -> list[LedgerEntry]:
    """The entries of the ledger file at ``path`` (none if it does not exist), read under a shared lock."""
    path = Path(path)
    with _shared(path) as fd:
        return [] if fd is None else parse_ledger(path, _read_all(fd))


def replay(path: Path, delta: float) -> float:
    """ε at ``delta`` recomputed from the ledger file alone, in a fresh PLD accountant.

    Composes every entry's event in file order, as :meth:`PrivacyLedger.charge`
    did, so with the ledger's δ it equals the last entry's ``epsilon_after``
    exactly (on the same ``dp-accounting`` and numpy versions).
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"{path}: no privacy ledger there")
    return epsilon([entry.event for entry in read_entries(path)], delta, Accountant.PLD)


# --------------------------------------------------------------------------- the ledger


class PrivacyLedger:
    """The privacy ledger of the hospital whose folder is ``folder``.

    Parameters
    ----------
    folder:
        The hospital folder; the ledger is ``folder / privacy_ledger.jsonl``.
    delta:
        The hospital's δ, in (0, 1); every ε is reported at this δ.
    budget_epsilon:
        The most PLD ε the hospital allows itself to spend in total, > 0.
    """

    def __init__(self, folder: Path | str, *, delta: float, budget_epsilon: float) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LEDGER_FILE
        self.delta = check_delta(delta)
        if (isinstance(budget_epsilon, bool) or not isinstance(budget_epsilon, numbers.Real)
                or not math.isfinite(budget_epsilon) or budget_epsilon <= 0):
            raise AccountingError(f"budget_epsilon must be a finite number > 0, got {budget_epsilon!r}")
        self.budget_epsilon = float(budget_epsilon)

    def entries(self) -> list[LedgerEntry]:
        """Every charged release, in order (none for a new hospital)."""
        return read_entries(self.path)

    def spent(self, accountant: Accountant | str = Accountant.PLD) -> float:
        """ε at the ledger's δ of every entry replayed into a fresh accountant (``"pld"`` or ``"rdp"``)."""
        return epsilon([entry.event for entry in self.entries()], self.delta, accountant)

    def would_exceed(self, event: PrivacyEvent) -> bool:
        """Whether charging ``event`` now would take the PLD ε past the budget.

        Advisory only: another process may charge in between; :meth:`charge`
        checks again under the lock.
        """
        events = [entry.event for entry in self.entries()] + [_checked_event(event)]
        return not epsilon(events, self.delta) <= self.budget_epsilon

    def charge(self, event: PrivacyEvent, *, mechanism: str, description: str, run_id: int,
               round: int | None) -> LedgerEntry:
        """Book ``event`` in the ledger, or refuse with :class:`BudgetExhausted` (file unchanged).

        Call before releasing anything: a release the ledger refuses must not
        happen. ``mechanism`` names what releases (e.g. ``"dp-sgd teacher"``,
        ``"gnmax"``), ``description`` is free text for the hospital's own
        records; ``round`` is ``None`` outside a federated round.
        """
        event = _checked_event(event)
        try:
            mechanism = _text(mechanism, "mechanism")
            description = _text(description, "description", empty=True)
            run_id = _int(run_id, "run_id", minimum=0)
            round = None if round is None else _int(round, "round", minimum=0)
        except ValueError as e:
            raise AccountingError(f"charge: {e}") from e

        with _exclusive(self.path) as fd:
            data = _read_all(fd)
            entries = parse_ledger(self.path, data)
            events = [entry.event for entry in entries] + [event]
            epsilon_after = epsilon(events, self.delta)
            if not epsilon_after <= self.budget_epsilon:
                spent = epsilon(events[:-1], self.delta)
                logger.warning("%s: refused %s (%s): ε would go from %.4f to %.4f, budget %g",
                               self.path, mechanism, description, spent, epsilon_after, self.budget_epsilon)
                raise BudgetExhausted(spent=spent, would_be=epsilon_after, budget=self.budget_epsilon,
                                      delta=self.delta, mechanism=mechanism)
            epsilon_rdp = epsilon(events, self.delta, Accountant.RDP)
            entry = LedgerEntry(
                sequence=len(entries) + 1, time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                mechanism=mechanism, event=event, description=description, run_id=run_id, round=round,
                delta=self.delta, epsilon_after=epsilon_after,
                epsilon_after_rdp=epsilon_rdp if math.isfinite(epsilon_rdp) else None)
            line = (json.dumps(entry.to_json(), sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
            written = os.write(fd, line)
            if written != len(line):
                raise LedgerError(f"{self.path}: only {written} of {len(line)} bytes of entry {entry.sequence} were "
                                  f"written (disk full?); the torn line must be repaired before the next charge")
            os.fsync(fd)
            if not data:  # the file is new: make its directory entry durable too
                _fsync_dir(self.folder)
        logger.info("%s: charged %s (%s), run %s round %s: ε %.4f of %g at δ=%g", self.path, mechanism, description,
                    run_id, round, epsilon_after, self.budget_epsilon, self.delta)
        return entry


def _checked_event(event: object) -> PrivacyEvent:
    if not isinstance(event, SampledGaussianEvent | GaussianEvent):
        raise AccountingError(f"event must be a SampledGaussianEvent or GaussianEvent, got {type(event).__name__}")
    return event
