"""The names a config may use: methods, aggregators, selectors, partitions, wire formats, models, devices.

Kept apart from :mod:`common.config` (which validates whole configs) so that
modules needing only a name import no schema machinery.
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = ["DEVICE_PATTERN", "MODEL_NAMES", "FAULT_NAMES", "Method", "AggregatorName", "SelectorKind",
           "PartitionName", "OutputKind", "WireDtype", "ProxySource", "PrivacyMechanism", "PateRelease", "LrSchedule"]

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # checked here; resolved by common.device
MODEL_NAMES = ("smallcnn", "densenet121", "resnet18", "resnet34", "resnet50")
FAULT_NAMES = ("nan", "shape", "negative", "uniform", "flip", "crash", "late")


class Method(StrEnum):
    """What ``medkd simulate`` trains."""

    FEDKD = "fedkd"
    FEDAVG = "fedavg"
    CENTRALIZED = "centralized"
    LOCAL = "local"


class AggregatorName(StrEnum):
    """Server-side aggregators of hospital soft labels (see server/aggregate.py)."""

    MEAN = "mean"
    WEIGHTED = "weighted"
    ERA = "era"
    CERTAINTY = "certainty"
    MEDIAN = "median"
    DENSITY = "density"
    LABEL_AWARE = "label_aware"


class SelectorKind(StrEnum):
    """How a hospital decides, per proxy sample, whether its teacher knows enough to answer (client/selector.py)."""

    NONE = "none"
    DENSITY_RATIO = "density_ratio"
    MAX_SOFTMAX = "max_softmax"


class LrSchedule(StrEnum):
    """The student's learning rate over a fedkd run's distillation epochs (server/distill.py)."""

    CONSTANT = "constant"
    COSINE = "cosine"


class PartitionName(StrEnum):
    """How the private (non-proxy) training data is split among hospitals."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    QUANTITY = "quantity"


class OutputKind(StrEnum):
    """What a teacher sends: probabilities at temperature T, or raw logits."""

    PROBS = "probs"
    LOGITS = "logits"


class WireDtype(StrEnum):
    """Float width of the outputs on the wire."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


class ProxySource(StrEnum):
    """Which official split the public proxy set is carved from."""

    TRAIN = "train"
    VAL = "val"


class PrivacyMechanism(StrEnum):
    """How a hospital makes what leaves it differentially private (see client/privacy.py for each one's guarantee)."""

    NONE = "none"
    DP_SGD_TEACHER = "dp_sgd_teacher"
    PATE = "pate"
    HOSPITAL_GAUSSIAN = "hospital_gaussian"


class PateRelease(StrEnum):
    """What a PATE hospital releases per proxy sample: a noisy vote histogram (GNMax) or a noisy probability sum."""

    VOTES = "votes"
    PROBS = "probs"
