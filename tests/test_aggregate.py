"""Tests for server.aggregate: hand-computed cases for every aggregator."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import PayloadError
from server.aggregate import Aggregator, aggregate_outputs, answered, normalised_entropy, probs_from_logits


def _t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _sigmoid(x: float) -> float:
    # softmax((a, b))[0] == 1 / (1 + exp(b - a))
    return 1.0 / (1.0 + math.exp(-x))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dim=-1)


def _random_probs(*, seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dim=-1)


# Certainty of p = (0.9, 0.1), C = 2:
#   H = -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.0948245 + 0.2302585 = 0.3250830
#   c = 1 - H / ln 2 + 1e-6 = 1 - 0.4689956 + 1e-6 = 0.5310054
_C_09 = 1.0 - -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2) + 1e-6
# Certainty of a one-hot row: 1 + 1e-6; of a uniform row: 0 + 1e-6.
_C_ONE = 1.0 + 1e-6
_C_UNI = 1e-6

CASES = [
    # ---- mean ---------------------------------------------------------------
    pytest.param(
        # ((0.8, 0.2) + (0.4, 0.6)) / 2 = (0.6, 0.4)
        [[[0.8, 0.2]], [[0.4, 0.6]]], "mean", {}, [[0.6, 0.4]],
        id="mean-H2",
    ),
    pytest.param(
        # sample 0: (0.5+0.1+0.3, 0.3+0.6+0.3, 0.2+0.3+0.4) / 3 = (0.9, 1.2, 0.9) / 3
        #         = (0.3, 0.4, 0.3)
        # sample 1: (1+0+0.5, 0+1+0.5, 0) / 3 = (0.5, 0.5, 0)
        [
            [[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]],
            [[0.1, 0.6, 0.3], [0.0, 1.0, 0.0]],
            [[0.3, 0.3, 0.4], [0.5, 0.5, 0.0]],
        ],
        "mean", {}, [[0.3, 0.4, 0.3], [0.5, 0.5, 0.0]],
        id="mean-H3-N2",
    ),
    # ---- weighted -------------------------------------------------------------
    pytest.param(
        # w = (1, 3): (1*0.8 + 3*0.4, 1*0.2 + 3*0.6) / 4 = (2.0, 2.0) / 4 = (0.5, 0.5)
        [[[0.8, 0.2]], [[0.4, 0.6]]], "weighted", {"weights": [1.0, 3.0]}, [[0.5, 0.5]],
        id="weighted-1-3",
    ),
    pytest.param(
        # w = (1, 3): (1*1 + 3*0, 1*0 + 3*1) / 4 = (0.25, 0.75)
        [[[1.0, 0.0]], [[0.0, 1.0]]], "weighted", {"weights": [1.0, 3.0]}, [[0.25, 0.75]],
        id="weighted-onehot-1-3",
    ),
    pytest.param(
        # only the ratio matters: w = (2, 6) is w = (1, 3) again
        [[[1.0, 0.0]], [[0.0, 1.0]]], "weighted", {"weights": [2.0, 6.0]}, [[0.25, 0.75]],
        id="weighted-scale-invariant",
    ),
    pytest.param(
        # a zero weight drops hospital 0: result is hospital 1
        [[[1.0, 0.0]], [[0.3, 0.7]]], "weighted", {"weights": [0.0, 5.0]}, [[0.3, 0.7]],
        id="weighted-zero-weight",
    ),
    # ---- era ------------------------------------------------------------------
    pytest.param(
        # mean = (0.6, 0.4); T = 1: softmax(0.6, 0.4) = 1 / (1 + e^-0.2) = 0.549834
        [[[0.8, 0.2]], [[0.4, 0.6]]], "era", {"era_temperature": 1.0},
        [[_sigmoid(0.2), 1 - _sigmoid(0.2)]],
        id="era-T1",
    ),
    pytest.param(
        # mean = (0.6, 0.4); T = 0.5: softmax(1.2, 0.8) = 1 / (1 + e^-0.4) = 0.598688
        [[[0.8, 0.2]], [[0.4, 0.6]]], "era", {"era_temperature": 0.5},
        [[_sigmoid(0.4), 1 - _sigmoid(0.4)]],
        id="era-T0.5",
    ),
    pytest.param(
        # default T = 0.1: softmax(6, 4) = 1 / (1 + e^-2) = 0.880797
        [[[0.8, 0.2]], [[0.4, 0.6]]], "era", {}, [[_sigmoid(2.0), 1 - _sigmoid(2.0)]],
        id="era-default-T0.1",
    ),
    pytest.param(
        # T = 1 FLATTENS a one-hot mean: softmax(1, 0) = (e, 1) / (e + 1) = (0.731, 0.269)
        [[[1.0, 0.0]]], "era", {"era_temperature": 1.0},
        [[math.e / (math.e + 1), 1 / (math.e + 1)]],
        id="era-T1-flattens",
    ),
    pytest.param(
        # C = 3, mean = (0.5, 0.25, 0.25); T = 0.5 -> logits (1, 0.5, 0.5)
        # softmax = (e^1, e^0.5, e^0.5) / (e^1 + 2 e^0.5)
        [[[1.0, 0.0, 0.0]], [[0.0, 0.5, 0.5]]], "era", {"era_temperature": 0.5},
        [[
            math.exp(1) / (math.exp(1) + 2 * math.exp(0.5)),
            math.exp(0.5) / (math.exp(1) + 2 * math.exp(0.5)),
            math.exp(0.5) / (math.exp(1) + 2 * math.exp(0.5)),
        ]],
        id="era-C3-T0.5",
    ),
    # ---- certainty ------------------------------------------------------------
    pytest.param(
        # confident (1, 0) has c = 1 + 1e-6; uniform (0.5, 0.5) has c = 1e-6
        # class 0: (c1 * 1 + c2 * 0.5) / (c1 + c2) = (1 + 1.5e-6) / (1 + 2e-6)
        [[[1.0, 0.0]], [[0.5, 0.5]]], "certainty", {},
        [[
            (_C_ONE * 1.0 + _C_UNI * 0.5) / (_C_ONE + _C_UNI),
            (_C_ONE * 0.0 + _C_UNI * 0.5) / (_C_ONE + _C_UNI),
        ]],
        id="certainty-confident-vs-uniform",
    ),
    pytest.param(
        # (0.9, 0.1) has c = 0.5310054 (see _C_09); uniform has c = 1e-6
        # class 0: (0.5310054 * 0.9 + 1e-6 * 0.5) / (0.5310054 + 1e-6) = 0.8999992
        [[[0.9, 0.1]], [[0.5, 0.5]]], "certainty", {},
        [[
            (_C_09 * 0.9 + _C_UNI * 0.5) / (_C_09 + _C_UNI),
            (_C_09 * 0.1 + _C_UNI * 0.5) / (_C_09 + _C_UNI),
        ]],
        id="certainty-0.9-vs-uniform",
    ),
    pytest.param(
        # (1, 0) with c = 1 + 1e-6 against (0.1, 0.9) with c = 0.5310054 (same
        # entropy as (0.9, 0.1)); class 0: (c1 * 1 + c2 * 0.1) / (c1 + c2) = 0.6879
        [[[1.0, 0.0]], [[0.1, 0.9]]], "certainty", {},
        [[
            (_C_ONE * 1.0 + _C_09 * 0.1) / (_C_ONE + _C_09),
            (_C_ONE * 0.0 + _C_09 * 0.9) / (_C_ONE + _C_09),
        ]],
        id="certainty-two-confident",
    ),
    pytest.param(
        # all uniform: every c = 1e-6, so the result is the plain mean
        [[[1 / 3, 1 / 3, 1 / 3]], [[1 / 3, 1 / 3, 1 / 3]]], "certainty", {},
        [[1 / 3, 1 / 3, 1 / 3]],
        id="certainty-all-uniform",
    ),
    # ---- median ---------------------------------------------------------------
    pytest.param(
        # H = 3, hospital 2 is an outlier voting class 2.
        # class 0: sorted (0.0, 0.6, 0.7) -> 0.6
        # class 1: sorted (0.0, 0.2, 0.3) -> 0.2
        # class 2: sorted (0.1, 0.1, 1.0) -> 0.1
        # sum 0.9 -> (0.6, 0.2, 0.1) / 0.9 = (2/3, 2/9, 1/9); the mean would be
        # (0.433, 0.167, 0.4)
        [[[0.7, 0.2, 0.1]], [[0.6, 0.3, 0.1]], [[0.0, 0.0, 1.0]]], "median", {},
        [[2 / 3, 2 / 9, 1 / 9]],
        id="median-H3-outlier",
    ),
    pytest.param(
        # H = 4 (even): mean of the two middle values.
        # class 0: sorted (0.0, 0.6, 0.7, 0.9) -> (0.6 + 0.7) / 2 = 0.65
        # class 1: sorted (0.1, 0.3, 0.4, 1.0) -> (0.3 + 0.4) / 2 = 0.35
        # (torch.median would give (0.6, 0.3) -> (2/3, 1/3))
        [[[0.9, 0.1]], [[0.7, 0.3]], [[0.6, 0.4]], [[0.0, 1.0]]], "median", {},
        [[0.65, 0.35]],
        id="median-H4-even",
    ),
    pytest.param(
        # renormalisation: class 0 sorted (0.2, 0.4, 0.6) -> 0.4
        #                  class 1 sorted (0.1, 0.2, 0.4) -> 0.2
        #                  class 2 sorted (0.0, 0.5, 0.6) -> 0.5
        # sum 1.1 -> (4/11, 2/11, 5/11)
        [[[0.6, 0.4, 0.0]], [[0.2, 0.2, 0.6]], [[0.4, 0.1, 0.5]]], "median", {},
        [[4 / 11, 2 / 11, 5 / 11]],
        id="median-renormalise",
    ),
    pytest.param(
        # sample 0: one-hot answers that all disagree -> every median is 0,
        #           so that row falls back to the mean (1/3, 1/3, 1/3).
        # sample 1: medians (0.5, 0.3, 0.2), sum 1 -> unchanged.
        [
            [[1.0, 0.0, 0.0], [0.5, 0.3, 0.2]],
            [[0.0, 1.0, 0.0], [0.5, 0.3, 0.2]],
            [[0.0, 0.0, 1.0], [0.5, 0.3, 0.2]],
        ],
        "median", {}, [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2]],
        id="median-zero-row-falls-back-to-mean",
    ),
    pytest.param(
        # H = 1: every aggregator returns the single hospital's answer
        [[[0.25, 0.75]]], "median", {}, [[0.25, 0.75]],
        id="median-H1",
    ),
]


@pytest.mark.parametrize(("probs", "method", "kwargs", "expected"), CASES)
def test_hand_computed(probs: list, method: str, kwargs: dict, expected: list) -> None:
    if "weights" in kwargs:
        kwargs = {**kwargs, "weights": torch.tensor(kwargs["weights"])}
    out = aggregate_outputs(_t(probs), method=method, **kwargs)
    assert out.dtype == torch.float32
    assert out.shape == (len(expected), len(expected[0]))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", list(Aggregator))
def test_enum_and_string_names_agree(method: Aggregator) -> None:
    probs = _random_probs(seed=0, shape=(3, 4, 5))
    weights = torch.tensor([1.0, 2.0, 3.0])
    counts = torch.tensor([[3.0, 0, 1, 2, 5], [1, 1, 1, 1, 1], [0, 4, 0, 2, 2]])
    by_enum = aggregate_outputs(probs, method=method, weights=weights, class_counts=counts)
    by_name = aggregate_outputs(probs, method=method.value, weights=weights, class_counts=counts)
    torch.testing.assert_close(by_enum, by_name)


@pytest.mark.parametrize("method", list(Aggregator))
def test_rows_sum_to_one(method: Aggregator) -> None:
    # inputs sum to 1 only within the 1e-3 tolerance; outputs must be exact
    probs = _random_probs(seed=1, shape=(4, 6, 3)) * (1 + 5e-4)
    out = aggregate_outputs(probs, method=method, weights=torch.tensor([4.0, 1.0, 2.0, 3.0]),
                            class_counts=torch.tensor([[1.0, 2, 3], [0, 5, 1], [2, 2, 2], [9, 0, 0]]))
    assert out.shape == (6, 3)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", list(Aggregator))
@pytest.mark.parametrize("num_hospitals", [3, 4])
def test_permutation_invariant_over_hospitals(method: Aggregator, num_hospitals: int) -> None:
    probs = _random_probs(seed=2, shape=(num_hospitals, 5, 4))
    weights = torch.arange(1, num_hospitals + 1, dtype=torch.float64)
    counts = torch.arange(num_hospitals * 4, dtype=torch.float64).reshape(num_hospitals, 4) % 5
    density = torch.rand(num_hospitals, 5, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(num_hospitals, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    extra = {"class_counts": counts, "density": density, "mask": mask}
    base = aggregate_outputs(probs, method=method, weights=weights, **extra)
    reverse = torch.arange(num_hospitals).flip(0)
    for perm in (reverse, torch.roll(torch.arange(num_hospitals), 1)):
        permuted = aggregate_outputs(probs[perm], method=method, weights=weights[perm],
                                     **{k: v[perm] for k, v in extra.items()})
        torch.testing.assert_close(base, permuted, atol=1e-6, rtol=0)
    # and the result does depend on the data: a different input gives a different answer
    other = aggregate_outputs(_random_probs(seed=4, shape=(num_hospitals, 5, 4)),
                              method=method, weights=weights, **extra)
    assert not torch.allclose(base, other, atol=1e-3)


@pytest.mark.parametrize("temperature", [0.1, 0.05])
def test_era_below_one_reduces_entropy_vs_mean(temperature: float) -> None:
    # C = 4 and T < 1/C: ERA sharpens every row
    probs = _random_probs(seed=5, shape=(3, 8, 4))
    mean = aggregate_outputs(probs, method="mean")
    era = aggregate_outputs(probs, method="era", era_temperature=temperature)
    assert (_entropy(era) < _entropy(mean)).all()
    # ERA keeps the mean's ranking of classes (softmax is monotone)
    assert torch.equal(era.argmax(dim=-1), mean.argmax(dim=-1))


def test_era_with_temperature_above_one_over_c_flattens() -> None:
    # T < 1 is not enough: with C = 4, T = 0.5 > 1/C flattens these averages
    probs = _random_probs(seed=5, shape=(3, 8, 4))
    mean = aggregate_outputs(probs, method="mean")
    era = aggregate_outputs(probs, method="era", era_temperature=0.5)
    assert (_entropy(era) > _entropy(mean)).all()


def test_median_ignores_a_minority_of_outliers() -> None:
    honest = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    probs = honest.expand(5, 1, 3).clone()
    probs[3, 0] = torch.tensor([0.0, 0.0, 1.0])
    probs[4, 0] = torch.tensor([0.0, 1.0, 0.0])
    out = aggregate_outputs(probs, method="median")
    torch.testing.assert_close(out[0], honest.float())


def test_result_is_float32_on_input_device_for_float32_input() -> None:
    probs = _random_probs(seed=6, shape=(2, 3, 4)).float()
    out = aggregate_outputs(probs, method="certainty")
    assert out.dtype == torch.float32
    assert out.device == probs.device


def _with(value: float, index: tuple[int, int, int]) -> torch.Tensor:
    probs = _t([[[0.5, 0.5], [0.2, 0.8]], [[0.9, 0.1], [0.6, 0.4]]])
    probs[index] = value
    return probs


_GOOD = _t([[[0.5, 0.5]], [[0.9, 0.1]]])

ERROR_CASES = [
    pytest.param(
        _with(float("nan"), (1, 0, 0)), "mean", {}, r"NaN or Inf \(hospitals \[1\]\)", id="nan",
    ),
    pytest.param(
        _with(float("inf"), (0, 1, 1)), "mean", {}, r"NaN or Inf \(hospitals \[0\]\)", id="inf",
    ),
    pytest.param(
        _t([[[1.2, -0.2]], [[0.5, 0.5]]]), "mean", {}, r"negative values \(hospitals \[0\]\)",
        id="negative",
    ),
    pytest.param(
        _t([[[0.5, 0.5]], [[0.6, 0.6]]]), "mean", {}, r"sum to 1 within 0.001 \(hospitals \[1\]\)",
        id="not-summing-to-one",
    ),
    pytest.param(
        _t([[[0.5, 0.5]], [[0.5, 0.498]]]), "mean", {}, "sum to 1", id="just-outside-tolerance",
    ),
    pytest.param(_t([[0.5, 0.5]]), "mean", {}, r"3-D .* got shape \(1, 2\)", id="ndim-2"),
    pytest.param(_t([[[[0.5, 0.5]]]]), "mean", {}, "3-D", id="ndim-4"),
    pytest.param(torch.zeros((0, 1, 2)), "mean", {}, "no hospitals", id="no-hospitals"),
    pytest.param(
        torch.ones((2, 1, 1), dtype=torch.int64), "mean", {}, "floating point", id="int-dtype",
    ),
    pytest.param([[[0.5, 0.5]]], "mean", {}, "torch.Tensor", id="not-a-tensor"),
    pytest.param(
        _GOOD, "avg", {}, r"unknown aggregation method 'avg'.*'mean', 'weighted', 'era', "
        r"'certainty', 'median'", id="unknown-method",
    ),
    pytest.param(_GOOD, "MEAN", {}, "unknown aggregation method", id="method-is-case-sensitive"),
    pytest.param(_GOOD, 3, {}, "unknown aggregation method 3", id="method-not-a-string"),
    pytest.param(_GOOD, "weighted", {}, "needs weights", id="weighted-without-weights"),
    pytest.param(
        _GOOD, "weighted", {"weights": torch.tensor([1.0, 2.0, 3.0])}, r"shape \(2,\)",
        id="weights-wrong-shape",
    ),
    pytest.param(
        _GOOD, "weighted", {"weights": torch.tensor([[1.0, 2.0]])}, r"shape \(2,\)",
        id="weights-wrong-ndim",
    ),
    pytest.param(
        _GOOD, "weighted", {"weights": torch.tensor([1.0, -2.0])}, "non-negative",
        id="weights-negative",
    ),
    pytest.param(
        _GOOD, "weighted", {"weights": torch.tensor([0.0, 0.0])}, "all be zero",
        id="weights-all-zero",
    ),
    pytest.param(
        _GOOD, "weighted", {"weights": torch.tensor([1.0, float("nan")])}, "finite",
        id="weights-nan",
    ),
]


@pytest.mark.parametrize(("probs", "method", "kwargs", "match"), ERROR_CASES)
def test_bad_inputs_raise_payload_error(probs: torch.Tensor, method: str, kwargs: dict,
                                        match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        aggregate_outputs(probs, method=method, **kwargs)


def test_payload_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        aggregate_outputs(_GOOD, method="nope")


def test_weights_ignored_by_other_methods() -> None:
    plain = aggregate_outputs(_GOOD, method="mean")
    with_weights = aggregate_outputs(_GOOD, method="mean", weights=torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(plain, with_weights)


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_era_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(ValueError, match="era_temperature must be a finite number > 0"):
        aggregate_outputs(_GOOD, method="era", era_temperature=temperature)


@pytest.mark.parametrize(
    ("logits", "temperature", "expected"),
    [
        # exp(0) : exp(ln 3) = 1 : 3 -> (0.25, 0.75)
        ([0.0, math.log(3)], 1.0, [0.25, 0.75]),
        # T = 2: exp(0) : exp(ln 3 / 2) = 1 : sqrt(3) -> (1, sqrt 3) / (1 + sqrt 3)
        ([0.0, math.log(3)], 2.0, [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]),
        # shift invariance: (10, 10 + ln 3) gives the same as (0, ln 3)
        ([10.0, 10.0 + math.log(3)], 1.0, [0.25, 0.75]),
    ],
)
def test_probs_from_logits(logits: list[float], temperature: float, expected: list[float]) -> None:
    out = probs_from_logits(torch.tensor([logits], dtype=torch.float64), temperature=temperature)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_probs_from_logits_rejects_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        probs_from_logits(torch.zeros(1, 2), temperature=temperature)


def test_probs_from_logits_rejects_integer_logits() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        probs_from_logits(torch.zeros(1, 2, dtype=torch.int64), temperature=1.0)


# --------------------------------------------------------------------------- masks, density, label counts


@pytest.mark.parametrize("method", list(Aggregator))
def test_abstaining_hospital_is_left_out(method: Aggregator) -> None:
    # hospital 2 abstains on sample 0: the aggregate there equals the aggregate of hospitals 0 and 1 alone
    probs = _random_probs(seed=7, shape=(3, 2, 3))
    probs[2, 0] = torch.tensor([0.0, 0.0, 1.0])  # what an abstaining hospital sent does not matter
    weights = torch.tensor([1.0, 2.0, 5.0])
    counts = torch.tensor([[3.0, 1, 1], [1, 3, 1], [1, 1, 3]])
    density = torch.tensor([[1.0, 2.0], [0.5, 1.0], [9.0, 1.0]])
    mask = torch.tensor([[True, True], [True, True], [False, True]])
    out = aggregate_outputs(probs, method=method, weights=weights, class_counts=counts, density=density, mask=mask)
    if method != Aggregator.LABEL_AWARE:  # label_aware's per-class support depends on all hospitals' counts
        two = aggregate_outputs(probs[:2, :1], method=method, weights=weights[:2], density=density[:2, :1])
        torch.testing.assert_close(out[0], two[0], atol=1e-6, rtol=0)
    changed = aggregate_outputs(probs, method=method, weights=weights, class_counts=counts, density=density)
    assert not torch.allclose(out[0], changed[0], atol=1e-4)  # without the mask, hospital 2 counts
    torch.testing.assert_close(out[1], changed[1], atol=1e-6, rtol=0)  # sample 1 is untouched


def test_answered_flags_samples_nobody_answered() -> None:
    mask = torch.tensor([[True, False, False], [False, False, True]])
    assert answered(mask, 3).tolist() == [True, False, True]
    assert answered(None, 2).tolist() == [True, True]
    out = aggregate_outputs(_random_probs(seed=8, shape=(2, 3, 2)), method="mean", mask=mask)
    assert torch.isfinite(out).all()


def test_density_recovers_the_pooled_posterior_from_one_class_teachers() -> None:
    # Two one-class hospitals: each teacher always says "my class". Their density ratios say which samples
    # look like their data; the density aggregate is then the pooled posterior, the mean is constant.
    probs = torch.tensor([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3])  # (2, 3, 2)
    sizes = torch.tensor([100.0, 100.0])
    density = torch.tensor([[1.8, 1.0, 0.2], [0.2, 1.0, 1.8]])  # sample 0 looks like H0, sample 2 like H1
    fused = aggregate_outputs(probs, method="density", weights=sizes, density=density)
    torch.testing.assert_close(fused, torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]), atol=1e-6, rtol=0)
    mean = aggregate_outputs(probs, method="mean")
    assert torch.allclose(mean, torch.full((3, 2), 0.5))


def test_label_aware_weights_each_class_by_support() -> None:
    # H0 has only class 0, H1 both: class 1 comes from H1 alone
    probs = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])
    counts = torch.tensor([[10.0, 0.0], [10.0, 10.0]])
    fused = aggregate_outputs(probs, method="label_aware", class_counts=counts)
    raw = torch.tensor([0.5 * 0.9 + 0.5 * 0.4, 1.0 * 0.6])
    torch.testing.assert_close(fused[0], (raw / raw.sum()).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad, message", [
    ({"mask": torch.ones(3, 2, dtype=torch.bool)}, "mask must be"),
    ({"density": -torch.ones(2, 2)}, "density ratios must be finite"),
    ({"density": torch.full((2, 2), math.nan)}, "density ratios must be finite"),
])
def test_bad_masks_and_densities_are_payload_errors(bad: dict, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        aggregate_outputs(_random_probs(seed=9, shape=(2, 2, 2)), method="density", weights=torch.ones(2), **bad)


def test_normalised_entropy_bounds() -> None:
    ent = normalised_entropy(torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    torch.testing.assert_close(ent, torch.tensor([0.0, 1.0]))
