"""Answering a query under a per-answer DP mechanism (``pate``, ``hospital_gaussian``).

New answers are formed, noised once and staged with the gate as one
Gaussian charge (``GaussianEvent(noise_multiplier, count=new answers)``);
answers released before (same proxy index, same teachers, same mechanism
and output format) are sent again from the hospital's release record at no
cost (:mod:`client.releases`). The record is extended only once the gate
has charged the ledger.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from client.gate import Charge, stage_charge
from client.privacy import noisy_probabilities, pate_summary, to_output, vote_histogram
from client.releases import ReleaseCache, release_key
from common.accounting import GaussianEvent
from common.config import PateRelease, PrivacyMechanism, WireDtype
from common.payload import Query

if TYPE_CHECKING:
    from client.hospital import Hospital
    from common.split import FederatedSplit

logger = logging.getLogger(__name__)

_WIRE = {WireDtype.FLOAT16: np.float16, WireDtype.FLOAT32: np.float32}


def noisy_answers(*, query: Query, hospital: Hospital, split: FederatedSplit, run_id: int) -> tuple[np.ndarray, str]:
    """Outputs (N, C) for ``query.indices`` under the hospital's per-answer mechanism; returns (outputs, model label).

    The values returned are exactly what goes on the wire (already rounded
    to the query's dtype), so a repeated answer is bit-identical.
    """
    from client.dp_teacher import pate_probabilities, pate_teachers, privacy_settings
    from client.teacher import load_or_train_teacher, teacher_fingerprint, teacher_seed

    privacy = hospital.policy.privacy
    cfg, index = hospital.cfg, hospital.index
    fingerprint = teacher_fingerprint(cfg, split, index)
    key = release_key(fingerprint=fingerprint, privacy=privacy_settings(privacy), output=query.output.value,
                      temperature=repr(float(query.temperature)), dtype=query.dtype.value, proxy=split.proxy_hash)
    cache = ReleaseCache(hospital.folder, key)
    held, known = cache.lookup(query.indices)
    fresh = query.indices[~held]
    n_classes = split.data.n_classes
    outputs = np.zeros((len(query.indices), n_classes), dtype=np.float64)
    if known is not None:
        outputs[held] = known[held]
    model_label = cfg.teacher_model(index)
    if privacy.mechanism == PrivacyMechanism.PATE:
        model_label = f"{model_label} x{privacy.partitions} (pate)"
    if fresh.size:
        if privacy.mechanism == PrivacyMechanism.PATE:
            models = pate_teachers(cfg=cfg, split=split, hospital=index, privacy=privacy, folder=hospital.folder,
                                   seed=teacher_seed(cfg, index), fingerprint=fingerprint)
            device = next(models[0].parameters()).device
            probs = pate_probabilities(models, split.proxy_on(device).take(fresh), amp=cfg.amp)
            summed = vote_histogram(probs) if privacy.pate_release == PateRelease.VOTES else probs.sum(axis=0)
            what = pate_summary(privacy)
        else:
            teacher, _ = load_or_train_teacher(cfg=cfg, split=split, hospital=index, hospital_dir=hospital.folder,
                                               run_id=run_id)
            device = next(teacher.parameters()).device
            from common.training import predict_logits

            logits = predict_logits(teacher, split.proxy_on(device).take(fresh), amp=cfg.amp)
            summed = torch.softmax(logits.double(), dim=1).numpy()
            what = f"teacher probabilities plus Gaussian noise std {privacy.noise_multiplier * 2 ** 0.5:g}"
        released = noisy_probabilities(summed, noise_multiplier=privacy.noise_multiplier)
        wire = to_output(released, output=query.output, temperature=query.temperature)
        wire = wire.astype(_WIRE[query.dtype]).astype(np.float64)
        outputs[~held] = wire
        event = GaussianEvent(noise_multiplier=privacy.noise_multiplier, count=int(fresh.size))
        description = (f"{fresh.size} new answers ({what}); {int(held.sum())} repeated answers sent again at no "
                       f"cost")
        stage_charge(Charge(event=event, description=description,
                            on_release=lambda: cache.commit(fresh, wire)))
        logger.info("hospital %s: %d new %s answers staged for charging, %d repeated for free", hospital.name,
                    fresh.size, privacy.mechanism.value, int(held.sum()))
    else:
        logger.info("hospital %s: all %d queried samples were released before; answered again at no cost",
                    hospital.name, len(query.indices))
    return outputs, model_label
