"""What the coordinator holds: soft labels per proxy sample, and when it must ask for them again.

Privacy is spent per released answer, so the coordinator keeps every fused
soft label in a bank (index -> probabilities, part of its checkpoint) and
asks no hospital twice for the same proxy sample, unless that hospital's
teacher changed (each reply announces a random teacher version token,
client/teacher_version.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from server.checkpoint import ServerState

__all__ = ["teacher_changes", "update_bank", "with_held"]

logger = logging.getLogger(__name__)


def update_bank(state: ServerState, indices: np.ndarray, probs: torch.Tensor,
                dropped: np.ndarray | None = None) -> None:
    """Insert (or refresh) soft labels for ``indices`` in the bank, and forget ``dropped`` ones. probs: (N, C)."""
    idx = torch.as_tensor(indices, dtype=torch.int64)
    if state.bank_indices.numel() == 0:
        state.bank_indices, state.bank_probs = idx.clone(), probs.clone()
        return
    gone = idx if dropped is None or len(dropped) == 0 else torch.cat([idx, torch.as_tensor(dropped,
                                                                                           dtype=torch.int64)])
    keep = ~torch.isin(state.bank_indices, gone)
    state.bank_indices = torch.cat([state.bank_indices[keep], idx])
    state.bank_probs = torch.cat([state.bank_probs[keep], probs])


def teacher_changes(state: ServerState, accepted: list[Any], *, rnd: int, held: int, requery: bool) -> list[str]:
    """Record each hospital's announced teacher version; the hospitals whose teacher changed since their last reply.

    A changed teacher's earlier answers no longer describe it, so (when ``requery``) the samples the
    coordinator holds are asked again as they come up; hospitals whose teacher did not change answer them
    from their release records at no privacy cost (client/releases.py).
    """
    changed = []
    for reply in accepted:
        if reply.teacher_version is None:
            continue
        before = state.teacher_versions.get(reply.hospital)
        if before is not None and before != reply.teacher_version:
            changed.append(reply.hospital)
        state.teacher_versions[reply.hospital] = reply.teacher_version
    if changed and requery and held:
        logger.warning("round %d: the teacher of %s changed since its last reply; the %d proxy samples held so far "
                       "will be asked again as they come up", rnd, ", ".join(changed), held)
    return changed if requery else []


def with_held(state: ServerState, held: np.ndarray, kept_new: np.ndarray,
              probs_new: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """This round's soft labels in index order: held samples from the bank, new ones from the replies."""
    in_bank = np.isin(held, state.bank_indices.numpy())
    held = held[in_bank]  # held samples that were dropped (nobody answered, ambiguous) stay dropped
    if held.size:
        lookup = {int(i): k for k, i in enumerate(state.bank_indices.tolist())}
        held_probs = state.bank_probs[[lookup[int(i)] for i in held]]
    else:
        held_probs = probs_new.new_zeros((0, probs_new.shape[1] if probs_new.dim() == 2 else 0))
    if kept_new.size == 0:
        return held, held_probs
    if held.size == 0:
        return kept_new, probs_new
    merged = np.concatenate([held, kept_new])
    order = np.argsort(merged, kind="stable")
    return merged[order], torch.cat([held_probs, probs_new])[torch.as_tensor(order)]
