"""Clean stops for ``medkd simulate``: the simulation runs in a child process tree this process can always end.

Flower's simulation engine (Ray) answers SIGTERM with a crash dump and "Aborted", and leaves worker processes
behind. So ``medkd simulate`` starts itself again as a child in its own session and only supervises it: on
Ctrl-C or SIGTERM it sends SIGTERM to every process of the child's tree, gives them ``grace_s`` seconds, kills
what is left, and prints how to resume (checkpoints are written atomically, so the last completed round is
intact). The child's console output passes through a filter that keeps medkd's lines and drops Flower's and
Ray's internals (deprecation notices, ``alembic`` plugin lines, Ray start-up banners) unless ``--verbose``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from common.processes import stop_tree

CHILD_ENV = "MEDKD_SIMULATE_CHILD"
_NOISE = re.compile(r"alembic|DEPRECATED|deprecated|run_simulation|ray\.init|Ray |raylet|Started a local Ray|"
                    r"^\s*(\x1b\[\d+m)?(INFO|DEBUG)\s*(\x1b\[0m)?\s*:|^\s*$|Please use|flwr run|"
                    r"RAY_|Starting Flower|gcs_server|(\(ClientAppActor pid=\d+\)\s*$)")


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def supervise(argv: list[str], *, out_dir: Path, verbose: bool, grace_s: float = 10.0) -> int:
    """Run ``medkd simulate argv`` as a child; filter its output; stop its whole tree on Ctrl-C/SIGTERM."""
    env = {**os.environ, CHILD_ENV: "1", "PYTHONUNBUFFERED": "1"}
    if sys.stdout.isatty():
        env.setdefault("FORCE_COLOR", "1")
        env.setdefault("COLUMNS", str(os.get_terminal_size().columns))
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stopped: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if not stopped:
            stopped.append(signum)
            stop_tree(proc.pid, whole_tree=True, grace_s=grace_s)  # a PID: the main thread is in proc.wait()

    def pass_through() -> None:
        for line in proc.stdout or ():
            if verbose or not _NOISE.search(line):
                sys.stdout.write(line)
                sys.stdout.flush()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    reader = threading.Thread(target=pass_through, daemon=True)  # engine processes may hold the pipe open
    reader.start()
    try:
        code = proc.wait()
        reader.join(timeout=5.0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        stop_tree(proc.pid, whole_tree=True, grace_s=0.0)  # nothing of the simulation stays behind
        print(f"medkd simulate stopped ({signal.Signals(stopped[0]).name}); {_checkpoint_note(out_dir)}",
              file=sys.stderr)
        return 128 + stopped[0]
    return code


def _checkpoint_note(out_dir: Path) -> str:
    path = out_dir / "checkpoint.pt"
    if not path.exists():
        return f"no round had completed, nothing to resume in {out_dir}"
    import torch

    try:
        done = int(torch.load(path, map_location="cpu", weights_only=True)["state"]["round"])
    except Exception as e:  # a damaged checkpoint must still be reported, not crash the stop
        return f"cannot read {path} ({e})"
    return (f"the checkpoint after round {done} is intact in {path}; resume with the same command "
            f"(same --config/--set and --out {out_dir})")
