"""The device setting: validation, CPU paths unchanged and deterministic, and (where a GPU exists) GPU parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import build_config
from common.data import to_tensor
from common.device import DeviceError, autocast, place_batch, place_model, resolve_device, uint8_images_to
from common.errors import ConfigError
from common.models import ModelSpec, build_model
from common.training import predict_logits, seed_everything, train_supervised

CUDA = torch.cuda.is_available()
SPEC = ModelSpec(spatial_dims=2, in_channels=3, n_classes=5, spatial_size=28)


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=gen)
    images = torch.rand(n, 3, 28, 28, generator=gen) * 0.5 + labels.view(-1, 1, 1, 1) / 10
    return images, labels


def test_device_specs_are_validated_with_the_key_named() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(DeviceError, match="policy device: expected auto, cpu, cuda or cuda:<index>, got 'gpu'"):
        resolve_device("gpu", key="policy device")
    if not CUDA:
        with pytest.raises(DeviceError, match="device: cuda:0 asked for, but this machine has no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="has 1 CUDA|no CUDA device"):
        resolve_device("cuda:1" if CUDA and torch.cuda.device_count() == 1 else "cuda:99")
    with pytest.raises(ConfigError, match="device: expected auto, cpu, cuda or cuda:<index>, got 'tpu'"):
        build_config({"device": "tpu"})


def test_cpu_paths_are_unchanged_by_the_device_helpers() -> None:
    x = torch.rand(4, 3, 28, 28)
    cpu = torch.device("cpu")
    assert place_batch(x, cpu) is x
    with autocast(cpu, amp=True):  # no autocast on the CPU: fp32 stays fp32
        assert (x @ x.transpose(-1, -2)).dtype == torch.float32
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28, 3), dtype=np.uint8)
    torch.testing.assert_close(uint8_images_to(images, spatial_dims=2, device=cpu), to_tensor(images, spatial_dims=2),
                               rtol=0, atol=0)


def test_cpu_training_is_deterministic_run_to_run() -> None:
    images, labels = _data()
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = place_model(build_model("smallcnn", SPEC), torch.device("cpu"))
        train_supervised(model=model, train_images=images[:64], train_labels=labels[:64], val_images=images[64:],
                         val_labels=labels[64:], epochs=2, patience=2, batch_size=16, lr=1e-3, weight_decay=0.0,
                         augment=True, seed=5, amp=True)
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on the GPU machine: python -m pytest tests/test_device.py)")
def test_gpu_inference_matches_cpu_within_bf16_tolerance() -> None:
    images, _ = _data(64)
    torch.manual_seed(0)
    model = build_model("resnet18", SPEC).eval()
    on_cpu = predict_logits(model, images)
    gpu_model = place_model(build_model("resnet18", SPEC), torch.device("cuda"))
    gpu_model.load_state_dict(model.state_dict())
    fp32 = predict_logits(gpu_model, images, amp=False)
    bf16 = predict_logits(gpu_model, images, amp=True)
    assert fp32.device.type == "cpu" and fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, on_cpu, rtol=1e-3, atol=1e-3)
    assert (bf16.argmax(1) == on_cpu.argmax(1)).float().mean() > 0.9
    torch.testing.assert_close(torch.softmax(bf16, 1), torch.softmax(on_cpu, 1), rtol=0, atol=0.05)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_training_learns_and_keeps_the_rng_on_the_cpu() -> None:
    images, labels = _data(256)
    model = place_model(build_model("smallcnn", SPEC), torch.device("cuda"))
    result = train_supervised(model=model, train_images=images[:192], train_labels=labels[:192],
                              val_images=images[192:], val_labels=labels[192:], epochs=6, patience=6, batch_size=32,
                              lr=3e-3, weight_decay=0.0, augment=True, seed=1, amp=True)
    assert next(model.parameters()).device.type == "cuda"
    assert result.val.auc > 0.8  # the brightness carries the class
    assert seed_everything(0).device.type == "cpu"


@pytest.mark.parametrize("shape", [(7, 28, 28, 3), (7, 28, 28), (7, 8, 8, 8)], ids=["rgb", "grey", "3d"])
def test_resident_proxy_images_match_the_host_path(shape: tuple[int, ...]) -> None:
    from common.device import ResidentImages

    images = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    spatial_dims = 3 if shape == (7, 8, 8, 8) else 2
    indices = np.array([5, 0, 3])
    expected = to_tensor(images[indices], spatial_dims=spatial_dims)
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        got = ResidentImages(images, spatial_dims=spatial_dims, device=torch.device(device)).take(indices)
        assert got.device.type == device
        # CUDA divides by a scalar through its reciprocal: values may differ from the CPU's by one ulp
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0 if device == "cpu" else 1e-6)


def test_teacher_cache_is_bounded_by_the_bytes_of_its_weights(tmp_path) -> None:
    from client.teacher import TeacherCache, _weight_bytes

    model = build_model("smallcnn", SPEC)
    size = _weight_bytes(model)
    cache = TeacherCache(max_bytes=int(2.5 * size))  # room for two teachers
    keys = []
    for i in range(3):
        path = tmp_path / f"t{i}.pt"
        path.write_bytes(b"x" * (i + 1))
        keys.append(TeacherCache.key(path, device="cpu", fingerprint="f"))
        cache.put(keys[-1], (model, None))  # type: ignore[arg-type]
    assert cache.get(keys[0]) is None  # the least recently used left first
    assert cache.get(keys[1]) is not None and cache.get(keys[2]) is not None
    path = tmp_path / "t2.pt"
    path.write_bytes(b"changed")  # a retrained teacher is a new key, never served stale
    assert cache.get(TeacherCache.key(path, device="cpu", fingerprint="f")) is None


def test_patience_zero_trains_every_epoch_and_keeps_the_last_weights() -> None:
    images, labels = _data(96)
    model = build_model("smallcnn", SPEC)
    result = train_supervised(model=model, train_images=images[:64], train_labels=labels[:64], val_images=images[64:],
                              val_labels=labels[64:], epochs=3, patience=0, batch_size=32, lr=1e-3, weight_decay=0.0,
                              augment=False, seed=0)
    assert (result.epochs_run, result.best_epoch) == (3, 3)
    after = predict_logits(model, images[64:])
    # the reported validation figures are those of the weights the model holds now: the last epoch's
    assert result.val.acc == pytest.approx(float((after.argmax(1) == labels[64:]).float().mean()), abs=1e-6)
