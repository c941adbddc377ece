"""Process trees on Linux: find a process's descendants, measure them, and stop them all, leaving nothing behind.

A medkd daemon or simulation starts a tree of Flower processes (``flower-supernode`` -> ``flower-superexec`` ->
``flwr-clientapp``; ``flower-superlink`` -> ``flower-superexec`` -> ``flwr-serverapp``; Ray's workers). Flower
relies on each process polling whether its parent still exists, so a stopped parent leaves its children running
for a while, re-parented away from the tree, and a parent that lingers as a zombie keeps them running for good.
:func:`stop_tree` therefore does not trust that cascade: it keeps track of every process it has seen in the tree,
gives the tree a grace period, then ends whatever is left (SIGTERM, then SIGKILL) and logs each one.

This is the only module that reads ``/proc`` (psutil would do it, but it is not a dependency of medkd).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent PID) of ``pid``, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _parents() -> dict[int, int]:
    """PID -> parent PID of every process visible in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat[1]
    return table


def descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (children, their children, ...), zombies included."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie has exited and only waits to be reaped)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def command_line(pid: int) -> str:
    """The command line of ``pid`` as one string ('' if it is gone or a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def describe(pid: int, *, width: int = 160) -> str:
    """``PID command line`` shortened to ``width`` characters, for logs."""
    text = f"{pid} {command_line(pid) or '(exited)'}"
    return text if len(text) <= width else text[:width - 3] + "..."


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes (other than this one) whose command line contains ``text``."""
    return [pid for pid in _parents() if pid != os.getpid() and alive(pid) and text in command_line(pid)]


def processes_in_folder(folder: Path) -> list[int]:
    """PIDs of live processes (other than this one) whose command line or environment mentions ``folder``.

    Every process of a hospital or coordinator has ``FLWR_HOME=<folder>/flwr-home`` in its environment, even
    those (SuperExec, ClientApp) whose command line names no folder.
    """
    text = str(Path(folder).resolve()).encode()
    found = []
    for pid in _parents():
        if pid == os.getpid() or not alive(pid):
            continue
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes() or text in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes: its resident memory with each shared page split among the
    processes that share it (so a sum over processes does not count shared libraries many times); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        return 0
    return 0


def tree_rss_bytes(roots: Iterable[int]) -> int:
    """Summed resident memory of the processes ``roots`` and all their descendants, each counted once."""
    pids = {p for root in roots for p in (root, *descendants(root))}
    return sum(rss_bytes(p) for p in pids)


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids`` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` (e.g. SIGSTOP/SIGCONT) to ``pid`` and all its descendants."""
    signal_all([pid, *descendants(pid)], sig)


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``).

    A Flower process whose parent stops is then re-parented to this process instead of to init, so it stays
    in this process's tree where :func:`stop_tree` finds it. Returns False where that is not available.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_adopted(*, keep: Iterable[int] = ()) -> None:
    """Reap this process's exited children except ``keep`` (the children a ``Popen`` waits for itself).

    Adopted orphans must be reaped: a Flower process whose parent is a zombie believes its parent still runs.
    """
    keep = set(keep)
    for pid, parent in _parents().items():
        if parent == os.getpid() and pid not in keep and (stat := _stat(pid)) is not None and stat[0] == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


class StopRequested(Exception):
    """Raised in a daemon's main thread by :func:`stop_on_signals`' handler: stop everything now."""


def stop_on_signals(stopping: list[int]) -> None:
    """Make SIGTERM and SIGINT (Ctrl-C) note the signal in ``stopping`` and raise :class:`StopRequested` once.

    The exception interrupts whatever the main thread waits for (a child, a port, a registration), so that the
    caller's handler can stop its process tree with :func:`stop_tree`; a second signal is ignored meanwhile.
    """

    def handler(signum: int, _frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def crash(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at once (a machine losing power), then wait until they are gone."""
    tree = [pid, *descendants(pid)]
    signal_all(tree, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)


def stop_tree(proc: subprocess.Popen | int, *, sig: int = signal.SIGTERM, whole_tree: bool = False,
              grace_s: float = 20.0, leftover_grace_s: float = 5.0, kill_grace_s: float = 3.0,
              adopted: bool = False) -> list[str]:
    """Stop ``proc`` and every process below it; returns a description of each process that had to be ended.

    1. ``sig`` goes to ``proc`` only (its own shutdown then stops its children), or with ``whole_tree`` to every
       process in the tree at once (for trees, like Ray's, that do not stop their children). If ``proc`` has
       already exited, only its leftovers are looked after.
    2. Wait up to ``grace_s`` for the tree to be gone; once ``proc`` itself has exited, its leftovers get at most
       ``leftover_grace_s`` more (Flower's children notice a stopped parent within a few seconds).
    3. Whatever is left gets SIGTERM, then after ``kill_grace_s`` SIGKILL; each is logged as a warning.

    Every process seen in the tree while waiting is tracked, including children re-parented away from it. With
    ``adopted`` (a daemon that called :func:`become_subreaper` and has no other children), every descendant of
    this process counts as part of the tree, and its exited ones are reaped so that none lingers as a zombie.
    ``proc`` may be a ``Popen`` (then it is waited for, so its exit status stays readable) or a PID.
    """
    root = proc.pid if isinstance(proc, subprocess.Popen) else proc

    def root_done() -> bool:
        return proc.poll() is not None if isinstance(proc, subprocess.Popen) else not alive(root)

    seen = {root, *descendants(root)}

    def look() -> list[int]:
        seen.update(descendants(root))
        if adopted:
            seen.update(descendants(os.getpid()))
            reap_adopted(keep={root})
        return [p for p in seen if alive(p) and not (p == root and root_done())]

    if whole_tree:
        signal_all(sorted(p for p in seen if p != root or not root_done()), sig)
    elif not root_done():
        signal_all([root], sig)
    deadline = time.monotonic() + grace_s
    root_exit: float | None = None
    while (left := look()) and time.monotonic() < deadline:
        if root_exit is None and root_done():
            root_exit = time.monotonic()
            deadline = min(deadline, root_exit + leftover_grace_s)
        time.sleep(0.2)
    ended: list[str] = []
    for final_sig, wait_s in ((signal.SIGTERM, kill_grace_s), (signal.SIGKILL, kill_grace_s)):
        if not left:
            break
        for pid in left:
            what = describe(pid)
            logger.warning("still running after the stop; sending %s to %s", final_sig.name, what)
            ended.append(f"{final_sig.name} {what}")
        signal_all(left, final_sig)
        until = time.monotonic() + wait_s
        while (left := look()) and time.monotonic() < until:
            time.sleep(0.1)
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=kill_grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if adopted:
        reap_adopted(keep={root})
    return ended
