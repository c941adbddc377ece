"""Privacy accounting: medkd's privacy events and thin, typed wrappers over Google's ``dp-accounting``.

Every figure comes from the library's accountants; nothing here does
accountant maths by hand:

* **PLD** (privacy loss distributions; Meiser & Mohammadi, CCS 2018;
  Koskela et al., AISTATS 2020; Doroshenko et al., PETS 2022) is the main
  figure. It is a numerically tight, pessimistic (upper) bound.
* **RDP** (Rényi DP; Mironov, CSF 2017; Mironov, Talwar & Zhang 2019 for the
  sampled Gaussian) is the cross-check; it is looser, so its ε is larger.

The Gaussian differential privacy (GDP/CLT) accountant is never used: it can
underestimate ε (Gopi, Lee & Wutschitz, NeurIPS 2021).

Neighbouring datasets differ by adding or removing one record
(``ADD_OR_REMOVE_ONE``), which is what Poisson-sampled DP-SGD guarantees.

Events are frozen dataclasses that round-trip through plain JSON dicts
(:meth:`to_dict`, :func:`event_from_dict`), so a ledger can store them and
replay them later into a fresh accountant, in the same order, to the same ε.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

import dp_accounting
from dp_accounting import pld, rdp

from common.errors import MedkdError

logger = logging.getLogger(__name__)

PLD_VALUE_DISCRETIZATION = 1e-4
"""Grid step of the privacy-loss values in the PLD accountant (the library's default).

The discretisation is pessimistic: ε comes out at most about 1e-3 above the
exact value for the DP-SGD settings medkd uses, at ~0.4 s per 1000 sampled
steps on one CPU core (1e-3 is ten times faster but ~1e-3 looser).
"""

NOISE_TOLERANCE = 1e-4
"""Default tolerance of :func:`noise_for_epsilon` on the noise multiplier."""


class Accountant(StrEnum):
    """The accountants medkd composes events in."""

    PLD = "pld"
    RDP = "rdp"


class AccountingError(MedkdError, ValueError):
    """A privacy event or accounting request has an invalid parameter; the message names it."""


# --------------------------------------------------------------------------- checks


def _check_positive(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise AccountingError(f"{owner}.{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_rate(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise AccountingError(f"{owner}.{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_count(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise AccountingError(f"{owner}.{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_delta(delta: object, *, name: str = "delta") -> float:
    """``delta`` as a float, or :class:`AccountingError` unless it lies in (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise AccountingError(f"{name} must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _check_fields(kind: str, data: Mapping[str, object], fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in data]
    unknown = sorted(set(data) - set(fields) - {"kind"})
    if missing or unknown:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(unknown)}"] if unknown else []
        raise AccountingError(f"{kind} event: {'; '.join(problems)} (expected {', '.join(fields)})")


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class SampledGaussianEvent:
    """DP-SGD training: a Gaussian mechanism on Poisson-sampled batches, composed ``steps`` times.

    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.

    Parameters
    ----------
    noise_multiplier:
        Noise standard deviation divided by the L2 clipping norm (σ), > 0.
    sample_rate:
        Poisson sampling probability of each record per step (q), in (0, 1].
    steps:
        Number of noisy steps (T), >= 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    kind: ClassVar[str] = "sampled_gaussian"

    def __post_init__(self) -> None:
        owner = type(self).__name__  # normalised to plain float/int, so a JSON round trip gives an equal event
        object.__setattr__(self, "noise_multiplier", _check_positive(owner, "noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _check_rate(owner, "sample_rate", self.sample_rate))
        object.__setattr__(self, "steps", _check_count(owner, "steps", self.steps))

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The ``dp_accounting`` event: ``SelfComposed(PoissonSampled(q, Gaussian(σ)), T)``."""
        sampled = dp_accounting.PoissonSampledDpEvent(
            sampling_probability=self.sample_rate, event=dp_accounting.GaussianDpEvent(self.noise_multiplier))
        return dp_accounting.SelfComposedDpEvent(event=sampled, count=self.steps)

    def to_dict(self) -> dict[str, object]:
        """A plain JSON dict (``kind`` plus the fields)."""
        return {"kind": self.kind, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SampledGaussianEvent:
        """The event :meth:`to_dict` wrote; :class:`AccountingError` names any bad field."""
        _check_fields(cls.kind, data, ("noise_multiplier", "sample_rate", "steps"))
        return cls(noise_multiplier=data["noise_multiplier"], sample_rate=data["sample_rate"],  # type: ignore[arg-type]
                   steps=data["steps"])  # type: ignore[arg-type]


@dataclass(frozen=True)
class GaussianEvent:
    """A Gaussian mechanism with sensitivity-normalised noise, released ``count`` times.

    For example PATE's GNMax answers (Papernot et al., ICLR 2018) or
    hospital-level clipped outputs with noise of standard deviation
    ``noise_multiplier × L2 sensitivity``.

    Parameters
    ----------
    noise_multiplier:
        Noise standard deviation divided by the L2 sensitivity (σ), > 0.
    count:
        Number of releases, >= 1.
    """

    noise_multiplier: float
    count: int

    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "noise_multiplier", _check_positive(owner, "noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "count", _check_count(owner, "count", self.count))

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The ``dp_accounting`` event: ``SelfComposed(Gaussian(σ), count)``."""
        return dp_accounting.SelfComposedDpEvent(
            event=dp_accounting.GaussianDpEvent(self.noise_multiplier), count=self.count)

    def to_dict(self) -> dict[str, object]:
        """A plain JSON dict (``kind`` plus the fields)."""
        return {"kind": self.kind, "noise_multiplier": self.noise_multiplier, "count": self.count}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> GaussianEvent:
        """The event :meth:`to_dict` wrote; :class:`AccountingError` names any bad field."""
        _check_fields(cls.kind, data, ("noise_multiplier", "count"))
        return cls(noise_multiplier=data["noise_multiplier"], count=data["count"])  # type: ignore[arg-type]


PrivacyEvent = SampledGaussianEvent | GaussianEvent
"""Any event medkd can account for."""

EVENT_TYPES: dict[str, type[SampledGaussianEvent] | type[GaussianEvent]] = {
    cls.kind: cls for cls in (SampledGaussianEvent, GaussianEvent)
}
"""Registry: the ``kind`` written in a serialised event -> its class."""


def event_from_dict(data: object) -> PrivacyEvent:
    """The event serialised in ``data`` (from :meth:`to_dict`); :class:`AccountingError` if it is not one."""
    if not isinstance(data, Mapping):
        raise AccountingError(f"a privacy event must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise AccountingError(f"event.kind must be one of {sorted(EVENT_TYPES)}, got {kind!r}")
    return cls.from_dict(data)


# --------------------------------------------------------------------------- accounting


def fresh_accountant(accountant: Accountant | str = Accountant.PLD) -> dp_accounting.PrivacyAccountant:
    """An empty ``dp_accounting`` accountant of the given kind (add-or-remove-one neighbours)."""
    kind = _accountant(accountant)
    if kind is Accountant.PLD:
        return pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                 value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


def _accountant(accountant: Accountant | str) -> Accountant:
    try:
        return Accountant(accountant)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in Accountant)
        raise AccountingError(f"accountant must be one of {choices}, got {accountant!r}") from None


def epsilon(events: Iterable[PrivacyEvent], delta: float, accountant: Accountant | str = Accountant.PLD) -> float:
    """ε at ``delta`` of all ``events`` composed, in order, in a fresh accountant.

    Parameters
    ----------
    events:
        The releases to compose (none gives 0.0).
    delta:
        Target δ, in (0, 1).
    accountant:
        ``"pld"`` (the main figure) or ``"rdp"`` (the looser cross-check).

    Returns
    -------
    float
        ε, possibly ``inf`` where the events give no useful guarantee at δ.
    """
    delta = check_delta(delta)
    kind = _accountant(accountant)
    composed = fresh_accountant(kind)
    for position, event in enumerate(events):
        if not isinstance(event, SampledGaussianEvent | GaussianEvent):
            raise AccountingError(f"events[{position}] must be a SampledGaussianEvent or GaussianEvent, "
                                  f"got {type(event).__name__}")
        composed.compose(event.to_dp_event())
    return float(composed.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, *,
                      tol: float = NOISE_TOLERANCE) -> float:
    """The smallest noise multiplier σ whose DP-SGD run stays within ``target_epsilon`` under PLD.

    Uses the library's ``calibrate_dp_mechanism`` (Brent's method over fresh
    PLD accountants, the same ones :func:`epsilon` uses). The result is
    within ``tol`` above the exact smallest σ and never below it, so
    ``epsilon([SampledGaussianEvent(σ, sample_rate, steps)], delta) <= target_epsilon``.

    Small σ (large targets, many steps) is slow to evaluate under PLD: seconds
    per call for σ around 0.5 and 1000 steps.
    """
    target_epsilon = _check_positive("noise_for_epsilon", "target_epsilon", target_epsilon)
    delta = check_delta(delta)
    sample_rate = _check_rate("noise_for_epsilon", "sample_rate", sample_rate)
    steps = _check_count("noise_for_epsilon", "steps", steps)
    tol = _check_positive("noise_for_epsilon", "tol", tol)

    def make_event(noise_multiplier: float) -> dp_accounting.DpEvent:
        if noise_multiplier <= 0:  # the search starts at 0: no noise is no privacy (ε = inf)
            return dp_accounting.NonPrivateDpEvent()
        return SampledGaussianEvent(noise_multiplier, sample_rate, steps).to_dp_event()

    try:
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: fresh_accountant(Accountant.PLD), make_event, target_epsilon, delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(lower_endpoint=0.0, initial_guess=1.0), tol=tol)
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as e:
        raise AccountingError(f"no noise multiplier up to 2**30 reaches target_epsilon={target_epsilon} at "
                              f"delta={delta} (sample_rate={sample_rate}, steps={steps})") from e
    logger.debug("σ=%.6f reaches ε=%s at δ=%s (q=%s, %d steps)", sigma, target_epsilon, delta, sample_rate, steps)
    return float(sigma)


def gaussian_noise_for_epsilon(target_epsilon: float, delta: float, count: int, *, tol: float = NOISE_TOLERANCE) -> float:
    """The smallest noise multiplier σ for which ``count`` Gaussian releases stay within ``target_epsilon`` (PLD).

    For planning per-answer mechanisms (PATE, hospital-level noise): a
    hospital that expects to answer ``count`` samples sets
    ``privacy.noise_multiplier`` to this value and its budget to the target.
    """
    target_epsilon = _check_positive("gaussian_noise_for_epsilon", "target_epsilon", target_epsilon)
    delta = check_delta(delta)
    count = _check_count("gaussian_noise_for_epsilon", "count", count)

    def make_event(noise_multiplier: float) -> dp_accounting.DpEvent:
        if noise_multiplier <= 0:
            return dp_accounting.NonPrivateDpEvent()
        return GaussianEvent(noise_multiplier, count).to_dp_event()

    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: fresh_accountant(Accountant.PLD), make_event, target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(lower_endpoint=0.0, initial_guess=1.0), tol=tol)
    return float(sigma)
