"""A real deployment on 127.0.0.1: a coordinator and hospitals as separate processes (integration tests, latency
and load scripts).

Every process is started through the ``medkd`` CLI exactly as the deployment guide says (``server start``,
``client start``), on free ports chosen at run time, each in its own session; the tests stop them by PID.
:meth:`Deployment.close` stops hospitals first, then the coordinator, then anything they left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.processes import command_line, descendants, stop_tree

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clientapp_pids(pid: int, *, timeout_s: float = 120) -> list[int]:
    """PIDs of the ClientApp processes under SuperNode ``pid`` (one per message being answered), once there are some."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = []
        for child in descendants(pid):
            if "flwr-clientapp" in command_line(child):
                found.append(child)
        if found:
            return found
        time.sleep(0.1)
    raise RuntimeError(f"no ClientApp process appeared under SuperNode {pid} within {timeout_s:.0f} s")


# every round queries every hospital (the tiny config's proxy set is covered after two rounds, after which a
# coordinator that holds every answer would stop asking): fault tests and latency measure query rounds
STUDY_DEFAULTS = ("query.requery_held=true",)


@dataclass
class Deployment:
    """A coordinator folder, hospital folders, and the processes started from them."""

    root: Path
    data_dir: Path
    config: Path = REPO / "configs" / "tiny.yaml"
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

    def output(self, name: str, *, since: int = 0) -> str:
        return self.logs[name].read_text(errors="replace")[since:] if name in self.logs else ""

    def wait_for(self, name: str, text: str, *, timeout_s: float = 600, since: int = 0) -> None:
        """Wait until process ``name``'s output (from offset ``since``) contains ``text``; fail if it exits first."""
        deadline = time.monotonic() + timeout_s
        while text not in self.output(name, since=since):
            if self.processes[name].poll() is not None and text not in self.output(name, since=since):
                raise RuntimeError(f"{name} exited before printing {text!r}:\n{self.output(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not print {text!r} within {timeout_s:.0f} s")
            time.sleep(0.3)

    def make_certs(self) -> None:
        _ok(self.medkd("certs", str(self.coordinator / "certs")))

    def start_server(self) -> subprocess.Popen[bytes]:
        mark = len(self.output("coordinator"))
        proc = self.spawn("coordinator", "server", "start", str(self.coordinator), "--host", "127.0.0.1",
                          "--port", str(self.port))
        self.wait_for("coordinator", "SuperLink up on", timeout_s=90, since=mark)
        return proc

    def init_hospital(self, index: int, *, name: str | None = None, overrides: tuple[str, ...] = (),
                      teacher: Path | None = None) -> Path:
        name = name or f"H{index}"
        folder = self.root / name
        done = self.medkd("client", "init", str(folder), "--name", name, "--superlink", f"127.0.0.1:{self.port}",
                          "--ca-cert", str(self.coordinator / "certs" / "ca.crt"), "--clientapp-port",
                          str(free_port()), "--config", str(self.config), "--index", str(index),
                          "--set", f"data.data_dir={self.data_dir}", *overrides)
        _ok(done)
        if teacher is not None:  # a teacher trained once for the session (same policy, same fingerprint)
            shutil.copyfile(teacher, folder / "teacher.pt")
        return folder

    def federation(self, *, hospitals: int = 3, teachers: dict[str, Path] | None = None,
                   overrides: tuple[str, ...] = (), train_teachers: bool = False) -> None:
        """Certificates, the coordinator, and ``hospitals`` registered hospitals, all started."""
        self.make_certs()
        self.start_server()
        for i in range(hospitals):
            self.init_hospital(i, teacher=(teachers or {}).get(f"H{i}"), overrides=overrides)
            self.register(f"H{i}")
            if train_teachers:
                _ok(self.medkd("client", "train-teacher", str(self.root / f"H{i}")))
        for i in range(hospitals):
            self.start_hospital(f"H{i}")

    def spawn_study(self, out: Path, *overrides: str) -> subprocess.Popen[bytes]:
        return self.spawn("study", "server", "run", str(self.coordinator), "--config",
                          str(self.config), "--set", f"data.data_dir={self.data_dir}", *STUDY_DEFAULTS, *overrides,
                          "--out", str(out))

    def register(self, name: str) -> None:
        _ok(self.medkd("server", "register", str(self.coordinator), "--name", name,
                       str(self.root / name / "keys" / "auth.pub")))

    def start_hospital(self, name: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, "client", "start", str(self.root / name))

    def run_study(self, out: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return self.medkd("server", "run", str(self.coordinator), "--config", str(self.config),
                          "--set", f"data.data_dir={self.data_dir}", *STUDY_DEFAULTS, *overrides, "--out", str(out),
                          timeout=timeout)

    def metrics(self, out: Path) -> dict:
        return json.loads((out / "metrics.json").read_text())

    def close(self) -> None:
        hospitals = [n for n in self.processes if n not in ("coordinator", "study")]
        for name in ["study", *hospitals, "coordinator"]:
            if name not in self.processes:
                continue
            stop_tree(self.processes[name])


def _ok(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(done.args[3:6])} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")


def outbound(folder: Path) -> list[dict]:
    path = folder / "outbound.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
