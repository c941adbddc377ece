"""The coordinator asks only for proxy samples it does not hold yet, and distils held ones from its bank."""

from __future__ import annotations

import numpy as np
import torch

from server.bank import update_bank, with_held
from server.checkpoint import ServerState


def test_held_samples_come_from_the_bank_in_index_order() -> None:
    state = ServerState()
    update_bank(state, np.array([1, 3, 5]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    # round 2 covers 3 and 5 (held) and 4, 6 (new); 9 was held but dropped (nobody answered): stays dropped
    kept, probs = with_held(state, np.array([3, 5, 9]), np.array([4, 6]), torch.tensor([[0.2, 0.8], [0.9, 0.1]]))
    assert kept.tolist() == [3, 4, 5, 6]
    assert torch.equal(probs, torch.tensor([[0.0, 1.0], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1]]))
    update_bank(state, kept, probs)
    assert state.bank_indices.tolist() == [1, 3, 4, 5, 6]  # the same order a full re-query would leave


def test_all_held_needs_no_new_answers() -> None:
    state = ServerState()
    update_bank(state, np.array([0, 2]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    kept, probs = with_held(state, np.array([0, 2]), np.array([], dtype=np.int64), torch.empty(0, 2))
    assert kept.tolist() == [0, 2] and probs.tolist() == [[1.0, 0.0], [0.0, 1.0]]
