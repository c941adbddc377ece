"""The student's ceiling: the teachers' aggregate, evaluated directly on the coordinator's images.

A FedKD student learns one function: the coordinator's aggregate of the hospitals' answers on proxy
samples. On the default experiment, over three seeds, its mean test AUC came within 0.0002 of that
aggregate evaluated directly on the test images, and its mean validation AUC within 0.0005
(README, "Measured results"). So the aggregate is the figure a teacher-side change (ensemble size,
epochs, batch size ...) can be judged by, from the teachers alone and in seconds once they are
trained, instead of from a full federated run per seed.

:func:`aggregate_evaluation` computes every hospital's answer on the given images with
:func:`client.serve.plain_answer`, as :func:`client.app.answer_query` does on proxy samples (the
calibration bias, the KD temperature, the selector's mask and density ratio; label counts only
where the hospital's policy releases them), sends them through the reply's wire format and back, and fuses them with
:func:`server.app.aggregate_replies`, the coordinator's own code. The ``local`` baseline reports it
on the validation split, where a choice may be made, and after every choice on the test split.

This is a simulation diagnostic: it shows the teachers the coordinator's validation and test
images, which no deployment does. It is not evaluated for teachers under a DP mechanism: those
answer through their privacy ledger, and an answer outside a run would be a release to account for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from client.selector import load_or_train_selector
from client.serve import plain_answer
from client.teacher import TeacherInfo
from common.config import AggregatorName, ExperimentConfig, PrivacyMechanism
from common.data import class_counts
from common.metrics import EvalResult, classification_metrics
from common.payload import Reply, make_reply_content, parse_reply
from common.split import FederatedSplit, hospital_name
from server.app import aggregate_replies

__all__ = ["aggregate_evaluation", "describe_aggregate", "no_aggregate_reason"]


def no_aggregate_reason(cfg: ExperimentConfig) -> str | None:
    """Why the aggregate is not evaluated for ``cfg`` (None: it is)."""
    dp = sorted({cfg.policy_rules(h).privacy.mechanism.value for h in range(cfg.federation.hospitals)}
                - {PrivacyMechanism.NONE.value})
    if dp:
        return (f"not evaluated under the DP mechanism(s) {', '.join(dp)}: such teachers answer through their "
                "privacy ledger")
    return None


def describe_aggregate(cfg: ExperimentConfig) -> str:
    """One line naming what is aggregated, for the metrics file."""
    return (f"{cfg.aggregator.value} aggregate of the teachers' answers (selector {cfg.selector.kind.value}, "
            f"temperature {cfg.distill.temperature:g}) evaluated directly on the images: a simulation diagnostic")


def hospital_replies(*, cfg: ExperimentConfig, split: FederatedSplit, hospitals_dir: Path,
                     teachers: list[nn.Module], infos: list[TeacherInfo], images: torch.Tensor) -> list[Reply]:
    """Every hospital's answer on ``images`` as the coordinator receives it (plain teachers only).

    Computed as the hospital answers a query on proxy samples, then packed and parsed as on the wire
    (so the wire dtype's rounding and the density ratio's clipping apply too).
    """
    replies = []
    for h, (teacher, info) in enumerate(zip(teachers, infos, strict=True)):
        selector = load_or_train_selector(cfg=cfg, split=split, hospital=h,
                                          hospital_dir=hospitals_dir / hospital_name(h), teacher=teacher)
        outputs, mask, density = plain_answer(teacher, selector, images, output=cfg.query.output,
                                              temperature=cfg.distill.temperature, amp=cfg.amp)
        counts = None
        if cfg.aggregator == AggregatorName.LABEL_AWARE and cfg.policy_rules(h).answers.label_counts:
            counts = class_counts(split.hospital(h).labels, split.data.n_classes)
        content = make_reply_content(outputs=outputs, dtype=cfg.query.dtype, hospital=info.hospital,
                                     model=info.model, privacy="", num_private=info.num_private, val_auc=info.val_auc,
                                     mask=mask, density=density, label_counts=counts)
        replies.append(parse_reply(content, n_samples=images.shape[0], n_classes=split.data.n_classes,
                                   output=cfg.query.output, dtype=cfg.query.dtype,
                                   simplex_tolerance=cfg.query.simplex_tolerance, hospital=info.hospital))
    return replies


def aggregate_evaluation(*, cfg: ExperimentConfig, split: FederatedSplit, hospitals_dir: Path,
                         teachers: list[nn.Module], infos: list[TeacherInfo], images: torch.Tensor,
                         labels: torch.Tensor) -> EvalResult:
    """AUC and accuracy of the teachers' aggregate on ``images`` (labels used for the figures only).

    Raises
    ------
    ValueError
        If a hospital's policy uses a DP mechanism (see :func:`no_aggregate_reason`).
    """
    reason = no_aggregate_reason(cfg)
    if reason is not None:
        raise ValueError(f"the teachers' aggregate is {reason}")
    replies = hospital_replies(cfg=cfg, split=split, hospitals_dir=hospitals_dir, teachers=teachers, infos=infos,
                               images=images)
    fused, _ = aggregate_replies(replies, cfg, split.data.n_classes)
    return classification_metrics(fused, labels)
