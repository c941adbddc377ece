"""What each differential-privacy mechanism protects, and the noisy releases of the per-query ones.

A hospital's policy (``privacy.mechanism``) picks one mechanism. Each one
states its neighbouring relation, its unit and δ; ε always comes from the
hospital's ledger (:mod:`client.ledger`, Google's ``dp-accounting``: PLD
main figure, RDP cross-check).

``none``
    No mechanism: every output says "no formal DP guarantee".
``dp_sgd_teacher``
    The teacher is trained with Opacus DP-SGD (Poisson sampling, per-sample
    clipping; Abadi et al., CCS 2016). Protects one **record** (one training
    image) under add/remove-one-record neighbours. Its outputs are
    post-processing: queries cost nothing; every (re)training is charged.
``pate``
    The private set is split into ``partitions`` disjoint parts, one teacher
    each (Papernot et al., ICLR 2017 and 2018). A record is in exactly one
    part, so adding or removing it changes one teacher: a sample's vote
    histogram (or sum of probability vectors) moves by at most √2 in L2.
    Each released answer adds Gaussian noise of std ``noise_multiplier × √2``
    to that sum (GNMax's noisy histogram, or the noisy probability sum) and
    is charged with the data-independent Gaussian bound. Protects one
    **record**.
``hospital_gaussian``
    The teacher's probability vectors (clipped to the simplex, L2 distance
    between any two at most √2) plus Gaussian noise of std
    ``noise_multiplier × √2`` per entry, charged per answered sample.
    Protects the **whole hospital** (any change to all of its data), so its
    noise must hide everything the teacher learnt: low utility, worse the
    more samples are answered.

Noise comes from OpenDP's Gaussian mechanism (``opendp.measurements.
make_gaussian``), a floating-point-safe sampler driven by the operating
system's secure randomness. DP-SGD's noise comes from Opacus, which uses
torch's PRNG: its ``secure_mode`` needs ``torchcsprng``, which is not
installable for this torch, so DP-SGD noise is not cryptographically secure
(documented in the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.config import OutputKind, PateRelease, PolicyPrivacy, PrivacyMechanism
from common.errors import MedkdError

__all__ = ["NO_DP", "MechanismInfo", "describe", "gaussian_noise", "noisy_probabilities", "vote_histogram",
           "to_output", "SENSITIVITY"]

NO_DP = "none: no formal DP guarantee"
SENSITIVITY = math.sqrt(2.0)
"""L2 sensitivity of one answer: a vote moving between two classes, or one probability vector replaced."""


@dataclass(frozen=True)
class MechanismInfo:
    """What a mechanism guarantees, in words every output carries."""

    mechanism: PrivacyMechanism
    protects: str  # "record" | "hospital" | "nothing"
    relation: str
    delta: float | None
    charged: str  # what the ledger charges

    @property
    def label(self) -> str:
        """One line for replies, logs and metrics."""
        if self.mechanism == PrivacyMechanism.NONE:
            return NO_DP
        return (f"{self.mechanism.value}: {self.protects}-level DP, {self.relation}, δ={self.delta:g}, "
                f"ε by dp-accounting PLD (RDP cross-check)")


def describe(privacy: PolicyPrivacy) -> MechanismInfo:
    """The guarantee of the policy's mechanism."""
    mechanism = privacy.mechanism
    if mechanism == PrivacyMechanism.NONE:
        return MechanismInfo(mechanism, "nothing", "none", None, "nothing (no formal DP guarantee)")
    if mechanism == PrivacyMechanism.DP_SGD_TEACHER:
        return MechanismInfo(mechanism, "record", "add/remove one training record", privacy.delta,
                             "each teacher (re)training; queries are post-processing and free")
    if mechanism == PrivacyMechanism.PATE:
        return MechanismInfo(mechanism, "record", "add/remove one training record", privacy.delta,
                             "each newly released answer (Gaussian, sensitivity √2)")
    return MechanismInfo(mechanism, "hospital", "any change to all of the hospital's data", privacy.delta,
                         "each newly released answer (Gaussian, sensitivity √2)")


def gaussian_noise(values: np.ndarray, *, std: float) -> np.ndarray:
    """``values`` plus independent Gaussian noise of standard deviation ``std`` (OpenDP's sampler).

    values: any shape, float; returns float64 of the same shape.
    """
    if not (math.isfinite(std) and std > 0):
        raise MedkdError(f"noise std must be a finite number > 0, got {std!r}")
    try:
        import opendp.prelude as dp
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise MedkdError("the DP noise sampler needs OpenDP: pip install opendp") from e
    dp.enable_features("contrib")
    flat = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    measurement = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                                     dp.l2_distance(T=float), scale=float(std))
    return np.asarray(measurement(flat.tolist()), dtype=np.float64).reshape(np.shape(values))


def vote_histogram(probs: np.ndarray) -> np.ndarray:
    """Votes of ``m`` teachers. probs: (m, N, C) -> counts (N, C) of each teacher's top class."""
    m, n, c = probs.shape
    counts = np.zeros((n, c), dtype=np.float64)
    top = probs.argmax(axis=2)  # (m, N)
    for k in range(m):
        counts[np.arange(n), top[k]] += 1.0
    return counts


def noisy_probabilities(summed: np.ndarray, *, noise_multiplier: float) -> np.ndarray:
    """Release of a per-sample sum with sensitivity √2: noise, then post-processing onto the simplex.

    summed: (N, C) vote counts or probability sums. Gaussian noise of std
    ``noise_multiplier × √2`` per entry; negatives clipped to 0 and each row
    normalised (a row with nothing left becomes uniform). Returns (N, C) float64.
    """
    noisy = np.clip(gaussian_noise(summed, std=noise_multiplier * SENSITIVITY), 0.0, None)
    total = noisy.sum(axis=1, keepdims=True)
    uniform = np.full_like(noisy, 1.0 / max(noisy.shape[1], 1))
    return np.where(total > 0, noisy / np.where(total > 0, total, 1.0), uniform)


def to_output(probs: np.ndarray, *, output: OutputKind, temperature: float) -> np.ndarray:
    """Post-process released probabilities (N, C) into the output kind a query asked for.

    ``probs``: renormalised ``p^(1/T)``; ``logits``: ``log p`` (floored at 1e-6),
    which the coordinator's softmax at temperature T turns into the same ``p^(1/T)``.
    """
    floor = np.clip(probs, 1e-6, 1.0)
    if output == OutputKind.LOGITS:
        return np.log(floor).astype(np.float32)
    sharpened = floor ** (1.0 / temperature)
    return (sharpened / sharpened.sum(axis=1, keepdims=True)).astype(np.float32)


def pate_summary(privacy: PolicyPrivacy) -> str:
    """How a PATE answer is formed (for the hospital's log)."""
    what = "vote histogram (GNMax)" if privacy.pate_release == PateRelease.VOTES else "sum of probability vectors"
    return f"{privacy.partitions} disjoint teachers, noisy {what}, noise std {privacy.noise_multiplier * SENSITIVITY:g}"
