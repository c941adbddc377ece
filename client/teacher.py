"""A hospital's teacher: trained once on the private partition, kept on the hospital's disk.

The checkpoint ``<hospital_dir>/teacher.pt`` carries a fingerprint of what
it was trained from (data file, private indices, architecture, training
settings, seed); a checkpoint whose fingerprint differs is retrained rather
than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_torch_save, load_saved
from common.config import ExperimentConfig, PrivacyMechanism, config_to_dict
from common.device import place_model, resolve_device, state_dict_on_cpu
from common.models import MeanEnsemble, build_model, build_teacher
from common.data import class_counts
from common.split import FederatedSplit, class_warnings, hospital_name, local_train_val, tensors
from common.training import train_supervised

logger = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pt"


@dataclass(frozen=True)
class TeacherInfo:
    """What a hospital knows about its teacher (the figures it may report: sizes and local AUC)."""

    hospital: str
    model: str
    num_private: int
    num_train: int
    num_val: int
    val_auc: float
    val_acc: float
    best_epoch: int
    epochs_run: int
    seconds: float
    fingerprint: str
    mechanism: str = "none"  # "dp_sgd_teacher": trained with DP-SGD (GroupNorm architecture)
    members: int = 1  # > 1: a MeanEnsemble (teacher.ensemble); num_train/num_val/best_epoch are member 1's,
    # val_auc/val_acc the members' mean, each on its own held-out split


def teacher_seed(cfg: ExperimentConfig, hospital: int) -> int:
    """Seed of hospital ``hospital``'s teacher training."""
    return cfg.seed * 1000 + 17 * hospital + 1 + 7919 * cfg.teacher.seed_offset


MEMBER_SEED_STEP = 104729  # member k of an ensemble trains from teacher_seed + k * this (a prime unlike seed_offset's)


def member_seed(cfg: ExperimentConfig, hospital: int, member: int) -> int:
    """Seed of member ``member`` (0-based) of hospital ``hospital``'s teacher: its init, shuffling and local split."""
    return teacher_seed(cfg, hospital) + MEMBER_SEED_STEP * member


# Teacher settings added after fingerprints were first stored, with the value every teacher saved before had.
# A key at that value is left out of the hash, so those teachers stay valid; any other value (a new default
# included) is hashed, so an old checkpoint is never taken for a teacher it is not.
LATER_TEACHER_KEYS: dict[str, object] = {"ema_decay": 0.0, "ensemble": 1}


def teacher_fingerprint(cfg: ExperimentConfig, split: FederatedSplit, hospital: int) -> str:
    """SHA-256 of everything the teacher of ``hospital`` depends on."""
    h = hashlib.sha256()
    h.update(split.data.sha256.encode())
    h.update(split.hospital_indices[hospital].tobytes())
    h.update(cfg.teacher_model(hospital).encode())
    settings = config_to_dict(cfg.teacher)
    settings.pop("per_hospital")
    settings.pop("model")  # the hospital's own architecture is hashed above
    for key, before in LATER_TEACHER_KEYS.items():
        if settings.get(key) == before:
            settings.pop(key)
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(f"{cfg.data.local_val_fraction}|{teacher_seed(cfg, hospital)}".encode())
    privacy = cfg.policy_rules(hospital).privacy
    if privacy.mechanism != PrivacyMechanism.NONE:  # a DP teacher is another teacher (and another charge)
        from client.dp_teacher import privacy_settings

        h.update(privacy_settings(privacy).encode())
    return h.hexdigest()


def train_teacher(cfg: ExperimentConfig, split: FederatedSplit, hospital: int, *, folder: Path | None = None,
                  run_id: int = 0) -> tuple[nn.Module, TeacherInfo]:
    """Train hospital ``hospital``'s teacher on its private data (early stopping on a local validation split).

    It trains on ``cfg.device`` (the hospital's policy device) and is returned there. With ``teacher.ensemble``
    K > 1 it trains K networks, member k from :func:`member_seed` (its own initialisation, shuffling and local
    train/val split), and returns their :class:`~common.models.MeanEnsemble`. Under the policy's
    ``dp_sgd_teacher`` mechanism it trains one network with DP-SGD instead, charged to the ledger in ``folder``
    first.
    """
    name = hospital_name(hospital)
    privacy = cfg.policy_rules(hospital).privacy
    if privacy.mechanism == PrivacyMechanism.DP_SGD_TEACHER:
        from client.dp_teacher import train_dp_sgd_teacher

        if folder is None:
            raise ValueError("a DP-SGD teacher needs the hospital folder (its privacy ledger is there)")
        if cfg.teacher.ensemble > 1:
            logger.info("%s: teacher.ensemble=%d applies to plain teachers only: under dp_sgd_teacher each member "
                        "would be another DP-SGD charge on the same records, so one DP-SGD teacher is trained",
                        name, cfg.teacher.ensemble)
        model, facts = train_dp_sgd_teacher(cfg=cfg, split=split, hospital=hospital, privacy=privacy, folder=folder,
                                            seed=teacher_seed(cfg, hospital), run_id=run_id)
        info = TeacherInfo(hospital=name, model=cfg.teacher_model(hospital), fingerprint=teacher_fingerprint(
            cfg, split, hospital), mechanism=privacy.mechanism.value, **facts)  # type: ignore[arg-type]
        logger.info("%s: DP-SGD teacher ready (%.1f s; no local validation: selection on private data would be "
                    "an uncharged release)", name, info.seconds)
        return model, info
    private = split.hospital(hospital)
    images, labels = tensors(private, spatial_dims=split.data.spatial_dims)
    model_name = cfg.teacher_model(hospital)
    members = cfg.teacher.ensemble
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    for text in class_warnings(name, class_counts(private.labels, split.data.n_classes).tolist(),
                               below=cfg.federation.warn_class_below):
        logger.warning("%s", text)
    trained, results, sizes = [], [], []
    for k in range(members):
        seed = member_seed(cfg, hospital, k)
        train_pos, val_pos = local_train_val(private.labels, val_fraction=cfg.data.local_val_fraction, seed=seed)
        label = name if members == 1 else f"{name} member {k + 1}/{members}"
        logger.info("%s: training teacher %s on %d private samples (%d for local validation)", label, model_name,
                    len(train_pos), len(val_pos))
        torch.manual_seed(seed)
        model = place_model(build_model(model_name, split.model_spec()), device)
        results.append(train_supervised(
            model=model, train_images=images[train_pos], train_labels=labels[train_pos],
            val_images=images[val_pos], val_labels=labels[val_pos], epochs=cfg.teacher.epochs,
            patience=cfg.teacher.patience, batch_size=cfg.teacher.batch_size, lr=cfg.teacher.lr,
            weight_decay=cfg.teacher.weight_decay, augment=cfg.teacher.augment, seed=seed,
            class_weighted=cfg.teacher.class_weighted, log_prefix=f"{label} teacher ", amp=cfg.amp,
            ema_decay=cfg.teacher.ema_decay,
        ))
        trained.append(model)
        sizes.append((len(train_pos), len(val_pos)))
    model = trained[0] if members == 1 else MeanEnsemble(trained)
    info = TeacherInfo(
        hospital=name, model=model_name, num_private=int(labels.shape[0]), num_train=sizes[0][0],
        num_val=sizes[0][1], val_auc=_finite_mean([r.val.auc for r in results]),
        val_acc=float(np.mean([r.val.acc for r in results])), best_epoch=results[0].best_epoch,
        epochs_run=results[0].epochs_run, seconds=time.perf_counter() - start,
        fingerprint=teacher_fingerprint(cfg, split, hospital), members=members,
    )
    logger.info("%s: teacher ready (local val AUC %.3f%s, best epoch %d of %d, %.1f s)", name, info.val_auc,
                "" if members == 1 else f", mean of {members} members each on its own held-out split",
                info.best_epoch, info.epochs_run, info.seconds)
    return model, info


def _finite_mean(values: list[float]) -> float:
    """Mean of the non-NaN ``values`` (a member's local AUC is NaN when its held-out split has one class)."""
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def save_teacher(path: Path, model: nn.Module, info: TeacherInfo) -> None:
    """Write the teacher checkpoint atomically."""
    atomic_torch_save(path, {"state_dict": state_dict_on_cpu(model), "info": asdict(info)})


class TeacherCache:
    """The last few teachers this process loaded, keyed by checkpoint file (path, mtime, size) and device.

    A process answers many queries (a SuperNode's ClientApp process, or a
    simulation actor serving many hospitals); reading and rebuilding a
    teacher (about 11 ms for a smallcnn) costs more than answering with it. A
    changed file is a new key, so a retrained teacher is never served stale.
    Bounded by the bytes of the cached weights (least recently used first
    out): a thousand smallcnn teachers fit in the default 1 GiB, a few dozen
    ResNets do.
    """

    def __init__(self, max_bytes: int = 2**30) -> None:
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[tuple[str, int, int, str, str], tuple[nn.Module, TeacherInfo]] = OrderedDict()

    @staticmethod
    def key(path: Path, *, device: str, fingerprint: str) -> tuple[str, int, int, str, str] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, device, fingerprint)

    def get(self, key: tuple[str, int, int, str, str] | None) -> tuple[nn.Module, TeacherInfo] | None:
        if key is None or key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: tuple[str, int, int, str, str] | None, value: tuple[nn.Module, TeacherInfo]) -> None:
        if key is None:
            return
        if key in self._items:
            return
        self._items[key] = value
        self._bytes += _weight_bytes(value[0])
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (model, _) = self._items.popitem(last=False)
            self._bytes -= _weight_bytes(model)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


_CACHE = TeacherCache()


def forget_teacher_versions(hospital_dir: Path) -> None:
    """Drop the hospital's version tokens (client/teacher_version.py): the next reply announces a new one."""
    from client.teacher_version import forget_versions

    forget_versions(hospital_dir)


def load_or_train_teacher(*, cfg: ExperimentConfig, split: FederatedSplit, hospital: int, hospital_dir: Path,
                          retrain: bool = False, run_id: int = 0) -> tuple[nn.Module, TeacherInfo]:
    """Load ``<hospital_dir>/teacher.pt`` if it matches this config, else train and save it; on ``cfg.device``.

    A teacher already loaded by this process (same file, same fingerprint) is served from memory.
    """
    path = Path(hospital_dir) / TEACHER_FILE
    fingerprint = teacher_fingerprint(cfg, split, hospital)
    key = TeacherCache.key(path, device=cfg.device, fingerprint=fingerprint)
    cached = None if retrain else _CACHE.get(key)
    if cached is not None:
        return cached
    loaded = None
    if path.exists() and not retrain:
        loaded = load_saved(path, TeacherInfo, what=f"{hospital_name(hospital)} teacher checkpoint")
    if loaded is not None:
        saved, info = loaded
        if info.fingerprint == fingerprint:
            model = build_teacher(info.model, split.model_spec(), info.members)
            if info.mechanism == PrivacyMechanism.DP_SGD_TEACHER.value:
                from client.dp_teacher import dp_ready

                model = dp_ready(model)
            model.load_state_dict(saved["state_dict"])
            model = place_model(model, resolve_device(cfg.device))
            model.eval()
            _CACHE.put(key, (model, info))
            return model, info
        logger.info("%s: teacher checkpoint %s was trained from other data or settings; retraining",
                    hospital_name(hospital), path)
    model, info = train_teacher(cfg, split, hospital, folder=Path(hospital_dir), run_id=run_id)
    save_teacher(path, model, info)
    forget_teacher_versions(Path(hospital_dir))  # a (re)trained teacher announces a new version
    model.eval()
    _CACHE.put(TeacherCache.key(path, device=cfg.device, fingerprint=fingerprint), (model, info))
    return model, info
