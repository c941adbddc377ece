"""The hospital's half of the FedAvg *baseline*: train the student it received, return the weights.

Only a hospital whose policy opted in (``answers.fedavg_weights``) gets
here. Everything in the coordinator's message is checked first: the
training settings (types and ranges) and the received weights (decoded
safely, then loaded strictly into the named registry architecture).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from client.hospital import Hospital
from client.teacher import teacher_seed
from common.config import MODEL_NAMES
from common.device import place_model, resolve_device, state_dict_on_cpu
from common.errors import PayloadError
from common.models import build_model
from common.wire import as_integer, as_number, as_text, check_keys, check_records, decode_weights
from common.split import local_train_val, make_split, tensors
from common.training import run_epoch, seed_everything, to_model_device

TRAIN_CONFIG_KEYS = {"server-round", "lr", "local-epochs", "batch-size", "student-model"}


def train_received_student(content: RecordDict, *, hospital: Hospital) -> tuple[ArrayRecord, int, float]:
    """Train the received student on this hospital's private training positions.

    Returns (weights, number of training examples, last epoch's mean loss).

    Raises
    ------
    PayloadError
        If the message is malformed or its weights do not fit the named architecture.
    """
    check_records(content, arrays={"arrays"}, metrics=set(), configs={"config"})
    config = content.config_records["config"]
    check_keys(config, field="config", required=TRAIN_CONFIG_KEYS)
    server_round = as_integer(config["server-round"], field="config.server-round", low=0, high=10**6)
    lr = as_number(config["lr"], field="config.lr")
    if not 0.0 < lr <= 1.0:
        raise PayloadError(f"must be in (0, 1], got {lr}", field="config.lr")
    epochs = as_integer(config["local-epochs"], field="config.local-epochs", low=1, high=100)
    batch_size = as_integer(config["batch-size"], field="config.batch-size", low=1, high=4096)
    model_name = as_text(config["student-model"], field="config.student-model", max_len=32)
    if model_name not in MODEL_NAMES:
        raise PayloadError(f"must be one of {list(MODEL_NAMES)}, got {model_name!r}", field="config.student-model")

    cfg = hospital.cfg
    split = make_split(cfg)
    model = build_model(model_name, split.model_spec())
    reference = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    weights = decode_weights(content.array_records["arrays"], reference=reference, field="arrays")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    model = place_model(model, resolve_device(cfg.device, key="policy device"))

    private = split.hospital(hospital.index)
    train_pos, _ = local_train_val(private.labels, val_fraction=cfg.data.local_val_fraction,
                                   seed=teacher_seed(cfg, hospital.index))
    images, labels = tensors(private, spatial_dims=split.data.spatial_dims)
    images, labels = to_model_device(model, images[train_pos], labels[train_pos])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = seed_everything(cfg.seed * 7919 + server_round * 101 + hospital.index)
    loss = 0.0
    for _ in range(epochs):
        loss = run_epoch(model=model, optimizer=optimizer, images=images, batch_size=batch_size, gen=gen,
                         augment=cfg.teacher.augment, amp=cfg.amp,
                         loss_fn=lambda logits, idx: torch.nn.functional.cross_entropy(logits.float(), labels[idx]))
    return ArrayRecord(state_dict_on_cpu(model)), int(labels.shape[0]), float(loss)
