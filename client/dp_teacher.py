"""Teachers whose outputs carry a DP guarantee: Opacus DP-SGD, and PATE's disjoint partitions.

``dp_sgd_teacher`` (Abadi et al., CCS 2016) trains on the hospital's whole
private set with Opacus: Poisson sampling (``poisson_sampling=True``; no
weighted sampler, which would break the sampling rate), per-sample gradient
clipping to ``privacy.max_grad_norm`` and Gaussian noise ``σ ×
max_grad_norm``. MONAI's BatchNorm networks are made DP-ready with Opacus's
``ModuleValidator.fix``, which swaps every BatchNorm for a GroupNorm.
No early stopping and no model selection on private data: the teacher after
the last epoch is the one released, since a choice made on held-out private
records would itself be a release no accountant covers. The training is
charged to the ledger *before* it starts (event ``SampledGaussian(σ, q, T)``
with q = 1 / batches per epoch and T = epochs × batches).

``pate`` (Papernot et al., ICLR 2017) trains one ordinary teacher per
disjoint partition of the private set (MedMNIST has no patient ids, so a
partition is a set of records; with patient ids it must be a set of
patients). Teachers cost nothing; each released answer is charged where it
is released (:mod:`client.gate`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.ledger import PrivacyLedger
from common.accounting import SampledGaussianEvent, noise_for_epsilon
from common.atomic import atomic_torch_save, load_saved
from common.config import ExperimentConfig, PolicyPrivacy, config_to_dict
from common.device import place_model, resolve_device, state_dict_on_cpu
from common.models import build_model
from common.split import FederatedSplit, hospital_name, local_train_val, tensors
from common.training import augment_batch, predict_logits, train_supervised

logger = logging.getLogger(__name__)

PATE_DIR = "pate"


def dp_ready(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by GroupNorm (Opacus ``ModuleValidator.fix``), validated."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    problems = ModuleValidator.validate(fixed, strict=False)
    if problems:
        raise ValueError(f"model is not DP-SGD ready after ModuleValidator.fix: {problems}")
    return fixed


def build_teacher(name: str, spec: object, *, dp_sgd: bool) -> nn.Module:
    """The teacher architecture; the DP-ready (GroupNorm) variant for a DP-SGD teacher."""
    model = build_model(name, spec)  # type: ignore[arg-type]
    return dp_ready(model) if dp_sgd else model


def dp_sgd_plan(privacy: PolicyPrivacy, *, n_records: int, batch_size: int, epochs: int) -> SampledGaussianEvent:
    """The DP-SGD event a training will be: σ (given or calibrated to ``target_epsilon``), q and steps."""
    batches = max(1, math.ceil(n_records / batch_size))
    sample_rate = 1.0 / batches  # Opacus's DPDataLoader uses exactly this rate
    steps = epochs * batches
    sigma = privacy.noise_multiplier
    if privacy.target_epsilon > 0:
        sigma = noise_for_epsilon(privacy.target_epsilon, privacy.delta, sample_rate, steps, tol=1e-3)
    return SampledGaussianEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)


def train_dp_sgd_teacher(*, cfg: ExperimentConfig, split: FederatedSplit, hospital: int, privacy: PolicyPrivacy,
                         folder: Path, seed: int, run_id: int = 0) -> tuple[nn.Module, dict[str, object]]:
    """Train the hospital's teacher with DP-SGD after charging the ledger; returns (model, facts for TeacherInfo).

    Raises
    ------
    client.ledger.BudgetExhausted
        If the training would take the hospital past ``privacy.budget_epsilon`` (nothing is trained).
    """
    from opacus import PrivacyEngine

    name = hospital_name(hospital)
    private = split.hospital(hospital)
    images, labels = tensors(private, spatial_dims=split.data.spatial_dims)
    n = int(labels.shape[0])
    event = dp_sgd_plan(privacy, n_records=n, batch_size=cfg.teacher.batch_size, epochs=cfg.teacher.epochs)
    ledger = PrivacyLedger(folder, delta=privacy.delta, budget_epsilon=privacy.budget_epsilon)
    entry = ledger.charge(event, mechanism=privacy.mechanism.value, run_id=run_id, round=None,
                          description=f"teacher training: {n} records, {cfg.teacher.epochs} epochs, "
                                      f"q={event.sample_rate:.5f}, σ={event.noise_multiplier:.4f}, "
                                      f"clip={privacy.max_grad_norm:g}")
    logger.info("%s: DP-SGD teacher on %d records (σ=%.4f, q=%.4f, %d steps); ledger ε %.4f at δ=%g", name, n,
                event.noise_multiplier, event.sample_rate, event.steps, entry.epsilon_after, privacy.delta)
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    model = place_model(build_teacher(cfg.teacher_model(hospital), split.model_spec(), dp_sgd=True), device)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=cfg.teacher.batch_size, shuffle=True, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.teacher.lr, weight_decay=cfg.teacher.weight_decay)
    with warnings.catch_warnings():  # "Secure RNG turned off": stated once in our own log and in the README
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="rdp")  # medkd's ledger is the account; Opacus's is not consulted
    logger.info("%s: DP-SGD noise comes from torch's PRNG (Opacus secure_mode needs torchcsprng, not "
                "installable here): not cryptographically secure", name)
    private_model, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=event.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm, poisson_sampling=True)
    if abs(dp_loader.sample_rate - event.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus sample rate {dp_loader.sample_rate} differs from the charged {event.sample_rate}")
    start, steps = time.perf_counter(), 0
    aug_gen = torch.Generator().manual_seed(seed + 1)
    for epoch in range(cfg.teacher.epochs):
        private_model.train()
        for x, y in dp_loader:
            if x.shape[0] == 0:
                dp_optimizer.zero_grad(set_to_none=True)
                dp_optimizer.step()  # an empty Poisson batch is still a noisy step
                steps += 1
                continue
            x, y = x.to(device), y.to(device)
            if cfg.teacher.augment:
                x = augment_batch(x, aug_gen)
            loss = F.cross_entropy(private_model(x).float(), y)
            dp_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dp_optimizer.step()
            steps += 1
        logger.debug("%s DP-SGD teacher epoch %d done (%d noisy steps so far)", name, epoch + 1, steps)
    if steps != event.steps:
        logger.warning("%s: DP-SGD ran %d steps, %d were charged", name, steps, event.steps)
    model = private_model.to_standard_module()
    model.eval()
    return model, {"num_private": n, "num_train": n, "num_val": 0, "val_auc": math.nan, "val_acc": math.nan,
                   "best_epoch": cfg.teacher.epochs, "epochs_run": cfg.teacher.epochs,
                   "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- PATE


def pate_partitions(n_records: int, partitions: int, seed: int) -> list[np.ndarray]:
    """Disjoint positions ``0..n_records-1`` split into ``partitions`` near-equal parts (seeded)."""
    if n_records < 2 * partitions:
        raise ValueError(f"pate needs at least 2 private records per partition: {n_records} records for "
                         f"{partitions} partitions (lower privacy.partitions)")
    order = np.random.default_rng(seed).permutation(n_records)
    return [np.sort(part) for part in np.array_split(order, partitions)]


def pate_teachers(*, cfg: ExperimentConfig, split: FederatedSplit, hospital: int, privacy: PolicyPrivacy,
                  folder: Path, seed: int, fingerprint: str) -> list[nn.Module]:
    """The hospital's PATE teachers, one per disjoint partition (trained once, saved in ``<folder>/pate``)."""
    path = Path(folder) / PATE_DIR / "teachers.pt"
    device = resolve_device(cfg.device)
    spec = split.model_spec()
    model_name = cfg.teacher_model(hospital)
    if path.exists():
        loaded = load_saved(path, _PateInfo, what=f"{hospital_name(hospital)} PATE teachers")
        if loaded is not None and loaded[1].fingerprint == fingerprint:
            models = []
            for state in loaded[0]["state_dicts"]:
                model = build_model(model_name, spec)
                model.load_state_dict(state)
                models.append(place_model(model, device).eval())
            return models
    private = split.hospital(hospital)
    images, labels = tensors(private, spatial_dims=split.data.spatial_dims)
    parts = pate_partitions(int(labels.shape[0]), privacy.partitions, seed)
    models, start = [], time.perf_counter()
    for k, part in enumerate(parts):
        part_labels = private.labels[part]
        train_pos, val_pos = local_train_val(part_labels, val_fraction=cfg.data.local_val_fraction, seed=seed + k)
        torch.manual_seed(seed + 7 * k)
        model = place_model(build_model(model_name, spec), device)
        x, y = images[part], labels[part]
        train_supervised(model=model, train_images=x[train_pos], train_labels=y[train_pos], val_images=x[val_pos],
                         val_labels=y[val_pos], epochs=cfg.teacher.epochs, patience=cfg.teacher.patience,
                         batch_size=cfg.teacher.batch_size, lr=cfg.teacher.lr,
                         weight_decay=cfg.teacher.weight_decay, augment=cfg.teacher.augment, seed=seed + k,
                         class_weighted=cfg.teacher.class_weighted, log_prefix=f"PATE teacher {k} ", amp=cfg.amp)
        models.append(model.eval())
    logger.info("%s: %d PATE teachers trained on disjoint partitions of %d records (%.1f s)",
                hospital_name(hospital), len(models), int(labels.shape[0]), time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"state_dicts": [state_dict_on_cpu(m) for m in models],
                             "info": {"fingerprint": fingerprint, "partitions": len(models)}})
    from client.teacher_version import forget_versions

    forget_versions(Path(folder))  # new teachers announce a new version
    return models


class _PateInfo:
    """The ``info`` block of ``pate/teachers.pt``."""

    def __init__(self, fingerprint: str, partitions: int) -> None:
        self.fingerprint = fingerprint
        self.partitions = partitions


def pate_probabilities(models: list[nn.Module], images: torch.Tensor, *, amp: bool) -> np.ndarray:
    """Every PATE teacher's probabilities on ``images``: (m, N, C) float64."""
    return np.stack([torch.softmax(predict_logits(m, images, amp=amp), dim=1).double().numpy() for m in models])


def privacy_settings(privacy: PolicyPrivacy) -> str:
    """The policy's privacy settings as canonical JSON (part of teacher fingerprints and release keys)."""
    return json.dumps(config_to_dict(privacy), sort_keys=True, default=str)
