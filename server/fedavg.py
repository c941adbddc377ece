"""FedAvg baseline: the same student architecture trained with Flower's message-based FedAvg.

It runs on the same :class:`~server.metering.MeteredGrid` as FedKD, so its
uplink bytes (whole model weights every round) are counted the same way.
Only hospitals whose policy opted in (``answers.fedavg_weights``) send
weights; the others refuse with an error reply. :class:`CheckedFedAvg`
validates every reply before Flower aggregates it (the names, shapes and
dtypes of the student's weights, finite values, the example count), so a
bad reply is rejected and logged and never reaches the average.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import ExperimentConfig
from common.errors import PayloadError
from common.device import place_model, resolve_device, state_dict_on_cpu
from common.models import build_model
from common.wire import as_integer, check_keys, check_records, decode_weights
from common.split import make_split
from server.app import wait_for_nodes
from server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from server.evaluate import write_metrics
from server.identity import name_order, node_identities
from server.metering import MeteredGrid, by_name
from server.selection import RoundSelection, score

logger = logging.getLogger(__name__)


def check_weights_reply(content: Any, *, reference: dict[str, np.ndarray]) -> None:
    """A FedAvg reply holds exactly the student's weights (names, dtypes, shapes; finite) and an example count.

    Raises
    ------
    PayloadError
        Naming the field that is wrong.
    """
    try:
        check_records(content, arrays={"arrays"}, metrics={"metrics"}, configs={"hospital"})
        decode_weights(content.array_records["arrays"], reference=reference, field="arrays")
        metrics = content.metric_records["metrics"]
        check_keys(metrics, field="metrics", required={"num-examples", "train_loss"})
        as_integer(metrics["num-examples"], field="metrics.num-examples", low=1, high=10**9)
    except PayloadError:
        raise
    except Exception as e:
        raise PayloadError(f"malformed reply ({type(e).__name__})", field="content") from None


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg, rejecting (and logging) every reply that does not hold the student's weights."""

    def __init__(self, *, reference: dict[str, np.ndarray], names: dict[int, str], min_nodes: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_nodes,
                         min_available_nodes=min_nodes, min_evaluate_nodes=0)
        self._reference = reference
        self._names = names
        self.rejected: dict[str, str] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                     MetricRecord | None]:
        good: list[Message] = []
        for reply in replies:
            who = self._names.get(int(reply.metadata.src_node_id), f"node {reply.metadata.src_node_id}")
            if reply.has_error():
                reason = f"error {int(reply.error.code)}: {str(reply.error.reason)[:300]}"
            else:
                try:
                    check_weights_reply(reply.content, reference=self._reference)
                except PayloadError as e:
                    reason = e.reason
                else:
                    good.append(reply)
                    continue
            self.rejected[who] = reason
            logger.warning("hospital %s reply rejected: %s (round %d); continuing with the others", who, reason,
                           server_round)
        if not good:
            logger.warning("round %d: no valid FedAvg replies; the student is not updated", server_round)
            return None, None
        good.sort(key=lambda r: name_order(self._names.get(int(r.metadata.src_node_id), "")))  # not arrival order
        arrays, metrics = super().aggregate_train(server_round, good)
        return (None if arrays is None else restore_dtypes(arrays, self._reference)), metrics


def restore_dtypes(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> ArrayRecord:
    """Give averaged weights back the student's dtypes.

    Flower's weighted average turns every array into float64, integer
    buffers such as BatchNorm's ``num_batches_tracked`` included; the
    hospitals rightly reject a float64 ``num_batches_tracked`` next round.
    Integer buffers are rounded back to their integer dtype.
    """
    fixed: dict[str, Array] = {}
    for name, array in arrays.items():
        value, want = array.numpy(), reference[name].dtype
        if value.dtype != want:
            value = np.rint(value).astype(want) if np.issubdtype(want, np.integer) else value.astype(want)
        fixed[name] = Array(np.array(value, dtype=want, order="C"))  # np.array keeps 0-d buffers 0-d
    return ArrayRecord(fixed)


def run_fedavg(grid: Grid, cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Train the student with FedAvg for ``cfg.rounds`` rounds; evaluate centrally after each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(cfg)
    selection = RoundSelection(out_dir, cfg, split)
    torch.manual_seed(cfg.seed)
    student = place_model(build_model(cfg.student.model, split.model_spec()), resolve_device(cfg.device))
    state = load_checkpoint(out_dir, cfg=cfg, student=student, optimizer=None) or ServerState()
    offset = state.round
    remaining = cfg.rounds - offset
    if state.history and (remaining <= 0 or state.history[-1].get("early_stop")):
        logger.info("all rounds already done in %s", out_dir)
        return _finish(out_dir, cfg, state, student, selection)
    nodes = wait_for_nodes(grid, wanted=cfg.federation.hospitals, quorum=cfg.quorum(),
                           timeout_s=cfg.federation.wait_for_nodes_s)
    names = node_identities(grid)
    metered = MeteredGrid(grid)
    clock = {"start": time.perf_counter()}
    reference = {k: v.numpy() for k, v in state_dict_on_cpu(student).items()}
    k = len(nodes)
    strategy = CheckedFedAvg(reference=reference, names=names, min_nodes=k)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        rnd = offset + server_round
        if state.history and state.history[-1].get("early_stop"):
            return None  # Flower's strategy runs its rounds; after an early stop they are not recorded
        student.load_state_dict(arrays.to_torch_state_dict())
        evaluation = selection.record(rnd, student)
        traffic = metered.take()
        rejected, strategy.rejected = strategy.rejected, {}
        seconds = time.perf_counter() - clock["start"]
        clock["start"] = time.perf_counter()
        state.round, state.seconds = rnd, state.seconds + seconds
        state.history.append({
            "round": rnd, "val_auc": evaluation.auc, "val_acc": evaluation.acc, "val_score": score(evaluation),
            "test_auc": None, "test_acc": None,
            "bytes_up": by_name(traffic.bytes_up, names), "bytes_down": by_name(traffic.bytes_down, names),
            "reply_sha256": by_name(traffic.reply_sha256, names),
            "replies_ok": traffic.replies_with_content + traffic.replies_with_error - len(rejected),
            "replies_rejected": len(rejected), "rejected": rejected, "seconds": seconds,
        })
        if selection.should_stop(state.history):
            state.history[-1]["early_stop"] = True
            logger.info("round %d: no validation improvement for %d rounds; later rounds are not recorded", rnd,
                        cfg.early_stop_rounds)
        save_checkpoint(out_dir, cfg=cfg, student=student, optimizer=None, state=state)
        write_metrics(out_dir, cfg=cfg, rounds=state.history, final=None)
        logger.info("round %d/%d: val AUC %.4f acc %.4f | %d/%d replies ok | %.1f s", rnd, cfg.rounds,
                    evaluation.auc, evaluation.acc, state.history[-1]["replies_ok"], k, seconds)
        return MetricRecord({"val_auc": evaluation.auc, "val_acc": evaluation.acc})

    train_config = ConfigRecord({"lr": cfg.fedavg.lr, "local-epochs": cfg.fedavg.local_epochs,
                                 "batch-size": cfg.fedavg.batch_size, "student-model": cfg.student.model})
    strategy.start(grid=metered, initial_arrays=ArrayRecord(state_dict_on_cpu(student)), num_rounds=remaining,
                   timeout=cfg.federation.reply_timeout_s, train_config=train_config, evaluate_fn=evaluate_fn)
    return _finish(out_dir, cfg, state, student, selection)


def _finish(out_dir: Path, cfg: ExperimentConfig, state: ServerState, student: torch.nn.Module,
            selection: RoundSelection) -> dict[str, Any]:
    """Select the best round on validation, read the test split once, write the final metrics."""
    final = selection.finish(student, state.history, method=cfg.method.value, seconds=state.seconds)
    write_metrics(out_dir, cfg=cfg, rounds=state.history, final=final)
    return final
