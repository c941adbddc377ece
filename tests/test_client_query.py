"""A hospital's ClientApp: its own policy decides, malformed queries are refused, every reply passes the gate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from client.app import make_client_app
from common.config import OutputKind, WireDtype
from common.errors import PayloadError
from common.payload import (HOSPITAL_ERROR_CODE, QUERY_MESSAGE_TYPE, QUERY_REJECTED_CODE, TEACHER_MESSAGE_TYPE, Query,
                            make_query_content, parse_query, wire_bytes)
from common.policy import load_policy, write_policy
from common.split import make_split
from simulations.run import prepare_hospitals
from tests.conftest import request_message


def _query(server_hash: str, **changes: object) -> Query:
    fields = dict(round=3, proxy_hash=server_hash, indices=np.arange(8), temperature=2.0, output=OutputKind.PROBS,
                  dtype=WireDtype.FLOAT16)
    fields.update(changes)
    return Query(**fields)


def _context(partition: int, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=10 + partition, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config=run_config or {})


def _call(client_app, content: RecordDict, partition: int = 0, message_type: str = QUERY_MESSAGE_TYPE,
          context: Context | None = None):
    msg = request_message(content, message_type=message_type, dst_node_id=10 + partition)
    return client_app(msg, context or _context(partition))


def _log(folder: Path) -> list[dict]:
    path = folder / "outbound.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def hospital_app(tiny_config, tmp_path: Path):
    """(config, split, ClientApp, hospitals folder) with policies written as ``medkd simulate`` writes them."""

    def make(**overrides: object):
        cfg = tiny_config(**overrides)
        prepare_hospitals(cfg, tmp_path)
        return cfg, make_split(cfg), make_client_app(tmp_path), tmp_path

    return make


@pytest.mark.parametrize(("change", "reason"), [
    ({"proxy_hash": "0" * 64}, "query.proxy_hash: proxy manifest mismatch"),
    ({"indices": np.array([0, 1, 10_000])}, "indices: out of range"),
    ({"indices": np.array([-1, 2])}, "indices: out of range"),
    ({"indices": np.array([4, 4])}, "indices: contain duplicates"),
    ({"indices": np.arange(5000)}, "indices: declared shape (5000,) holds more than 270 elements"),
    ({"indices": np.array([], dtype=np.int64)}, "indices: is empty"),
    ({"temperature": 0.0}, "query.temperature: must be a finite number > 0"),
    ({"temperature": -1.5}, "query.temperature: must be a finite number > 0"),
    ({"temperature": float("nan")}, "query.temperature: must be finite"),
])
def test_client_app_rejects_bad_queries(hospital_app, change: dict, reason: str) -> None:
    _, split, app, folder = hospital_app()
    reply = _call(app, make_query_content(_query(split.proxy_hash, **change)))
    assert reply.has_error()
    assert reply.error.code == QUERY_REJECTED_CODE
    assert reason in reply.error.reason and "hospital H0 refused query.logits (round 1)" in reply.error.reason
    assert not (folder / "H0" / "teacher.pt").exists()  # refused before any work
    [entry] = _log(folder / "H0")  # the refusal itself left through the gate, and is logged
    assert entry["status"] == "error" and entry["n_indices"] == 0
    assert reason in (folder / "H0" / "hospital.log").read_text()


@pytest.mark.parametrize(("policy_key", "value", "change", "reason"), [
    ("policy.outputs.kinds", ["probs"], {"output": OutputKind.LOGITS}, "policy outputs.kinds: output 'logits'"),
    ("policy.outputs.dtypes", ["float16"], {"dtype": WireDtype.FLOAT32}, "policy outputs.dtypes: dtype 'float32'"),
    ("policy.outputs.max_temperature", 4.0, {"temperature": 8.0}, "policy outputs.max_temperature: temperature 8.0"),
    ("policy.outputs.min_temperature", 1.0, {"temperature": 0.5}, "policy outputs.min_temperature: temperature 0.5"),
    ("policy.limits.max_indices_per_query", 4, {}, "policy limits.max_indices_per_query: query asks for 8 samples"),
])
def test_requests_outside_the_policy_are_refused_naming_the_key(hospital_app, policy_key: str, value: object,
                                                                change: dict, reason: str) -> None:
    _, split, app, folder = hospital_app(**{policy_key: value})
    reply = _call(app, make_query_content(_query(split.proxy_hash, **change)))
    assert reply.has_error() and reply.error.code == QUERY_REJECTED_CODE
    assert reason in reply.error.reason
    assert reason in (folder / "H0" / "hospital.log").read_text()
    assert [e["status"] for e in _log(folder / "H0")] == ["error"]


def test_the_run_limit_counts_what_already_left(hospital_app) -> None:
    _, split, app, folder = hospital_app(**{"policy.limits.max_indices_per_run": 12, "policy.limits.max_indices_per_query": 8,
                                      "teacher.epochs": 1})
    first = _call(app, make_query_content(_query(split.proxy_hash, indices=np.arange(8))))
    assert not first.has_error()
    second = _call(app, make_query_content(_query(split.proxy_hash, indices=np.arange(8, 16))))
    assert second.has_error() and "policy limits.max_indices_per_run: 8 samples already released" in \
        second.error.reason
    assert [(e["status"], e["n_indices"]) for e in _log(folder / "H0")] == [("sent", 8), ("error", 0)]


def test_client_app_rejects_wrong_output_kind_and_missing_records(hospital_app) -> None:
    _, split, app, _ = hospital_app()
    content = make_query_content(_query(split.proxy_hash))
    content.config_records["query"]["output"] = "weights"
    reply = _call(app, content)
    assert reply.has_error() and "query.output: must be one of ['probs', 'logits'], got 'weights'" in reply.error.reason
    reply = _call(app, RecordDict({"query": ConfigRecord({"round": 1})}))
    assert reply.has_error() and "missing ArrayRecord 'indices'" in reply.error.reason
    content = make_query_content(_query(split.proxy_hash))
    content.array_records["indices"] = ArrayRecord({"indices": Array(np.zeros((2, 2), dtype=np.int64))})
    reply = _call(app, content)
    assert reply.has_error() and "indices: declared shape (2, 2) is not a 1-D shape" in reply.error.reason


def test_client_app_answers_a_good_query_with_outputs_only(hospital_app) -> None:
    _, split, app, folder = hospital_app()
    reply = _call(app, make_query_content(_query(split.proxy_hash)), partition=1)
    assert not reply.has_error()
    assert set(reply.content.array_records) == {"outputs"}  # no weights, gradients or samples
    outputs = reply.content.array_records["outputs"]["outputs"].numpy()
    assert outputs.dtype == np.float16 and outputs.shape == (8, split.data.n_classes)
    np.testing.assert_allclose(outputs.astype(np.float32).sum(axis=1), 1.0, atol=5e-3)
    assert reply.content.metric_records["metrics"]["num_private"] == split.hospital_indices[1].size
    assert (folder / "H1" / "teacher.pt").exists()
    [entry] = _log(folder / "H1")
    assert entry["kind"] == "query.logits" and entry["status"] == "sent" and entry["n_indices"] == 8
    assert "no formal DP guarantee" in entry["privacy"]
    import hashlib

    assert entry["sha256"] == hashlib.sha256(wire_bytes(reply)).hexdigest()  # the hash is of what left
    # The same query again reuses the saved teacher: identical outputs.
    again = _call(app, make_query_content(_query(split.proxy_hash)), partition=1)
    np.testing.assert_array_equal(again.content.array_records["outputs"]["outputs"].numpy(), outputs)


def test_parse_query_accepts_the_contract() -> None:
    q = _query("abc", indices=np.array([3, 1, 2]))
    parsed = parse_query(make_query_content(q), proxy_size=4, proxy_hash="abc")
    assert parsed.round == 3 and parsed.indices.tolist() == [3, 1, 2] and parsed.output == OutputKind.PROBS
    with pytest.raises(PayloadError, match="proxy set has 4 samples"):
        parse_query(make_query_content(_query("abc", indices=np.array([4]))), proxy_size=4, proxy_hash="abc")


def test_explicit_teacher_command_trains_and_replies_with_metrics_only(hospital_app) -> None:
    cfg, split, app, folder = hospital_app()
    reply = _call(app, RecordDict(), partition=2, message_type=TEACHER_MESSAGE_TYPE)
    assert not reply.has_error() and not reply.content.array_records
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num_private"] == split.hospital_indices[2].size
    assert 0.0 <= metrics["val_auc"] <= 1.0
    assert (folder / "H2" / "teacher.pt").exists()
    assert [(e["kind"], e["status"]) for e in _log(folder / "H2")] == [("train.teacher", "sent")]


def test_hospital_refuses_to_send_weights_unless_its_policy_opted_in(hospital_app) -> None:
    _, _, app, folder = hospital_app()  # method fedkd: the simulated policies do not opt in
    reply = _call(app, RecordDict(), message_type="train")
    assert reply.has_error() and reply.error.code == QUERY_REJECTED_CODE
    assert "hospital H0 refused train (round 1): policy answers.fedavg_weights" in reply.error.reason
    assert [(e["kind"], e["status"]) for e in _log(folder / "H0")] == [("train", "error")]


def test_coordinator_run_config_is_ignored_and_noted(hospital_app) -> None:
    _, split, app, folder = hospital_app(**{"teacher.epochs": 1})
    run_config = {"config": "/etc/medkd.yaml", "set": "method=fedavg data.dataset=/etc/passwd query.max_indices=1000000",
                  "out": "/tmp/elsewhere"}
    context = _context(0, run_config)
    reply = _call(app, make_query_content(_query(split.proxy_hash)), context=context)
    assert not reply.has_error()  # answered from the hospital's own policy and data
    _call(app, make_query_content(_query(split.proxy_hash)), context=context)
    local = (folder / "H0" / "hospital.log").read_text()
    assert local.count("ignored the coordinator's run_config set='method=fedavg data.dataset=/etc/passwd") == 1
    assert "ignored the coordinator's run_config out='/tmp/elsewhere'" in local
    assert not Path("/tmp/elsewhere/hospitals").exists()


def test_unexpected_failures_leave_no_internals_in_the_reply(hospital_app) -> None:
    _, _, app, folder = hospital_app()
    policy = load_policy(folder / "H0" / "policy.yaml")
    write_policy(folder / "H0" / "policy.yaml",
                 replace(policy, data=replace(policy.data, dataset="/nonexistent/secret/dir/data.npz")))
    reply = _call(app, make_query_content(_query("0" * 64)))
    assert reply.has_error() and reply.error.code == HOSPITAL_ERROR_CODE
    assert "its data could not be loaded; details stay in the hospital's log" in reply.error.reason
    assert "/nonexistent" not in reply.error.reason and "secret" not in reply.error.reason
    assert "/nonexistent/secret/dir/data.npz" in (folder / "H0" / "hospital.log").read_text()
    reply = _call(app, RecordDict(), message_type="evaluate.unregistered")
    assert reply.has_error() and "internal error" in reply.error.reason
    assert [e["status"] for e in _log(folder / "H0")] == ["error", "error"]


def test_a_node_without_a_policy_sends_nothing_but_a_setup_error(tmp_path: Path) -> None:
    app = make_client_app(tmp_path)  # no policies written
    reply = _call(app, RecordDict())
    assert reply.has_error() and reply.error.code == HOSPITAL_ERROR_CODE
    assert "policy is missing or invalid" in reply.error.reason and str(tmp_path) not in reply.error.reason


def test_each_hospital_may_use_its_own_teacher_architecture(hospital_app) -> None:
    _, split, app, _ = hospital_app(**{"teacher.per_hospital": {"1": "resnet18"}, "teacher.epochs": 1})
    reply = _call(app, make_query_content(_query(split.proxy_hash)), partition=1)
    assert reply.content.config_records["hospital"]["model"] == "resnet18"
    assert tuple(reply.content.array_records["outputs"]["outputs"].shape) == (8, split.data.n_classes)


def test_released_count_reads_only_what_was_appended_and_survives_a_replaced_log(tmp_path: Path) -> None:
    from client.hospital import released_indices

    log = tmp_path / "outbound.jsonl"
    sent = lambda run, n: json.dumps({"run_id": run, "status": "sent", "n_indices": n}) + "\n"  # noqa: E731
    assert released_indices(tmp_path, run_id=1) == 0  # no log yet
    log.write_text(sent(1, 5) + sent(2, 7) + json.dumps({"run_id": 1, "status": "refused", "n_indices": 9}) + "\n")
    assert released_indices(tmp_path, run_id=1) == 5
    with log.open("a") as f:  # one whole line and one still being written
        f.write(sent(1, 3) + '{"run_id": 1, "status": "se')
    assert released_indices(tmp_path, run_id=1) == 8
    with log.open("a") as f:
        f.write('nt", "n_indices": 4}\n')
    assert released_indices(tmp_path, run_id=1) == 12 and released_indices(tmp_path, run_id=2) == 7
    replacement = tmp_path / "new.jsonl"  # a log replaced by another file (new inode) is counted from its start
    replacement.write_text(sent(1, 1))
    replacement.replace(log)
    assert released_indices(tmp_path, run_id=1) == 1 and released_indices(tmp_path, run_id=2) == 0
