"""FedAvg baseline at both ends: weights are checked by name, dtype, shape and value before anyone decodes or
averages them, and only hospitals that opted in send any."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from client.app import make_client_app
from common.errors import PayloadError
from common.models import build_model
from common.payload import QUERY_REJECTED_CODE
from common.split import make_split
from server.fedavg import check_weights_reply
from simulations.run import prepare_hospitals
from tests.conftest import request_message


def _student_state(cfg) -> dict[str, np.ndarray]:
    model = build_model(cfg.student.model, make_split(cfg).model_spec())
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _train_message(state: dict[str, np.ndarray], **config: object) -> Message:
    settings = {"server-round": 1, "lr": 1e-3, "local-epochs": 1, "batch-size": 32, "student-model": "smallcnn"}
    settings.update(config)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                          "config": ConfigRecord(settings)})
    return request_message(content, message_type="train", dst_node_id=10)


def _context() -> Context:
    return Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                   run_config={})


@pytest.mark.parametrize(("change", "reason"), [
    ("drop", "arrays: missing key(s)"),
    ("shape", "declared shape"),
    ("dtype", "dtype is 'float64'"),
    ("nan", "contains non-finite values"),
])
def test_opted_in_hospital_refuses_malformed_weights(tiny_config, tmp_path: Path, change: str, reason: str) -> None:
    cfg = tiny_config(method="fedavg", **{"teacher.epochs": 1})  # simulated hospitals opt in for a fedavg study
    prepare_hospitals(cfg, tmp_path)
    state = _student_state(cfg)
    name = next(k for k, v in state.items() if v.ndim == 4)  # a convolution kernel
    if change == "drop":
        state.pop(name)
    elif change == "shape":
        state[name] = np.zeros((2, *state[name].shape), dtype=np.float32)
    elif change == "dtype":
        state[name] = state[name].astype(np.float64)
    else:
        state[name][0] = np.nan
    reply = make_client_app(tmp_path)(_train_message(state), _context())
    assert reply.has_error() and reply.error.code == QUERY_REJECTED_CODE and reason in reply.error.reason
    assert "hospital H0 refused train (round 1)" in reply.error.reason


def test_opted_in_hospital_trains_and_sends_weights_through_the_gate(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(method="fedavg", **{"teacher.epochs": 1})
    prepare_hospitals(cfg, tmp_path)
    state = _student_state(cfg)
    reply = make_client_app(tmp_path)(_train_message(state), _context())
    assert not reply.has_error()
    check_weights_reply(reply.content, reference=state)  # exactly the student's weights, and finite
    [entry] = [json.loads(x) for x in (tmp_path / "H0" / "outbound.jsonl").read_text().splitlines()]
    assert (entry["kind"], entry["status"], entry["round"]) == ("train", "sent", "1") and entry["bytes"] > 400_000


def test_coordinator_rejects_a_weights_reply_that_does_not_fit_the_student(tiny_config) -> None:
    state = _student_state(tiny_config())
    good = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                       "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.5}),
                       "hospital": ConfigRecord({"name": "H0"})})
    check_weights_reply(good, reference=state)
    name = next(iter(state))
    bad = RecordDict({"arrays": ArrayRecord({**{k: Array(v) for k, v in state.items()},
                                             name: Array(np.zeros(3, dtype=state[name].dtype))}),
                      "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.5}),
                      "hospital": ConfigRecord({"name": "H0"})})
    with pytest.raises(PayloadError, match=f"arrays.{name}"):
        check_weights_reply(bad, reference=state)
    no_count = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                           "metrics": MetricRecord({"num-examples": -1, "train_loss": 0.5}),
                           "hospital": ConfigRecord({"name": "H0"})})
    with pytest.raises(PayloadError, match="metrics.num-examples"):
        check_weights_reply(no_count, reference=state)


def test_averaged_weights_keep_the_students_dtypes_and_pass_the_hospitals_check(tiny_config) -> None:
    """Flower's average is float64 for every array; a float64 num_batches_tracked would be refused next round."""
    from server.fedavg import CheckedFedAvg

    state = _student_state(tiny_config())
    assert any(np.issubdtype(v.dtype, np.integer) for v in state.values())  # BatchNorm's num_batches_tracked
    replies = []
    for node, scale in ((1, 1.0), (2, 3.0)):
        arrays = {k: np.asarray(v * scale if v.dtype.kind == "f" else v + node, dtype=v.dtype)
                  for k, v in state.items()}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.5}),
                              "hospital": ConfigRecord({"name": f"H{node}"})})
        metadata = Metadata(run_id=1, message_id=f"r-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                            group_id="1", created_at=time.time(), ttl=600.0, message_type="train")
        msg = Message(content=content, metadata=metadata)  # a reply as it arrives from that node
        replies.append(msg)
    strategy = CheckedFedAvg(reference=state, names={1: "H1", 2: "H2"}, min_nodes=2)
    averaged, _ = strategy.aggregate_train(1, replies)
    assert strategy.rejected == {}
    for name, array in averaged.items():
        assert array.numpy().dtype == state[name].dtype, name
    name = next(k for k, v in state.items() if v.dtype.kind == "f")
    np.testing.assert_allclose(averaged[name].numpy(), state[name] * 2.0, rtol=1e-5)
    # the hospitals' own check on the next round's weights accepts them
    check_weights_reply(RecordDict({"arrays": averaged, "metrics": MetricRecord({"num-examples": 1, "train_loss": 0.1}),
                                    "hospital": ConfigRecord({"name": "H1"})}), reference=state)
