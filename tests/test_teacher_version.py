"""Teacher versions: a hospital names its answerer with a random token, and the coordinator asks again on change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.app import make_client_app
from client.teacher import load_or_train_teacher
from client.teacher_version import VERSIONS_FILE, forget_versions, teacher_version
from common.config import OutputKind, WireDtype
from common.errors import PayloadError
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content, make_reply_content, parse_reply
from common.payload import Reply as PayloadReply
from common.split import make_split
from server.bank import teacher_changes
from server.checkpoint import ServerState
from simulations.run import prepare_hospitals
from tests.conftest import finite_probs, request_message


def test_a_token_is_random_stable_and_new_after_training(tmp_path: Path) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    first = teacher_version(a, "fingerprint-1")
    assert len(first) == 16 and int(first, 16) >= 0
    assert teacher_version(a, "fingerprint-1") == first  # the same answerer: the same token
    assert teacher_version(a, "fingerprint-2") != first  # another answerer (policy, data, selector): another
    assert teacher_version(b, "fingerprint-1") != first  # drawn at random, never derived from the fingerprint
    assert list(json.loads((a / VERSIONS_FILE).read_text()).values()).count(first) == 1  # kept on the disk
    forget_versions(a)
    assert teacher_version(a, "fingerprint-1") != first  # a retrained teacher announces a new version


def test_the_coordinator_sees_a_change_only_when_the_token_changes() -> None:
    def Reply(hospital: str, version: str | None) -> PayloadReply:  # noqa: N802
        return PayloadReply(hospital=hospital, model="m", privacy="none", outputs=finite_probs(2, 2), num_private=3,
                            val_auc=0.5, teacher_version=version)

    state = ServerState()
    assert teacher_changes(state, [Reply("H0", "a" * 16), Reply("H1", "b" * 16)], rnd=1, held=0, requery=True) == []
    assert teacher_changes(state, [Reply("H0", "a" * 16), Reply("H1", None)], rnd=2, held=5, requery=True) == []
    assert teacher_changes(state, [Reply("H0", "a" * 16), Reply("H1", "c" * 16)], rnd=3, held=5,
                           requery=True) == ["H1"]
    assert state.teacher_versions == {"H0": "a" * 16, "H1": "c" * 16}
    # with query.requery_held the coordinator asks everything anyway: nothing to do on a change
    assert teacher_changes(state, [Reply("H0", "d" * 16)], rnd=4, held=5, requery=False) == []


@pytest.mark.parametrize("bad", ["XYZ", "0" * 8, "0" * 65, "g" * 16])
def test_a_malformed_version_is_rejected_naming_the_field(bad: str) -> None:
    content = make_reply_content(outputs=finite_probs(4, 5), dtype=WireDtype.FLOAT16, hospital="H2", model="m",
                                 privacy="none", num_private=10, val_auc=0.5, teacher_version="0" * 16)
    content.config_records["hospital"]["teacher_version"] = bad
    with pytest.raises(PayloadError, match="hospital H2: hospital.teacher_version"):
        parse_reply(content, n_samples=4, n_classes=5, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16,
                    simplex_tolerance=1e-2, hospital="H2")


def test_a_reply_announces_its_teacher_version_and_a_retrained_teacher_a_new_one(tiny_config,
                                                                                  tmp_path: Path) -> None:
    cfg = tiny_config(**{"teacher.epochs": 1})
    prepare_hospitals(cfg, tmp_path)
    split, app = make_split(cfg), make_client_app(tmp_path)
    query = Query(round=1, proxy_hash=split.proxy_hash, indices=np.arange(6), temperature=1.0,
                  output=OutputKind.PROBS, dtype=WireDtype.FLOAT16)

    def version(message_id: str) -> str:
        from flwr.app import Context, RecordDict

        msg = request_message(make_query_content(query), message_type=QUERY_MESSAGE_TYPE, dst_node_id=10,
                              message_id=message_id)
        reply = app(msg, Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 3},
                                 state=RecordDict(), run_config={}))
        assert not reply.has_error(), reply.error
        return parse_reply(reply.content, n_samples=6, n_classes=split.data.n_classes, output=OutputKind.PROBS,
                           dtype=WireDtype.FLOAT16, simplex_tolerance=1e-2).teacher_version

    first = version("m-1")  # the teacher is trained on first use; the token is drawn after that
    assert first is not None and version("m-2") == first
    assert first in json.loads((tmp_path / "H0" / VERSIONS_FILE).read_text()).values()
    load_or_train_teacher(cfg=cfg, split=split, hospital=0, hospital_dir=tmp_path / "H0", retrain=True)
    assert version("m-3") != first
