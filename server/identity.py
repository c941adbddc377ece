"""Who a node is: the coordinator knows hospitals by Flower node ID, never by the name a reply writes.

- A node registered with a name (deployment: ``flwr supernode register
  KEY.pub --name H0``) is known by that name.
- A simulated node has no registered name; Flower's simulation engine
  registers partition ``i`` as its ``i``-th node, so nodes ordered by
  registration time are ``H0``, ``H1``, ... — the same names that
  ``medkd simulate`` writes into each simulated hospital's policy.

The name inside a reply is only a claim: a reply whose claim differs from
its node's identity is rejected (see :mod:`server.collect`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import datetime

from flwr.serverapp import Grid

from common.errors import MedkdError
from common.split import hospital_name

logger = logging.getLogger(__name__)


def node_identities(grid: Grid) -> dict[int, str]:
    """Node ID -> hospital name for every node the grid knows (see the module docstring).

    Raises
    ------
    MedkdError
        If unnamed nodes cannot be ordered by registration time (two share a timestamp).
    """
    return identities_from_nodes(grid.get_nodes())


def identities_from_nodes(nodes: Iterable[object]) -> dict[int, str]:
    """Node ID -> hospital name from Flower ``NodeInfo`` records (``node_id``, ``name``, ``registered_at``)."""
    infos = list(nodes)
    named = {int(i.node_id): str(i.name) for i in infos if getattr(i, "name", "")}
    unnamed = [i for i in infos if not getattr(i, "name", "")]
    if not unnamed:
        return named
    if named:
        logger.warning("%d of %d nodes have no registered name; they are known as node <id>", len(unnamed),
                       len(infos))
        return {**named, **{int(i.node_id): f"node {int(i.node_id)}" for i in unnamed}}
    stamps = [str(getattr(i, "registered_at", "")) for i in unnamed]
    if any(not s for s in stamps) or len(set(stamps)) != len(stamps):
        raise MedkdError("cannot tell the simulated hospitals apart: their nodes share a registration time; "
                         "register deployed nodes with names (flwr supernode register ... --name H<i>)")
    ordered = sorted(unnamed, key=lambda i: datetime.fromisoformat(str(i.registered_at)))
    return {int(info.node_id): hospital_name(k) for k, info in enumerate(ordered)}


def name_order(name: str) -> tuple[object, ...]:
    """Sort key for hospital names in natural order (``H2`` before ``H10``): the order queries go out and
    replies are aggregated in, so that a round's result does not depend on which reply arrived first."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)
