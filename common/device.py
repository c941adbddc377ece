"""Where tensors live: one device setting (``auto | cpu | cuda[:i]``) and the habits that make a GPU fast.

The coordinator's config sets the device of the student, the evaluation and
the baselines (``device``); each hospital's policy sets its teacher's.
``auto`` picks CUDA when present. On CUDA, 2D models and batches use
``channels_last``, inference and training run under bf16 autocast when
``amp`` is on (no loss scaling is needed for bf16), and host batches are
pinned and copied without blocking. On the CPU nothing changes: no
autocast, the default memory format, so CPU runs stay deterministic.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from common.config import DEVICE_PATTERN
from common.errors import MedkdError



class DeviceError(MedkdError, ValueError):
    """A device setting names a device this machine does not have."""


def resolve_device(spec: str, *, key: str = "device") -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:<i>`` into a :class:`torch.device`.

    Raises
    ------
    DeviceError
        Naming ``key`` when the spec is malformed or asks for a GPU that is not there.
    """
    spec = str(spec).strip()
    if not DEVICE_PATTERN.fullmatch(spec):
        raise DeviceError(f"{key}: expected auto, cpu, cuda or cuda:<index>, got {spec!r}")
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{key}: {spec} asked for, but this machine has no CUDA device (use auto or cpu)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{key}: {spec} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
    return device


def autocast(device: torch.device, *, amp: bool) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU runs stay in fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _channels_last(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` (``channels_last`` for 2D convolutions on CUDA)."""
    model = model.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def place_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to ``device`` (pinned, non-blocking on CUDA); on the CPU it is returned as is."""
    if device.type != "cuda":
        return x
    if x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return _channels_last(x.to(device, non_blocking=True), device)


def state_dict_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights as contiguous CPU tensors (for checkpoints and the wire)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


class ResidentImages:
    """A ``uint8`` image set kept on a GPU once, so that each query is a gather on the device, not a host copy.

    Used for the public proxy set, which every query indexes into: on CUDA the
    whole set (MedMNIST-sized: tens to hundreds of MB) is copied once per
    process; on the CPU :meth:`take` is the plain host path.
    """

    def __init__(self, images: np.ndarray, *, spatial_dims: int, device: torch.device) -> None:
        self.images = images
        self.spatial_dims = spatial_dims
        self.device = device
        self._resident = (torch.from_numpy(np.ascontiguousarray(images)).to(device)
                          if device.type == "cuda" else None)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        """Images at ``indices`` as channel-first ``float32`` in [0, 1] on the device."""
        if self._resident is None:
            return uint8_images_to(self.images[indices], spatial_dims=self.spatial_dims, device=self.device)
        picked = self._resident[torch.as_tensor(indices, device=self.device)]
        return _channels_last(_channel_first(picked.float().div_(255.0), self.spatial_dims), self.device)


def _channel_first(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    if spatial_dims == 2 and x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    return x.unsqueeze(1)


def uint8_images_to(images: np.ndarray, *, spatial_dims: int, device: torch.device) -> torch.Tensor:
    """Stored ``uint8`` images -> channel-first ``float32`` in [0, 1] on ``device``.

    On CUDA the ``uint8`` bytes travel (4x fewer than float32) and are
    converted on the GPU; on the CPU this is :func:`common.data.to_tensor`.
    """
    from common.data import to_tensor

    if device.type != "cuda":
        return to_tensor(images, spatial_dims=spatial_dims)
    raw = torch.from_numpy(np.ascontiguousarray(images)).pin_memory().to(device, non_blocking=True)
    return _channels_last(_channel_first(raw.float().div_(255.0), spatial_dims), device)
