"""Model registry: every name builds for 2D RGB, 2D grayscale and 3D inputs and returns logits."""

from __future__ import annotations

import pytest
import torch

from common.models import MODEL_NAMES, ModelSpec, ResizeInput, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("dims", "channels"), [(2, 3), (2, 1)])
def test_2d_models_give_logits_for_28px(name: str, dims: int, channels: int) -> None:
    model = build_model(name, ModelSpec(spatial_dims=dims, in_channels=channels, n_classes=5, spatial_size=28)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, 28, 28))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_3d_models_give_logits_for_28_cubed(name: str) -> None:
    model = build_model(name, ModelSpec(spatial_dims=3, in_channels=1, n_classes=2, spatial_size=28)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28, 28))
    assert out.shape == (2, 2)


def test_densenet121_is_resized_only_for_small_inputs() -> None:
    small = build_model("densenet121", ModelSpec(spatial_dims=2, in_channels=3, n_classes=5, spatial_size=28))
    large = build_model("densenet121", ModelSpec(spatial_dims=2, in_channels=3, n_classes=5, spatial_size=64))
    assert isinstance(small, ResizeInput) and small.size == 64
    assert not isinstance(large, ResizeInput)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'; expected one of smallcnn"):
        build_model("vgg", ModelSpec(spatial_dims=2, in_channels=1, n_classes=2, spatial_size=28))
