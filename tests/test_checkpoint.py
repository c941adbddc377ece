"""Checkpoints are written atomically and refuse to resume a different experiment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.atomic import atomic_write_json
from common.config import build_config
from common.errors import MedkdError
from common.models import ModelSpec, build_model
from server.checkpoint import CHECKPOINT_FILE, ServerState, load_checkpoint, save_checkpoint

SPEC = ModelSpec(spatial_dims=2, in_channels=3, n_classes=5, spatial_size=28)


def _student() -> torch.nn.Module:
    return build_model("smallcnn", SPEC)


def test_round_trip_restores_student_optimizer_and_state(tmp_path: Path) -> None:
    cfg = build_config({})
    torch.manual_seed(0)
    student = _student()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    student(torch.rand(4, 3, 28, 28)).sum().backward()
    optimizer.step()
    state = ServerState(round=3, cursor=17, bank_indices=torch.tensor([4, 1]), bank_probs=torch.full((2, 5), 0.2),
                        history=[{"round": 1, "test_auc": 0.61, "bytes_up": {"H0": 10}}], seconds=12.5)
    save_checkpoint(tmp_path, cfg=cfg, student=student, optimizer=optimizer, state=state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "student.pt"]  # no temp files left

    torch.manual_seed(1)
    other = _student()
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    loaded = load_checkpoint(tmp_path, cfg=build_config({}, overrides={"rounds": 20}), student=other,
                             optimizer=other_opt)
    assert loaded is not None and loaded.round == 3 and loaded.cursor == 17 and loaded.seconds == 12.5
    assert loaded.history == state.history and torch.equal(loaded.bank_indices, state.bank_indices)
    for a, b in zip(student.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert other_opt.state_dict()["state"][0]["step"] == 1


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path, cfg=build_config({}), student=_student(), optimizer=None) is None


def test_a_different_config_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, cfg=build_config({}), student=_student(), optimizer=None, state=ServerState(round=1))
    with pytest.raises(MedkdError, match="different config; use another --out, or --fresh"):
        load_checkpoint(tmp_path, cfg=build_config({"aggregator": "median"}), student=_student(), optimizer=None)


def test_a_torn_checkpoint_is_reported(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(MedkdError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path, cfg=build_config({}), student=_student(), optimizer=None)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_text().strip() == '{\n  "ok": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
