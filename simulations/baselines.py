"""Baselines that need no federation, on the same splits as FedKD.

``centralized``: the student architecture trained on the union of the
hospitals' private data (what pooling would give; the upper reference).
``local``: each hospital's own teacher evaluated alone (the same teachers
FedKD queries, loaded from the same hospital folders); the "best hospital"
is chosen on the coordinator's validation split, never on test. It also
reports the teachers' aggregate evaluated directly (the student's ceiling,
:mod:`simulations.ceiling`).

Both read the test split once, after every choice was made.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.teacher import load_or_train_teacher, teacher_seed
from common.atomic import atomic_torch_save
from common.config import ExperimentConfig
from common.device import place_model, resolve_device
from common.models import build_model
from common.split import hospital_name, local_train_val, make_split, tensors
from common.training import evaluate_model, train_supervised
from server.evaluate import evaluate_on_test, test_tensors, write_metrics
from server.selection import score, validation_tensors
from simulations.ceiling import aggregate_evaluation, describe_aggregate, no_aggregate_reason

logger = logging.getLogger(__name__)


def run_centralized(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Train the student on all hospitals' private data pooled; early stopping on their pooled local validation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(cfg)
    train_x, train_y, val_x, val_y = [], [], [], []
    for h in range(cfg.federation.hospitals):
        private = split.hospital(h)
        train_pos, val_pos = local_train_val(private.labels, val_fraction=cfg.data.local_val_fraction,
                                             seed=teacher_seed(cfg, h))
        x, y = tensors(private, spatial_dims=split.data.spatial_dims)
        train_x.append(x[train_pos]), train_y.append(y[train_pos]), val_x.append(x[val_pos]), val_y.append(y[val_pos])
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    student = place_model(build_model(cfg.student.model, split.model_spec()), resolve_device(cfg.device))
    logger.info("centralized: training %s on %d pooled private samples", cfg.student.model,
                sum(t.shape[0] for t in train_y))
    result = train_supervised(
        model=student, train_images=torch.cat(train_x), train_labels=torch.cat(train_y),
        val_images=torch.cat(val_x), val_labels=torch.cat(val_y), epochs=cfg.teacher.epochs,
        patience=cfg.teacher.patience, batch_size=cfg.teacher.batch_size, lr=cfg.teacher.lr,
        weight_decay=cfg.teacher.weight_decay, augment=cfg.teacher.augment, seed=cfg.seed,
        class_weighted=cfg.teacher.class_weighted, log_prefix="centralized ", amp=cfg.amp,
        ema_decay=cfg.teacher.ema_decay,
    )
    validation = evaluate_model(student, *validation_tensors(cfg, split), amp=cfg.amp, tta=cfg.tta)
    # the test split, read once
    evaluation = evaluate_on_test(student, test_tensors(cfg, split), amp=cfg.amp, tta=cfg.tta)
    seconds = time.perf_counter() - start
    atomic_torch_save(out_dir / "student.pt", {"model": cfg.student.model, "state_dict": student.state_dict()})
    final = {"test_auc": evaluation.auc, "test_acc": evaluation.acc, "val_auc": validation.auc,
             "method": cfg.method.value, "seconds": seconds,
             "per_class_auc": evaluation.per_class_auc, "per_class_acc": evaluation.per_class_acc,
             "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    rounds = [{"round": 1, "val_auc": validation.auc, "val_acc": validation.acc, "test_auc": evaluation.auc,
               "test_acc": evaluation.acc, "bytes_up": {}, "bytes_down": {}, "replies_ok": 0, "replies_rejected": 0,
               "seconds": seconds}]
    write_metrics(out_dir, cfg=cfg, rounds=rounds, final=final)
    return final


def run_local(cfg: ExperimentConfig, out_dir: Path, hospitals_dir: Path) -> dict[str, Any]:
    """Evaluate each hospital's teacher alone; the best hospital is picked on validation, then test is read once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(cfg)
    val = validation_tensors(cfg, split)
    start = time.perf_counter()
    rows, teachers, infos = [], [], []
    threads = torch.get_num_threads()
    # A teacher trained here is trained on the CPU threads a simulated hospital's policy gives it (client/app.py
    # sets them for `medkd simulate`'s hospitals), so both paths give the same teacher to the last bit.
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    try:
        for h in range(cfg.federation.hospitals):
            teacher, info = load_or_train_teacher(cfg=cfg, split=split, hospital=h,
                                                  hospital_dir=hospitals_dir / hospital_name(h))
            validation = evaluate_model(teacher, *val, amp=cfg.amp, tta=cfg.tta)
            teachers.append(teacher)
            infos.append(info)
            rows.append({"hospital": info.hospital, "model": info.model, "num_private": info.num_private,
                         "local_val_auc": info.val_auc, "val_auc": validation.auc, "val_score": score(validation)})
        reason = no_aggregate_reason(cfg)
        if reason is None:  # the teachers' aggregate: the student's ceiling (simulations/ceiling.py)
            aggregate = aggregate_evaluation(cfg=cfg, split=split, hospitals_dir=hospitals_dir, teachers=teachers,
                                             infos=infos, images=val[0], labels=val[1])
    finally:
        torch.set_num_threads(threads)
    best_index = max(range(len(rows)), key=lambda i: (rows[i]["val_score"], -i))
    test = test_tensors(cfg, split)  # every choice is made: read the test split, once
    for row, teacher in zip(rows, teachers):
        evaluation = evaluate_on_test(teacher, test, amp=cfg.amp, tta=cfg.tta)
        row.update(test_auc=evaluation.auc, test_acc=evaluation.acc)
        logger.info("local %s: val AUC %.4f, test AUC %.4f acc %.4f (%d private samples)", row["hospital"],
                    row["val_auc"], evaluation.auc, evaluation.acc, row["num_private"])
    extra: dict[str, Any] = {"aggregate": reason or describe_aggregate(cfg)}
    if reason is None:
        aggregate_test = aggregate_evaluation(cfg=cfg, split=split, hospitals_dir=hospitals_dir, teachers=teachers,
                                              infos=infos, images=test[0], labels=test[1])
        extra.update(aggregate_val_auc=aggregate.auc, aggregate_test_auc=aggregate_test.auc,
                     aggregate_test_acc=aggregate_test.acc)
        logger.info("local: the teachers' %s aggregate: val AUC %.4f, test AUC %.4f", cfg.aggregator.value,
                    aggregate.auc, aggregate_test.auc)
    seconds = time.perf_counter() - start
    aucs = [r["test_auc"] for r in rows if not math.isnan(r["test_auc"])]
    best = rows[best_index]
    final = {"test_auc": float(np.mean(aucs)), "test_acc": float(np.mean([r["test_acc"] for r in rows])),
             "method": cfg.method.value, "seconds": seconds, "best_test_auc": best["test_auc"],
             "best_val_auc": best["val_auc"], "best_hospital": best["hospital"],
             "selection": "best hospital by validation AUC (official val split); test read once at the end",
             **extra}
    rounds = [{"round": 1, "val_auc": float(np.nanmean([r["val_auc"] for r in rows])), "test_auc": final["test_auc"],
               "test_acc": final["test_acc"], "bytes_up": {},
               "bytes_down": {}, "replies_ok": 0, "replies_rejected": 0, "seconds": seconds}]
    write_metrics(out_dir, cfg=cfg, rounds=rounds, final=final, extra={"local": rows})
    return final
