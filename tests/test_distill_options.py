"""Student-side recipe options: flip TTA, mixup, the EMA of the student's weights, the cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.config import DistillConfig, build_config
from common.errors import ConfigError
from common.names import LrSchedule
from common.training import flip_views, mixup_pairs, predict_probs, run_epoch
from server.distill import distill_student, make_weight_average, scheduled_lr


class Recorder(nn.Module):
    """A linear model that keeps every input batch it is given."""

    def __init__(self, features: int, n_classes: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(features, n_classes)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("shape,count", [((2, 1, 3, 4), 4), ((2, 1, 3, 4, 5), 8)])
def test_flip_views_are_every_flip_of_the_spatial_axes(shape: tuple[int, ...], count: int) -> None:
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    views = flip_views(x)
    assert len(views) == count
    assert views[0] is x
    assert len({tuple(v.flatten().tolist()) for v in views}) == count  # all different
    assert torch.equal(views[1], x.flip(2)) and torch.equal(views[-1], x.flip(list(range(2, x.dim()))))


def test_tta_probs_are_the_mean_softmax_over_the_flips() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 4, 3))
    x = torch.rand(5, 2, 3, 4)
    expected = torch.stack([torch.softmax(model(x.flip(axes) if axes else x), dim=1)
                            for axes in ([], [2], [3], [2, 3])]).mean(dim=0)
    torch.testing.assert_close(predict_probs(model, x, tta=True), expected.detach())
    torch.testing.assert_close(predict_probs(model, x), torch.softmax(model(x), dim=1).detach(), rtol=0, atol=0)


def test_mixup_mixes_images_and_losses_with_the_drawn_pairs() -> None:
    images = torch.rand(6, 4)
    model = Recorder(4)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        seen.append((logits.detach(), idx.clone()))
        return logits.square().mean()

    run_epoch(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), images=images, loss_fn=loss_fn,
              batch_size=6, gen=torch.Generator().manual_seed(1), augment=False, mixup_alpha=0.4)
    replay = torch.Generator().manual_seed(1)
    order = torch.randperm(6, generator=replay)
    lam, perm = mixup_pairs(6, 0.4, replay)
    assert 0.0 <= lam <= 1.0 and not torch.equal(perm, torch.arange(6))
    torch.testing.assert_close(model.inputs[0], lam * images[order] + (1 - lam) * images[order][perm])
    assert [idx.tolist() for _, idx in seen] == [order.tolist(), order[perm].tolist()]


def test_mixup_off_leaves_an_epoch_unchanged() -> None:
    images = torch.rand(8, 4)
    results = []
    for kwargs in ({}, {"mixup_alpha": 0.0}):
        torch.manual_seed(0)
        model = Recorder(4)
        run_epoch(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), images=images,
                  loss_fn=lambda logits, idx: logits.square().mean(), batch_size=3,
                  gen=torch.Generator().manual_seed(2), augment=True, **kwargs)
        results.append(model.linear.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_ema_of_the_student_follows_every_step() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    cfg = DistillConfig(epochs=2, batch_size=4, ema_decay=0.5, augment=False)
    assert make_weight_average(student, DistillConfig()) is None
    average = make_weight_average(student, cfg)
    assert average is not None
    snapshots: list[torch.Tensor] = []
    original = average.update_parameters

    def record(model: nn.Module) -> None:
        snapshots.append(model[1].weight.detach().clone())
        original(model)

    average.update_parameters = record  # type: ignore[method-assign]
    images, targets = torch.rand(8, 4), torch.softmax(torch.rand(8, 3), dim=1)
    distill_student(student=student, optimizer=torch.optim.Adam(student.parameters(), lr=0.05), images=images,
                    target_probs=targets, cfg=cfg, gen=torch.Generator().manual_seed(0), average=average)
    assert len(snapshots) == 4  # 2 epochs x 2 batches
    expected = snapshots[0]
    for weight in snapshots[1:]:
        expected = 0.5 * expected + 0.5 * weight
    torch.testing.assert_close(average.module[1].weight, expected)
    assert not torch.allclose(average.module[1].weight, student[1].weight)


def test_cosine_schedule_decays_from_lr_to_zero_over_the_run() -> None:
    cfg = DistillConfig(lr=1e-3, epochs=5, lr_schedule=LrSchedule.COSINE)
    assert scheduled_lr(cfg, epoch=0, total_epochs=50) == pytest.approx(1e-3)
    assert scheduled_lr(cfg, epoch=25, total_epochs=50) == pytest.approx(5e-4)
    assert scheduled_lr(cfg, epoch=50, total_epochs=50) == pytest.approx(0.0)
    assert scheduled_lr(DistillConfig(lr=1e-3), epoch=25, total_epochs=50) == 1e-3
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    distill_student(student=student, optimizer=optimizer, images=torch.rand(4, 4),
                    target_probs=torch.softmax(torch.rand(4, 3), dim=1), cfg=cfg,
                    gen=torch.Generator().manual_seed(0), rnd=10, rounds=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduled_lr(cfg, epoch=49, total_epochs=50))


@pytest.mark.parametrize("key,value", [("distill.ema_decay", 1.0), ("distill.mixup_alpha", -0.1),
                                       ("distill.lr_schedule", "step"), ("tta", "maybe")])
def test_recipe_options_are_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({}, overrides={key: value})


def _supervised(ema_decay: float) -> dict[str, torch.Tensor]:
    from common.models import ModelSpec, build_model
    from common.training import train_supervised

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40,), generator=gen)
    images = torch.rand(40, 1, 28, 28, generator=gen) + labels.view(-1, 1, 1, 1) / 4
    torch.manual_seed(1)
    model = build_model("smallcnn", ModelSpec(spatial_dims=2, in_channels=1, n_classes=3, spatial_size=28))
    train_supervised(model=model, train_images=images[:32], train_labels=labels[:32], val_images=images[32:],
                     val_labels=labels[32:], epochs=2, patience=0, batch_size=8, lr=1e-2, weight_decay=0.0,
                     augment=False, seed=2, ema_decay=ema_decay)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_teacher_ema_keeps_the_average_not_the_last_weights() -> None:
    plain, tiny, averaged = _supervised(0.0), _supervised(1e-12), _supervised(0.9)
    for key, value in plain.items():
        if value.is_floating_point():  # decay ~0: the average is the last step's weights
            torch.testing.assert_close(tiny[key], value, rtol=1e-5, atol=1e-6)
    weight = next(k for k in plain if k.endswith("weight"))
    assert not torch.allclose(averaged[weight], plain[weight])


def test_a_resumed_weight_average_starts_from_the_last_snapshot(tiny_config, tmp_path) -> None:
    from common.models import build_model
    from common.split import make_split
    from server.selection import RoundSelection

    cfg = tiny_config(**{"distill.ema_decay": 0.9})
    split = make_split(cfg)
    selection = RoundSelection(tmp_path, cfg, split)
    torch.manual_seed(0)
    recorded = build_model("smallcnn", split.model_spec())
    selection.record(3, recorded)
    torch.manual_seed(1)
    average = make_weight_average(build_model("smallcnn", split.model_spec()), cfg.distill)
    assert average is not None and int(average.n_averaged) == 0
    selection.restore(3, average)
    assert int(average.n_averaged) == 1  # the next update averages into it instead of copying over it
    for key, value in recorded.state_dict().items():
        torch.testing.assert_close(average.module.state_dict()[key], value, rtol=0, atol=0)
