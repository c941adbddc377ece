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

import torch
from torch import nn

from common.atomic import atomic_torch_save, load_saved
from common.config import ExperimentConfig, PrivacyMechanism, TeacherConfig, config_to_dict
from common.device import place_model, resolve_device, state_dict_on_cpu
from common.models import build_model
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


def teacher_seed(cfg: ExperimentConfig, hospital: int) -> int:
    """Seed of hospital ``hospital``'s teacher training."""
    return cfg.seed * 1000 + 17 * hospital + 1 + 7919 * cfg.teacher.seed_offset


LATER_TEACHER_KEYS = ("ema_decay",)  # teacher settings added after fingerprints were first stored


def teacher_fingerprint(cfg: ExperimentConfig, split: FederatedSplit, hospital: int) -> str:
    """SHA-256 of everything the teacher of ``hospital`` depends on."""
    h = hashlib.sha256()
    h.update(split.data.sha256.encode())
    h.update(split.hospital_indices[hospital].tobytes())
    h.update(cfg.teacher_model(hospital).encode())
    settings = config_to_dict(cfg.teacher)
    settings.pop("per_hospital")
    settings.pop("model")  # the hospital's own architecture is hashed above
    for key in LATER_TEACHER_KEYS:  # hashed only when set: teachers saved before the key existed stay valid
        if settings.get(key) == getattr(TeacherConfig(), key):
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

    It trains on ``cfg.device`` (the hospital's policy device) and is returned there. Under the policy's
    ``dp_sgd_teacher`` mechanism it trains with DP-SGD instead, charged to the ledger in ``folder`` first.
    """
    name = hospital_name(hospital)
    privacy = cfg.policy_rules(hospital).privacy
    if privacy.mechanism == PrivacyMechanism.DP_SGD_TEACHER:
        from client.dp_teacher import train_dp_sgd_teacher

        if folder is None:
            raise ValueError("a DP-SGD teacher needs the hospital folder (its privacy ledger is there)")
        model, facts = train_dp_sgd_teacher(cfg=cfg, split=split, hospital=hospital, privacy=privacy, folder=folder,
                                            seed=teacher_seed(cfg, hospital), run_id=run_id)
        info = TeacherInfo(hospital=name, model=cfg.teacher_model(hospital), fingerprint=teacher_fingerprint(
            cfg, split, hospital), mechanism=privacy.mechanism.value, **facts)  # type: ignore[arg-type]
        logger.info("%s: DP-SGD teacher ready (%.1f s; no local validation: selection on private data would be "
                    "an uncharged release)", name, info.seconds)
        return model, info
    private = split.hospital(hospital)
    train_pos, val_pos = local_train_val(private.labels, val_fraction=cfg.data.local_val_fraction,
                                         seed=teacher_seed(cfg, hospital))
    images, labels = tensors(private, spatial_dims=split.data.spatial_dims)
    model_name = cfg.teacher_model(hospital)
    torch.manual_seed(teacher_seed(cfg, hospital))
    device = resolve_device(cfg.device)
    model = place_model(build_model(model_name, split.model_spec()), device)
    start = time.perf_counter()
    logger.info("%s: training teacher %s on %d private samples (%d for local validation)", name, model_name,
                len(train_pos), len(val_pos))
    for text in class_warnings(name, class_counts(private.labels, split.data.n_classes).tolist(),
                               below=cfg.federation.warn_class_below):
        logger.warning("%s", text)
    result = train_supervised(
        model=model, train_images=images[train_pos], train_labels=labels[train_pos],
        val_images=images[val_pos], val_labels=labels[val_pos], epochs=cfg.teacher.epochs,
        patience=cfg.teacher.patience, batch_size=cfg.teacher.batch_size, lr=cfg.teacher.lr,
        weight_decay=cfg.teacher.weight_decay, augment=cfg.teacher.augment, seed=teacher_seed(cfg, hospital),
        class_weighted=cfg.teacher.class_weighted, log_prefix=f"{name} teacher ", amp=cfg.amp,
        ema_decay=cfg.teacher.ema_decay,
    )
    info = TeacherInfo(
        hospital=name, model=model_name, num_private=int(labels.shape[0]), num_train=len(train_pos),
        num_val=len(val_pos), val_auc=result.val.auc, val_acc=result.val.acc, best_epoch=result.best_epoch,
        epochs_run=result.epochs_run, seconds=time.perf_counter() - start,
        fingerprint=teacher_fingerprint(cfg, split, hospital),
    )
    logger.info("%s: teacher ready (local val AUC %.3f, best epoch %d of %d, %.1f s)", name, info.val_auc,
                info.best_epoch, info.epochs_run, info.seconds)
    return model, info


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
            model = build_model(info.model, split.model_spec())
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
