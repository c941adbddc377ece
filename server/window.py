"""Send a round's queries through Flower's ``Grid`` with at most ``window`` in flight, topped up as replies come.

Flower's in-memory simulation engine scans every stored message for every
node ten times a second, so a round with K simulated hospitals and all K
queries in flight costs O(K²). Capping what is in flight keeps that linear.
Fixed waves (send W, wait for all W, send the next W) leave the ClientApp
workers idle while the slowest query of each wave finishes and while the
next wave is picked up; a sliding window sends the next query as soon as
any reply arrives, so the workers always have queued work.

Only ``Grid.push_messages`` and ``Grid.pull_messages`` are used: the same
code drives a simulation and a SuperLink deployment.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from flwr.app import Message

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from server.metering import MeteredGrid

logger = logging.getLogger(__name__)

PULL_INTERVAL_S = 0.05  # between pulls while nothing came back (Flower's own send_and_receive waits 0.1 s)


def send_windowed(grid: Grid | MeteredGrid, messages: list[Message], *, window: int, timeout_s: float,
                  pull_interval_s: float = PULL_INTERVAL_S) -> list[Message]:
    """Send ``messages``, at most ``window`` in flight (0: all at once); return the replies that came in time.

    Each message has ``timeout_s`` from the moment it is pushed; one that
    runs out is given up (its hospital is then missing from the round, as
    with ``send_and_receive``) and frees its place for the next.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    window = len(messages) if window <= 0 else window
    pending = deque(messages)
    deadlines: dict[str, float] = {}  # message id -> when it is given up
    replies: list[Message] = []

    def top_up() -> None:
        batch = [pending.popleft() for _ in range(min(window - len(deadlines), len(pending)))]
        if batch:
            deadline = time.monotonic() + timeout_s
            deadlines.update((str(message_id), deadline) for message_id in grid.push_messages(batch)
                             if message_id)  # a deployment's SuperLink answers None for a message it refused

    while deadlines or pending:
        top_up()  # a push Flower refused (no id back) just moves on to the next message
        if not deadlines:
            continue
        arrived = list(grid.pull_messages(list(deadlines)))
        for reply in arrived:
            deadlines.pop(reply.metadata.reply_to_message_id, None)
        replies.extend(arrived)
        now = time.monotonic()
        late = [message_id for message_id, deadline in deadlines.items() if deadline <= now]
        for message_id in late:
            del deadlines[message_id]
        if late:
            logger.warning("%d quer%s got no reply within %.0f s; given up", len(late),
                           "y" if len(late) == 1 else "ies", timeout_s)
        if deadlines and not arrived and not late:
            time.sleep(pull_interval_s)
    return replies
