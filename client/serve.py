"""Teacher outputs on proxy samples: probabilities at temperature T or raw logits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.config import OutputKind
from common.training import predict_logits


def teacher_outputs(model: nn.Module, images: torch.Tensor, *, output: OutputKind, temperature: float,
                    amp: bool = False, bias: np.ndarray | None = None) -> np.ndarray:
    """Outputs of ``model`` on proxy images (N, C, *spatial) -> (N, n_classes) float32.

    Runs on the model's device (bf16 autocast on CUDA when ``amp``; the
    softmax is taken in float32). ``probs`` is softmax(logits / temperature);
    ``logits`` are sent raw (the server applies the temperature).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = predict_logits(model, images, amp=amp)
    if bias is not None:  # the hospital's calibration of its teacher (client/selector.output_bias)
        logits = logits + torch.as_tensor(bias, dtype=logits.dtype)
    if output == OutputKind.PROBS:
        return torch.softmax(logits / temperature, dim=1).numpy().astype(np.float32)
    return logits.numpy().astype(np.float32)
