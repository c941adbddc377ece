"""Tests for common.losses.kd_loss (Hinton et al., 2015)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses import kd_loss


def _manual_kl_batchmean(target: torch.Tensor, student_logits: torch.Tensor, *,
                         temperature: float) -> torch.Tensor:
    """mean_i sum_c p_ic (log p_ic - log q_ic), with 0 log 0 = 0 and q = softmax(z / T)."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    terms = torch.special.xlogy(target, target) - target * log_q
    return terms.sum(dim=-1).mean()


def _random(seed: int, *, n: int = 5, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64)
    target = torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), dim=-1)
    return logits, target


def test_matches_hand_computation_1x2() -> None:
    # z = (1, 0), T = 2 -> z / T = (0.5, 0)
    # q0 = e^0.5 / (e^0.5 + 1) = 0.622459, q1 = 1 / (e^0.5 + 1) = 0.377541
    # p = (0.7, 0.3)
    # KL = 0.7 ln(0.7 / 0.622459) + 0.3 ln(0.3 / 0.377541)
    #    = 0.7 * 0.117402 + 0.3 * (-0.229896) = 0.082181 - 0.068969 = 0.013213
    # loss = T^2 * KL = 4 * 0.013213 = 0.052851
    q0 = math.exp(0.5) / (math.exp(0.5) + 1)
    q1 = 1 / (math.exp(0.5) + 1)
    expected = 4 * (0.7 * math.log(0.7 / q0) + 0.3 * math.log(0.3 / q1))
    loss = kd_loss(torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                   torch.tensor([[0.7, 0.3]], dtype=torch.float64), temperature=2.0)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.052851, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 10.0])
def test_zero_when_student_matches_target(temperature: float) -> None:
    logits, _ = _random(0)
    target = torch.softmax(logits / temperature, dim=-1)
    loss = kd_loss(logits, target, temperature=temperature)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    # and it is positive when they differ
    assert kd_loss(logits, target.flip(-1), temperature=temperature).item() > 1e-4


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_is_t_squared_times_batchmean_kl(temperature: float) -> None:
    logits, target = _random(1)
    manual = temperature**2 * _manual_kl_batchmean(target, logits, temperature=temperature)
    loss = kd_loss(logits, target, temperature=temperature)
    torch.testing.assert_close(loss, manual, atol=1e-12, rtol=1e-10)


def test_gradient_magnitude_comparable_across_temperatures() -> None:
    # Hinton et al., Sec. 2.1: for large T and zero-mean logits, the gradient of
    # KL(softmax(v/T) || softmax(z/T)) w.r.t. z_i is about (z_i - v_i) / (C T^2);
    # the T^2 factor makes it about (z_i - v_i) / C, independent of T.
    z = torch.tensor([[0.6, -0.2, -0.4]], dtype=torch.float64)  # zero mean
    v = torch.tensor([[-0.3, 0.5, -0.2]], dtype=torch.float64)  # zero mean
    expected = (z - v) / 3
    grads = []
    for temperature in (50.0, 100.0):
        student = z.clone().requires_grad_(True)
        target = torch.softmax(v / temperature, dim=-1)
        kd_loss(student, target, temperature=temperature).backward()
        grads.append(student.grad)
        torch.testing.assert_close(student.grad, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=0)


def test_ce_mixing_hand_computed() -> None:
    # z = (1, 0), T = 2, p = (0.7, 0.3), label 0, ce_weight = 0.3
    # KD = 0.052851 (see test_matches_hand_computation_1x2)
    # CE = -ln softmax(z)[0] = -ln(e / (e + 1)) = ln(1 + e^-1) = 0.313262
    # loss = 0.7 * KD + 0.3 * CE = 0.036996 + 0.093979 = 0.130974
    q0 = math.exp(0.5) / (math.exp(0.5) + 1)
    q1 = 1 / (math.exp(0.5) + 1)
    kd = 4 * (0.7 * math.log(0.7 / q0) + 0.3 * math.log(0.3 / q1))
    ce = math.log(1 + math.exp(-1))
    loss = kd_loss(torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                   torch.tensor([[0.7, 0.3]], dtype=torch.float64), temperature=2.0,
                   labels=torch.tensor([0]), ce_weight=0.3)
    assert loss.item() == pytest.approx(0.7 * kd + 0.3 * ce, abs=1e-12)
    assert loss.item() == pytest.approx(0.130974, abs=1e-6)


@pytest.mark.parametrize("ce_weight", [0.0, 0.25, 0.5, 1.0])
def test_ce_mixing_matches_torch(ce_weight: float) -> None:
    logits, target = _random(2)
    labels = torch.tensor([0, 3, 1, 2, 3])
    kd = 9.0 * _manual_kl_batchmean(target, logits, temperature=3.0)
    ce = F.cross_entropy(logits, labels)
    loss = kd_loss(logits, target, temperature=3.0, labels=labels, ce_weight=ce_weight)
    torch.testing.assert_close(loss, (1 - ce_weight) * kd + ce_weight * ce)


def test_labels_ignored_when_ce_weight_is_zero() -> None:
    logits, target = _random(3)
    with_labels = kd_loss(logits, target, temperature=2.0, labels=torch.tensor([0, 0, 0, 0, 0]))
    without = kd_loss(logits, target, temperature=2.0)
    torch.testing.assert_close(with_labels, without)


def test_zero_probability_targets_give_finite_loss_and_gradient() -> None:
    # p = (1, 0): KL = 1 * ln(1 / q0) + 0 (0 ln 0 = 0) = -ln q0
    # z = (0, 0), T = 1: q0 = 0.5 -> loss = T^2 * ln 2 = 0.693147
    student = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    loss = kd_loss(student, torch.tensor([[1.0, 0.0]], dtype=torch.float64), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # d/dz of -ln softmax(z)_0 = q - p = (0.5 - 1, 0.5 - 0)
    torch.testing.assert_close(student.grad, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))


def test_zero_targets_with_extreme_student_logits_stay_finite() -> None:
    student = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.0]])
    loss = kd_loss(student, target, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(100.0, rel=1e-5)  # -log softmax(z)_1 ~ 50 + 50
    assert torch.isfinite(student.grad).all()


_Z = torch.zeros(2, 3)
_P = torch.full((2, 3), 1 / 3)

ERROR_CASES = [
    pytest.param(_Z, _P, {"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0",
                 id="temperature-zero"),
    pytest.param(_Z, _P, {"temperature": -1.0}, "temperature must be .* got -1.0",
                 id="temperature-negative"),
    pytest.param(_Z, _P, {"temperature": float("nan")}, "temperature must be",
                 id="temperature-nan"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": -0.1},
                 r"ce_weight must be in \[0, 1\], got -0.1", id="ce-weight-negative"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": 1.5},
                 r"ce_weight must be in \[0, 1\], got 1.5", id="ce-weight-above-one"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": float("nan")}, "ce_weight",
                 id="ce-weight-nan"),
    pytest.param(_Z, torch.full((2, 2), 0.5), {"temperature": 1.0},
                 r"target_probs shape \(2, 2\) does not match student_logits shape \(2, 3\)",
                 id="shape-mismatch"),
    pytest.param(torch.zeros(3), torch.full((3,), 1 / 3), {"temperature": 1.0},
                 r"student_logits must be 2-D \(N, C\), got shape \(3,\)", id="logits-1d"),
    pytest.param(torch.zeros(0, 3), torch.zeros(0, 3), {"temperature": 1.0}, "N = 0",
                 id="empty-batch"),
    pytest.param(torch.zeros(2, 3, dtype=torch.int64), _P, {"temperature": 1.0},
                 "floating point", id="integer-logits"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": 0.5},
                 r"labels \(N,\) int64 are required when ce_weight > 0", id="labels-missing"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": 0.5, "labels": torch.tensor([0, 1, 2])},
                 r"labels must have shape \(2,\)", id="labels-wrong-shape"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": 0.5, "labels": torch.tensor([0.0, 1.0])},
                 "labels must be int64", id="labels-float"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": 0.5, "labels": torch.tensor([0, 3])},
                 r"class indices in \[0, 3\)", id="labels-out-of-range"),
    pytest.param(_Z, _P, {"temperature": 1.0, "ce_weight": 0.5, "labels": torch.tensor([-1, 0])},
                 r"class indices in \[0, 3\)", id="labels-negative"),
]


@pytest.mark.parametrize(("logits", "target", "kwargs", "match"), ERROR_CASES)
def test_validation_errors(logits: torch.Tensor, target: torch.Tensor, kwargs: dict,
                           match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kd_loss(logits, target, **kwargs)
