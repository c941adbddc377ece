"""Model registry: a name -> builder over MONAI networks plus a small fast CNN.

Every builder takes the data's geometry (2D or 3D, channels, size) and the
number of classes, so the same name works for 28x28 RGB fundus images and
28^3 MRA volumes. Architectures whose pooling runs out of resolution on
MedMNIST's 28 px inputs (MONAI's DenseNet121 needs at least 64 px) are
wrapped in :class:`ResizeInput`, which upsamples the batch first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import MODEL_NAMES

logger = logging.getLogger(__name__)

__all__ = ["ModelSpec", "build_model", "build_teacher", "MODEL_NAMES", "SmallCNN", "ResizeInput", "MeanEnsemble",
           "count_parameters"]


@dataclass(frozen=True)
class ModelSpec:
    """Geometry a model is built for."""

    spatial_dims: int  # 2 or 3
    in_channels: int  # 1 (grayscale, volumes) or 3 (RGB)
    n_classes: int
    spatial_size: int  # side length of the (square/cubic) input, e.g. 28


class ResizeInput(nn.Module):
    """Upsample ``(N, C, *spatial)`` inputs to ``size`` before ``net`` (bilinear / trilinear)."""

    def __init__(self, net: nn.Module, *, size: int, spatial_dims: int) -> None:
        super().__init__()
        self.net = net
        self.size = size
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size,) * (x.dim() - 2), mode=self.mode, align_corners=False)
        return self.net(x)


class MeanEnsemble(nn.Module):
    """Several networks answering as one: its logits are the log of their mean softmax.

    ``softmax(forward(x))`` is the members' mean probability (the usual deep-ensemble average,
    Lakshminarayanan et al. 2017), so a temperature or a per-class bias applied downstream acts on
    the ensemble's distribution like on one model's logits. Input ``(N, C, *spatial)``, output
    ``(N, n_classes)``.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([F.log_softmax(m(x).float(), dim=1) for m in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


class SmallCNN(nn.Module):
    """A small CNN for 28 px (2D) and 28^3 (3D) inputs that trains in seconds on a CPU.

    Built from MONAI ``Convolution`` blocks (conv + batch norm + ReLU), so one
    definition serves 2D and 3D. Input ``(N, C, *spatial)``, output logits ``(N, n_classes)``.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        d = spec.spatial_dims
        widths = (32, 64, 128) if d == 2 else (16, 32, 64)
        pool: type[nn.Module] = nn.MaxPool2d if d == 2 else nn.MaxPool3d
        first_stride = 1 if d == 2 else 2  # 3D: halve 28^3 at once to stay CPU-friendly

        def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Module:
            return Convolution(spatial_dims=d, in_channels=c_in, out_channels=c_out, strides=stride,
                               kernel_size=3, act="RELU", norm="BATCH")

        self.features = nn.Sequential(
            conv(spec.in_channels, widths[0], first_stride), conv(widths[0], widths[0]), pool(2),
            conv(widths[0], widths[1]), conv(widths[1], widths[1]), pool(2),
            conv(widths[1], widths[2]),
            nn.AdaptiveAvgPool2d(1) if d == 2 else nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(widths[2], spec.n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _densenet121(spec: ModelSpec) -> nn.Module:
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, out_channels=spec.n_classes)
    min_size = 64  # four transitions after a stride-4 stem: 28 px would pool to nothing
    if spec.spatial_size < min_size:
        logger.info("densenet121 needs >= %d px inputs; upsampling %d px inputs to %d", min_size,
                    spec.spatial_size, min_size)
        return ResizeInput(net, size=min_size, spatial_dims=spec.spatial_dims)
    return net


def _resnet(depth: int) -> Callable[[ModelSpec], nn.Module]:
    def build(spec: ModelSpec) -> nn.Module:
        from monai.networks import nets

        small = spec.spatial_size < 64
        # MedMNIST's "ResNet (28)": a 3x3 stride-1 stem without max pooling for small inputs.
        return getattr(nets, f"resnet{depth}")(
            spatial_dims=spec.spatial_dims, n_input_channels=spec.in_channels, num_classes=spec.n_classes,
            conv1_t_size=3 if small else 7, conv1_t_stride=1 if small else 2, no_max_pool=small,
        )

    return build


_REGISTRY: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "smallcnn": SmallCNN,
    "densenet121": _densenet121,
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
}
if set(_REGISTRY) != set(MODEL_NAMES):  # keeps config validation and the registry in step
    raise RuntimeError(f"model registry {sorted(_REGISTRY)} differs from config MODEL_NAMES {sorted(MODEL_NAMES)}")


def build_model(name: str, spec: ModelSpec) -> nn.Module:
    """Build the registered network ``name`` for ``spec``; output logits ``(N, spec.n_classes)``.

    Raises
    ------
    ValueError
        If ``name`` is not registered (lists the valid names).
    """
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}") from None
    if spec.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spec.spatial_dims}")
    return builder(spec)


def build_teacher(name: str, spec: ModelSpec, members: int = 1) -> nn.Module:
    """``build_model(name, spec)``, or a :class:`MeanEnsemble` of ``members`` of them when ``members`` > 1."""
    if members == 1:
        return build_model(name, spec)
    return MeanEnsemble([build_model(name, spec) for _ in range(members)])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
