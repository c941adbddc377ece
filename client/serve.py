"""Teacher outputs on proxy samples: probabilities at temperature T or raw logits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from client.selector import Selector, selection
from common.config import OutputKind
from common.training import predict_logits


def teacher_outputs(model: nn.Module, images: torch.Tensor, *, output: OutputKind, temperature: float,
                    amp: bool = False, bias: np.ndarray | None = None) -> np.ndarray:
    """Outputs of ``model`` on proxy images (N, C, *spatial) -> (N, n_classes) float32.

    Runs on the model's device (bf16 autocast on CUDA when ``amp``); see :func:`outputs_from_logits`
    (which refuses a temperature <= 0).
    """
    return outputs_from_logits(predict_logits(model, images, amp=amp), output=output, temperature=temperature,
                               bias=bias)


def outputs_from_logits(logits: torch.Tensor, *, output: OutputKind, temperature: float,
                        bias: np.ndarray | None = None) -> np.ndarray:
    """What leaves for teacher ``logits`` (N, n_classes) on the host: float32 probabilities or logits.

    ``probs`` is softmax(logits / temperature), taken in float32; ``logits``
    are sent raw (the server applies the temperature). ``bias`` is the
    hospital's calibration of its teacher (client/selector.output_bias).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    if bias is not None:
        logits = logits + torch.as_tensor(bias, dtype=logits.dtype)
    if output == OutputKind.PROBS:
        return torch.softmax(logits / temperature, dim=1).numpy().astype(np.float32, copy=False)
    return logits.numpy().astype(np.float32, copy=False)


def plain_answer(teacher: nn.Module, selector: Selector | None, images: torch.Tensor, *, output: OutputKind,
                 temperature: float, amp: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A plain (non-DP) teacher's answer on ``images``: (outputs, mask, density ratio).

    The teacher runs once: its logits give the outputs (calibrated by the selector's bias) and, for a
    ``max_softmax`` selector, the confidence too. Without a selector, mask and density are None.
    """
    logits = predict_logits(teacher, images, amp=amp)
    outputs = outputs_from_logits(logits, output=output, temperature=temperature,
                                  bias=selector.bias if selector else None)
    if selector is None:
        return outputs, None, None
    mask, density = selection(selector, teacher, images, amp=amp, teacher_logits=logits)
    return outputs, mask, density
