"""What a medkd message holds, and the checks on both ends of the wire.

Query (server -> hospital), message type ``query.logits``::

    ConfigRecord "query":   round (int), proxy_hash (str), temperature (float),
                            output ("probs"|"logits"), dtype ("float16"|"float32"),
                            label_counts (bool: may the hospital add its class counts)
    ArrayRecord  "indices": "indices" -> int64 (N,) positions in the proxy set

Reply (hospital -> server)::

    ArrayRecord  "outputs":  "outputs" -> (N, C) float16/float32 teacher outputs
                             "mask"    -> (N,) uint8, optional: 1 answered, 0 abstained (selector)
                             "density" -> (N,) float16, optional: density ratio p_hospital(x)/p_proxy(x)
    MetricRecord "metrics":  num_private (int), val_auc (float in [0, 1], or -1 when undefined),
                             optional epsilon and delta (float, together: the hospital's ε spent so far,
                             from its ledger, under a DP mechanism; added by its gate),
                             label_counts (C ints summing to num_private), optional: only when the
                             query asked and the hospital's policy releases them
    ConfigRecord "hospital": name (str), model (str), privacy (str), optional together:
                             audit_seq (int >= 0), audit_head (64 hex digits): the head of the
                             hospital's audit log when the reply left (the coordinator signs
                             it in a receipt, see server/receipts.py); optional teacher_version
                             (16-64 hex digits, a random token per answerer: a new one means
                             the teacher changed, so the coordinator asks held samples again)

A query may carry the coordinator's receipt for the hospital's previous
reply: ConfigRecord "receipt" (see :data:`RECEIPT_KEYS`).

What each optional field adds on the wire: the mask 1 byte per sample, the
density 2 bytes per sample, the label counts C integers per reply.

Nothing else may leave a hospital: no weights, gradients or private samples
(the FedAvg *baseline*'s weights only where a hospital's policy opts in).

Everything that crosses the boundary is distrusted. :func:`parse_query` and
:func:`parse_reply` check the exact set of records and keys, every value's
type, range, finiteness and length, and the *decoded* array (dtype, shape,
values), not only what its metadata claims. Every problem, including any
conversion error, becomes a :class:`~common.errors.PayloadError` naming the
field; no other exception escapes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import OutputKind, WireDtype
from common.errors import PayloadError
from common.wire import MAX_TEXT  # noqa: F401  (the limit of free-text fields; tests import it from here)
from common.wire import as_choice, as_integer, as_number, as_text, check_keys, check_records, decode_array

QUERY_MESSAGE_TYPE = "query.logits"
TEACHER_MESSAGE_TYPE = "train.teacher"
FEDAVG_MESSAGE_TYPE = "train"

QUERY_REJECTED_CODE = 100  # a hospital refused a query: malformed, or outside its policy
HOSPITAL_ERROR_CODE = 101  # a hospital could not answer (details stay in its own log)
WITHHELD_CODE = 102  # a hospital's gate withheld a reply that broke the outbound contract
BUDGET_EXHAUSTED_CODE = 103  # a hospital refused: the release would exceed its privacy budget (nothing left it)

MAX_ROUND = 10**6
MAX_PRIVATE = 10**9
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
VERSION = re.compile(r"^[0-9a-f]{16,64}$")
HEX128 = re.compile(r"^[0-9a-f]{128}$")
RECEIPT_KEYS = {"hospital", "round", "audit_seq", "audit_head", "reply_sha256", "coordinator_key", "signature"}
UNDEFINED_AUC = -1.0  # val_auc when the hospital's local validation holds a single class
DENSITY_MAX = 60000.0  # largest density ratio sent (float16 holds up to 65504)

_WIRE_DTYPES = {WireDtype.FLOAT16: np.float16, WireDtype.FLOAT32: np.float32}


@dataclass(frozen=True)
class Query:
    """A request for teacher outputs on proxy samples."""

    round: int
    proxy_hash: str
    indices: np.ndarray  # (N,) int64
    temperature: float
    output: OutputKind
    dtype: WireDtype
    label_counts: bool = False
    receipt: dict[str, Any] | None = None  # the coordinator's signed receipt for this hospital's last reply


@dataclass(frozen=True)
class Reply:
    """A hospital's validated answer."""

    hospital: str
    model: str
    privacy: str
    outputs: np.ndarray  # (N, C) float32 (converted from the wire dtype after checks)
    num_private: int
    val_auc: float  # in [0, 1], or -1 when undefined
    mask: np.ndarray | None = None  # (N,) bool: True where the hospital answered
    density: np.ndarray | None = None  # (N,) float32 >= 0
    label_counts: np.ndarray | None = None  # (C,) int64, sums to num_private
    epsilon: float | None = None  # the hospital's ε spent so far (its ledger, at ``delta``), under a DP mechanism
    delta: float | None = None
    audit_seq: int | None = None  # the hospital's audit-log head when the reply left
    audit_head: str | None = None
    teacher_version: str | None = None  # opaque token; a new one means the hospital's answerer changed


# --------------------------------------------------------------------------- query


def make_query_content(query: Query) -> RecordDict:
    """Pack a :class:`Query` into a RecordDict (its receipt, if any, as ConfigRecord "receipt")."""
    config = ConfigRecord({
        "round": int(query.round), "proxy_hash": query.proxy_hash, "temperature": float(query.temperature),
        "output": query.output.value, "dtype": query.dtype.value, "label_counts": bool(query.label_counts),
    })
    indices = ArrayRecord({"indices": Array(np.ascontiguousarray(query.indices, dtype=np.int64))})
    content = RecordDict({"query": config, "indices": indices})
    if query.receipt is not None:
        content["receipt"] = ConfigRecord(dict(query.receipt))
    return content


def parse_query(content: Any, *, proxy_size: int, proxy_hash: str) -> Query:
    """Check a query against this hospital's proxy manifest (the contract; policy limits are checked apart).

    Raises
    ------
    PayloadError
        Naming the field: a missing or extra record or key, a wrong type, a
        proxy manifest mismatch, indices that are not a 1-D integer array,
        out of range, duplicated or empty, a temperature that is not a
        finite number > 0, an unknown output kind or dtype.
    """
    try:
        return _parse_query(content, proxy_size=proxy_size, proxy_hash=proxy_hash)
    except PayloadError:
        raise
    except Exception as e:  # a shape of input no check above foresaw: still the peer's fault, still named
        raise PayloadError(f"malformed query ({type(e).__name__})", field="content") from None


def _parse_query(content: Any, *, proxy_size: int, proxy_hash: str) -> Query:
    receipt = None
    if isinstance(content, RecordDict) and "receipt" in [str(k) for k in content.keys()]:
        check_records(content, arrays={"indices"}, metrics=set(), configs={"query", "receipt"})
        receipt = _receipt(content.config_records["receipt"])
    else:
        check_records(content, arrays={"indices"}, metrics=set(), configs={"query"})
    cfg = content.config_records["query"]
    check_keys(cfg, field="query", required={"round", "proxy_hash", "temperature", "output", "dtype",
                                             "label_counts"})
    round_ = as_integer(cfg["round"], field="query.round", low=0, high=MAX_ROUND)
    server_hash = as_text(cfg["proxy_hash"], field="query.proxy_hash", max_len=128)
    if server_hash != proxy_hash:
        raise PayloadError(
            f"proxy manifest mismatch: server has {server_hash[:12]}..., this hospital has {proxy_hash[:12]}... "
            "(different data set, proxy fraction or seed)", field="query.proxy_hash")
    temperature = as_number(cfg["temperature"], field="query.temperature")
    if temperature <= 0:
        raise PayloadError(f"must be a finite number > 0, got {temperature!r}", field="query.temperature")
    output = as_choice(cfg["output"], OutputKind, field="query.output")
    dtype = as_choice(cfg["dtype"], WireDtype, field="query.dtype")
    if not isinstance(cfg["label_counts"], bool):
        raise PayloadError(f"expected true or false, got {type(cfg['label_counts']).__name__}",
                           field="query.label_counts")
    arrays = content.array_records["indices"]
    check_keys(arrays, field="indices", required={"indices"})
    indices = decode_array(arrays["indices"], field="indices", dtypes=("int64", "int32", "uint32", "int16", "uint16"),
                           ndim=1, max_elements=proxy_size)
    if indices.size == 0:
        raise PayloadError("is empty", field="indices")
    if indices.min() < 0 or indices.max() >= proxy_size:
        raise PayloadError(f"out of range: proxy set has {proxy_size} samples, got min {indices.min()} "
                           f"max {indices.max()}", field="indices")
    if np.bincount(indices, minlength=proxy_size).max() > 1:  # O(N + proxy size); in range, checked above
        raise PayloadError("contain duplicates", field="indices")
    return Query(round=round_, proxy_hash=server_hash, indices=indices.astype(np.int64), temperature=temperature,
                 output=output, dtype=dtype, label_counts=bool(cfg["label_counts"]), receipt=receipt)


def _receipt(record: Any) -> dict[str, Any]:
    """The receipt's fields, typed and bounded (its signature is checked by the hospital, client/receipts.py)."""
    check_keys(record, field="receipt", required=RECEIPT_KEYS)
    return {
        "hospital": as_text(record["hospital"], field="receipt.hospital", max_len=64, pattern=NAME_PATTERN),
        "round": as_integer(record["round"], field="receipt.round", low=0, high=MAX_ROUND),
        "audit_seq": as_integer(record["audit_seq"], field="receipt.audit_seq", low=0, high=2**62),
        "audit_head": as_text(record["audit_head"], field="receipt.audit_head", max_len=64, pattern=HEX64),
        "reply_sha256": as_text(record["reply_sha256"], field="receipt.reply_sha256", max_len=64, pattern=HEX64),
        "coordinator_key": as_text(record["coordinator_key"], field="receipt.coordinator_key", max_len=64,
                                   pattern=HEX64),
        "signature": as_text(record["signature"], field="receipt.signature", max_len=128, pattern=HEX128),
    }


# --------------------------------------------------------------------------- reply


def reportable(value: float) -> float:
    """A local figure as it may be reported: itself when finite, else -1 ("undefined"; NaN never travels)."""
    return float(value) if math.isfinite(value) else UNDEFINED_AUC


def make_reply_content(*, outputs: np.ndarray, dtype: WireDtype, hospital: str, model: str, privacy: str,
                       num_private: int, val_auc: float, mask: np.ndarray | None = None,
                       density: np.ndarray | None = None, label_counts: np.ndarray | None = None,
                       teacher_version: str | None = None) -> RecordDict:
    """Pack teacher outputs (N, C) in the wire dtype with the hospital's metrics (NaN AUC sent as -1).

    ``mask`` (N,) bool and ``density`` (N,) come from the hospital's selector;
    ``label_counts`` (C,) only where the query asked and the policy allows;
    ``teacher_version`` is the random token naming the answerer (client/teacher_version.py).
    """
    wire = np.ascontiguousarray(outputs, dtype=_WIRE_DTYPES[dtype])
    arrays = {"outputs": Array(wire)}
    if mask is not None:
        arrays["mask"] = Array(np.ascontiguousarray(mask, dtype=np.uint8))
    if density is not None:
        arrays["density"] = Array(np.ascontiguousarray(np.clip(density, 0.0, DENSITY_MAX), dtype=np.float16))
    metrics: dict[str, Any] = {"num_private": int(num_private), "val_auc": reportable(val_auc)}
    if label_counts is not None:
        metrics["label_counts"] = [int(c) for c in label_counts]
    info: dict[str, Any] = {"name": hospital, "model": model, "privacy": privacy}
    if teacher_version is not None:
        info["teacher_version"] = teacher_version
    return RecordDict({
        "outputs": ArrayRecord(arrays),
        "metrics": MetricRecord(metrics),
        "hospital": ConfigRecord(info),
    })


def parse_reply(content: Any, *, n_samples: int, n_classes: int, output: OutputKind, dtype: WireDtype,
                simplex_tolerance: float, hospital: str | None = None) -> Reply:
    """Validate a hospital's reply: records, keys, types, the decoded outputs, finite values, simplex.

    ``hospital`` is who the coordinator knows the sender to be (by node);
    it is named in every error.

    Raises
    ------
    PayloadError
        Naming the hospital and the field (e.g. "hospital H3: outputs: contain NaN").
    """
    try:
        return _parse_reply(content, n_samples=n_samples, n_classes=n_classes, output=output, dtype=dtype,
                            simplex_tolerance=simplex_tolerance)
    except PayloadError as e:
        raise (e.naming(hospital) if hospital else e) from None
    except Exception as e:  # a shape of input no check above foresaw: still the sender's fault, still named
        raise PayloadError(f"malformed reply ({type(e).__name__})", field="content", hospital=hospital) from None


def _parse_reply(content: Any, *, n_samples: int, n_classes: int, output: OutputKind, dtype: WireDtype,
                 simplex_tolerance: float) -> Reply:
    check_records(content, arrays={"outputs"}, metrics={"metrics"}, configs={"hospital"})
    arrays = content.array_records["outputs"]
    present = {str(k) for k in arrays.keys()}
    check_keys(arrays, field="outputs", required={"outputs"} | (present & {"mask", "density"}))
    wire = np.dtype(_WIRE_DTYPES[dtype]).name
    values = decode_array(arrays["outputs"], field="outputs", dtypes=(wire,), ndim=2,
                          max_elements=max(1, n_samples * n_classes))
    if values.shape != (n_samples, n_classes):
        raise PayloadError(f"shape is {values.shape}, expected {(n_samples, n_classes)}", field="outputs")
    values = values.astype(np.float32)
    if np.isnan(values).any():
        raise PayloadError("contain NaN", field="outputs")
    if not np.isfinite(values).all():
        raise PayloadError("contain infinite values", field="outputs")
    if output == OutputKind.PROBS:
        if (values < 0).any():
            raise PayloadError(f"probabilities are negative (min {values.min():.4g})", field="outputs")
        worst = float(np.abs(values.sum(axis=1) - 1.0).max()) if n_samples else 0.0
        if worst > simplex_tolerance:
            raise PayloadError(f"probability rows do not sum to 1 (off by up to {worst:.4g}, tolerance "
                               f"{simplex_tolerance})", field="outputs")
        values = values / values.sum(axis=1, keepdims=True)  # undo float16 rounding
    mask = density = None
    if "mask" in present:
        raw = decode_array(arrays["mask"], field="outputs.mask", dtypes=("uint8",), ndim=1,
                           max_elements=max(1, n_samples))
        if raw.shape != (n_samples,):
            raise PayloadError(f"shape is {raw.shape}, expected {(n_samples,)}", field="outputs.mask")
        if n_samples and raw.max() > 1:
            raise PayloadError(f"must hold 0 (abstain) or 1 (answer), got {int(raw.max())}", field="outputs.mask")
        mask = raw.astype(bool)
    if "density" in present:
        raw = decode_array(arrays["density"], field="outputs.density", dtypes=("float16",), ndim=1,
                           max_elements=max(1, n_samples))
        if raw.shape != (n_samples,):
            raise PayloadError(f"shape is {raw.shape}, expected {(n_samples,)}", field="outputs.density")
        density = raw.astype(np.float32)
        if not np.isfinite(density).all() or (density < 0).any():
            raise PayloadError("density ratios must be finite and >= 0", field="outputs.density")
    metrics = content.metric_records["metrics"]
    present_metrics = {str(k) for k in metrics.keys()}
    optional = present_metrics & {"label_counts", "epsilon", "delta"}
    check_keys(metrics, field="metrics", required={"num_private", "val_auc"} | optional)
    if len(present_metrics & {"epsilon", "delta"}) == 1:
        raise PayloadError("epsilon and delta come together", field="metrics")
    spent = delta = None
    if "epsilon" in present_metrics:
        spent = as_number(metrics["epsilon"], field="metrics.epsilon")
        delta = as_number(metrics["delta"], field="metrics.delta")
        if spent < 0 or not 0 < delta < 1:
            raise PayloadError(f"need epsilon >= 0 and 0 < delta < 1, got {spent} and {delta}", field="metrics")
    num_private = as_integer(metrics["num_private"], field="metrics.num_private", low=0, high=MAX_PRIVATE)
    label_counts = None
    if "label_counts" in present_metrics:
        label_counts = _label_counts(metrics["label_counts"], n_classes=n_classes, num_private=num_private)
    val_auc = as_number(metrics["val_auc"], field="metrics.val_auc")
    if not (0.0 <= val_auc <= 1.0 or val_auc == UNDEFINED_AUC):
        raise PayloadError(f"must be in [0, 1] (or -1: undefined), got {val_auc}", field="metrics.val_auc")
    info = content.config_records["hospital"]
    audit_keys = {"audit_seq", "audit_head"}
    info_keys = {str(k) for k in info.keys()}
    check_keys(info, field="hospital", required={"name", "model", "privacy"} | (info_keys & {"teacher_version"})
               | (audit_keys if audit_keys & info_keys else set()))
    name = as_text(info["name"], field="hospital.name", max_len=64, pattern=NAME_PATTERN)
    model = as_text(info["model"], field="hospital.model", max_len=64)
    privacy = as_text(info["privacy"], field="hospital.privacy")
    audit_seq = audit_head = None
    if "audit_seq" in info:
        audit_seq = as_integer(info["audit_seq"], field="hospital.audit_seq", low=0, high=2**62)
        audit_head = as_text(info["audit_head"], field="hospital.audit_head", max_len=64, pattern=HEX64)
    version = None
    if "teacher_version" in info:
        version = as_text(info["teacher_version"], field="hospital.teacher_version", max_len=64, pattern=VERSION)
    return Reply(hospital=name, model=model, privacy=privacy, outputs=values, num_private=num_private,
                 val_auc=val_auc, mask=mask, density=density, label_counts=label_counts, epsilon=spent, delta=delta,
                 audit_seq=audit_seq, audit_head=audit_head, teacher_version=version)


def _label_counts(value: Any, *, n_classes: int, num_private: int) -> np.ndarray:
    """C non-negative integers that sum to ``num_private``."""
    field = "metrics.label_counts"
    if not isinstance(value, list):
        raise PayloadError(f"expected a list of {n_classes} integers, got {type(value).__name__}", field=field)
    if len(value) != n_classes:
        raise PayloadError(f"expected {n_classes} counts (one per class), got {len(value)}", field=field)
    counts = np.asarray([as_integer(v, field=field, low=0, high=MAX_PRIVATE) for v in value], dtype=np.int64)
    if int(counts.sum()) != num_private:
        raise PayloadError(f"counts sum to {int(counts.sum())}, but metrics.num_private is {num_private}", field=field)
    return counts


def wire_bytes(message: Message) -> bytes:
    """The bytes of ``message``'s content (or error) as serialised for the wire (deterministic protobuf).

    The hospital's gate hashes these bytes before a reply leaves and the
    coordinator hashes the same bytes of what it received, so the two logs
    can be compared entry by entry.
    """
    from flwr.common.serde import error_to_proto, recorddict_to_proto

    if message.has_error():
        return error_to_proto(message.error).SerializeToString(deterministic=True)
    return recorddict_to_proto(message.content).SerializeToString(deterministic=True)


def payload_bytes(content: RecordDict) -> int:
    """Size in bytes of ``content`` as Flower serialises it onto the wire (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())
