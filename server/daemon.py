"""The coordinator's daemon: ``flower-superlink`` with TLS, node authentication and a persistent state database.

The coordinator's folder ``DIR``::

    DIR/certs/             ``medkd certs DIR/certs --host <name>``: ca.crt (public), ca.key, server.crt, server.key
    DIR/server.yaml        host, port, insecure (written by ``medkd server start``)
    DIR/hospital-keys/     NAME.pub: each hospital's public authentication key, registered under NAME
    DIR/registered.json    NAME -> Flower node ID and the key's SHA-256, for every registered hospital
    DIR/state.db           the SuperLink's state (runs, registered nodes); survives restarts
    DIR/superlink.log      the SuperLink's log (joins, refusals of unknown keys)
    DIR/flwr-home/         FLWR_HOME of the coordinator's Flower processes and of ``flwr`` commands

A hospital is known by the name it was registered with: Flower keeps that name in the node's record, and
:mod:`server.identity` reads it, so replies are attributed to NAME and never to what a reply claims.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from common.atomic import atomic_write_json, atomic_write_text
from common.certs import CertPaths, check_certificate
from common.errors import ConfigError, MedkdError
from common.policy import HOSPITAL_NAME
from common.processes import StopRequested, become_subreaper, stop_on_signals, stop_tree

logger = logging.getLogger(__name__)

SERVER_FILE = "server.yaml"
KEYS_DIR = "hospital-keys"
REGISTERED_FILE = "registered.json"
DATABASE = "state.db"
LOG_FILE = "superlink.log"
PID_FILE = "superlink.pid"
FLWR_HOME = "flwr-home"
CONNECTION = "medkd"  # the connection name in DIR/flwr-home/config.toml
INSECURE_WARNING = ("WARNING: --insecure: the coordinator runs WITHOUT TLS. Hospitals cannot verify it and all "
                    "traffic is readable on the network. Use it only on a test machine.")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 9093
    insecure: bool = False


def load_server_settings(folder: Path) -> ServerSettings:
    path = Path(folder) / SERVER_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror or e}; run `medkd server start {folder}` first"]) \
            from e
    unknown = [k for k in raw if k not in ServerSettings.__dataclass_fields__]
    if unknown:
        raise ConfigError(str(path), [f"{k}: unknown key" for k in unknown])
    return ServerSettings(**raw)


def flwr_env(folder: Path) -> dict[str, str]:
    """Environment of every Flower process of the coordinator (own FLWR_HOME, no telemetry, offline)."""
    return {**os.environ, "FLWR_HOME": str(Path(folder).resolve() / FLWR_HOME), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def write_connection(folder: Path, settings: ServerSettings) -> None:
    """``DIR/flwr-home/config.toml``: the ``medkd`` connection the ``flwr`` commands use to reach this SuperLink."""
    folder = Path(folder).resolve()
    (folder / FLWR_HOME).mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "127.0.0.1:{settings.port}"']
    if settings.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{CertPaths(folder / "certs").ca_cert}"')
    atomic_write_text(folder / FLWR_HOME / "config.toml", "\n".join(lines) + "\n")


def superlink_command(folder: Path, settings: ServerSettings) -> list[str]:
    """The ``flower-superlink`` command line for the coordinator in ``folder``."""
    folder = Path(folder).resolve()
    exe = shutil.which("flower-superlink") or str(Path(sys.executable).parent / "flower-superlink")
    argv = [exe, "--host", settings.host, "--port", str(settings.port), "--database", str(folder / DATABASE),
            "--log-file", str(folder / LOG_FILE), "--disable-runtime-dependency-installation",
            "--enable-supernode-auth"]
    if settings.insecure:
        return [*argv, "--insecure"]
    certs = CertPaths(folder / "certs")
    ca = check_certificate(certs.ca_cert)
    check_certificate(certs.server_cert, ca=ca)
    if not certs.server_key.exists():
        raise MedkdError(f"{certs.server_key} is missing; run `medkd certs {certs.folder} --host <this host>`")
    return [*argv, "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key)]


def wait_for_port(port: int, *, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (or the process exits, or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise MedkdError(f"flower-superlink exited with status {proc.returncode} while starting; see its log")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise MedkdError(f"the SuperLink did not open port {port} within {timeout_s:.0f} s")


def _key_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes().split()[1]).hexdigest()


def _registered(folder: Path) -> dict[str, dict[str, object]]:
    path = Path(folder) / REGISTERED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def add_hospital_key(folder: Path, *, name: str, public_key: Path) -> Path:
    """Copy a hospital's public key into ``DIR/hospital-keys/NAME.pub`` after checking it (EC P-384, OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not HOSPITAL_NAME.match(name):
        raise MedkdError(f"hospital name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    try:
        key = serialization.load_ssh_public_key(Path(public_key).read_bytes())
    except (OSError, ValueError) as e:
        raise MedkdError(f"cannot read hospital {name}'s public key {public_key}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise MedkdError(f"hospital {name}'s key {public_key} is not EC P-384 (made by `medkd client init`)")
    target = Path(folder) / KEYS_DIR / f"{name}.pub"
    if target.exists() and _key_sha(target) != _key_sha(Path(public_key)):
        raise MedkdError(f"hospital {name} already has another key in {target}; `medkd server unregister "
                         f"{folder} --name {name}` first (key rotation)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public_key, target)
    return target


def register_keys(folder: Path) -> dict[str, int]:
    """Register every key in ``DIR/hospital-keys`` not yet registered (the SuperLink must be up); name -> node ID.

    Raises
    ------
    MedkdError
        If Flower refuses a key for another reason than that it is already registered.
    """
    folder = Path(folder).resolve()
    registered = _registered(folder)
    added: dict[str, int] = {}
    for pub in sorted((folder / KEYS_DIR).glob("*.pub")):
        name, sha = pub.stem, _key_sha(pub)
        if registered.get(name, {}).get("sha256") == sha:
            continue
        done = subprocess.run(["flwr", "supernode", "register", str(pub), CONNECTION, "--name", name, "--format",
                               "json"], env=flwr_env(folder), capture_output=True, text=True, timeout=60)
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            answer = {"success": False, "error-message": (done.stdout + done.stderr)[-500:]}
        if not answer.get("success"):
            raise MedkdError(f"registering hospital {name} ({pub}) failed: "
                             f"{str(answer.get('error-message', '')).strip()}")
        registered[name] = {"node_id": int(answer["node-id"]), "sha256": sha}
        added[name] = int(answer["node-id"])
        atomic_write_json(folder / REGISTERED_FILE, registered)
        logger.info("registered hospital %s as node %s", name, answer["node-id"])
    return added


def unregister_hospital(folder: Path, *, name: str) -> None:
    """Unregister hospital ``name`` (its key no longer joins) and remove its key from ``DIR/hospital-keys``."""
    folder = Path(folder).resolve()
    registered = _registered(folder)
    if name not in registered:
        raise MedkdError(f"hospital {name} is not registered (see {folder / REGISTERED_FILE})")
    done = subprocess.run(["flwr", "supernode", "unregister", str(registered[name]["node_id"]), CONNECTION,
                           "--format", "json"], env=flwr_env(folder), capture_output=True, text=True, timeout=60)
    if '"success": true' not in done.stdout:
        raise MedkdError(f"unregistering hospital {name} failed: {(done.stdout + done.stderr).strip()[-500:]}")
    del registered[name]
    atomic_write_json(folder / REGISTERED_FILE, registered)
    (folder / KEYS_DIR / f"{name}.pub").unlink(missing_ok=True)
    logger.info("unregistered hospital %s", name)


def superlink_running(folder: Path) -> bool:
    try:
        pid = int((Path(folder) / PID_FILE).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def start_superlink(folder: Path, settings: ServerSettings, *, start_timeout_s: float = 60.0,
                    stop_grace_s: float = 20.0) -> int:
    """Run the SuperLink in the foreground until it exits or this process gets SIGTERM/SIGINT; returns its status.

    The SuperLink is a child process. SIGTERM or Ctrl-C here stops it and everything it started: it gets
    SIGTERM and ``stop_grace_s`` seconds to stop cleanly (its database stays consistent); its SuperExec and
    ServerApp processes still running after that are ended and logged (:func:`common.processes.stop_tree`),
    and the exit status is 0. Hospitals' keys in ``DIR/hospital-keys`` are registered as soon as it is up.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SERVER_FILE, yaml.safe_dump(asdict(settings), sort_keys=False))
    write_connection(folder, settings)
    argv = superlink_command(folder, settings)
    if settings.insecure:
        logger.warning("%s", INSECURE_WARNING)
    become_subreaper()  # a SuperExec or ServerApp orphaned by a stopped SuperLink stays in this process's tree
    stopping: list[int] = []
    stop_on_signals(stopping)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(argv, env=flwr_env(folder), cwd=folder)
        atomic_write_text(folder / PID_FILE, f"{proc.pid}\n")
        wait_for_port(settings.port, timeout_s=start_timeout_s, proc=proc)
        logger.info("SuperLink up on %s:%d (TLS %s, node authentication on, state in %s)", settings.host,
                    settings.port, "off" if settings.insecure else "on", folder / DATABASE)
        for name, node in register_keys(folder).items():
            logger.info("hospital %s may join (node %d)", name, node)
        code = proc.wait()
        logger.error("the SuperLink exited by itself (status %d); see %s", code, folder / LOG_FILE)
        return code if code >= 0 else 128 - code
    except StopRequested:
        ended = stop_tree(proc, grace_s=stop_grace_s, adopted=True) if proc is not None else []
        logger.info("SuperLink stopped (%s)%s; nothing of it is left running; state kept in %s. Start it again "
                    "with `medkd server start %s`; a study that was running resumes after its last checkpointed "
                    "round when its `medkd server run` command is run again", signal.Signals(stopping[0]).name,
                    f", {len(ended)} leftover process(es) ended" if ended else "", folder / DATABASE, folder)
        return 0
    finally:
        if proc is not None and not stopping:  # an error, or the SuperLink exited: nothing of it stays behind
            stop_tree(proc, grace_s=stop_grace_s, adopted=True)
        (folder / PID_FILE).unlink(missing_ok=True)
