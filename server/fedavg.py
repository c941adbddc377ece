"""FedAvg baseline: the same student architecture trained with Flower's message-based FedAvg.

It runs on the same :class:`~server.metering.MeteredGrid` as FedKD, so its
uplink bytes (whole model weights every round) are counted the same way.
Only the baseline sends weights; hospitals refuse ``train`` messages unless
the experiment's method is ``fedavg``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import ExperimentConfig
from common.models import build_model
from common.split import make_split
from server.app import wait_for_nodes
from server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from server.evaluate import evaluate_on_test, test_tensors, write_metrics
from server.metering import MeteredGrid

logger = logging.getLogger(__name__)


def run_fedavg(grid: Grid, cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Train the student with FedAvg for ``cfg.rounds`` rounds; evaluate centrally after each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(cfg)
    test = test_tensors(cfg, split)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student.model, split.model_spec())
    state = load_checkpoint(out_dir, cfg=cfg, student=student, optimizer=None) or ServerState()
    offset = state.round
    remaining = cfg.rounds - offset
    final: dict[str, Any] = {}
    if remaining <= 0:
        logger.info("all %d rounds already done in %s", cfg.rounds, out_dir)
        return state.history[-1] if state.history else {}
    nodes = wait_for_nodes(grid, wanted=cfg.federation.hospitals, quorum=cfg.quorum(),
                           timeout_s=cfg.federation.wait_for_nodes_s)
    metered = MeteredGrid(grid)
    clock = {"start": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        rnd = offset + server_round
        student.load_state_dict(arrays.to_torch_state_dict())
        evaluation = evaluate_on_test(student, test)
        traffic = metered.take()
        seconds = time.perf_counter() - clock["start"]
        clock["start"] = time.perf_counter()
        state.round, state.seconds = rnd, state.seconds + seconds
        state.history.append({
            "round": rnd, "test_auc": evaluation.auc, "test_acc": evaluation.acc,
            "bytes_up": metered.by_name(traffic.bytes_up), "bytes_down": metered.by_name(traffic.bytes_down),
            "replies_ok": traffic.replies_with_content, "replies_rejected": traffic.replies_with_error,
            "seconds": seconds,
        })
        final.update({"test_auc": evaluation.auc, "test_acc": evaluation.acc, "method": cfg.method.value,
                      "seconds": state.seconds, "per_class_auc": evaluation.per_class_auc,
                      "per_class_acc": evaluation.per_class_acc})
        save_checkpoint(out_dir, cfg=cfg, student=student, optimizer=None, state=state)
        write_metrics(out_dir, cfg=cfg, rounds=state.history, final=final if rnd == cfg.rounds else None)
        logger.info("round %d/%d: test AUC %.4f acc %.4f | %d replies ok | %.1f s", rnd, cfg.rounds,
                    evaluation.auc, evaluation.acc, traffic.replies_with_content, seconds)
        return MetricRecord({"test_auc": evaluation.auc, "test_acc": evaluation.acc})

    k = len(nodes)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=k,
                      min_evaluate_nodes=0)
    strategy.start(grid=metered, initial_arrays=ArrayRecord(student.state_dict()), num_rounds=remaining,
                   timeout=cfg.federation.reply_timeout_s,
                   train_config=ConfigRecord({"lr": cfg.fedavg.lr, "local-epochs": cfg.fedavg.local_epochs}),
                   evaluate_fn=evaluate_fn)
    return final
