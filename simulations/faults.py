"""Injected reply faults for simulated hospitals (``federation.faults``), as a Flower client mod.

A researcher marks hospitals as faulty to watch the server's validation
reject their replies (``nan``, ``shape``, ``negative``) or to compare robust
aggregators against a hospital whose replies are valid but wrong
(``uniform``: no information; ``flip``: class order reversed, a confident
wrong teacher), or whose ClientApp fails (``crash``: the handler raises, so the
hospital's gate sends an error reply) or answers late (``late``: a valid reply
after :data:`LATE_S` seconds, to watch the server give up on it when
``federation.reply_timeout_s`` is shorter). Only ``medkd simulate`` installs this
mod; it runs inside the hospital's gate, so what it sends is what the gate logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

logger = logging.getLogger(__name__)

LATE_S = 40.0  # how long a ``late`` hospital takes to answer


def _corrupt(outputs: np.ndarray, fault: str) -> np.ndarray:
    """Return a faulty version of (N, C) outputs (same dtype unless the fault is the shape)."""
    out = outputs.copy()
    if fault == "nan":
        out[0, 0] = np.nan
    elif fault == "shape":
        out = out[:, :-1]
    elif fault == "negative":
        out[0, 0], out[0, 1] = -0.5, out[0, 1] + out[0, 0] + 0.5
    elif fault == "uniform":
        out[:] = 1.0 / out.shape[1]
    elif fault == "flip":
        out = out[:, ::-1]
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return np.ascontiguousarray(out, dtype=outputs.dtype)


def make_fault_mod(faults: dict[str, str]) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """A client mod corrupting the ``outputs`` of hospitals listed in ``faults`` (index -> fault)."""

    def fault_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        fault = faults.get(str(context.node_config.get("partition-id")))
        if fault == "crash":
            raise RuntimeError("injected crash (simulation fault 'crash')")
        if fault == "late":
            logger.info("injected fault 'late': hospital %s answers in %.0f s", context.node_config.get("partition-id"),
                        LATE_S)
            time.sleep(LATE_S)
            return call_next(msg, context)
        reply = call_next(msg, context)
        if fault is None or not reply.has_content() or "outputs" not in reply.content.array_records:
            return reply
        outputs = reply.content.array_records["outputs"]["outputs"].numpy()
        reply.content.array_records["outputs"] = ArrayRecord({"outputs": Array(_corrupt(outputs, fault))})
        logger.info("injected fault %r into hospital %s's reply", fault, context.node_config.get("partition-id"))
        return reply

    return fault_mod
