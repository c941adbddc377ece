"""A hospital's ClientApp refuses malformed queries with a clear error reply and sends nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Array, ConfigRecord, Context, RecordDict

from client.app import make_client_app
from common.config import OutputKind, WireDtype
from common.payload import (QUERY_MESSAGE_TYPE, QUERY_REJECTED_CODE, TEACHER_MESSAGE_TYPE, Query, make_query_content,
                            parse_query)
from common.errors import MedkdError, PayloadError
from common.split import make_split
from tests.conftest import request_message


def _query(server_hash: str, **changes: object) -> Query:
    fields = dict(round=3, proxy_hash=server_hash, indices=np.arange(8), temperature=2.0, output=OutputKind.PROBS,
                  dtype=WireDtype.FLOAT16)
    fields.update(changes)
    return Query(**fields)


def _call(client_app, content: RecordDict, hospitals_dir: Path, partition: int = 0):
    context = Context(run_id=1, node_id=10 + partition, node_config={"partition-id": partition, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    return client_app(request_message(content, message_type=QUERY_MESSAGE_TYPE, dst_node_id=10 + partition), context)


@pytest.mark.parametrize(("change", "reason"), [
    ({"proxy_hash": "0" * 64}, "proxy manifest mismatch"),
    ({"indices": np.array([0, 1, 10_000])}, "indices out of range"),
    ({"indices": np.array([-1, 2])}, "indices out of range"),
    ({"indices": np.array([4, 4])}, "indices contain duplicates"),
    ({"indices": np.arange(5000)}, "more than the limit 4096"),
    ({"indices": np.array([], dtype=np.int64)}, "indices is empty"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"temperature": -1.5}, "temperature must be a finite number > 0"),
])
def test_client_app_rejects_bad_queries(tiny_config, tmp_path: Path, change: dict, reason: str) -> None:
    cfg = tiny_config()
    split = make_split(cfg)
    app = make_client_app(cfg, tmp_path)
    reply = _call(app, make_query_content(_query(split.proxy_hash, **change)), tmp_path)
    assert reply.has_error()
    assert reply.error.code == QUERY_REJECTED_CODE
    assert reason in reply.error.reason and "hospital H0 rejected query (round 3)" in reply.error.reason
    assert not (tmp_path / "H0" / "teacher.pt").exists()  # refused before any work
    assert not (tmp_path / "H0" / "outbound.jsonl").exists()  # nothing left the hospital


def test_client_app_rejects_wrong_output_kind_and_missing_records(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    split = make_split(cfg)
    app = make_client_app(cfg, tmp_path)
    content = make_query_content(_query(split.proxy_hash))
    content.config_records["query"]["output"] = "weights"
    reply = _call(app, content, tmp_path)
    assert reply.has_error() and "output must be one of" in reply.error.reason
    reply = _call(app, RecordDict({"query": ConfigRecord({"round": 1})}), tmp_path)
    assert reply.has_error() and "ArrayRecord 'indices'" in reply.error.reason
    content = make_query_content(_query(split.proxy_hash))
    content.array_records["indices"] = ArrayRecord({"indices": Array(np.zeros((2, 2), dtype=np.int64))})
    reply = _call(app, content, tmp_path)
    assert reply.has_error() and "1-D integer array" in reply.error.reason


def test_client_app_answers_a_good_query_with_outputs_only(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    split = make_split(cfg)
    app = make_client_app(cfg, tmp_path)
    reply = _call(app, make_query_content(_query(split.proxy_hash)), tmp_path, partition=1)
    assert not reply.has_error()
    assert set(reply.content.array_records) == {"outputs"}  # no weights, gradients or samples
    outputs = reply.content.array_records["outputs"]["outputs"].numpy()
    assert outputs.dtype == np.float16 and outputs.shape == (8, split.data.n_classes)
    np.testing.assert_allclose(outputs.astype(np.float32).sum(axis=1), 1.0, atol=5e-3)
    assert reply.content.metric_records["metrics"]["num_private"] == split.hospital_indices[1].size
    assert (tmp_path / "H1" / "teacher.pt").exists()
    log = (tmp_path / "H1" / "outbound.jsonl").read_text().splitlines()
    assert len(log) == 1 and '"kind": "query.logits"' in log[0] and "no formal DP guarantee" in log[0]
    # The same query again reuses the saved teacher: identical outputs.
    again = _call(app, make_query_content(_query(split.proxy_hash)), tmp_path, partition=1)
    np.testing.assert_array_equal(again.content.array_records["outputs"]["outputs"].numpy(), outputs)


def test_parse_query_accepts_the_contract() -> None:
    q = _query("abc", indices=np.array([3, 1, 2]))
    parsed = parse_query(make_query_content(q), proxy_size=4, proxy_hash="abc", max_indices=10)
    assert parsed.round == 3 and parsed.indices.tolist() == [3, 1, 2] and parsed.output == OutputKind.PROBS
    with pytest.raises(PayloadError, match="proxy set has 4 samples"):
        parse_query(make_query_content(_query("abc", indices=np.array([4]))), proxy_size=4, proxy_hash="abc",
                    max_indices=10)


def test_explicit_teacher_command_trains_and_replies_with_metrics_only(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    app = make_client_app(cfg, tmp_path)
    context = Context(run_id=1, node_id=12, node_config={"partition-id": 2, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    reply = app(request_message(RecordDict(), message_type=TEACHER_MESSAGE_TYPE, dst_node_id=12), context)
    assert not reply.has_error() and not reply.content.array_records
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num_private"] == make_split(cfg).hospital_indices[2].size
    assert 0.0 <= metrics["val_auc"] <= 1.0
    assert (tmp_path / "H2" / "teacher.pt").exists()


def test_hospital_refuses_to_send_weights_outside_the_fedavg_baseline(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()  # method fedkd
    app = make_client_app(cfg, tmp_path)
    context = Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    with pytest.raises(MedkdError, match="refuses to send model weights: method is fedkd"):
        app(request_message(RecordDict(), message_type="train", dst_node_id=10), context)


def test_each_hospital_may_use_its_own_teacher_architecture(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**{"teacher.per_hospital": {"1": "resnet18"}, "teacher.epochs": 1})
    split = make_split(cfg)
    app = make_client_app(cfg, tmp_path)
    reply = _call(app, make_query_content(_query(split.proxy_hash)), tmp_path, partition=1)
    assert reply.content.config_records["hospital"]["model"] == "resnet18"
    assert tuple(reply.content.array_records["outputs"]["outputs"].shape) == (8, split.data.n_classes)
