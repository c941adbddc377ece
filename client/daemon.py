"""A deployed hospital: its folder, and the ``flower-supernode`` daemon that serves the hospital's ClientApp.

Everything a hospital holds stays in its folder ``DIR`` (``medkd client init DIR`` makes it)::

    DIR/policy.yaml        what this hospital answers and what may leave it (the hospital's own file)
    DIR/node.yaml          where the coordinator is and how to reach it (address, TLS, local port)
    DIR/keys/auth.key      private key proving this hospital's identity to the coordinator (never leaves)
    DIR/keys/auth.pub      its public half: send it to the coordinator once, to be registered
    DIR/certs/ca.crt       the study's CA certificate, from the coordinator: verifies the coordinator
    DIR/flwr-home/         Flower's own files (installed app bundles); FLWR_HOME points here
    DIR/teacher.pt         the hospital's teacher (made by ``medkd client train-teacher`` or on first query)
    DIR/outbound.jsonl     one line per reply that left the hospital (SHA-256 of the exact bytes)
    DIR/hospital.log       the hospital's own log (refusals, ignored coordinator requests)
    DIR/approved-apps.txt  (optional) SHA-256 of the app bundles this hospital runs (``medkd client approve``)

``medkd client start DIR`` runs ``flower-supernode`` in the foreground (SIGTERM/Ctrl-C stop it and all it
started), with TLS, the authentication key, ``node_config`` pointing at ``DIR/policy.yaml``, runtime dependency
installation left off (the default of ``flower-supernode``), and ``FLWR_HOME=DIR/flwr-home``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from client.approval import APPROVED_ENV, APPROVED_FILE, approved_hashes, write_launcher
from common.atomic import atomic_write_text
from common.certs import write_auth_keypair
from common.errors import ConfigError, MedkdError
from common.policy import POLICY_FILE, HospitalPolicy, load_policy, write_policy
from common.processes import StopRequested, become_subreaper, stop_on_signals, stop_tree

logger = logging.getLogger(__name__)

NODE_FILE = "node.yaml"
AUTH_KEY = Path("keys") / "auth.key"
AUTH_PUB = Path("keys") / "auth.pub"
CA_CERT = Path("certs") / "ca.crt"
FLWR_HOME = "flwr-home"
DEFAULT_CLIENTAPP_PORT = 9094
_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")

INSECURE_WARNING = ("WARNING: --insecure: traffic between this hospital and the coordinator is NOT encrypted and the "
                    "coordinator is NOT verified. Use it only on a test machine, never with patient-derived data.")


@dataclass(frozen=True)
class NodeSettings:
    """``node.yaml``: how this hospital's SuperNode reaches the coordinator (paths relative to DIR)."""

    superlink: str  # coordinator address host:port
    root_certificates: str = str(CA_CERT)
    auth_key: str = str(AUTH_KEY)
    insecure: bool = False
    clientapp_port: int = DEFAULT_CLIENTAPP_PORT  # SuperNode's local ClientApp API, on 127.0.0.1 only
    trusted_entities: str | None = None  # YAML of publisher keys whose signed apps this hospital runs

    def host_port(self) -> tuple[str, int]:
        match = _ADDRESS.match(self.superlink)
        if not match:
            raise ConfigError(NODE_FILE, [f"superlink: expected host:port, got {self.superlink!r}"])
        return match["host"].strip("[]"), int(match["port"])


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); raises ConfigError naming the value."""
    return NodeSettings(superlink=address).host_port()


def load_node_settings(folder: Path) -> NodeSettings:
    """Read and validate ``DIR/node.yaml``.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, or a key is unknown or invalid (all problems at once).
    """
    path = Path(folder) / NODE_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror or e}; run `medkd client init {folder}`"]) from e
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["expected a mapping of keys"])
    known = set(NodeSettings.__dataclass_fields__)
    problems = [f"{k}: unknown key (known: {', '.join(sorted(known))})" for k in raw if k not in known]
    if "superlink" not in raw:
        problems.append("superlink: required (the coordinator's host:port)")
    if problems:
        raise ConfigError(str(path), problems)
    settings = NodeSettings(**raw)
    if not isinstance(settings.insecure, bool):
        problems.append(f"insecure: expected true or false, got {settings.insecure!r}")
    if not isinstance(settings.clientapp_port, int) or not 0 < settings.clientapp_port < 65536:
        problems.append(f"clientapp_port: expected a port number, got {settings.clientapp_port!r}")
    try:
        settings.host_port()
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(str(path), problems)
    return settings


def write_node_settings(folder: Path, settings: NodeSettings) -> None:
    header = ("# How this hospital's SuperNode reaches the coordinator (medkd client start reads this).\n"
              "# Paths are relative to this folder.\n")
    atomic_write_text(Path(folder) / NODE_FILE, header + yaml.safe_dump(asdict(settings), sort_keys=False))


def resolve(folder: Path, relative: str) -> Path:
    path = Path(relative).expanduser()
    return path if path.is_absolute() else Path(folder) / path


def init_hospital(folder: Path, *, policy: HospitalPolicy, superlink: str, ca_cert: Path | None,
                  insecure: bool = False, clientapp_port: int = DEFAULT_CLIENTAPP_PORT,
                  trusted_entities: Path | None = None) -> list[tuple[Path, str]]:
    """Make a hospital folder: policy, node settings, key pair, CA certificate. Returns (file, what it is) rows.

    Raises
    ------
    MedkdError
        If ``folder`` already holds a policy (``init`` never overwrites a hospital), or TLS is on and no CA
        certificate is given.
    """
    folder = Path(folder).resolve()
    if (folder / POLICY_FILE).exists():
        raise MedkdError(f"{folder / POLICY_FILE} exists: this folder is already a hospital; edit its files instead")
    if ca_cert is None and not insecure:
        raise MedkdError("give --ca-cert FILE (the study's ca.crt from the coordinator), or --insecure for a test")
    parse_address(superlink)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FLWR_HOME).mkdir(exist_ok=True)
    write_policy(folder / POLICY_FILE, policy, comment=f"Policy of hospital {policy.hospital}: the only source of "
                 "what this hospital does and releases.\nThe coordinator cannot change it. Keys: see README "
                 "(policy reference).")
    load_policy(folder / POLICY_FILE)  # read back, as the ClientApp will
    write_auth_keypair(folder / AUTH_KEY, folder / AUTH_PUB, comment=policy.hospital)
    rows = [
        (folder / POLICY_FILE, "this hospital's policy: data, teacher, what it answers and what may leave"),
        (folder / NODE_FILE, f"where the coordinator is ({superlink}) and how to reach it"),
        (folder / AUTH_KEY, "PRIVATE authentication key (mode 0600): never copy it off this machine"),
        (folder / AUTH_PUB, "public key: send it to the coordinator, who registers it under the name "
                            f"{policy.hospital}"),
    ]
    entities = None
    if trusted_entities is not None:
        entities = str(Path("certs") / "trusted-entities.yaml")
        (folder / "certs").mkdir(exist_ok=True)
        shutil.copyfile(trusted_entities, folder / entities)
        rows.append((folder / entities, "publisher keys whose signed app bundles this hospital runs (approved code)"))
    if ca_cert is not None:
        (folder / "certs").mkdir(exist_ok=True)
        shutil.copyfile(ca_cert, folder / CA_CERT)
        rows.append((folder / CA_CERT, "the study's CA certificate: proves the coordinator is who it says"))
    write_node_settings(folder, NodeSettings(superlink=superlink, insecure=insecure, clientapp_port=clientapp_port,
                                             trusted_entities=entities))
    rows += [
        (folder / FLWR_HOME, "Flower's working files (installed app bundles); safe to delete while stopped"),
        (folder / "teacher.pt", "(later) the teacher: `medkd client train-teacher`, or trained on the first query"),
        (folder / "outbound.jsonl", "(later) one line per reply that left this hospital, with its SHA-256"),
        (folder / "hospital.log", "(later) this hospital's own log: refusals, ignored coordinator requests"),
    ]
    if insecure:
        logger.warning("%s", INSECURE_WARNING)
    return rows


def rotate_key(folder: Path) -> Path:
    """Move the current key pair to ``keys/retired-<time>/`` and make a new one; returns the new public key."""
    folder = Path(folder).resolve()
    name = load_policy(folder / POLICY_FILE).hospital
    retired = folder / "keys" / f"retired-{time.strftime('%Y%m%d-%H%M%S')}"
    retired.mkdir(parents=True)
    for path in (folder / AUTH_KEY, folder / AUTH_PUB):
        if path.exists():
            path.rename(retired / path.name)
    write_auth_keypair(folder / AUTH_KEY, folder / AUTH_PUB, comment=name)
    return folder / AUTH_PUB


def train_hospital_teacher(folder: Path, *, retrain: bool = False) -> dict[str, object]:
    """Train (or load) the hospital's teacher from its own policy; returns its local figures."""
    from client.hospital import load_hospital
    from client.teacher import load_or_train_teacher
    from common.split import make_split

    hospital = load_hospital(Path(folder).resolve() / POLICY_FILE)
    _, info = load_or_train_teacher(cfg=hospital.cfg, split=make_split(hospital.cfg), hospital=hospital.index,
                                    hospital_dir=hospital.folder, retrain=retrain)
    return {"hospital": hospital.name, "model": info.model, "num_private": info.num_private,
            "val_auc": info.val_auc, "val_acc": info.val_acc, "epochs_run": info.epochs_run,
            "path": str(hospital.folder / "teacher.pt")}


def supernode_command(folder: Path) -> tuple[list[str], dict[str, str]]:
    """The ``flower-supernode`` command line and environment for the hospital in ``folder``.

    Raises
    ------
    ConfigError
        If ``node.yaml`` is missing or invalid.
    MedkdError
        If a file it names (CA certificate, key, trusted entities) is missing.
    """
    folder = Path(folder).resolve()
    settings = load_node_settings(folder)
    exe = shutil.which("flower-supernode") or str(Path(sys.executable).parent / "flower-supernode")
    argv = [exe, "--superlink", settings.superlink, "--port", str(settings.clientapp_port), "--host", "127.0.0.1",
            "--node-config", f'policy="{folder / POLICY_FILE}"']
    needed: list[Path] = [folder / POLICY_FILE, resolve(folder, settings.auth_key)]
    if settings.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(resolve(folder, settings.root_certificates))]
        needed.append(resolve(folder, settings.root_certificates))
    argv += ["--auth-supernode-private-key", str(resolve(folder, settings.auth_key))]
    if settings.trusted_entities:
        argv += ["--trusted-entities", str(resolve(folder, settings.trusted_entities))]
        needed.append(resolve(folder, settings.trusted_entities))
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise MedkdError(f"hospital folder {folder} is missing {', '.join(missing)}; run `medkd client check "
                         f"{folder}`")
    env = {**os.environ, "FLWR_HOME": str(folder / FLWR_HOME), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if (folder / APPROVED_FILE).exists():  # approved code only: a launcher checks each bundle's hash first
        approved_hashes(folder / APPROVED_FILE)  # a malformed list stops the start, not a round
        env["PATH"] = f"{write_launcher(folder)}{os.pathsep}{env.get('PATH', '')}"
        env[APPROVED_ENV] = str(folder / APPROVED_FILE)
    return argv, env


ACTIVATION_REFUSED = "Failed to activate SuperNode"  # flower-supernode's message (Flower exit code 305)
KEY_REFUSED_EXIT = 3  # `medkd client start`'s exit status when the coordinator keeps refusing this key
REJOIN_WAIT_S = 120.0  # a node that died without signing off stays "online" for about a minute


def _pass_through(proc: subprocess.Popen[str], refused: list[bool]) -> None:
    """Copy the SuperNode's output to ours; note in ``refused`` when the coordinator refused activation."""
    for line in proc.stdout or ():
        if ACTIVATION_REFUSED in line and not refused:
            refused.append(True)
        sys.stdout.write(line)
        sys.stdout.flush()


def start_supernode(folder: Path, *, rejoin_wait_s: float = REJOIN_WAIT_S, retry_every_s: float = 10.0,
                    stop_grace_s: float = 20.0) -> int:
    """Run the hospital's ``flower-supernode`` in the foreground until it stops; returns its exit status.

    Its output passes through unchanged. SIGTERM or Ctrl-C here stops it and everything it started: the
    SuperNode gets SIGTERM and ``stop_grace_s`` seconds to sign off; its ClientApp and SuperExec processes that
    are still running after that are ended and logged (:func:`common.processes.stop_tree`), so nothing of the
    hospital is left running; the exit status is then 0. If the coordinator refuses to activate the node, the
    start is retried every ``retry_every_s`` for up to ``rejoin_wait_s``: after a crash the coordinator still
    sees this hospital online until its heartbeats expire. A key the coordinator never registered is refused
    for good once that time is up (exit status 3).
    """
    argv, env = supernode_command(folder)
    if load_node_settings(Path(folder)).insecure:
        logger.warning("%s", INSECURE_WARNING)
    logger.info("starting: %s", " ".join(argv))
    become_subreaper()  # SuperExec and ClientApps orphaned by a stopped SuperNode stay in this process's tree
    stopping: list[int] = []
    stop_on_signals(stopping)
    deadline = time.monotonic() + rejoin_wait_s
    code, refused, proc = 0, False, None
    try:
        while True:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
            seen: list[bool] = []
            # a reader thread, not a loop here: the SuperNode's own children inherit the pipe and may outlive it
            reader = threading.Thread(target=_pass_through, args=(proc, seen), daemon=True)
            reader.start()
            code = proc.wait()
            stop_tree(proc, grace_s=stop_grace_s, adopted=True)  # what the SuperNode left behind
            reader.join(timeout=2.0)
            refused = bool(seen)
            if not refused or time.monotonic() + retry_every_s > deadline:
                break
            logger.warning("the coordinator refused to activate this hospital's node: either it still sees it "
                           "online after a crash, or its key is not registered; retrying in %.0f s", retry_every_s)
            time.sleep(retry_every_s)
    except StopRequested:
        ended = stop_tree(proc, grace_s=stop_grace_s, adopted=True) if proc is not None else []
        logger.info("hospital daemon stopped (%s)%s; nothing of it is left running; start it again with "
                    "`medkd client start %s`", signal.Signals(stopping[0]).name,
                    f", {len(ended)} leftover process(es) ended" if ended else "", folder)
        return 0
    if refused:
        logger.error("the coordinator refused this hospital's key: ask the coordinator to register "
                     "keys/auth.pub under this hospital's name (`medkd server register`)")
        return KEY_REFUSED_EXIT
    logger.info("hospital daemon stopped (flower-supernode exit %d); start it again with `medkd client start %s`",
                code, folder)
    return code if code >= 0 else 128 - code
