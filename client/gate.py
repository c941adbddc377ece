"""The one exit of a hospital: every reply its ClientApp sends passes :meth:`OutboundGate.guard`.

The gate wraps the whole ClientApp (``client.app.HospitalApp``), outside
every handler and every Flower mod, so that nothing runs after it:

1. it runs the handler and turns any exception into an error reply. A
   refusal (:class:`~common.errors.PayloadError`, including a
   :class:`~common.errors.PolicyRefusal`) says what was refused and which
   field or policy key; any other failure says only that the hospital could
   not answer. Local paths and exception internals stay in the hospital's
   own log (``hospital.log``), never in the reply;
2. it checks that the reply holds only the records its message kind allows
   (teacher outputs for ``query.logits``, metrics for ``train.teacher``,
   model weights for ``train`` only where the policy opted in) and is not
   too large; a reply that breaks this is withheld and replaced by an error;
3. it charges the privacy ledger for every release the handler staged
   (:func:`stage_charge`): a release past the policy's budget is refused
   with "privacy budget exhausted" and nothing else leaves; otherwise the
   reply's metrics get the hospital's ε and δ after it;
4. it serialises the reply exactly as it will travel (a query reply first
   stamped with the audit log's head, ``hospital.audit_seq``/``audit_head``,
   for the coordinator's receipt), appends a signed ``release`` record to the
   hash-chained audit log (:mod:`client.audit_log`: payload hash, shape and
   dtype, proxy manifest and indices, mechanism and ε; the bytes archived),
   then one summary line to ``outbound.jsonl`` (single write + fsync), then a
   ``sent`` record, and sends a fresh copy decoded from those very bytes, so
   that nothing can change the payload after it was hashed and logged. If a
   log cannot be written the error propagates and nothing is sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Error, Message
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from client.audit_log import AuditLog
from client.hospital import LOCAL_LOG, OUTBOUND_LOG
from client.ledger import BudgetExhausted, PrivacyLedger, read_entries
from client.privacy import describe
from common.accounting import PrivacyEvent, epsilon
from common.config import PolicyPrivacy, PrivacyMechanism
from common.errors import DataError, PayloadError, PolicyError
from common.payload import (BUDGET_EXHAUSTED_CODE, FEDAVG_MESSAGE_TYPE, HOSPITAL_ERROR_CODE, QUERY_MESSAGE_TYPE,
                            QUERY_REJECTED_CODE, TEACHER_MESSAGE_TYPE, WITHHELD_CODE, wire_bytes)

logger = logging.getLogger(__name__)

MAX_REASON = 400
_PATH = re.compile(r"(?:(?<=\s)|(?<=^)|(?<=['\"(=]))(?:~|[A-Za-z]:)?[/\\][^\s'\",;)]*")

# message type -> (ArrayRecords, MetricRecords, ConfigRecords) its reply may carry
_REPLY_RECORDS: dict[str, tuple[set[str], set[str], set[str]]] = {
    QUERY_MESSAGE_TYPE: ({"outputs"}, {"metrics"}, {"hospital"}),
    TEACHER_MESSAGE_TYPE: (set(), {"metrics"}, set()),
    FEDAVG_MESSAGE_TYPE: ({"arrays"}, {"metrics"}, {"hospital"}),
}


@dataclass(frozen=True)
class Charge:
    """A release a handler prepared, to be charged by the gate before it leaves.

    ``on_release`` runs after the ledger accepted the charge (e.g. recording
    the released values so that a repeated query is answered for free).
    """

    event: PrivacyEvent
    description: str
    on_release: Callable[[], None] | None = None


_STAGED: ContextVar[list[Charge] | None] = ContextVar("medkd_staged_charges", default=None)


def stage_charge(charge: Charge) -> None:
    """Stage ``charge`` with the gate now guarding this reply; it is charged before anything leaves."""
    staged = _STAGED.get()
    if staged is None:
        raise RuntimeError("a privacy charge was staged outside OutboundGate.guard: every release must pass the gate")
    staged.append(charge)


def scrub(text: str) -> str:
    """``text`` without anything that looks like a file path, cut to :data:`MAX_REASON` characters."""
    clean = _PATH.sub("<path>", text)
    return clean if len(clean) <= MAX_REASON else clean[: MAX_REASON - 3] + "..."


class OutboundGate:
    """Checks, records and releases every reply of one hospital."""

    def __init__(self, *, hospital: str, folder: Path, run_id: int, allow_weights: bool = False,
                 privacy: PolicyPrivacy | None = None, max_bytes: int = 64 * 2**20,
                 archive_payloads: bool = True) -> None:
        self.hospital = hospital
        self.folder = Path(folder)
        self.run_id = int(run_id)
        self.allow_weights = allow_weights
        self.policy_privacy = privacy or PolicyPrivacy()
        self.privacy = describe(self.policy_privacy).label
        self.max_bytes = max_bytes
        self.audit = AuditLog(self.folder, hospital=hospital, archive_payloads=archive_payloads)

    # ------------------------------------------------------------------ the exit

    def guard(self, request: Message, handle: Callable[[Message], Message]) -> Message:
        """Run ``handle(request)`` and release its reply (or an error reply) through the gate."""
        kind, round_ = _kind(request), _round(request)
        token = _STAGED.set([])
        try:
            return self._guard(request, handle, kind, round_)
        finally:
            _STAGED.reset(token)

    def _guard(self, request: Message, handle: Callable[[Message], Message], kind: str, round_: str) -> Message:
        try:
            reply = handle(request)
        except BudgetExhausted as e:  # e.g. a DP-SGD (re)training the budget does not allow: nothing was trained
            reason = f"hospital {self.hospital} refused {kind} (round {round_}): {e}"
            self.note(reason)
            logger.warning("%s", reason)
            reply = Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=reason), reply_to=request)
        except PayloadError as e:  # a refusal: the reason names the field or the policy key
            reason = f"hospital {self.hospital} refused {kind} (round {round_}): {e.reason}"
            self.note(reason)
            logger.warning("%s", reason)
            reply = Message(Error(code=QUERY_REJECTED_CODE, reason=reason), reply_to=request)
        except Exception as e:  # details stay here; the reply says only what kind of failure it was
            what = ("its policy is invalid" if isinstance(e, PolicyError) else
                    "its data could not be loaded" if isinstance(e, DataError) else "internal error")
            self.note(f"{kind} (round {round_}) failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            logger.error("hospital %s could not answer %s (round %s): %s", self.hospital, kind, round_, e)
            reply = Message(Error(code=HOSPITAL_ERROR_CODE, reason=f"hospital {self.hospital} could not answer "
                                  f"{kind} (round {round_}): {what}; details stay in the hospital's log"),
                            reply_to=request)
        return self.release(request, reply)

    def release(self, request: Message, reply: object) -> Message:
        """Check ``reply``, log the SHA-256 of its wire bytes, and return a copy decoded from those bytes."""
        kind, round_ = _kind(request), _round(request)
        privacy_fields: dict[str, object] = {}
        if isinstance(reply, Message) and reply.has_content():
            problem = self._check_content(kind, reply)
            if problem is None:
                try:
                    privacy_fields = self._charge(request, reply, kind)
                except BudgetExhausted as e:
                    reason = f"hospital {self.hospital} refused {kind} (round {round_}): {e}"
                    self.note(reason)
                    logger.warning("%s", reason)
                    return self.release(request, Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=reason),
                                                         reply_to=request))
            if problem is None:
                if kind == QUERY_MESSAGE_TYPE:
                    _stamp_head(reply, self.audit)
                proto = recorddict_to_proto(reply.content)
                wire = proto.SerializeToString(deterministic=True)
                if len(wire) <= self.max_bytes:
                    outgoing = Message(recorddict_from_proto(proto), reply_to=request)
                    self._log(request, status="sent", wire=wire, n_indices=_n_indices(kind, outgoing),
                              extras={**_extras(kind, outgoing), **privacy_fields}, outgoing=outgoing)
                    return outgoing
                problem = f"payload of {len(wire)} bytes exceeds the gate's limit of {self.max_bytes}"
            self.note(f"withheld a {kind} reply (round {round_}): {problem}")
            logger.error("hospital %s withheld a %s reply (round %s): %s", self.hospital, kind, round_, problem)
            reply = Message(Error(code=WITHHELD_CODE, reason=f"hospital {self.hospital} withheld its {kind} reply "
                                  f"(round {round_}): it broke the outbound contract"), reply_to=request)
        elif not isinstance(reply, Message) or not reply.has_error():
            reply = Message(Error(code=HOSPITAL_ERROR_CODE, reason=f"hospital {self.hospital} produced no reply to "
                                  f"{kind} (round {round_})"), reply_to=request)
        outgoing = Message(Error(code=int(reply.error.code), reason=scrub(str(reply.error.reason))), reply_to=request)
        self._log(request, status="error", wire=wire_bytes(outgoing), n_indices=0, code=int(reply.error.code))
        return outgoing

    def _charge(self, request: Message, reply: Message, kind: str) -> dict[str, object]:
        """Charge the staged releases (all or none leave), then state ε and δ in a query reply's metrics.

        Returns the privacy fields of the outbound log line. Raises
        :class:`BudgetExhausted` (nothing charged beyond the ledger's own
        all-or-nothing entries) when the budget refuses.
        """
        staged = _STAGED.get() or []
        mechanism = self.policy_privacy.mechanism
        if mechanism == PrivacyMechanism.NONE:
            if staged:
                raise RuntimeError("a charge was staged under privacy.mechanism none")
            return {}
        ledger = PrivacyLedger(self.folder, delta=self.policy_privacy.delta,
                               budget_epsilon=self.policy_privacy.budget_epsilon)
        round_ = _round(request)
        for charge in staged:
            ledger.charge(charge.event, mechanism=mechanism.value, description=charge.description,
                          run_id=self.run_id, round=int(round_) if round_.isdigit() else None)
        released = epsilon([c.event for c in staged], self.policy_privacy.delta) if staged else 0.0
        for charge in staged:
            if charge.on_release is not None:
                charge.on_release()
        entries = read_entries(ledger.path)
        spent = entries[-1].epsilon_after if entries else 0.0
        if kind == QUERY_MESSAGE_TYPE:
            metrics = reply.content.metric_records["metrics"]
            metrics["epsilon"] = float(spent)
            metrics["delta"] = float(self.policy_privacy.delta)
        return {"mechanism": mechanism.value, "epsilon_release": float(released),
                "epsilon_cumulative": float(spent), "delta": self.policy_privacy.delta, "charged": len(staged)}

    def _check_content(self, kind: str, reply: Message) -> str | None:
        allowed = _REPLY_RECORDS.get(kind)
        if allowed is None:
            return f"no reply payload is allowed for message type {kind!r}"
        if kind == FEDAVG_MESSAGE_TYPE and not self.allow_weights:
            return "model weights may not leave: the policy's answers.fedavg_weights is false"
        arrays, metrics, configs = allowed
        content = reply.content
        for have, want, what in ((content.array_records, arrays, "arrays"),
                                 (content.metric_records, metrics, "metrics"),
                                 (content.config_records, configs, "configs")):
            extra = sorted(set(have) - want)
            if extra:
                return f"{kind} replies may not carry {what} {extra}"
        if kind == QUERY_MESSAGE_TYPE:
            arrays_out = set(content.array_records.get("outputs", {}))
            if "outputs" not in arrays_out or arrays_out - {"outputs", "mask", "density"}:
                return "ArrayRecord 'outputs' must hold the array 'outputs' and at most 'mask' and 'density'"
            if set(content.metric_records.get("metrics", {})) - {"num_private", "val_auc", "label_counts"}:
                return "MetricRecord 'metrics' may hold only num_private, val_auc and label_counts"
            if self.policy_privacy.mechanism != PrivacyMechanism.NONE:
                metrics = content.metric_records.get("metrics", {})
                leaks = [k for k in ("label_counts",) if k in metrics] + [k for k in ("mask", "density")
                                                                          if k in arrays_out]
                if leaks or metrics.get("val_auc", -1.0) != -1.0:
                    return (f"under privacy.mechanism {self.policy_privacy.mechanism.value} a reply may not carry "
                            f"{leaks or ['val_auc']}: computed from private data outside the mechanism")
        return None

    # ------------------------------------------------------------------ logs

    def _log(self, request: Message, *, status: str, wire: bytes, n_indices: int, code: int | None = None,
             extras: dict[str, object] | None = None, outgoing: Message | None = None) -> None:
        record: dict[str, object] = {
            "time": time.time(), "hospital": self.hospital, "run_id": self.run_id, "round": _round(request),
            "request_id": str(request.metadata.message_id)[:128], "kind": _kind(request), "status": status,
            "bytes": len(wire), "sha256": hashlib.sha256(wire).hexdigest(), "n_indices": int(n_indices),
            "privacy": self.privacy,
        }
        if code is not None:
            record["error_code"] = code
        record.update(extras or {})
        released = self.audit.append_release(record, wire=wire, arrays=_arrays(outgoing),
                                             **_proxy(request) if status == "sent" else {})
        record["audit_seq"] = released.seq
        self._append(self.folder / OUTBOUND_LOG, json.dumps(record, sort_keys=True) + "\n")
        self.audit.confirm_sent(released, str(record["sha256"]))
        logger.debug("%s released %s %s reply of %d bytes", self.hospital, status, record["kind"], len(wire))

    def note(self, text: str) -> None:
        """Append ``text`` to the hospital's own log (never sent anywhere)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._append(self.folder / LOCAL_LOG, f"{stamp} run {self.run_id}: {text.rstrip()}\n")

    def _append(self, path: Path, text: str) -> None:
        """Append with a single write + fsync (a crash leaves whole lines only)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def _kind(request: Message) -> str:
    return scrub(str(request.metadata.message_type))[:64]


def _round(request: Message) -> str:
    """The round of a request: its group ID (medkd's queries), else FedAvg's ``server-round``, else "?"."""
    group = str(request.metadata.group_id)
    if group.isdigit() and len(group) <= 9:
        return group
    try:
        value = request.content.config_records["config"]["server-round"]
    except Exception:  # no content, no such record: the round is unknown, not an error
        return "?"
    return str(value) if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9 else "?"


def _stamp_head(reply: Message, audit: AuditLog) -> None:
    """Write the audit log's head into a query reply, for the coordinator to sign in its receipt."""
    head = audit.head()
    info = reply.content.config_records.get("hospital")
    if info is not None:
        info["audit_seq"], info["audit_head"] = head.seq, head.hash


def _arrays(outgoing: Message | None) -> dict[str, object]:
    """Shape and dtype of each array a reply carries: ``{"record.array": {"shape": [...], "dtype": "..."}}``."""
    if outgoing is None or not outgoing.has_content():
        return {}
    return {f"{name}.{key}": {"shape": list(array.shape), "dtype": str(array.dtype)}
            for name, record in outgoing.content.array_records.items() for key, array in record.items()}


def _proxy(request: Message) -> dict[str, object]:
    """The proxy manifest hash and the exact proxy indices a (validated, answered) query asked for."""
    try:
        manifest = str(request.content.config_records["query"]["proxy_hash"])
        indices = request.content.array_records["indices"]["indices"].numpy()
    except Exception:  # not a query: no proxy samples were released
        return {"proxy_manifest": None, "proxy_indices": None}
    return {"proxy_manifest": manifest, "proxy_indices": indices}


def _n_indices(kind: str, reply: Message) -> int:
    if kind != QUERY_MESSAGE_TYPE:
        return 0
    shape = reply.content.array_records["outputs"]["outputs"].shape
    return int(shape[0]) if shape else 0


def _extras(kind: str, reply: Message) -> dict[str, object]:
    """What a query reply released beyond its outputs: how many samples it answered, the fields it carried."""
    if kind != QUERY_MESSAGE_TYPE:
        return {}
    arrays = reply.content.array_records["outputs"]
    extras: dict[str, object] = {"fields": sorted(set(arrays) | set(reply.content.metric_records["metrics"]))}
    if "mask" in arrays:
        extras["n_answered"] = int(arrays["mask"].numpy().astype(bool).sum())
    if "label_counts" in reply.content.metric_records["metrics"]:
        extras["label_counts_released"] = True
    return extras
