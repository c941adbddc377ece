"""The round in flight: written before a round's queries leave, so a restarted coordinator never re-asks them.

If the coordinator dies after sending round ``r``'s queries but before checkpointing round ``r``, the
hospitals may already have answered (and logged, and been charged for) round ``r``. Asking the same round
again would make them release twice. So ``<out>/inflight.json`` records the round and the proxy cursor after
its batch *before* anything is sent; a resumed study that finds a round in flight past its checkpoint skips
that round number and that batch: each hospital answers each round at most once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_json

logger = logging.getLogger(__name__)

INFLIGHT_FILE = "inflight.json"


@dataclass(frozen=True)
class Inflight:
    round: int
    cursor_after: int  # the proxy cursor once this round's batch is taken


def mark_inflight(out_dir: Path, *, rnd: int, cursor_after: int) -> None:
    """Record (atomically, before the queries are sent) that round ``rnd`` is in flight."""
    atomic_write_json(Path(out_dir) / INFLIGHT_FILE, {"round": rnd, "cursor_after": cursor_after})


def torn_round(out_dir: Path, *, completed: int) -> Inflight | None:
    """The round that was in flight past checkpointed round ``completed`` when the coordinator stopped, if any."""
    path = Path(out_dir) / INFLIGHT_FILE
    try:
        raw = json.loads(path.read_text())
        inflight = Inflight(round=int(raw["round"]), cursor_after=int(raw["cursor_after"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        logger.warning("ignoring unreadable %s (%s)", path, e)
        return None
    if inflight.round <= completed:
        return None
    logger.warning("round %d was interrupted by a coordinator stop after its queries were sent; hospitals may "
                   "have answered it, so it is not asked again (no release is made twice); going on with round %d",
                   inflight.round, inflight.round + 1)
    return inflight
