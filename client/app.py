"""The hospital's ClientApp: handlers only (unpack, call, pack).

Handlers
--------
``query.logits``   teacher outputs on proxy indices (trains the teacher the first time).
``train.teacher``  (re)train the teacher on an explicit command; replies with local metrics only.
``train``          FedAvg *baseline* only: one round of local training of the shared student.

Which hospital this is comes from ``node_config["partition-id"]`` (and an
optional ``node_config["hospital-dir"]``). The experiment config comes from
the closure of :func:`make_client_app` (``medkd simulate``) or from
``run_config["config"]`` / ``run_config["set"]`` (``flwr run .``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.gate import NO_DP, OutboundGate
from client.serve import teacher_outputs
from client.teacher import load_or_train_teacher, teacher_seed
from common.config import ExperimentConfig, Method
from common.data import to_tensor
from common.errors import MedkdError, PayloadError
from common.models import build_model
from common.payload import QUERY_REJECTED_CODE, make_reply_content, parse_query
from common.runconfig import config_from_run_config, out_dir_from_run_config
from common.split import hospital_name, local_train_val, make_split, tensors
from common.training import run_epoch, seed_everything

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hospital:
    """Who answers: the config, the hospital's index and name, and its folder."""

    cfg: ExperimentConfig
    index: int
    name: str
    directory: Path


def _resolve(context: Context, cfg: ExperimentConfig | None, hospitals_dir: Path | None) -> Hospital:
    if cfg is None:
        cfg = config_from_run_config(context.run_config)
    if hospitals_dir is None:
        hospitals_dir = out_dir_from_run_config(context.run_config, context.run_id) / "hospitals"
    if "partition-id" not in context.node_config:
        raise MedkdError("node_config lacks 'partition-id' (the hospital index); set it with --node-config")
    index = int(context.node_config["partition-id"])
    if not 0 <= index < cfg.federation.hospitals:
        raise MedkdError(f"partition-id {index} is outside 0..{cfg.federation.hospitals - 1} (federation.hospitals)")
    name = str(context.node_config.get("hospital", hospital_name(index)))
    directory = Path(str(context.node_config.get("hospital-dir", hospitals_dir / hospital_name(index))))
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    return Hospital(cfg=cfg, index=index, name=name, directory=directory)


def _reject(msg: Message, hospital: str, round_: object, problem: str) -> Message:
    reason = f"hospital {hospital} rejected query (round {round_}): {problem}"
    logger.warning(reason)
    return Message(Error(code=QUERY_REJECTED_CODE, reason=reason), reply_to=msg)


def answer_query(msg: Message, hospital: Hospital) -> Message:
    """Check the query, run the teacher on the requested proxy samples, and release outputs through the gate."""
    cfg = hospital.cfg
    split = make_split(cfg)
    proxy = split.proxy
    round_ = msg.content.config_records.get("query", {}).get("round", "?") if msg.has_content() else "?"
    try:
        query = parse_query(msg.content, proxy_size=proxy.labels.shape[0], proxy_hash=split.proxy_hash,
                            max_indices=cfg.query.max_indices)
    except PayloadError as e:
        return _reject(msg, hospital.name, round_, str(e))
    teacher, info = load_or_train_teacher(cfg=cfg, split=split, hospital=hospital.index,
                                          hospital_dir=hospital.directory)
    images = to_tensor(proxy.images[query.indices], spatial_dims=split.data.spatial_dims)  # only the queried samples
    outputs = teacher_outputs(teacher, images, output=query.output, temperature=query.temperature)
    content = make_reply_content(outputs=outputs, dtype=query.dtype, hospital=hospital.name, model=info.model,
                                 privacy=NO_DP, num_private=info.num_private, val_auc=info.val_auc)
    gate = OutboundGate(hospital=hospital.name, hospital_dir=hospital.directory)
    try:
        content = gate.release(content, kind="query.logits", round=query.round)
    except PayloadError as e:
        return _reject(msg, hospital.name, query.round, str(e))
    return Message(content, reply_to=msg)


def train_teacher_now(msg: Message, hospital: Hospital) -> Message:
    """Explicit command: retrain the teacher; reply with sizes and local validation figures only."""
    split = make_split(hospital.cfg)
    _, info = load_or_train_teacher(cfg=hospital.cfg, split=split, hospital=hospital.index,
                                    hospital_dir=hospital.directory, retrain=True)
    return Message(RecordDict({"metrics": MetricRecord({
        "num_private": info.num_private, "val_auc": info.val_auc, "val_acc": info.val_acc,
        "epochs_run": info.epochs_run})}), reply_to=msg)


def fedavg_train(msg: Message, hospital: Hospital) -> Message:
    """FedAvg baseline: train the received student on private data; send the weights back (through the gate)."""
    cfg = hospital.cfg
    if cfg.method != Method.FEDAVG:
        raise MedkdError(f"{hospital.name} refuses to send model weights: method is {cfg.method}, not fedavg")
    split = make_split(cfg)
    private = split.hospital(hospital.index)
    train_pos, _ = local_train_val(private.labels, val_fraction=cfg.data.local_val_fraction, seed=teacher_seed(cfg, hospital.index))
    images, labels = tensors(private, spatial_dims=split.data.spatial_dims)
    images, labels = images[train_pos], labels[train_pos]
    server_round = int(msg.content.config_records["config"]["server-round"])
    model = build_model(cfg.student.model, split.model_spec())
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.fedavg.lr)
    gen = seed_everything(cfg.seed * 7919 + server_round * 101 + hospital.index)
    loss = 0.0
    for _ in range(cfg.fedavg.local_epochs):
        loss = run_epoch(model=model, optimizer=optimizer, images=images, batch_size=cfg.fedavg.batch_size,
                         gen=gen, augment=cfg.teacher.augment,
                         loss_fn=lambda logits, idx: torch.nn.functional.cross_entropy(logits, labels[idx]))
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": int(labels.shape[0]), "train_loss": float(loss)}),
        "hospital": ConfigRecord({"name": hospital.name}),
    })
    gate = OutboundGate(hospital=hospital.name, hospital_dir=hospital.directory)
    return Message(gate.release(content, kind="train.fedavg-baseline", round=server_round), reply_to=msg)


def make_client_app(cfg: ExperimentConfig | None = None, hospitals_dir: Path | None = None, *,
                    query_mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg`` and ``hospitals_dir`` (or reading both from the run config when None).

    Hospital ``i`` keeps its files in ``<hospitals_dir>/H<i>`` unless its
    ``node_config["hospital-dir"]`` names another folder. ``query_mods`` are
    Flower mods wrapped around the ``query.logits`` handler (simulation fault injection).
    """
    client_app = ClientApp()

    @client_app.query("logits", mods=query_mods)
    def query_logits(msg: Message, context: Context) -> Message:
        return answer_query(msg, _resolve(context, cfg, hospitals_dir))

    @client_app.train("teacher")
    def train_teacher(msg: Message, context: Context) -> Message:
        return train_teacher_now(msg, _resolve(context, cfg, hospitals_dir))

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return fedavg_train(msg, _resolve(context, cfg, hospitals_dir))

    return client_app


app = make_client_app()
