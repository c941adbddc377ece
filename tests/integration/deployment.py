"""A real deployment on 127.0.0.1 for the integration tests: a coordinator and hospitals as separate processes.

Every process is started through the ``medkd`` CLI exactly as the deployment guide says (``server start``,
``client start``), on free ports chosen at run time, each in its own session; the tests stop them by PID.
:meth:`Deployment.close` stops hospitals first, then the coordinator, then anything they left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop(pid: int, *, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
    """Send ``sig`` to ``pid`` and wait for it and its descendants; SIGKILL whatever is left after ``timeout_s``."""
    tree = [pid, *descendants(pid)]
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    for p in tree:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Deployment:
    """A coordinator folder, hospital folders, and the processes started from them."""

    root: Path
    data_dir: Path
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "MEDKD_DATA": str(self.data_dir),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def medkd(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=REPO, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.out"
        handle = log.open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=REPO, env=self.env(),
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.processes[name], self.logs[name] = proc, log
        return proc

    def output(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def make_certs(self) -> None:
        done = self.medkd("certs", str(self.coordinator / "certs"))
        assert done.returncode == 0, done.stderr

    def start_server(self) -> subprocess.Popen[bytes]:
        proc = self.spawn("coordinator", "server", "start", str(self.coordinator), "--host", "127.0.0.1",
                          "--port", str(self.port))
        deadline = time.monotonic() + 90
        while "SuperLink up on" not in self.output("coordinator"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"coordinator did not start:\n{self.output('coordinator')[-3000:]}")
            time.sleep(0.3)
        return proc

    def init_hospital(self, index: int, *, name: str | None = None, overrides: list[str] = ()) -> Path:
        name = name or f"H{index}"
        folder = self.root / name
        done = self.medkd("client", "init", str(folder), "--name", name, "--superlink", f"127.0.0.1:{self.port}",
                          "--ca-cert", str(self.coordinator / "certs" / "ca.crt"), "--clientapp-port",
                          str(free_port()), "--config", str(REPO / "configs" / "tiny.yaml"), "--index", str(index),
                          "--set", f"data.data_dir={self.data_dir}", *overrides)
        assert done.returncode == 0, done.stdout + done.stderr
        return folder

    def register(self, name: str) -> None:
        done = self.medkd("server", "register", str(self.coordinator), "--name", name,
                          str(self.root / name / "keys" / "auth.pub"))
        assert done.returncode == 0, done.stdout + done.stderr

    def start_hospital(self, name: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, "client", "start", str(self.root / name))

    def run_study(self, out: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return self.medkd("server", "run", str(self.coordinator), "--config", str(REPO / "configs" / "tiny.yaml"),
                          "--set", f"data.data_dir={self.data_dir}", *overrides, "--out", str(out), timeout=timeout)

    def metrics(self, out: Path) -> dict:
        return json.loads((out / "metrics.json").read_text())

    def close(self) -> None:
        hospitals = [n for n in self.processes if n != "coordinator"]
        for name in [*hospitals, "coordinator"]:
            stop(self.processes[name].pid)
            self.processes[name].wait(timeout=30)


def outbound(folder: Path) -> list[dict]:
    path = folder / "outbound.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
