"""Generic checks for anything received over the wire: exact records and keys, typed values, safely decoded arrays.

Both ends of every medkd message use them (:mod:`common.payload` for
queries and replies, the FedAvg baseline for model weights). Every problem,
including any conversion error, becomes a :class:`~common.errors.PayloadError`
naming the field.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.errors import PayloadError

__all__ = ["MAX_TEXT", "check_records", "check_keys", "as_integer", "as_number", "as_text", "as_choice",
           "decode_array", "decode_weights"]

MAX_TEXT = 256  # longest free-text field (model, privacy statement)
NPY_HEADER_MAX = 4096  # bytes of .npy header allowed on top of the raw data
_NUMPY_STYPE = "numpy.ndarray"


def check_records(content: Any, *, arrays: set[str], metrics: set[str], configs: set[str]) -> None:
    """``content`` holds exactly these records, each of its declared kind."""
    if not isinstance(content, RecordDict):
        raise PayloadError(f"expected a RecordDict, got {type(content).__name__}", field="content")
    want = {**{k: ArrayRecord for k in arrays}, **{k: MetricRecord for k in metrics},
            **{k: ConfigRecord for k in configs}}
    names = [str(k) for k in content.keys()]
    extra = sorted(set(names) - set(want))
    if extra:
        raise PayloadError(f"unexpected record(s) {_short(extra)}; expected exactly {sorted(want)}", field="content")
    for name, kind in want.items():
        if name not in names:
            raise PayloadError(f"missing {kind.__name__} {name!r}", field="content")
        if not isinstance(content[name], kind):
            raise PayloadError(f"expected a {kind.__name__}, got {type(content[name]).__name__}", field=name)


def check_keys(record: Mapping[str, Any], *, field: str, required: set[str]) -> None:
    """``record`` holds exactly the keys ``required``."""
    names = {str(k) for k in record.keys()}
    extra = sorted(names - required)
    if extra:
        raise PayloadError(f"unexpected key(s) {_short(extra)}", field=field)
    missing = sorted(required - names)
    if missing:
        raise PayloadError(f"missing key(s) {missing}", field=field)


def _short(items: list[str], limit: int = 5) -> str:
    shown = [s[:40] for s in items[:limit]]
    return repr(shown) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def as_integer(value: Any, *, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PayloadError(f"expected an integer, got {type(value).__name__}", field=field)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not float(value).is_integer():
            raise PayloadError(f"expected an integer, got {value!r}", field=field)
    number = int(value)
    if not low <= number <= high:
        raise PayloadError(f"must be in [{low}, {high}], got {number!r:.40}", field=field)
    return number


def as_number(value: Any, *, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PayloadError(f"expected a number, got {type(value).__name__}", field=field)
    try:
        number = float(value)
    except OverflowError:
        raise PayloadError("is too large for a float", field=field) from None
    if not math.isfinite(number):
        raise PayloadError(f"must be finite, got {number!r}", field=field)
    return number


def as_text(value: Any, *, field: str, max_len: int = MAX_TEXT, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"expected a string, got {type(value).__name__}", field=field)
    if len(value) > max_len:
        raise PayloadError(f"string of {len(value)} characters, more than {max_len}", field=field)
    if pattern is not None and not pattern.fullmatch(value):
        raise PayloadError(f"does not match {pattern.pattern}: {value[:40]!r}", field=field)
    return value


def as_choice(value: Any, enum_type: type, *, field: str) -> Any:
    text = as_text(value, field=field, max_len=32)
    try:
        return enum_type(text)
    except ValueError:
        raise PayloadError(f"must be one of {[m.value for m in enum_type]}, got {text!r}", field=field) from None


def decode_array(array: Any, *, field: str, dtypes: tuple[str, ...], ndim: int, max_elements: int) -> np.ndarray:
    """Decode a received :class:`flwr.app.Array` safely and check what it *decodes to*.

    The declared metadata is checked first (so that no oversized buffer is
    parsed), then the bytes are decoded with ``allow_pickle=False`` and the
    decoded array's dtype, rank and size are checked again.
    """
    if not isinstance(array, Array):
        raise PayloadError(f"expected an Array, got {type(array).__name__}", field=field)
    if array.stype != _NUMPY_STYPE:
        raise PayloadError(f"unsupported serialisation {str(array.stype)[:40]!r}", field=field)
    declared = tuple(array.shape)
    if len(declared) != ndim or any(not isinstance(d, int) or d < 0 for d in declared):
        raise PayloadError(f"declared shape {declared[:8]} is not a {ndim}-D shape", field=field)
    if math.prod(declared) > max_elements:
        raise PayloadError(f"declared shape {declared} holds more than {max_elements} elements", field=field)
    if str(array.dtype) not in dtypes:
        raise PayloadError(f"dtype is {str(array.dtype)[:20]!r}, expected {' or '.join(dtypes)}", field=field)
    data = array.data
    if not isinstance(data, bytes):
        raise PayloadError(f"data is {type(data).__name__}, not bytes", field=field)
    itemsize = max(np.dtype(d).itemsize for d in dtypes)
    if len(data) > max_elements * itemsize + NPY_HEADER_MAX:
        raise PayloadError(f"{len(data)} bytes is more than {max_elements} elements can take", field=field)
    try:  # read the .npy header first: its shape, not the declared one, decides what np.load allocates
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header_shape, _, header_dtype = reader(stream)
    except Exception as e:  # whatever numpy raises on bytes that are not a valid .npy array
        raise PayloadError(f"bytes are not a valid .npy array ({type(e).__name__})", field=field) from None
    if tuple(header_shape) != declared or header_dtype.name not in dtypes:
        raise PayloadError(f"bytes hold {header_dtype.name[:20]!r} {tuple(header_shape)[:8]}, not the declared "
                           f"{str(array.dtype)[:20]!r} {declared}", field=field)
    try:
        decoded = array.numpy()
    except Exception as e:  # whatever numpy raises on bytes that are not a valid .npy array
        raise PayloadError(f"bytes are not a valid .npy array ({type(e).__name__})", field=field) from None
    if not isinstance(decoded, np.ndarray):
        raise PayloadError(f"decodes to {type(decoded).__name__}, not an array", field=field)
    if decoded.dtype.name not in dtypes:
        raise PayloadError(f"decoded dtype is {decoded.dtype}, expected {' or '.join(dtypes)}", field=field)
    if decoded.shape != declared:
        raise PayloadError(f"decoded shape {decoded.shape} differs from the declared {declared}", field=field)
    return decoded


def decode_weights(record: Any, *, reference: Mapping[str, np.ndarray], field: str) -> dict[str, np.ndarray]:
    """Decode model weights, checking every name, dtype and shape against ``reference`` before decoding.

    Used at both ends of the FedAvg baseline, so that neither a hospital nor
    the coordinator decodes an array it did not expect.

    Raises
    ------
    PayloadError
        Naming the weight (``arrays.<name>``) that is missing, extra, of another dtype or shape, or not finite.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}", field=field)
    check_keys(record, field=field, required=set(reference))
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        key = f"{field}.{name}"
        value = decode_array(record[name], field=key, dtypes=(ref.dtype.name,), ndim=ref.ndim,
                             max_elements=max(1, ref.size))
        if value.shape != ref.shape:
            raise PayloadError(f"shape {value.shape}, expected {ref.shape}", field=key)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise PayloadError("contains non-finite values", field=key)
        out[name] = value
    return out
