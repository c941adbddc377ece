"""Knowledge that knows its limits: selectors on real label-skewed data, and the reply fields they add."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array

from client.selector import load_or_train_selector, selection, train_selector
from common.config import OutputKind, WireDtype, build_config
from common.errors import PayloadError
from common.metrics import classification_metrics
from common.payload import make_reply_content, parse_reply
from common.split import class_warnings, make_split, tensors
from simulations.run import warn_label_skew
from tests.conftest import finite_probs


@pytest.fixture
def skewed(medmnist_dir: Path):
    """The class-imbalanced PneumoniaMNIST copy, 4 hospitals, Dirichlet alpha 0.1, seed 2 (single-class hospitals)."""
    if not (medmnist_dir / "pneumoniamnist_kaggle.npz").exists():
        pytest.fail(f"pneumoniamnist_kaggle.npz missing from {medmnist_dir}")

    def make(**overrides: object):
        raw = {"seed": 2, "aggregator": "weighted",
               "data": {"dataset": "pneumoniamnist_kaggle.npz", "data_dir": str(medmnist_dir),
                                   "download": False, "proxy_fraction": 0.2},
               "federation": {"hospitals": 4, "partition": "dirichlet", "alpha": 0.1},
               "teacher": {"epochs": 3, "patience": 2, "ensemble": 1},
               "selector": {"kind": "density_ratio", "abstain_quantile": 0.05, "epochs": 6, "patience": 3}}
        cfg = build_config(raw, source="skewed", overrides=dict(overrides))
        return cfg, make_split(cfg)

    return make


def _single_class_hospital(split) -> tuple[int, int]:
    for h in range(len(split.hospital_indices)):
        present = np.unique(split.hospital(h).labels)
        if present.size == 1:
            return h, int(present[0])
    raise AssertionError("this split has no single-class hospital")


def test_density_ratio_selector_knows_which_samples_resemble_its_data(skewed) -> None:
    cfg, split = skewed()
    hospital, its_class = _single_class_hospital(split)
    selector = train_selector(cfg, split, hospital, teacher=None)
    images, labels = tensors(split.proxy, spatial_dims=split.data.spatial_dims)
    mask, density = selection(selector, None, images)
    assert mask.shape == density.shape == (labels.shape[0],)
    assert (density > 0).all() and np.isfinite(density).all()
    # its teacher can only say "my class"; its density ratio tells which proxy samples are of that class
    scores = torch.from_numpy(np.stack([1.0 - density / density.max(), density / density.max()], axis=1))
    auc = classification_metrics(scores, (labels == its_class).long()).auc
    assert auc > 0.75, f"density ratio separates its class from the rest with AUC {auc:.3f}"
    # it abstains more on samples of the class it never saw
    assert (~mask[labels.numpy() != its_class]).mean() > (~mask[labels.numpy() == its_class]).mean()


def test_selector_is_saved_and_reused_and_retrained_on_change(skewed, tmp_path: Path) -> None:
    cfg, split = skewed(**{"selector.kind": "max_softmax", "selector.abstain_quantile": 0.2})
    from client.teacher import load_or_train_teacher

    teacher, _ = load_or_train_teacher(cfg=cfg, split=split, hospital=1, hospital_dir=tmp_path)
    first = load_or_train_selector(cfg=cfg, split=split, hospital=1, hospital_dir=tmp_path, teacher=teacher)
    assert (tmp_path / "selector.pt").exists() and first.model is None
    again = load_or_train_selector(cfg=cfg, split=split, hospital=1, hospital_dir=tmp_path, teacher=teacher)
    assert again.info == first.info
    cfg0, _ = skewed(**{"selector.kind": "max_softmax", "selector.abstain_quantile": 0.0})
    never = load_or_train_selector(cfg=cfg0, split=split, hospital=1, hospital_dir=tmp_path, teacher=teacher)
    assert never.info.fingerprint != first.info.fingerprint and never.info.threshold == -np.inf
    images, _ = tensors(split.proxy, spatial_dims=split.data.spatial_dims)
    mask, density = selection(never, teacher, images)
    assert mask.all() and density is None
    mask20, _ = selection(first, teacher, images)
    assert 0 < (~mask20).sum() < mask20.size


def test_single_class_hospitals_are_named_in_warnings(skewed, caplog: pytest.LogCaptureFixture) -> None:
    cfg, split = skewed()
    hospital, _ = _single_class_hospital(split)
    warnings = warn_label_skew(cfg)
    assert any(f"hospital H{hospital} holds a single class" in w for w in warnings)
    assert class_warnings("H9", [3, 40], below=5) == ["hospital H9 has fewer than 5 examples of class(es) [0] "
                                                      "(counts [3, 40])"]
    assert class_warnings("H9", [30, 40], below=5) == []


# --------------------------------------------------------------------------- the reply fields


def _reply(**changes: object):
    fields = dict(outputs=finite_probs(6, 2), dtype=WireDtype.FLOAT16, hospital="H1", model="smallcnn",
                  privacy="none", num_private=10, val_auc=0.7, mask=np.array([1, 1, 0, 1, 0, 1], dtype=bool),
                  density=np.array([0.5, 2.0, 0.01, 1.0, 0.0, 9.0]), label_counts=np.array([3, 7]))
    fields.update(changes)
    return make_reply_content(**fields)


def _parse(content):
    return parse_reply(content, n_samples=6, n_classes=2, output=OutputKind.PROBS, dtype=WireDtype.FLOAT16,
                       simplex_tolerance=1e-2, hospital="H1")


def test_mask_density_and_label_counts_round_trip() -> None:
    reply = _parse(_reply())
    assert reply.mask.tolist() == [True, True, False, True, False, True]
    np.testing.assert_allclose(reply.density, [0.5, 2.0, 0.01, 1.0, 0.0, 9.0], rtol=1e-3)
    assert reply.label_counts.tolist() == [3, 7]
    bare = _parse(_reply(mask=None, density=None, label_counts=None))
    assert bare.mask is None and bare.density is None and bare.label_counts is None


def _with_array(name: str, value: np.ndarray):
    content = _reply()
    content.array_records["outputs"][name] = Array(value)
    return content


@pytest.mark.parametrize(("content", "reason"), [
    (lambda: _with_array("mask", np.array([1, 2, 0, 1, 0, 1], dtype=np.uint8)), "outputs.mask: must hold 0"),
    (lambda: _with_array("mask", np.ones(5, dtype=np.uint8)), "outputs.mask: shape is (5,)"),
    (lambda: _with_array("mask", np.ones(6, dtype=np.float32)), "outputs.mask: dtype is 'float32'"),
    (lambda: _with_array("density", np.array([1, -1, 1, 1, 1, 1], dtype=np.float16)), "outputs.density: density"),
    (lambda: _with_array("density", np.array([1, np.nan, 1, 1, 1, 1], dtype=np.float16)), "outputs.density"),
    (lambda: _with_array("density", np.ones((6, 1), dtype=np.float16)), "outputs.density: declared shape"),
    (lambda: _with_array("weights", np.ones(6, dtype=np.float16)), "outputs: unexpected key(s) ['weights']"),
    (lambda: _reply(label_counts=np.array([3, 8])), "metrics.label_counts: counts sum to 11"),
    (lambda: _reply(label_counts=np.array([10])), "metrics.label_counts: expected 2 counts"),
    (lambda: _reply(label_counts=np.array([-1, 11])), "metrics.label_counts: must be in [0"),
])
def test_bad_selector_fields_are_rejected_and_named(content, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        _parse(content())
    assert reason in str(info.value) and "hospital H1" in str(info.value)


def test_calibration_restores_each_hospitals_local_posterior(skewed, tmp_path: Path) -> None:
    """Early stopping on AUC keeps a teacher that ranks, not one that is calibrated; the bias fixes the level."""
    from client.serve import teacher_outputs
    from client.teacher import load_or_train_teacher
    from common.config import OutputKind

    cfg, split = skewed()
    hospital, its_class = _single_class_hospital(split)
    teacher, _ = load_or_train_teacher(cfg=cfg, split=split, hospital=hospital, hospital_dir=tmp_path)
    selector = load_or_train_selector(cfg=cfg, split=split, hospital=hospital, hospital_dir=tmp_path, teacher=teacher)
    assert selector.bias is not None and selector.bias.shape == (2,)
    images, _ = tensors(split.proxy, spatial_dims=split.data.spatial_dims)
    raw = teacher_outputs(teacher, images, output=OutputKind.PROBS, temperature=1.0)
    calibrated = teacher_outputs(teacher, images, output=OutputKind.PROBS, temperature=1.0, bias=selector.bias)
    # a hospital that saw one class has the local posterior "that class", whatever the teacher's level was
    assert calibrated[:, its_class].min() > 0.99 and calibrated[:, its_class].mean() > raw[:, its_class].mean()
    # the ranking of samples is the teacher's own (a per-class bias changes no order within a class column)
    order = np.argsort(raw[:, its_class], kind="stable")
    assert (np.diff(calibrated[order, its_class]) >= -1e-6).all()
