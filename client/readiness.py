"""``medkd client check DIR``: is this hospital ready to join the study? One line per check, then a verdict.

Each check is ``ok``, ``warn`` (works, but read this) or ``fail`` (the daemon would not work). The hospital is
ready when nothing fails. Checks: the policy, the node settings, the data (the split the policy describes), the
teacher, the authentication key pair, the CA certificate, the ``flower-supernode`` program, and a TLS handshake
with the coordinator that verifies its certificate against the study CA (the network path a SuperNode uses).
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.daemon import AUTH_PUB, NodeSettings, load_node_settings, resolve
from common.certs import check_auth_keypair, check_certificate
from common.errors import MedkdError
from common.policy import POLICY_FILE, HospitalPolicy, hospital_experiment, load_policy

logger = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


@dataclass(frozen=True)
class Readiness:
    checks: list[Check]

    @property
    def ready(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def verdict(self) -> str:
        failed = [c.name for c in self.checks if c.status == FAIL]
        warned = [c.name for c in self.checks if c.status == WARN]
        if failed:
            return f"NOT READY: fix {', '.join(failed)} (details above), then run this check again"
        if warned:
            return f"READY (with warnings: {', '.join(warned)})"
        return "READY: start the daemon with `medkd client start DIR`"


def _run(name: str, checks: list[Check], fn: Callable[[], tuple[str, str]]) -> None:
    try:
        status, detail = fn()
    except (MedkdError, OSError, ValueError) as e:
        status, detail = FAIL, str(e)
    checks.append(Check(name, status, detail))


def check_hospital(folder: Path, *, connect_timeout_s: float = 5.0) -> Readiness:
    """Run every check on the hospital in ``folder`` (nothing is changed, nothing leaves but a TLS handshake)."""
    folder = Path(folder).resolve()
    checks: list[Check] = []
    state: dict[str, object] = {}

    def policy() -> tuple[str, str]:
        p = load_policy(folder / POLICY_FILE)
        state["policy"] = p
        return OK, f"hospital {p.hospital}; answers teacher outputs {[k.value for k in p.outputs.kinds]}, at most " \
                   f"{p.limits.max_indices_per_query} samples per query, {p.limits.max_indices_per_run} per run"

    def node() -> tuple[str, str]:
        s = load_node_settings(folder)
        state["node"] = s
        if s.insecure:
            return WARN, f"coordinator {s.superlink} WITHOUT TLS (insecure: true): for tests only"
        return OK, f"coordinator {s.superlink}, TLS verified with {s.root_certificates}"

    _run("policy", checks, policy)
    _run("node settings", checks, node)
    pol = state.get("policy")
    settings = state.get("node")
    _run("data", checks, lambda: _check_data(pol) if isinstance(pol, HospitalPolicy) else (FAIL, "needs the policy"))
    _run("teacher", checks, lambda: _check_teacher(pol, folder) if isinstance(pol, HospitalPolicy)
         else (FAIL, "needs the policy"))
    if isinstance(settings, NodeSettings):
        _run("keys", checks, lambda: (OK, "EC P-384 key pair matches; public key " + str(folder / AUTH_PUB) + ": "
                                      + check_auth_keypair(resolve(folder, settings.auth_key),
                                                           folder / AUTH_PUB)[:40] + "..."))
        if not settings.insecure:
            _run("certificates", checks, lambda: _check_ca(resolve(folder, settings.root_certificates)))
        _run("flower-supernode", checks, lambda: (OK, str(shutil.which("flower-supernode"))) if shutil.which(
            "flower-supernode") else (FAIL, "flower-supernode not found on PATH (install flwr in this environment)"))
        _run("approved code", checks, lambda: _check_approved(folder))
        _run("coordinator", checks, lambda: _check_connection(folder, settings, timeout_s=connect_timeout_s))
    return Readiness(checks)


def _check_data(policy: HospitalPolicy) -> tuple[str, str]:
    from common.split import make_split

    cfg = hospital_experiment(policy)
    split = make_split(cfg)
    own = split.hospital(policy.share.index)
    n = int(own.labels.shape[0])
    if n < 2 * split.data.n_classes:
        return WARN, f"only {n} private samples for {split.data.n_classes} classes"
    return OK, (f"{split.data.name}: {n} private samples, {split.data.n_classes} classes; public proxy set "
                f"{split.proxy.labels.shape[0]} samples (manifest {split.proxy_hash[:12]})")


def _check_teacher(policy: HospitalPolicy, folder: Path) -> tuple[str, str]:
    from client.teacher import TEACHER_FILE, TeacherInfo, teacher_fingerprint
    from common.atomic import load_saved
    from common.split import make_split

    path = policy.folder_path(folder / POLICY_FILE) / TEACHER_FILE
    if not path.exists():
        return WARN, "no teacher yet: run `medkd client train-teacher DIR` (else it trains on the first query)"
    loaded = load_saved(path, TeacherInfo, what="teacher checkpoint")
    if loaded is None:
        return FAIL, f"{path} cannot be read; run `medkd client train-teacher DIR --retrain`"
    _, info = loaded
    cfg = hospital_experiment(policy)
    if info.fingerprint != teacher_fingerprint(cfg, make_split(cfg), policy.share.index):
        return WARN, f"{path} was trained from other data or settings; it will be retrained on the first query"
    return OK, f"{info.model}, local validation AUC {info.val_auc:.3f} on {info.num_val} samples"


def _check_approved(folder: Path) -> tuple[str, str]:
    from client.approval import APPROVED_FILE, approved_hashes

    if not (folder / APPROVED_FILE).exists():
        return WARN, (f"no {APPROVED_FILE}: any app the coordinator submits would run here; pin the reviewed "
                      "release with `medkd client approve DIR --app SOURCE`")
    hashes = approved_hashes(folder / APPROVED_FILE)
    return OK, f"{len(hashes)} approved app bundle(s): " + ", ".join(sorted(h[:12] for h in hashes))


def _check_ca(path: Path) -> tuple[str, str]:
    cert = check_certificate(path)
    return OK, f"{path.name}: {cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"


def _check_connection(folder: Path, settings: NodeSettings, *, timeout_s: float) -> tuple[str, str]:
    host, port = settings.host_port()
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        return FAIL, f"cannot reach {host}:{port}: {e.strerror or e} (is the coordinator up? a firewall?)"
    with raw:
        if settings.insecure:
            return WARN, f"{host}:{port} reachable (no TLS: not verified)"
        context = ssl.create_default_context(cafile=str(resolve(folder, settings.root_certificates)))
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                peer = tls.getpeercert() or {}
                version = tls.version()
        except ssl.SSLCertVerificationError as e:
            return FAIL, (f"{host}:{port} answered but its certificate is not trusted: {e.verify_message} "
                          "(wrong ca.crt, or the server certificate lacks this host name)")
        except (ssl.SSLError, OSError) as e:
            return FAIL, f"TLS handshake with {host}:{port} failed: {e}"
    subject = dict(x[0] for x in peer.get("subject", ()))
    return OK, f"{host}:{port} reachable, {version}, certificate of {subject.get('commonName', '?')} verified"
