"""Hostile replies and queries: every malformed payload becomes a PayloadError naming the field, and a round
goes on with the good replies (a table of malformed kinds, both impostor orders, and hypothesis fuzzing)."""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.config import OutputKind, QueryConfig, WireDtype
from common.errors import PayloadError
from common.payload import (
    MAX_PRIVATE,
    MAX_ROUND,
    MAX_TEXT,
    QUERY_MESSAGE_TYPE,
    Query,
    Reply,
    make_query_content,
    make_reply_content,
    parse_query,
    parse_reply,
)
from server.collect import MAX_REASON, collect_replies
from tests.conftest import finite_probs, request_message

N, C = 6, 5
QUERY = QueryConfig()  # probs, float16, simplex tolerance 1e-2
EXPECTED = {1: "H1", 2: "H2", 3: "H3"}
Mutation = Callable[[RecordDict], None]


# --------------------------------------------------------------------------- helpers


def _request(node: int) -> Message:
    q = Query(round=4, proxy_hash="h", indices=np.arange(N), temperature=2.0, output=OutputKind.PROBS,
              dtype=WireDtype.FLOAT16)
    return request_message(make_query_content(q), message_type=QUERY_MESSAGE_TYPE, dst_node_id=node, round=4,
                           message_id=f"m-{node}")


def _content(node: int = 3, *, name: str | None = None) -> RecordDict:
    """A valid reply content from hospital H<node> (float16 probabilities)."""
    return make_reply_content(outputs=finite_probs(N, C, node), dtype=WireDtype.FLOAT16, hospital=name or f"H{node}",
                              model="smallcnn", privacy="none", num_private=100 + node, val_auc=0.7)


def _message(content: RecordDict, node: int) -> Message:
    return Message(content, reply_to=_request(node))


def _good() -> list[Message]:
    return [_message(_content(n), n) for n in (1, 2)]


def _parse(content: RecordDict) -> Reply:
    return parse_reply(content, n_samples=N, n_classes=C, output=QUERY.output, dtype=QUERY.dtype,
                       simplex_tolerance=QUERY.simplex_tolerance, hospital="H3")


def _npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _raw(*, dtype: str = "float16", shape: tuple[int, ...] = (N, C), stype: str = "numpy.ndarray",
         data: bytes | None = None) -> Array:
    """An Array whose metadata says whatever the sender likes, whatever its bytes hold."""
    if data is None:
        data = _npy(finite_probs(N, C).astype(np.float16))
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _force(record: ArrayRecord | MetricRecord | ConfigRecord, key: str, value: object) -> None:
    """Store ``value`` without Flower's Python-side type check (a hostile peer is not bound by it)."""
    record.__dict__["_data"][key] = value


# --------------------------------------------------------------------------- mutations of a valid reply


def _metric(key: str, value: object) -> Mutation:
    def mutate(c: RecordDict) -> None:
        _force(c.metric_records["metrics"], key, value)
    return mutate


def _config(key: str, value: object) -> Mutation:
    def mutate(c: RecordDict) -> None:
        _force(c.config_records["hospital"], key, value)
    return mutate


def _outputs(array: object, key: str = "outputs") -> Mutation:
    def mutate(c: RecordDict) -> None:
        _force(c.array_records["outputs"], key, array)
    return mutate


def _values(edit: Callable[[np.ndarray], None], dtype: type = np.float16) -> Mutation:
    """Honest metadata around edited output values."""
    def mutate(c: RecordDict) -> None:
        values = finite_probs(N, C, 7)
        edit(values)
        with np.errstate(over="ignore"):
            wire = values.astype(dtype)
        c.array_records["outputs"] = ArrayRecord({"outputs": Array(wire)})
    return mutate


def _drop_record(name: str) -> Mutation:
    def mutate(c: RecordDict) -> None:
        del c[name]
    return mutate


def _add_record(name: str, record: ArrayRecord | MetricRecord | ConfigRecord) -> Mutation:
    def mutate(c: RecordDict) -> None:
        c[name] = record
    return mutate


def _replace_record(name: str, record: ArrayRecord | MetricRecord | ConfigRecord) -> Mutation:
    def mutate(c: RecordDict) -> None:
        c.__dict__["_data"][name] = record  # (RecordDict's own setter would log a warning about the kind change)
    return mutate


def _drop_key(record: str, key: str) -> Mutation:
    def mutate(c: RecordDict) -> None:
        del c[record][key]
    return mutate


def _set(index: tuple[int, int], value: float) -> Callable[[np.ndarray], None]:
    def edit(values: np.ndarray) -> None:
        values[index] = value
    return edit


def _negative(values: np.ndarray) -> None:
    values[0, :2] = [-0.2, values[0, 0] + values[0, 1] + 0.2]


def _scaled(values: np.ndarray) -> None:
    values *= 1.5


def _zeros(values: np.ndarray) -> None:
    values[3] = 0.0


def _bytearray_data(c: RecordDict) -> None:
    """Array's constructor insists on bytes; a peer's decoded message need not."""
    array = _raw()
    array.data = bytearray(array.data)
    _force(c.array_records["outputs"], "outputs", array)


_PROBS16 = finite_probs(N, C).astype(np.float16)
_NPY16 = _npy(_PROBS16)
_HUGE_HEADER = _NPY16.replace(b"(6, 5)", b"(99999999999, 5)")  # a 200-byte .npy whose header claims 1e12 values
_OBJECT_NPY = _npy(np.array([[{"rm": "-rf"}] * C] * N, dtype=object), allow_pickle=True)
_LONG = "x" * 10_000

# (id, mutation, substring the reason must hold)
BAD_REPLIES: list[tuple[str, Mutation, str]] = [
    # metrics.num_private
    ("num_private-list", _metric("num_private", [1, 2]), "metrics.num_private: expected an integer, got list"),
    ("num_private-nan", _metric("num_private", math.nan), "metrics.num_private: expected an integer, got nan"),
    ("num_private-inf", _metric("num_private", math.inf), "metrics.num_private: expected an integer, got inf"),
    ("num_private-neg-inf", _metric("num_private", -math.inf), "metrics.num_private: expected an integer, got -inf"),
    ("num_private-negative", _metric("num_private", -1), "metrics.num_private: must be in [0, "),
    ("num_private-fraction", _metric("num_private", 2.5), "metrics.num_private: expected an integer, got 2.5"),
    ("num_private-huge", _metric("num_private", 2**62), "metrics.num_private: must be in [0, "),
    ("num_private-huge-float", _metric("num_private", 1e300), "metrics.num_private: must be in [0, "),
    ("num_private-bool", _metric("num_private", True), "metrics.num_private: expected an integer, got bool"),
    ("num_private-str", _metric("num_private", "100"), "metrics.num_private: expected an integer, got str"),
    # metrics.val_auc
    ("val_auc-list", _metric("val_auc", [0.5, 0.6]), "metrics.val_auc: expected a number, got list"),
    ("val_auc-nan", _metric("val_auc", math.nan), "metrics.val_auc: must be finite"),
    ("val_auc-inf", _metric("val_auc", math.inf), "metrics.val_auc: must be finite"),
    ("val_auc-neg-inf", _metric("val_auc", -math.inf), "metrics.val_auc: must be finite"),
    ("val_auc-1.5", _metric("val_auc", 1.5), "metrics.val_auc: must be in [0, 1]"),
    ("val_auc-negative", _metric("val_auc", -0.5), "metrics.val_auc: must be in [0, 1]"),
    ("val_auc-bool", _metric("val_auc", True), "metrics.val_auc: expected a number, got bool"),
    # hospital.name / model / privacy
    ("name-too-long", _config("name", _LONG), "hospital.name: string of 10000 characters"),
    ("model-too-long", _config("model", _LONG), "hospital.model: string of 10000 characters"),
    ("privacy-too-long", _config("privacy", _LONG), f"hospital.privacy: string of 10000 characters, more than "
                                                    f"{MAX_TEXT}"),
    ("name-bad-chars", _config("name", "H3; rm -rf /"), "hospital.name: does not match"),
    ("name-empty", _config("name", ""), "hospital.name: does not match"),
    ("name-leading-dot", _config("name", "../H3"), "hospital.name: does not match"),
    ("name-trailing-newline", _config("name", "H3\n"), "hospital.name: does not match"),
    ("name-bytes", _config("name", b"H3"), "hospital.name: expected a string, got bytes"),
    ("name-int", _config("name", 3), "hospital.name: expected a string, got int"),
    ("name-list", _config("name", ["H3"]), "hospital.name: expected a string, got list"),
    ("model-bool", _config("model", True), "hospital.model: expected a string, got bool"),
    # records
    ("missing-outputs", _drop_record("outputs"), "content: missing ArrayRecord 'outputs'"),
    ("missing-metrics", _drop_record("metrics"), "content: missing MetricRecord 'metrics'"),
    ("missing-hospital", _drop_record("hospital"), "content: missing ConfigRecord 'hospital'"),
    ("extra-arrays-weights", _add_record("weights", ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})),
     "content: unexpected record(s) ['weights']"),
    ("extra-metrics", _add_record("train", MetricRecord({"loss": 0.1})), "content: unexpected record(s) ['train']"),
    ("extra-config", _add_record("debug", ConfigRecord({"ip": "10.0.0.3"})), "content: unexpected record(s) ['debug']"),
    ("outputs-is-metric-record", _replace_record("outputs", MetricRecord({"outputs": [0.1]})),
     "outputs: expected a ArrayRecord, got MetricRecord"),
    ("hospital-is-metric-record", _replace_record("hospital", MetricRecord({"name": 3})),
     "hospital: expected a ConfigRecord, got MetricRecord"),
    # keys
    ("metrics-extra-key", _metric("loss", 0.1), "metrics: unexpected key(s) ['loss']"),
    ("hospital-extra-key", _config("ip", "10.0.0.3"), "hospital: unexpected key(s) ['ip']"),
    ("outputs-two-arrays", _outputs(Array(_PROBS16), key="logits"), "outputs: unexpected key(s) ['logits']"),
    ("metrics-missing-val_auc", _drop_key("metrics", "val_auc"), "metrics: missing key(s) ['val_auc']"),
    ("metrics-missing-num_private", _drop_key("metrics", "num_private"), "metrics: missing key(s) ['num_private']"),
    ("hospital-missing-name", _drop_key("hospital", "name"), "hospital: missing key(s) ['name']"),
    ("hospital-missing-privacy", _drop_key("hospital", "privacy"), "hospital: missing key(s) ['privacy']"),
    ("outputs-missing-array", _drop_key("outputs", "outputs"), "outputs: missing key(s) ['outputs']"),
    # the array's bytes and metadata
    ("random-bytes", _outputs(_raw(data=np.random.default_rng(0).bytes(80))), "outputs: bytes are not a valid .npy"),
    ("empty-bytes", _outputs(_raw(data=b"")), "outputs: bytes are not a valid .npy"),
    ("truncated-npy", _outputs(_raw(data=_NPY16[:-7])), "outputs: bytes are not a valid .npy"),
    ("npy-header-claims-huge-shape", _outputs(_raw(data=_HUGE_HEADER)), "outputs: bytes hold 'float16' (99999999999, 5)"),
    ("pickled-object-array", _outputs(_raw(data=_OBJECT_NPY)), "outputs: bytes hold 'object' (6, 5)"),
    ("raw-pickle", _outputs(_raw(data=pickle.dumps(_PROBS16))), "outputs: bytes are not a valid .npy"),
    ("data-not-bytes", _bytearray_data, "outputs: data is bytearray, not bytes"),
    ("oversized-data", _outputs(_raw(data=b"\x93NUMPY" + b"\0" * 100_000)), "outputs: 100006 bytes is more than"),
    ("unknown-stype", _outputs(_raw(stype="torch.Tensor")), "outputs: unsupported serialisation 'torch.Tensor'"),
    ("data-float32-declared-float16", _outputs(_raw(data=_npy(finite_probs(N, C)))),
     "outputs: bytes hold 'float32' (6, 5), not the declared 'float16' (6, 5)"),
    ("data-float64-declared-float16", _outputs(_raw(data=_npy(finite_probs(N, C).astype(np.float64)))),
     "outputs: bytes hold 'float64' (6, 5), not the declared 'float16' (6, 5)"),
    ("data-int8-declared-float16", _outputs(_raw(data=_npy(np.zeros((N, C), dtype=np.int8)))),
     "outputs: bytes hold 'int8' (6, 5), not the declared 'float16' (6, 5)"),
    ("honest-float32", _outputs(Array(finite_probs(N, C))), "outputs: dtype is 'float32', expected float16"),
    ("declared-object", _outputs(_raw(dtype="object")), "outputs: dtype is 'object', expected float16"),
    ("declared-dtype-forges-log-line", _outputs(_raw(dtype="f\nWARNING H1 ok")), "outputs: dtype is "),
    ("data-more-classes", _outputs(_raw(data=_npy(finite_probs(N, C + 1).astype(np.float16)))),
     "outputs: bytes hold 'float16' (6, 6), not the declared 'float16' (6, 5)"),
    ("data-flat", _outputs(_raw(data=_npy(_PROBS16.reshape(-1)))),
     "outputs: bytes hold 'float16' (30,), not the declared 'float16' (6, 5)"),
    ("declared-rank-1", _outputs(_raw(shape=(N * C,))), "outputs: declared shape (30,) is not a 2-D shape"),
    ("declared-rank-3", _outputs(_raw(shape=(N, C, 1))), "outputs: declared shape (6, 5, 1) is not a 2-D shape"),
    ("declared-scalar", _outputs(_raw(shape=())), "outputs: declared shape () is not a 2-D shape"),
    ("declared-negative", _outputs(_raw(shape=(-N, -C))), "outputs: declared shape (-6, -5) is not a 2-D shape"),
    ("declared-huge", _outputs(_raw(shape=(10**9, 10**9))), "outputs: declared shape (1000000000, 1000000000) holds "
                                                            "more than 30 elements"),
    ("honest-fewer-rows", _outputs(Array(finite_probs(N - 1, C).astype(np.float16))),
     "outputs: shape is (5, 5), expected (6, 5)"),
    # values
    ("nan", _values(_set((2, 3), math.nan)), "outputs: contain NaN"),
    ("inf", _values(_set((1, 1), math.inf)), "outputs: contain infinite values"),
    ("neg-inf", _values(_set((0, 4), -math.inf)), "outputs: contain infinite values"),
    ("float16-overflow", _values(_set((0, 0), 1e6)), "outputs: contain infinite values"),
    ("negative-probs", _values(_negative), "outputs: probabilities are negative"),
    ("rows-not-summing-to-1", _values(_scaled), "outputs: probability rows do not sum to 1"),
    ("zero-row", _values(_zeros), "outputs: probability rows do not sum to 1"),
]


def _bad_content(mutate: Mutation) -> RecordDict:
    content = _content(3)
    mutate(content)
    return content


def test_table_covers_enough_kinds() -> None:
    assert len({label for label, _, _ in BAD_REPLIES}) == len(BAD_REPLIES) >= 28


@pytest.mark.parametrize(("label", "mutate", "reason"), BAD_REPLIES, ids=[c[0] for c in BAD_REPLIES])
def test_malformed_reply_is_named_and_round_goes_on(label: str, mutate: Mutation, reason: str) -> None:
    # (a) parse_reply raises PayloadError and nothing else
    with pytest.raises(PayloadError) as caught:
        _parse(_bad_content(mutate))
    error = caught.value
    # (b) the reason names the field and the problem; the hospital is named apart
    assert reason in error.reason, error.reason
    assert error.hospital == "H3" and str(error) == f"hospital H3: {error.reason}"
    assert error.field is not None and error.reason.startswith(f"{error.field}: ")
    assert len(error.reason) < 1000, error.reason  # a hostile input is never echoed back whole
    assert error.reason.isprintable(), error.reason  # nor can it forge lines in the coordinator's log
    # (c) the round keeps the two good replies and rejects H3 with the same reason
    bad = _message(_bad_content(mutate), 3)
    result = collect_replies([*_good(), bad], expected=EXPECTED, round=4, n_samples=N, n_classes=C, query=QUERY)
    assert [r.hospital for r in result.accepted] == ["H1", "H2"]
    assert result.rejected == {"H3": error.reason}


def test_valid_reply_still_parses() -> None:
    """The table's mutations start from a reply that is itself accepted."""
    reply = _parse(_content(3))
    assert reply.hospital == "H3" and reply.outputs.shape == (N, C) and reply.outputs.dtype == np.float32


@pytest.mark.parametrize("order", ["real-first", "impostor-first"])
def test_impostor_rejected_in_either_order(order: str) -> None:
    real = _message(_content(1), 1)
    impostor = _message(_content(3, name="H1"), 3)
    replies = [real, impostor] if order == "real-first" else [impostor, real]
    result = collect_replies(replies, expected={1: "H1", 3: "H3"}, round=4, n_samples=N, n_classes=C, query=QUERY)
    assert len(result.accepted) == 1 and result.accepted[0].hospital == "H1"
    assert result.accepted[0].num_private == 101  # the real H1's reply, not the impostor's
    assert list(result.rejected) == ["H3"]
    assert "hospital.name" in result.rejected["H3"] and "'H1'" in result.rejected["H3"]


def test_impostor_among_good_replies() -> None:
    bad = _message(_content(3, name="H1"), 3)
    result = collect_replies([*_good(), bad], expected=EXPECTED, round=4, n_samples=N, n_classes=C, query=QUERY)
    assert [r.hospital for r in result.accepted] == ["H1", "H2"]
    assert list(result.rejected) == ["H3"] and "'H1'" in result.rejected["H3"]


@pytest.mark.parametrize("reason", ["y" * 100_000, "boom\n\x1b[31mFAKE LOG LINE\x00" + "z" * 100_000],
                         ids=["huge", "control-chars"])
def test_error_reply_with_huge_reason_is_truncated(reason: str) -> None:
    bad = Message(Error(code=101, reason=reason), reply_to=_request(3))
    result = collect_replies([*_good(), bad], expected=EXPECTED, round=4, n_samples=N, n_classes=C, query=QUERY)
    assert [r.hospital for r in result.accepted] == ["H1", "H2"]
    stored = result.rejected["H3"]
    assert stored.startswith("error 101: ")
    assert len(stored) <= MAX_REASON + len("error 101: "), len(stored)
    assert stored.isprintable()


# --------------------------------------------------------------------------- hypothesis: replies

PN, PC = 4, 3  # small outputs keep the fuzzing fast
RECORD_NAMES = ["outputs", "metrics", "hospital", "weights", "query", "indices", "", "Outputs"]
KEYS = ["outputs", "num_private", "val_auc", "name", "model", "privacy", "logits", "loss", "", "indices"]
DTYPE_NAMES = ["float16", "float32", "float64", "int64", "int16", "uint16", "int32", "uint32", "int8", "bool",
               "object", "<f2", ">f2", "complex64", "", "float16\n"]
STYPES = ["numpy.ndarray", "torch.Tensor", "", "numpy.ndarray "]

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
metric_scalars = st.one_of(int64s, st.integers(0, 2000), st.floats(), st.sampled_from([-1.0, 0.0, 0.5, 1.0]))
metric_values = st.one_of(metric_scalars, st.lists(int64s, max_size=3), st.lists(st.floats(), max_size=3))
texts = st.one_of(st.text(max_size=80), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
                  st.sampled_from(["H3", "smallcnn", "none", "H3\n", "x" * 300]))
config_scalars = st.one_of(int64s, st.floats(), texts, st.binary(max_size=40), st.booleans())
config_values = st.one_of(config_scalars, st.lists(int64s, max_size=3), st.lists(st.floats(), max_size=3),
                          st.lists(st.text(max_size=10), max_size=3), st.lists(st.binary(max_size=10), max_size=3),
                          st.lists(st.booleans(), max_size=3))
shapes = st.tuples() | st.lists(st.integers(-(2**40), 2**40) | st.integers(0, 8), max_size=4).map(tuple)
np_dtypes = st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.int32, np.uint16, np.int8, np.bool_,
                             np.complex64, np.dtype(">f2"), np.dtype("<U2")])


@st.composite
def npy_bytes(draw: st.DrawFn, rows: int, cols: int) -> tuple[np.ndarray, bytes]:
    """A random array (often (rows, cols), sometimes on the simplex) and its .npy bytes, maybe damaged."""
    how = draw(st.sampled_from(["simplex", "simplex", "simplex", "any-shape", "right-shape"]))
    if how == "simplex":
        raw = draw(hnp.arrays(np.float64, (rows, cols), elements=st.floats(0.0, 1.0)))
        sums = raw.sum(axis=1, keepdims=True)
        array = np.where(sums > 0, raw / np.where(sums > 0, sums, 1.0), 1.0 / cols)
        array = array.astype(draw(st.sampled_from([np.float16, np.float32])))
    else:
        shape = (rows, cols) if how == "right-shape" else draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                               max_side=6))
        array = draw(hnp.arrays(draw(np_dtypes), shape))
    data = _npy(array)
    damage = draw(st.sampled_from(["truncate", "append", "flip"])) if _rarely(draw) else "none"
    if damage == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif damage == "append":
        data = data + draw(st.binary(min_size=1, max_size=32))
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return array, data


def _rarely(draw: st.DrawFn, odds: int = 5) -> bool:
    """True about once in ``odds`` draws (so most examples stay near-valid and reach the deep checks)."""
    return draw(st.sampled_from([False] * (odds - 1) + [True]))


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], odds: int = 5) -> st.SearchStrategy[Any]:
    """``good`` but about once in ``odds`` draws ``bad``."""
    return st.sampled_from([good] * (odds - 1) + [bad]).flatmap(lambda strategy: strategy)


@st.composite
def arrays(draw: st.DrawFn, rows: int, cols: int) -> Array:
    """An Array with honest, lying or random metadata, over .npy bytes or random bytes."""
    if _rarely(draw):
        data = draw(st.binary(max_size=200))
        return Array(dtype=draw(st.sampled_from(DTYPE_NAMES) | st.text(max_size=12)), shape=draw(shapes),
                     stype=draw(st.sampled_from(STYPES) | st.text(max_size=12)), data=data)
    array, data = draw(npy_bytes(rows, cols))
    dtype = draw(st.sampled_from(DTYPE_NAMES)) if _rarely(draw) else str(array.dtype)
    shape = draw(shapes) if _rarely(draw) else tuple(array.shape)
    stype = draw(st.sampled_from(STYPES)) if _rarely(draw, 10) else "numpy.ndarray"
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


@st.composite
def key_sets(draw: st.DrawFn, required: list[str]) -> list[str]:
    if not _rarely(draw, 6):
        return required
    return draw(st.lists(st.sampled_from(KEYS + required) | st.text(max_size=6), max_size=5, unique=True))


@st.composite
def any_record(draw: st.DrawFn, rows: int, cols: int) -> ArrayRecord | MetricRecord | ConfigRecord:
    """A record of a random kind with random keys."""
    kind = draw(st.sampled_from(["array", "metric", "config"]))
    names = draw(st.lists(st.sampled_from(KEYS) | st.text(max_size=6), max_size=4, unique=True))
    if kind == "array":
        return ArrayRecord({k: draw(arrays(rows, cols)) for k in names})
    if kind == "metric":
        return MetricRecord({k: draw(metric_values) for k in names})
    return ConfigRecord({k: draw(config_values) for k in names})


@st.composite
def reply_contents(draw: st.DrawFn) -> RecordDict:
    """Mostly near-valid replies (right record names and kinds, random keys and values), plus chaos."""
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    if not _rarely(draw, 8):
        records["outputs"] = ArrayRecord({k: draw(arrays(PN, PC)) for k in draw(key_sets(["outputs"]))})
        metrics = draw(key_sets(["num_private", "val_auc"]))
        good_metric = {"num_private": _mostly(st.integers(0, MAX_PRIVATE), st.sampled_from([-1, MAX_PRIVATE + 1, 2.5])),
                       "val_auc": _mostly(st.floats(0.0, 1.0) | st.just(-1.0), st.sampled_from([-0.5, 1.0001]))}
        records["metrics"] = MetricRecord({k: draw(metric_values if _rarely(draw, 8) or k not in good_metric
                                                   else good_metric[k]) for k in metrics})
        info = draw(key_sets(["name", "model", "privacy"]))
        good_text = _mostly(st.sampled_from(["H3", "smallcnn", "dp eps=2"]), texts)
        records["hospital"] = ConfigRecord({k: draw(config_values if _rarely(draw, 8) else good_text) for k in info})
        if _rarely(draw, 8):  # a record of a random kind in place of the right one
            records[draw(st.sampled_from(["outputs", "metrics", "hospital"]))] = draw(any_record(PN, PC))
    if _rarely(draw, 4):
        for name in draw(st.lists(st.sampled_from(RECORD_NAMES) | st.text(max_size=6), max_size=3, unique=True)):
            records[name] = draw(any_record(PN, PC))
    return RecordDict(records)


def _check_reply(reply: Reply) -> None:
    assert isinstance(reply, Reply)
    assert isinstance(reply.outputs, np.ndarray) and reply.outputs.dtype == np.float32
    assert reply.outputs.shape == (PN, PC) and np.isfinite(reply.outputs).all()
    assert isinstance(reply.num_private, int) and 0 <= reply.num_private <= MAX_PRIVATE
    assert math.isfinite(reply.val_auc) and (0.0 <= reply.val_auc <= 1.0 or reply.val_auc == -1.0)
    assert isinstance(reply.hospital, str) and 1 <= len(reply.hospital) <= 64
    assert isinstance(reply.model, str) and len(reply.model) <= 64
    assert isinstance(reply.privacy, str) and len(reply.privacy) <= MAX_TEXT


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(content=reply_contents(), output=st.sampled_from(list(OutputKind)), dtype=st.sampled_from(list(WireDtype)))
def test_fuzzed_reply_is_accepted_or_payload_error(content: RecordDict, output: OutputKind, dtype: WireDtype) -> None:
    try:
        reply = parse_reply(content, n_samples=PN, n_classes=PC, output=output, dtype=dtype,
                            simplex_tolerance=QUERY.simplex_tolerance, hospital="H3")
    except PayloadError as e:
        assert e.hospital == "H3" and e.field
        assert len(e.reason) < 1000  # a hostile input is never echoed back whole
        return
    _check_reply(reply)
    if output == OutputKind.PROBS:
        assert (reply.outputs >= 0).all()
        np.testing.assert_allclose(reply.outputs.sum(axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- hypothesis: queries

PROXY_SIZE, PROXY_HASH = 40, "3f2a9c"
INDEX_DTYPES = [np.int64, np.int32, np.uint32, np.int16, np.uint16, np.int8, np.uint64, np.float64, np.bool_]


@st.composite
def index_arrays(draw: st.DrawFn) -> Array:
    how = draw(st.sampled_from(["valid", "valid", "valid", "ints", "other"]))
    if how == "valid":
        chosen = draw(st.lists(st.integers(0, PROXY_SIZE - 1), min_size=1, max_size=PROXY_SIZE, unique=True))
        array = np.asarray(chosen, dtype=draw(st.sampled_from(INDEX_DTYPES[:5])))
        return Array(array)
    if how == "ints":
        array = draw(hnp.arrays(draw(st.sampled_from(INDEX_DTYPES)), draw(hnp.array_shapes(min_dims=0, max_dims=2,
                                                                                           min_side=0, max_side=50))))
        data = _npy(array)
        if draw(st.booleans()):
            return Array(array)
        return Array(dtype=draw(st.sampled_from([str(array.dtype), "int64", "float16"])), shape=draw(shapes),
                     stype=draw(st.sampled_from(STYPES)), data=data[:draw(st.integers(0, len(data)))])
    return draw(arrays(PROXY_SIZE, 1))


@st.composite
def query_contents(draw: st.DrawFn) -> RecordDict:
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    if not _rarely(draw, 8):
        keys = draw(key_sets(["round", "proxy_hash", "temperature", "output", "dtype"]))
        good = {"round": _mostly(st.integers(0, 20), st.sampled_from([3.0, MAX_ROUND, MAX_ROUND + 1, -1, 2.5])),
                "proxy_hash": _mostly(st.just(PROXY_HASH), st.sampled_from([PROXY_HASH.upper(), "", "x" * 200])),
                "temperature": _mostly(st.floats(0.01, 50.0), st.floats()),
                "output": _mostly(st.sampled_from(["probs", "logits"]), st.sampled_from(["PROBS", "softmax", ""])),
                "dtype": _mostly(st.sampled_from(["float16", "float32"]), st.sampled_from(["float64", "int8", ""]))}
        records["query"] = ConfigRecord({k: draw(config_values if _rarely(draw, 8) or k not in good else good[k])
                                         for k in keys})
        records["indices"] = ArrayRecord({k: draw(index_arrays()) for k in draw(key_sets(["indices"]))})
        if _rarely(draw, 8):
            records[draw(st.sampled_from(["query", "indices"]))] = draw(any_record(PROXY_SIZE, 1))
    if _rarely(draw, 4):
        names = ["query", "indices", "outputs", "config", ""]
        for name in draw(st.lists(st.sampled_from(names) | st.text(max_size=6), max_size=2, unique=True)):
            records[name] = draw(any_record(PROXY_SIZE, 1))
    return RecordDict(records)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(content=query_contents())
def test_fuzzed_query_is_accepted_or_payload_error(content: RecordDict) -> None:
    try:
        query = parse_query(content, proxy_size=PROXY_SIZE, proxy_hash=PROXY_HASH)
    except PayloadError as e:
        assert e.field
        assert len(e.reason) < 1000
        return
    assert isinstance(query, Query)
    assert 0 <= query.round <= MAX_ROUND and query.proxy_hash == PROXY_HASH
    assert math.isfinite(query.temperature) and query.temperature > 0
    assert isinstance(query.output, OutputKind) and isinstance(query.dtype, WireDtype)
    idx = query.indices
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64 and idx.ndim == 1
    assert 1 <= idx.size <= PROXY_SIZE and idx.min() >= 0 and idx.max() < PROXY_SIZE
    assert np.unique(idx).size == idx.size


def test_fuzz_helpers_can_build_valid_payloads() -> None:
    """The strategies' valid corners are accepted (so the fuzzing reaches past the first checks)."""
    content = make_reply_content(outputs=finite_probs(PN, PC), dtype=WireDtype.FLOAT16, hospital="H3", model="m",
                                 privacy="p", num_private=1, val_auc=-1.0)
    _check_reply(parse_reply(content, n_samples=PN, n_classes=PC, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16,
                             simplex_tolerance=QUERY.simplex_tolerance))
    q = Query(round=1, proxy_hash=PROXY_HASH, indices=np.array([3, 0, 39]), temperature=2.0,
              output=OutputKind.LOGITS, dtype=WireDtype.FLOAT32)
    parsed = parse_query(make_query_content(q), proxy_size=PROXY_SIZE, proxy_hash=PROXY_HASH)
    assert parsed.indices.tolist() == [3, 0, 39]
