"""Knowledge-distillation losses for training the server's student.

Plain torch; never imports Flower.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    temperature: float,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Distillation loss of Hinton et al., optionally mixed with hard-label CE.

    From Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural
    Network" (NIPS Deep Learning Workshop, 2015)::

        KD   = T^2 * mean_i KL(target_i || softmax(student_logits_i / T))
        loss = (1 - ce_weight) * KD + ce_weight * CE(student_logits, labels)

    The KL term uses ``reduction="batchmean"`` (sum over classes, mean over
    samples). The ``T^2`` factor keeps the gradients' magnitude roughly
    independent of ``T``, since the soft-target gradients scale as
    ``1 / T^2`` (Hinton et al., Sec. 2), so ``ce_weight`` means the same at
    any temperature. The cross-entropy term uses the student's plain logits
    (temperature 1), as in the paper.

    Parameters
    ----------
    student_logits : torch.Tensor
        ``(N, C)`` floating-point student logits, ``N >= 1``.
    target_probs : torch.Tensor
        ``(N, C)`` teacher (or aggregated) probabilities, each row on the
        simplex. They must *already* be at temperature ``T`` (e.g. from
        ``probs_from_logits(teacher_logits, temperature=T)`` or an
        aggregator): this function does not soften them again. Zero
        entries are allowed (``0 log 0 = 0``). Treated as constants; detach
        them if they carry a graph you do not want gradients through.
    temperature : float
        Softmax temperature ``T > 0`` applied to ``student_logits``.
    labels : torch.Tensor or None
        ``(N,)`` int64 class indices in ``[0, C)``; required when
        ``ce_weight > 0``, ignored otherwise.
    ce_weight : float
        Weight of the hard-label cross-entropy, in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        Scalar (0-d) loss.

    Raises
    ------
    ValueError
        If ``temperature`` is not a finite number > 0, ``ce_weight`` is not
        in ``[0, 1]``, the shapes do not match, or ``labels`` is missing or
        malformed while ``ce_weight > 0``.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not (0.0 <= ce_weight <= 1.0):
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    if student_logits.ndim != 2:
        raise ValueError(
            f"student_logits must be 2-D (N, C), got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape[0] < 1:
        raise ValueError("student_logits must hold at least one sample (N >= 1), got N = 0")
    if not torch.is_floating_point(student_logits):
        raise ValueError(
            f"student_logits must be floating point, got dtype {student_logits.dtype}"
        )
    if target_probs.shape != student_logits.shape:
        raise ValueError(
            f"target_probs shape {tuple(target_probs.shape)} does not match "
            f"student_logits shape {tuple(student_logits.shape)}"
        )

    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    target = target_probs.to(dtype=log_student.dtype, device=log_student.device)
    # kl_div computes target * (log target - input) with xlogy, so zero
    # target entries contribute exactly 0 instead of NaN.
    distill = F.kl_div(log_student, target, reduction="batchmean", log_target=False)
    distill = distill * temperature**2
    if ce_weight == 0.0:
        return distill

    checked = _check_labels(
        labels, num_samples=student_logits.shape[0], num_classes=student_logits.shape[1]
    )
    hard = F.cross_entropy(student_logits, checked.to(student_logits.device))
    return (1.0 - ce_weight) * distill + ce_weight * hard


def _check_labels(
    labels: torch.Tensor | None, *, num_samples: int, num_classes: int
) -> torch.Tensor:
    """Return ``labels`` if it is ``(N,)`` int64 in ``[0, C)``; else raise ValueError."""
    if labels is None:
        raise ValueError("labels (N,) int64 are required when ce_weight > 0, got None")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices, got dtype {labels.dtype}")
    if labels.shape != (num_samples,):
        raise ValueError(
            f"labels must have shape ({num_samples},) to match student_logits, "
            f"got {tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be class indices in [0, {num_classes})")
    return labels
