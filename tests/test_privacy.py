"""DP mechanisms at a hospital: guarantees stated, noise of the right size, charges before release, free repeats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from client.app import make_client_app
from client.dp_teacher import dp_sgd_plan, pate_partitions
from client.ledger import read_entries, replay
from client.privacy import NO_DP, SENSITIVITY, describe, gaussian_noise, noisy_probabilities, to_output, vote_histogram
from client.releases import ReleaseCache
from common.accounting import GaussianEvent, epsilon
from common.config import OutputKind, PolicyPrivacy, PrivacyMechanism, WireDtype
from common.errors import ConfigError, PolicyError
from common.payload import BUDGET_EXHAUSTED_CODE, QUERY_MESSAGE_TYPE, Query, make_query_content, parse_reply
from common.policy import build_policy
from common.split import make_split
from simulations.run import prepare_hospitals
from tests.conftest import request_message


def _context(partition: int):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=10 + partition, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _ask(app, split, indices, *, round_: int = 1, message_id: str = "m-1"):
    query = Query(round=round_, proxy_hash=split.proxy_hash, indices=np.asarray(indices, dtype=np.int64),
                  temperature=2.0, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16)
    msg = request_message(make_query_content(query), message_type=QUERY_MESSAGE_TYPE, dst_node_id=10,
                          round=round_, message_id=message_id)
    return app(msg, _context(0))


def _outbound(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "outbound.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- what each mechanism states


@pytest.mark.parametrize(("mechanism", "protects", "relation"), [
    (PrivacyMechanism.DP_SGD_TEACHER, "record", "add/remove one training record"),
    (PrivacyMechanism.PATE, "record", "add/remove one training record"),
    (PrivacyMechanism.HOSPITAL_GAUSSIAN, "hospital", "any change to all of the hospital's data"),
])
def test_each_mechanism_states_unit_relation_and_delta(mechanism, protects, relation) -> None:
    info = describe(PolicyPrivacy(mechanism=mechanism, delta=1e-6))
    assert info.protects == protects and info.relation == relation and info.delta == 1e-6
    assert f"{protects}-level DP" in info.label and "δ=1e-06" in info.label and "PLD" in info.label


def test_no_mechanism_says_no_formal_guarantee() -> None:
    info = describe(PolicyPrivacy())
    assert info.label == NO_DP == "none: no formal DP guarantee" and info.delta is None


# --------------------------------------------------------------------------- noise and releases


def test_opendp_noise_has_the_requested_spread() -> None:
    noise = gaussian_noise(np.zeros(20_000), std=3.0)
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 3.0) < 0.1
    assert not np.array_equal(noise, gaussian_noise(np.zeros(20_000), std=3.0))  # fresh draws each time


def test_vote_histogram_counts_each_teachers_top_class() -> None:
    probs = np.array([[[0.9, 0.1], [0.2, 0.8]],
                      [[0.6, 0.4], [0.3, 0.7]],
                      [[0.1, 0.9], [0.4, 0.6]]])  # 3 teachers, 2 samples, 2 classes
    assert vote_histogram(probs).tolist() == [[2.0, 1.0], [0.0, 3.0]]


def test_noisy_release_is_a_distribution_and_noise_scales_with_sensitivity() -> None:
    summed = np.tile([[30.0, 0.0, 0.0]], (4000, 1))
    released = noisy_probabilities(summed, noise_multiplier=2.0)
    assert np.allclose(released.sum(axis=1), 1.0) and (released >= 0).all()
    raw = gaussian_noise(np.zeros(20_000), std=2.0 * SENSITIVITY)
    assert abs(raw.std() - 2.0 * math.sqrt(2)) < 0.1
    logits = to_output(released[:5], output=OutputKind.LOGITS, temperature=3.0)
    assert logits.shape == (5, 3) and np.isfinite(logits).all()


def test_release_cache_returns_exactly_what_was_committed(tmp_path: Path) -> None:
    cache = ReleaseCache(tmp_path, "k")
    held, _ = cache.lookup(np.array([3, 4]))
    assert not held.any()
    cache.commit(np.array([4, 9]), np.array([[0.25, 0.75], [0.5, 0.5]]))
    cache.commit(np.array([9, 2]), np.array([[0.0, 1.0], [1.0, 0.0]]))  # 9 is kept as first released
    held, values = cache.lookup(np.array([2, 3, 9, 4]))
    assert held.tolist() == [True, False, True, True]
    assert values[[0, 2, 3]].tolist() == [[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]]
    assert not ReleaseCache(tmp_path, "other").lookup(np.array([4]))[0].any()


def test_pate_partitions_are_disjoint_and_cover_everything() -> None:
    parts = pate_partitions(103, 10, seed=1)
    together = np.concatenate(parts)
    assert len(parts) == 10 and sorted(together.tolist()) == list(range(103))
    with pytest.raises(ValueError, match="privacy.partitions"):
        pate_partitions(15, 10, seed=1)


def test_dp_sgd_plan_calibrates_sigma_to_the_target() -> None:
    event = dp_sgd_plan(PolicyPrivacy(mechanism=PrivacyMechanism.DP_SGD_TEACHER, target_epsilon=4.0),
                        n_records=200, batch_size=32, epochs=10)
    assert event.sample_rate == pytest.approx(1 / 7) and event.steps == 70
    spent = epsilon([event], 1e-5)
    assert 3.9 < spent <= 4.0
    fixed = dp_sgd_plan(PolicyPrivacy(mechanism=PrivacyMechanism.DP_SGD_TEACHER, noise_multiplier=1.3),
                        n_records=200, batch_size=32, epochs=10)
    assert fixed.noise_multiplier == 1.3


# --------------------------------------------------------------------------- what a DP policy may release


@pytest.mark.parametrize(("raw", "key"), [
    ({"selector": {"kind": "density_ratio"}}, "selector.kind: must be none under privacy.mechanism pate"),
    ({"selector": {"kind": "max_softmax"}}, "selector.kind: must be none"),
    ({"answers": {"label_counts": True}}, "answers.label_counts: must be false under privacy.mechanism pate"),
    ({"answers": {"fedavg_weights": True}}, "answers.fedavg_weights: must be false under privacy.mechanism pate"),
])
def test_dp_policy_forbids_what_no_mechanism_covers(raw: dict, key: str) -> None:
    with pytest.raises(PolicyError, match=key.replace(".", r"\.")):
        build_policy({"hospital": "H0", "privacy": {"mechanism": "pate"}, **raw})


def test_experiment_config_names_the_hospital_whose_policy_conflicts(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"policy_per_hospital\.1\.answers\.label_counts"):
        tiny_config(**{"policy_per_hospital": {"1": {"privacy": {"mechanism": "hospital_gaussian"},
                                                     "answers": {"label_counts": True}}}})


# --------------------------------------------------------------------------- the gate charges; repeats are free


@pytest.fixture
def dp_hospital(tiny_config, tmp_path: Path):
    def make(privacy: dict):
        cfg = tiny_config(**{"policy": {"privacy": privacy}, "teacher.epochs": 3})
        prepare_hospitals(cfg, tmp_path)
        return make_split(cfg), make_client_app(tmp_path), tmp_path / "H0"

    return make


def test_hospital_gaussian_charges_new_answers_and_repeats_for_free(dp_hospital) -> None:
    split, app, folder = dp_hospital({"mechanism": "hospital_gaussian", "noise_multiplier": 20.0,
                                      "budget_epsilon": 50.0})
    first = _ask(app, split, [0, 1, 2, 3])
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    [entry] = read_entries(folder / "privacy_ledger.jsonl")
    assert entry.event == GaussianEvent(noise_multiplier=20.0, count=4) and entry.round == 1
    reply = parse_reply(first.content, n_samples=4, n_classes=5, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16,
                        simplex_tolerance=0.05)
    assert reply.epsilon == pytest.approx(entry.epsilon_after) and reply.delta == 1e-5
    assert reply.privacy.startswith("hospital_gaussian: hospital-level DP") and reply.val_auc == -1.0
    assert reply.num_private == 1  # the declared size, not the private count

    again = _ask(app, split, [2, 3], round_=2, message_id="m-2")  # already released: free, bit-identical
    assert len(read_entries(folder / "privacy_ledger.jsonl")) == 1
    repeat = parse_reply(again.content, n_samples=2, n_classes=5, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16,
                         simplex_tolerance=0.05)
    assert np.array_equal(repeat.outputs, reply.outputs[2:])

    mixed = _ask(app, split, [3, 4, 5], round_=3, message_id="m-3")  # only the two new answers are charged
    assert not mixed.has_error()
    entries = read_entries(folder / "privacy_ledger.jsonl")
    assert [e.event.count for e in entries] == [4, 2]
    assert replay(folder / "privacy_ledger.jsonl", 1e-5) == entries[-1].epsilon_after
    log = _outbound(folder)
    assert [e["charged"] for e in log] == [1, 0, 1] and all(e["mechanism"] == "hospital_gaussian" for e in log)
    assert log[1]["epsilon_release"] == 0.0 and log[2]["epsilon_cumulative"] == entries[-1].epsilon_after


def test_budget_refusal_sends_only_the_error(dp_hospital) -> None:
    one = epsilon([GaussianEvent(noise_multiplier=5.0, count=4)], 1e-5)
    split, app, folder = dp_hospital({"mechanism": "hospital_gaussian", "noise_multiplier": 5.0,
                                      "budget_epsilon": one * 1.2})
    assert not _ask(app, split, [0, 1, 2, 3]).has_error()
    refused = _ask(app, split, [4, 5, 6, 7], round_=2, message_id="m-2")
    assert refused.has_error() and refused.error.code == BUDGET_EXHAUSTED_CODE
    assert "privacy budget exhausted" in refused.error.reason and "H0" in refused.error.reason
    assert len(read_entries(folder / "privacy_ledger.jsonl")) == 1
    assert [e["status"] for e in _outbound(folder)] == ["sent", "error"]
    held, _ = ReleaseCache(folder, "x").lookup(np.array([4]))  # nothing of the refused answer was recorded
    assert not held.any()
    assert not any(path.name != ".lock" and np.isin([4, 5, 6, 7], np.load(path)["indices"]).any()
                   for path in (folder / "released").iterdir() if path.suffix == ".npz")


def test_pate_answers_from_disjoint_teachers_and_charges_per_answer(dp_hospital) -> None:
    split, app, folder = dp_hospital({"mechanism": "pate", "partitions": 3, "noise_multiplier": 1.0,
                                      "budget_epsilon": 100.0})
    reply = _ask(app, split, [0, 1, 2, 3, 4, 5])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert (folder / "pate" / "teachers.pt").exists() and not (folder / "teacher.pt").exists()
    [entry] = read_entries(folder / "privacy_ledger.jsonl")
    assert entry.event == GaussianEvent(noise_multiplier=1.0, count=6) and entry.mechanism == "pate"
    parsed = parse_reply(reply.content, n_samples=6, n_classes=5, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16,
                         simplex_tolerance=0.05)
    assert parsed.model == "smallcnn x3 (pate)" and parsed.privacy.startswith("pate: record-level DP")


def test_dp_sgd_teacher_is_charged_once_per_training_and_queries_are_free(dp_hospital) -> None:
    split, app, folder = dp_hospital({"mechanism": "dp_sgd_teacher", "target_epsilon": 2.0, "budget_epsilon": 3.0})
    assert not _ask(app, split, [0, 1, 2]).has_error()
    assert not _ask(app, split, [3, 4, 5], round_=2, message_id="m-2").has_error()
    [entry] = read_entries(folder / "privacy_ledger.jsonl")
    assert entry.mechanism == "dp_sgd_teacher" and entry.event.kind == "sampled_gaussian"
    assert 1.9 < entry.epsilon_after <= 2.0
    import torch

    state = torch.load(folder / "teacher.pt", weights_only=True)["state_dict"]
    assert not any("running_mean" in k for k in state)  # BatchNorm replaced by GroupNorm (ModuleValidator.fix)
    log = _outbound(folder)
    assert [e["charged"] for e in log] == [0, 0] and log[1]["epsilon_cumulative"] == entry.epsilon_after


def test_gate_withholds_selector_outputs_under_a_dp_mechanism(tmp_path: Path) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from client.gate import OutboundGate
    from common.payload import WITHHELD_CODE

    gate = OutboundGate(hospital="H0", folder=tmp_path, run_id=1,
                        privacy=PolicyPrivacy(mechanism=PrivacyMechanism.PATE))
    request = request_message(RecordDict(), message_type=QUERY_MESSAGE_TYPE, dst_node_id=10)
    content = RecordDict({
        "outputs": ArrayRecord({"outputs": Array(np.full((2, 2), 0.5, dtype=np.float16)),
                                "mask": Array(np.ones(2, dtype=np.uint8))}),
        "metrics": MetricRecord({"num_private": 1, "val_auc": -1.0}),
        "hospital": ConfigRecord({"name": "H0", "model": "m", "privacy": "pate"}),
    })
    out = gate.release(request, Message(content, reply_to=request))
    assert out.has_error() and out.error.code == WITHHELD_CODE
    assert "under privacy.mechanism pate a reply may not carry ['mask']" in (tmp_path / "hospital.log").read_text()
    assert not (tmp_path / "privacy_ledger.jsonl").exists()
