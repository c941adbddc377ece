"""A hospital's local teacher ensemble (``teacher.ensemble``): trained, saved, reloaded and answered as one model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import client.teacher as teacher_module
from client.teacher import TEACHER_FILE, TeacherCache, load_or_train_teacher, member_seed, teacher_fingerprint
from common.config import config_to_dict
from common.errors import ConfigError
from common.models import MeanEnsemble
from common.split import make_split, tensors


def test_an_ensemble_answers_with_its_members_mean_probability_and_reloads_the_same(
        tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(**{"teacher.epochs": 2, "teacher.ensemble": 3})
    split = make_split(cfg)
    model, info = load_or_train_teacher(cfg=cfg, split=split, hospital=0, hospital_dir=tmp_path)
    assert isinstance(model, MeanEnsemble) and len(model.members) == 3 and info.members == 3
    first, second = (dict(m.named_parameters()) for m in model.members[:2])
    assert any(not torch.equal(first[k], second[k]) for k in first)  # members start and train from their own seeds
    assert len({member_seed(cfg, 0, k) for k in range(3)}) == 3

    images, _ = tensors(split.proxy, spatial_dims=split.data.spatial_dims, limit=16)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(images), dim=1) for m in model.members]).mean(dim=0)
        answered = torch.softmax(model(images), dim=1)
    torch.testing.assert_close(answered, mean, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(teacher_module, "_CACHE", TeacherCache())  # a new process: read from the disk
    reloaded, again = load_or_train_teacher(cfg=cfg, split=split, hospital=0, hospital_dir=tmp_path)
    assert reloaded is not model and again == info
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_ensemble_1_is_one_network_and_the_ensemble_size_is_part_of_the_fingerprint(
        tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    single = tiny_config(**{"teacher.epochs": 1, "teacher.ensemble": 1})
    split = make_split(single)
    model, info = load_or_train_teacher(cfg=single, split=split, hospital=1, hospital_dir=tmp_path)
    assert not isinstance(model, MeanEnsemble) and info.members == 1
    ensemble = tiny_config(**{"teacher.epochs": 1, "teacher.ensemble": 2})
    assert teacher_fingerprint(ensemble, split, 1) != teacher_fingerprint(single, split, 1)
    default = tiny_config(**{"teacher.epochs": 1, "teacher.ensemble": 5})
    fingerprints = {k: teacher_fingerprint(c, split, 1) for k, c in ((1, single), (2, ensemble), (5, default))}

    before = (tmp_path / TEACHER_FILE).stat().st_mtime_ns
    model, info = load_or_train_teacher(cfg=ensemble, split=split, hospital=1, hospital_dir=tmp_path)
    assert isinstance(model, MeanEnsemble) and info.members == 2  # the saved single network was not reused
    assert (tmp_path / TEACHER_FILE).stat().st_mtime_ns != before

    def without_ensemble_key(section):  # how fingerprints were computed before teacher.ensemble existed
        return {k: v for k, v in config_to_dict(section).items() if k != "ensemble"}

    monkeypatch.setattr(teacher_module, "config_to_dict", without_ensemble_key)
    saved_before = teacher_fingerprint(single, split, 1)
    assert fingerprints[1] == saved_before  # single networks saved before the key existed stay valid ...
    assert saved_before not in (fingerprints[2], fingerprints[5])  # ... and are never taken for an ensemble


@pytest.mark.parametrize("bad", [0, 17])
def test_an_ensemble_size_out_of_range_is_a_config_error_naming_the_key(tiny_config, bad: int) -> None:
    with pytest.raises(ConfigError, match="teacher.ensemble"):
        tiny_config(**{"teacher.ensemble": bad})


def test_a_hospital_answers_a_query_with_its_ensemble(tiny_config, tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from client.app import make_client_app
    from common.config import OutputKind, WireDtype
    from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content, parse_reply
    from simulations.run import prepare_hospitals
    from tests.conftest import request_message

    cfg = tiny_config(**{"teacher.epochs": 1, "teacher.ensemble": 2})
    prepare_hospitals(cfg, tmp_path)
    split, app = make_split(cfg), make_client_app(tmp_path)
    indices = np.arange(8)
    query = Query(round=1, proxy_hash=split.proxy_hash, indices=indices, temperature=2.0, output=OutputKind.PROBS,
                  dtype=WireDtype.FLOAT32)
    msg = request_message(make_query_content(query), message_type=QUERY_MESSAGE_TYPE, dst_node_id=10)
    reply = app(msg, Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 3},
                             state=RecordDict(), run_config={}))
    assert not reply.has_error(), reply.error
    answer = parse_reply(reply.content, n_samples=8, n_classes=split.data.n_classes, output=OutputKind.PROBS,
                         dtype=WireDtype.FLOAT32, simplex_tolerance=1e-3)
    teacher, info = load_or_train_teacher(cfg=cfg, split=split, hospital=0, hospital_dir=tmp_path / "H0")
    assert isinstance(teacher, MeanEnsemble) and info.members == 2
    images, _ = tensors(split.proxy, spatial_dims=split.data.spatial_dims, limit=8)
    with torch.no_grad():
        expected = torch.softmax(teacher(images) / 2.0, dim=1).numpy()  # no selector: no calibration bias
    np.testing.assert_allclose(answer.outputs, expected, rtol=1e-5, atol=1e-6)
