"""The server rejects bad replies (NaN, wrong shape, wrong dtype, negative probabilities, errors, silence)
with a logged reason, and keeps the valid ones."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message

from common.config import OutputKind, QueryConfig, WireDtype
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content, make_reply_content, parse_reply
from common.errors import PayloadError
from server.collect import collect_replies
from tests.conftest import finite_probs, request_message

N, C = 6, 5
QUERY = QueryConfig()


def _request(node: int) -> Message:
    q = Query(round=4, proxy_hash="h", indices=np.arange(N), temperature=2.0, output=OutputKind.PROBS,
              dtype=WireDtype.FLOAT16)
    return request_message(make_query_content(q), message_type=QUERY_MESSAGE_TYPE, dst_node_id=node, round=4,
                           message_id=f"m-{node}")


def _reply(node: int, outputs: np.ndarray, *, dtype: WireDtype = WireDtype.FLOAT16, name: str | None = None) -> Message:
    content = make_reply_content(outputs=outputs, dtype=dtype, hospital=name or f"H{node}", model="smallcnn",
                                 privacy="none", num_private=100 + node, val_auc=0.7)
    return Message(content, reply_to=_request(node))


def _bad_cases() -> list[tuple[str, Message, str]]:
    nan = finite_probs(N, C, 1)
    nan[2, 3] = np.nan
    negative = finite_probs(N, C, 2)
    negative[0, :2] = [-0.2, negative[0, 0] + negative[0, 1] + 0.2]
    not_simplex = finite_probs(N, C, 3) * 1.5
    float64 = make_reply_content(outputs=finite_probs(N, C, 4), dtype=WireDtype.FLOAT32, hospital="H3",
                                 model="smallcnn", privacy="none", num_private=1, val_auc=0.5)
    float64.array_records["outputs"] = ArrayRecord({"outputs": Array(finite_probs(N, C, 4).astype(np.float64))})
    weights = make_reply_content(outputs=finite_probs(N, C, 5), dtype=WireDtype.FLOAT16, hospital="H3",
                                 model="smallcnn", privacy="none", num_private=1, val_auc=0.5)
    weights.array_records["weights"] = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    return [
        ("nan", _reply(3, nan), "outputs: contain NaN"),
        ("shape", _reply(3, finite_probs(N - 1, C)), "outputs: shape is (5, 5), expected (6, 5)"),
        ("classes", _reply(3, finite_probs(N, C + 1)), "outputs: declared shape (6, 6) holds more than 30 elements"),
        ("dtype", _reply(3, finite_probs(N, C), dtype=WireDtype.FLOAT32), "outputs: dtype is 'float32', expected float16"),
        ("float64", Message(float64, reply_to=_request(3)), "outputs: dtype is 'float64'"),
        ("negative", _reply(3, negative), "probabilities are negative"),
        ("simplex", _reply(3, not_simplex), "do not sum to 1"),
        ("extra-arrays", Message(weights, reply_to=_request(3)), "content: unexpected record(s) ['weights']"),
        ("error", Message(Error(code=100, reason="hospital H3 rejected query (round 4): boom"), reply_to=_request(3)),
         "error 100: hospital H3 rejected query (round 4): boom"),
        ("impostor", _reply(3, finite_probs(N, C), name="H1"), "hospital.name: claims to be 'H1', but its node is H3"),
    ]


@pytest.mark.parametrize(("label", "bad", "reason"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_reply_rejected_round_goes_on(label: str, bad: Message, reason: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    good = [_reply(n, finite_probs(N, C, n)) for n in (1, 2)]
    expected = {1: "H1", 2: "H2", 3: "H3"}
    with caplog.at_level(logging.WARNING, logger="server.collect"):
        result = collect_replies([*good, bad], expected=expected, round=4, n_samples=N, n_classes=C, query=QUERY)
    assert [r.hospital for r in result.accepted] == ["H1", "H2"]
    assert list(result.rejected) == ["H3"] and reason in result.rejected["H3"]
    assert "hospital H3 reply rejected: " in caplog.text and "(round 4); continuing with 2 of 3 replies" in caplog.text


def test_missing_reply_is_reported() -> None:
    result = collect_replies([_reply(1, finite_probs(N, C))], expected={1: "H1", 2: "H2"}, round=1, n_samples=N,
                             n_classes=C, query=QUERY)
    assert len(result.accepted) == 1 and result.rejected == {"H2": "no reply before the round's timeout"}


def test_accepted_outputs_are_renormalised_float32() -> None:
    probs = finite_probs(N, C, 9)
    reply = parse_reply(_reply(1, probs).content, n_samples=N, n_classes=C, output=OutputKind.PROBS,
                        dtype=WireDtype.FLOAT16, simplex_tolerance=1e-2)
    assert reply.outputs.dtype == np.float32
    np.testing.assert_allclose(reply.outputs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(reply.outputs, probs, atol=2e-3)
    assert reply.num_private == 101


def test_logits_may_be_any_finite_value_but_not_inf() -> None:
    logits = np.array([[-30.0, 4.0, 0.0, 1.0, 2.0]] * N, dtype=np.float32)
    reply = parse_reply(_reply(1, logits, dtype=WireDtype.FLOAT32).content, n_samples=N, n_classes=C,
                        output=OutputKind.LOGITS, dtype=WireDtype.FLOAT32, simplex_tolerance=1e-2)
    assert reply.outputs[0, 0] == -30.0
    logits[0, 0] = np.inf
    with pytest.raises(PayloadError, match="infinite"):
        parse_reply(_reply(1, logits, dtype=WireDtype.FLOAT32).content, n_samples=N, n_classes=C,
                    output=OutputKind.LOGITS, dtype=WireDtype.FLOAT32, simplex_tolerance=1e-2)


def test_superlink_error_for_an_unavailable_node_is_not_an_impostor() -> None:
    from flwr.app import Error, Message
    from flwr.app import Metadata

    from common.config import QueryConfig
    from server.collect import collect_replies

    metadata = Metadata(run_id=1, message_id="r-1", src_node_id=1, dst_node_id=1, reply_to_message_id="q-1",
                        group_id="2", created_at=0.0, ttl=60.0, message_type="query.logits")
    unavailable = Message(Error(code=5, reason="node unavailable"), metadata=metadata)  # how the SuperLink writes it
    out = collect_replies([unavailable], expected={7: "H2"}, round=2, n_samples=4, n_classes=5, query=QueryConfig())
    assert out.accepted == [] and out.rejected == {"H2": "no reply before the round's timeout"}


def test_accepted_replies_are_in_name_order_whatever_order_they_arrived_in() -> None:
    """Aggregation sums in this order, so a round's result must not depend on which hospital answered first."""
    nodes = [11, 2, 10, 1]
    expected = {n: f"H{n}" for n in nodes}
    replies = [_reply(n, finite_probs(N, C, n)) for n in nodes]
    for arrival in (replies, replies[::-1]):
        result = collect_replies(arrival, expected=expected, round=4, n_samples=N, n_classes=C, query=QUERY)
        assert [r.hospital for r in result.accepted] == ["H1", "H2", "H10", "H11"]
