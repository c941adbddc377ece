"""What a medkd message holds, and the checks on both ends of the wire.

Query (server -> hospital), message type ``query.logits``::

    ConfigRecord "query":   round (int), proxy_hash (str), temperature (float),
                            output ("probs"|"logits"), dtype ("float16"|"float32")
    ArrayRecord  "indices": "indices" -> int64 (N,) positions in the proxy set

Reply (hospital -> server)::

    ArrayRecord  "outputs":  "outputs" -> (N, C) float16/float32 teacher outputs
    MetricRecord "metrics":  num_private (int), val_auc (float)
    ConfigRecord "hospital": name (str), model (str), privacy (str)

Nothing else may leave a hospital: no weights, gradients or private samples.
All checks live here so that the client (:func:`parse_query`) and the server
(:func:`parse_reply`) apply one contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import OutputKind, WireDtype
from common.errors import PayloadError

QUERY_MESSAGE_TYPE = "query.logits"
TEACHER_MESSAGE_TYPE = "train.teacher"
QUERY_REJECTED_CODE = 100  # Error code of a hospital's refusal of a malformed query

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


@dataclass(frozen=True)
class Reply:
    """A hospital's validated answer."""

    hospital: str
    model: str
    privacy: str
    outputs: np.ndarray  # (N, C) float32 (converted from the wire dtype after checks)
    num_private: int
    val_auc: float


def make_query_content(query: Query) -> RecordDict:
    """Pack a :class:`Query` into a RecordDict."""
    config = ConfigRecord({
        "round": int(query.round), "proxy_hash": query.proxy_hash, "temperature": float(query.temperature),
        "output": query.output.value, "dtype": query.dtype.value,
    })
    indices = ArrayRecord({"indices": Array(np.ascontiguousarray(query.indices, dtype=np.int64))})
    return RecordDict({"query": config, "indices": indices})


def parse_query(content: RecordDict, *, proxy_size: int, proxy_hash: str, max_indices: int) -> Query:
    """Check a query against this hospital's proxy manifest and limits.

    Raises
    ------
    PayloadError
        Naming the first problem: missing record/key, proxy manifest mismatch,
        index out of range, duplicate indices, too many indices, temperature <= 0,
        unknown output kind or dtype.
    """
    if "query" not in content.config_records or "indices" not in content.array_records:
        raise PayloadError("query must hold ConfigRecord 'query' and ArrayRecord 'indices'")
    cfg = content.config_records["query"]
    missing = [k for k in ("round", "proxy_hash", "temperature", "output", "dtype") if k not in cfg]
    if missing:
        raise PayloadError(f"query lacks key(s) {', '.join(missing)}")
    if cfg["proxy_hash"] != proxy_hash:
        raise PayloadError(
            f"proxy manifest mismatch: server has {str(cfg['proxy_hash'])[:12]}..., "
            f"this hospital has {proxy_hash[:12]}... (different data set, proxy fraction or seed)"
        )
    temperature = cfg["temperature"]
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise PayloadError(f"temperature must be a finite number > 0, got {temperature!r}")
    try:
        output = OutputKind(cfg["output"])
    except ValueError:
        raise PayloadError(f"output must be one of {[o.value for o in OutputKind]}, got {cfg['output']!r}") from None
    try:
        dtype = WireDtype(cfg["dtype"])
    except ValueError:
        raise PayloadError(f"dtype must be one of {[d.value for d in WireDtype]}, got {cfg['dtype']!r}") from None
    arrays = content.array_records["indices"]
    if "indices" not in arrays:
        raise PayloadError("ArrayRecord 'indices' lacks array 'indices'")
    indices = arrays["indices"].numpy()
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise PayloadError(f"indices must be a 1-D integer array, got {indices.dtype} of shape {indices.shape}")
    if indices.size == 0:
        raise PayloadError("indices is empty")
    if indices.size > max_indices:
        raise PayloadError(f"query asks for {indices.size} samples, more than the limit {max_indices}")
    if indices.min() < 0 or indices.max() >= proxy_size:
        raise PayloadError(
            f"indices out of range: proxy set has {proxy_size} samples, got min {indices.min()} max {indices.max()}"
        )
    if np.unique(indices).size != indices.size:
        raise PayloadError("indices contain duplicates")
    return Query(round=int(cfg["round"]), proxy_hash=str(cfg["proxy_hash"]), indices=indices.astype(np.int64),
                 temperature=float(temperature), output=output, dtype=dtype)


def make_reply_content(*, outputs: np.ndarray, dtype: WireDtype, hospital: str, model: str, privacy: str,
                       num_private: int, val_auc: float) -> RecordDict:
    """Pack teacher outputs (N, C) in the wire dtype with the hospital's metrics."""
    wire = np.ascontiguousarray(outputs, dtype=_WIRE_DTYPES[dtype])
    return RecordDict({
        "outputs": ArrayRecord({"outputs": Array(wire)}),
        "metrics": MetricRecord({"num_private": int(num_private), "val_auc": float(val_auc)}),
        "hospital": ConfigRecord({"name": hospital, "model": model, "privacy": privacy}),
    })


def parse_reply(content: RecordDict, *, n_samples: int, n_classes: int, output: OutputKind, dtype: WireDtype,
                simplex_tolerance: float) -> Reply:
    """Validate a hospital's reply: shape, dtype, finite values, simplex for probabilities.

    Raises
    ------
    PayloadError
        Naming what is wrong (e.g. "outputs contain NaN").
    """
    if "outputs" not in content.array_records or "outputs" not in content.array_records["outputs"]:
        raise PayloadError("reply lacks ArrayRecord 'outputs'")
    extra = sorted(set(content.array_records) - {"outputs"})
    if extra:
        raise PayloadError(f"reply carries unexpected arrays {extra}; only 'outputs' may leave a hospital")
    array = content.array_records["outputs"]["outputs"]
    if len(content.array_records["outputs"]) != 1:
        raise PayloadError("ArrayRecord 'outputs' must hold exactly one array")
    expected_dtype = np.dtype(_WIRE_DTYPES[dtype]).name
    if array.dtype != expected_dtype:
        raise PayloadError(f"outputs dtype is {array.dtype}, expected {expected_dtype}")
    if tuple(array.shape) != (n_samples, n_classes):
        raise PayloadError(f"outputs shape is {tuple(array.shape)}, expected {(n_samples, n_classes)}")
    values = array.numpy().astype(np.float32)
    if np.isnan(values).any():
        raise PayloadError("outputs contain NaN")
    if not np.isfinite(values).all():
        raise PayloadError("outputs contain infinite values")
    if output == OutputKind.PROBS:
        if (values < 0).any():
            raise PayloadError(f"probabilities are negative (min {values.min():.4g})")
        worst = float(np.abs(values.sum(axis=1) - 1.0).max()) if n_samples else 0.0
        if worst > simplex_tolerance:
            raise PayloadError(f"probability rows do not sum to 1 (off by up to {worst:.4g}, tolerance "
                               f"{simplex_tolerance})")
        values = values / values.sum(axis=1, keepdims=True)  # undo float16 rounding
    metrics = content.metric_records.get("metrics")
    if metrics is None or "num_private" not in metrics or "val_auc" not in metrics:
        raise PayloadError("reply lacks MetricRecord 'metrics' with num_private and val_auc")
    num_private = metrics["num_private"]
    if not isinstance(num_private, (int, float)) or num_private < 0:
        raise PayloadError(f"num_private must be >= 0, got {num_private!r}")
    info = content.config_records.get("hospital")
    if info is None or "name" not in info:
        raise PayloadError("reply lacks ConfigRecord 'hospital' with its name")
    return Reply(hospital=str(info["name"]), model=str(info.get("model", "?")), privacy=str(info.get("privacy", "?")),
                 outputs=values, num_private=int(num_private), val_auc=float(metrics["val_auc"]))


def payload_bytes(content: RecordDict) -> int:
    """Size in bytes of ``content`` as Flower serialises it onto the wire (protobuf)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())
