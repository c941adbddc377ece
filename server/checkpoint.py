"""The server's checkpoint: student, optimizer and round state in one atomically written file.

``<out>/checkpoint.pt`` lets a restarted server resume after its last
completed round; ``<out>/student.pt`` holds the student's weights alone for
users. Both are written with temp file + fsync + ``os.replace``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_torch_save
from common.config import ExperimentConfig, config_to_dict
from common.device import state_dict_on_cpu
from common.errors import MedkdError

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
STUDENT_FILE = "student.pt"


@dataclass
class ServerState:
    """Everything a resumed server needs besides the student and its optimizer."""

    round: int = 0  # last completed round
    cursor: int = 0  # position in the proxy permutation
    bank_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # (M,)
    bank_probs: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))  # (M, C)
    held: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # answered indices (K,)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    teacher_versions: dict[str, str] = field(default_factory=dict)  # hospital -> last announced teacher version


def config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config, excluding ``rounds`` (a resumed run may be extended) and where it runs."""
    d = config_to_dict(cfg)
    for key in ("rounds", "device", "amp"):
        d.pop(key)
    return hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()


def save_checkpoint(out_dir: Path, *, cfg: ExperimentConfig, student: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: ServerState) -> None:
    """Write ``checkpoint.pt`` and ``student.pt`` atomically."""
    payload = {
        "config_hash": config_hash(cfg),
        "student": state_dict_on_cpu(student),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "state": {"round": state.round, "cursor": state.cursor, "bank_indices": state.bank_indices,
                  "bank_probs": state.bank_probs, "history": state.history, "seconds": state.seconds,
                  "held": state.held, "teacher_versions": dict(state.teacher_versions)},
    }
    atomic_torch_save(Path(out_dir) / CHECKPOINT_FILE, payload)
    atomic_torch_save(Path(out_dir) / STUDENT_FILE, {"model": cfg.student.model, "state_dict": state_dict_on_cpu(student),
                                                     "round": state.round})


def load_checkpoint(out_dir: Path, *, cfg: ExperimentConfig, student: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> ServerState | None:
    """Restore student/optimizer from ``checkpoint.pt``; None when there is none.

    Raises
    ------
    MedkdError
        If the checkpoint belongs to a different config, or cannot be read.
    """
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MedkdError(f"cannot read checkpoint {path}: {e}; delete it or use another --out") from e
    if saved.get("config_hash") != config_hash(cfg):
        raise MedkdError(
            f"{path} was written by a run with a different config; use another --out, or --fresh to overwrite"
        )
    student.load_state_dict(saved["student"])
    if optimizer is not None and saved.get("optimizer") is not None:
        optimizer.load_state_dict(saved["optimizer"])
    s = saved["state"]
    state = ServerState(round=int(s["round"]), cursor=int(s["cursor"]), bank_indices=s["bank_indices"],
                        bank_probs=s["bank_probs"], history=list(s["history"]), seconds=float(s["seconds"]),
                        held=s.get("held", s["bank_indices"]),
                        teacher_versions={str(k): str(v) for k, v in s.get("teacher_versions", {}).items()})
    logger.info("resuming from %s after round %d", path, state.round)
    return state
