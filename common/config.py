"""Experiment config: YAML -> frozen, typed dataclasses, every problem at once.

A config is read once with :func:`yaml.safe_load`, merged with ``--set
a.b=c`` overrides and turned into :class:`ExperimentConfig`. Validation
collects every problem (unknown key with a did-you-mean, wrong type,
out-of-range value, cross-field rule) and raises one :class:`ConfigError`::

    medkd: 3 problems in configs/retina.yaml
      federation.alpha: must be > 0, got -1
      teacher.epochs: expected an integer, got 'ten'
      data.datset: unknown key; did you mean 'data.dataset'?

Range limits live next to each field (``metadata``) so that the reference
in ``README.md`` and the checks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

__all__ = [
    "Method",
    "AggregatorName",
    "PartitionName",
    "OutputKind",
    "WireDtype",
    "ProxySource",
    "DataConfig",
    "FederationConfig",
    "TeacherConfig",
    "StudentConfig",
    "DistillConfig",
    "QueryConfig",
    "FedAvgConfig",
    "ExperimentConfig",
    "load_config",
    "build_config",
    "parse_overrides",
    "config_to_dict",
    "dump_config",
]

MODEL_NAMES = ("smallcnn", "densenet121", "resnet18", "resnet34", "resnet50")
FAULT_NAMES = ("nan", "shape", "negative", "uniform", "flip")


class Method(StrEnum):
    """What ``medkd simulate`` trains."""

    FEDKD = "fedkd"
    FEDAVG = "fedavg"
    CENTRALIZED = "centralized"
    LOCAL = "local"


class AggregatorName(StrEnum):
    """Server-side aggregators of hospital soft labels (see server/aggregate.py)."""

    MEAN = "mean"
    WEIGHTED = "weighted"
    ERA = "era"
    CERTAINTY = "certainty"
    MEDIAN = "median"


class PartitionName(StrEnum):
    """How the private (non-proxy) training data is split among hospitals."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    QUANTITY = "quantity"


class OutputKind(StrEnum):
    """What a teacher sends: probabilities at temperature T, or raw logits."""

    PROBS = "probs"
    LOGITS = "logits"


class WireDtype(StrEnum):
    """Float width of the outputs on the wire."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


class ProxySource(StrEnum):
    """Which official split the public proxy set is carved from."""

    TRAIN = "train"
    VAL = "val"


def _f(default: Any, *, doc: str, gt: float | None = None, ge: float | None = None,
       lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a documented default and optional range limits."""
    meta = {"doc": doc, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("retinamnist", doc="MedMNIST flag (looked up in data_dir, downloaded if missing) or a path to a MedMNIST-format .npz")
    data_dir: str | None = _f(None, doc="where MedMNIST flags are looked up; default $MEDKD_DATA, else ~/.local/share/medkd")
    download: bool = _f(True, doc="download a missing MedMNIST flag from the official URL (MD5-verified)")
    proxy_source: ProxySource = _f(ProxySource.TRAIN, doc="official split the public proxy set is carved from (train|val); no hospital holds it")
    proxy_fraction: float = _f(0.25, ge=0.0, lt=1.0, doc="fraction of proxy_source used as the public proxy set (stratified)")
    proxy_labelled: bool = _f(False, doc="whether proxy labels may reach the student (enables distill.ce_weight)")
    local_val_fraction: float = _f(0.15, gt=0.0, lt=0.5, doc="fraction of each hospital's private data held out for early stopping and local AUC")
    max_test_samples: int = _f(0, ge=0, doc="evaluate on at most this many test samples (0 = the whole test split)")


@dataclass(frozen=True)
class FederationConfig:
    hospitals: int = _f(5, ge=1, le=1000, doc="number of hospitals (ClientApps)")
    partition: PartitionName = _f(PartitionName.DIRICHLET, doc="iid | dirichlet (label skew) | quantity (size skew)")
    alpha: float = _f(0.5, gt=0.0, doc="Dirichlet concentration for dirichlet/quantity partitions (smaller = more skew)")
    min_samples: int = _f(20, ge=1, doc="smallest private partition a hospital may get")
    min_replies: int = _f(0, ge=0, doc="quorum of valid replies per round; 0 = a majority of hospitals")
    reply_timeout_s: float = _f(900.0, gt=0.0, doc="how long the server waits for replies in one round")
    wait_for_nodes_s: float = _f(300.0, gt=0.0, doc="how long the server waits for the hospitals to connect")
    client_cpus: float = _f(1.0, gt=0.0, doc="CPUs per simulated ClientApp (Flower simulation backend)")
    faults: dict[str, str] = _f({}, doc="simulation only: hospital index -> injected reply fault "
                                "(nan|shape|negative|uniform|flip), to test validation and robust aggregators")


@dataclass(frozen=True)
class TeacherConfig:
    model: str = _f("smallcnn", doc="default teacher architecture (smallcnn|densenet121|resnet18|resnet34|resnet50)")
    per_hospital: dict[str, str] = _f({}, doc="teacher architecture per hospital index, e.g. {'0': resnet18}")
    epochs: int = _f(40, ge=1, doc="maximum local training epochs")
    patience: int = _f(8, ge=1, doc="early stopping patience in epochs (local validation AUC)")
    batch_size: int = _f(32, ge=1, doc="local training batch size")
    lr: float = _f(1e-3, gt=0.0, doc="Adam learning rate")
    weight_decay: float = _f(1e-4, ge=0.0, doc="Adam weight decay")
    augment: bool = _f(True, doc="random flips during training")
    class_weighted: bool = _f(False, doc="inverse-frequency class weights in the teacher's loss (off: keeps "
                              "teacher probabilities calibrated to the hospital's own label mix, which "
                              "averages better across hospitals)")


@dataclass(frozen=True)
class StudentConfig:
    model: str = _f("smallcnn", doc="student architecture (same registry as teachers)")


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = _f(2.0, gt=0.0, doc="KD temperature T (teacher probabilities at T; loss scaled by T^2)")
    proxy_batch: int = _f(128, ge=1, doc="proxy samples queried per round (cycled without replacement)")
    epochs: int = _f(15, ge=1, doc="student epochs over the soft-labelled proxy bank per round")
    batch_size: int = _f(32, ge=1, doc="student batch size")
    lr: float = _f(1e-3, gt=0.0, doc="student Adam learning rate")
    weight_decay: float = _f(1e-4, ge=0.0, doc="student Adam weight decay")
    ce_weight: float = _f(0.0, ge=0.0, le=1.0, doc="weight of cross-entropy on proxy labels (needs data.proxy_labelled)")
    era_temperature: float = _f(0.1, gt=0.0, doc="sharpening temperature of the era aggregator (DS-FL)")
    augment: bool = _f(True, doc="random flips during distillation")


@dataclass(frozen=True)
class QueryConfig:
    output: OutputKind = _f(OutputKind.PROBS, doc="probs (softmax at T) or logits")
    dtype: WireDtype = _f(WireDtype.FLOAT16, doc="float width of outputs on the wire")
    max_indices: int = _f(4096, ge=1, doc="largest query a hospital answers")
    simplex_tolerance: float = _f(1e-2, gt=0.0, doc="allowed |row sum - 1| for probability replies")


@dataclass(frozen=True)
class FedAvgConfig:
    local_epochs: int = _f(2, ge=1, doc="local epochs per FedAvg round")
    lr: float = _f(1e-3, gt=0.0, doc="local Adam learning rate")
    batch_size: int = _f(32, ge=1, doc="local batch size")


@dataclass(frozen=True)
class ExperimentConfig:
    seed: int = _f(0, ge=0, doc="seed for splits, initialisation and sampling")
    rounds: int = _f(10, ge=1, doc="federated rounds (fedkd, fedavg); centralized and local train once")
    method: Method = _f(Method.FEDKD, doc="fedkd | fedavg | centralized | local")
    aggregator: AggregatorName = _f(AggregatorName.ERA, doc="mean | weighted | era | certainty | median")
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)

    def teacher_model(self, hospital: int) -> str:
        """Teacher architecture of hospital index ``hospital``."""
        return self.teacher.per_hospital.get(str(hospital), self.teacher.model)

    def quorum(self) -> int:
        """Valid replies needed for a round to update the student."""
        if self.federation.min_replies > 0:
            return self.federation.min_replies
        return self.federation.hospitals // 2 + 1


# --------------------------------------------------------------------------- parsing


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a.b": 1, "c": "x"}``; values are YAML scalars.

    Raises
    ------
    ConfigError
        Listing every item that is not ``key=value``.
    """
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    if problems:
        raise ConfigError("--set", problems)
    return out


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = merged
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return merged


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], key + ".")
    return keys


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; append a problem and return None on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, problems)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return {str(k): _convert(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            hint = difflib.get_close_matches(str(value), [m.value for m in tp], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(f"{key}: expected {_describe(tp)}, got {value!r}{extra}")
            return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{key}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-3' as a string
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, got {value!r}")
        return None
    raise TypeError(f"unsupported config field type {tp!r} at {key}")  # a bug in this module


def _check_range(value: Any, meta: dict[str, Any], key: str, problems: list[str]) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    checks = (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
              ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<="))
    for name, ok, sym in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            problems.append(f"{key}: must be {sym} {bound}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or '<top>'}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            hint = difflib.get_close_matches(full, _all_keys(ExperimentConfig), n=1, cutoff=0.6)
            if not hint:
                hint = [f"{prefix}{m}" for m in difflib.get_close_matches(str(key), sorted(names), n=1)]
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys here: {', '.join(sorted(names))}"
            problems.append(f"{full}: unknown key{extra}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = _build(tp, raw[f.name], key + ".", problems)
            if sub is not None:
                kwargs[f.name] = sub
            continue
        before = len(problems)
        value = _convert(raw[f.name], tp, key, problems)
        if len(problems) == before:
            _check_range(value, dict(f.metadata), key, problems)
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def _cross_checks(cfg: ExperimentConfig, problems: list[str]) -> None:
    models = [("teacher.model", cfg.teacher.model), ("student.model", cfg.student.model)]
    for idx, name in cfg.teacher.per_hospital.items():
        models.append((f"teacher.per_hospital.{idx}", name))
        if not idx.isdigit() or int(idx) >= cfg.federation.hospitals:
            problems.append(
                f"teacher.per_hospital.{idx}: expected a hospital index 0..{cfg.federation.hospitals - 1}, got {idx!r}"
            )
    for idx, fault in cfg.federation.faults.items():
        if not idx.isdigit() or int(idx) >= cfg.federation.hospitals:
            problems.append(
                f"federation.faults.{idx}: expected a hospital index 0..{cfg.federation.hospitals - 1}, got {idx!r}"
            )
        if fault not in FAULT_NAMES:
            problems.append(f"federation.faults.{idx}: expected one of {', '.join(FAULT_NAMES)}, got {fault!r}")
    for key, name in models:
        if name not in MODEL_NAMES:
            hint = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(f"{key}: expected one of {', '.join(MODEL_NAMES)}, got {name!r}{extra}")
    if cfg.distill.ce_weight > 0 and not cfg.data.proxy_labelled:
        problems.append(
            f"distill.ce_weight: must be 0 unless data.proxy_labelled is true, got {cfg.distill.ce_weight}"
        )
    if cfg.quorum() > cfg.federation.hospitals:
        problems.append(
            f"federation.min_replies: must be <= federation.hospitals ({cfg.federation.hospitals}), "
            f"got {cfg.federation.min_replies}"
        )
    if cfg.method == Method.FEDKD and cfg.data.proxy_fraction <= 0:
        problems.append("data.proxy_fraction: must be > 0 for method fedkd (the proxy set is what teachers label), got 0")
    if cfg.query.max_indices < cfg.distill.proxy_batch:
        problems.append(
            f"query.max_indices: must be >= distill.proxy_batch ({cfg.distill.proxy_batch}), got {cfg.query.max_indices}"
        )


def build_config(raw: Any, *, source: str = "<config>", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Validate a raw mapping (plus dotted overrides) into an :class:`ExperimentConfig`.

    Raises
    ------
    ConfigError
        With every problem found, each naming its dotted key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"<top>: expected a mapping of keys, got {type(raw).__name__}"])
    merged = _apply_overrides(raw, overrides or {})
    problems: list[str] = []
    cfg = _build(ExperimentConfig, merged, "", problems)
    if cfg is not None and not problems:
        _cross_checks(cfg, problems)
    if problems or cfg is None:
        raise ConfigError(source, problems or ["could not build the config"])
    return cfg


def load_config(path: str | Path | None, *, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults when ``path`` is None) and validate it.

    Raises
    ------
    ConfigError
        If the file is missing or not YAML, or any key is invalid (all listed at once).
    """
    if path is None:
        return build_config({}, source="<defaults>", overrides=overrides)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read the config file: {e.strerror or e}"]) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(str(p), [f"not valid YAML: {e}"]) from e
    return build_config(raw, source=str(p), overrides=overrides)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-Python (YAML-safe) view of a config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


def dump_config(cfg: ExperimentConfig) -> str:
    """The fully resolved config as YAML text (loadable by :func:`load_config`)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key; used to write the README reference."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            value = getattr(defaults, f.name)
            shown = value.value if isinstance(value, enum.Enum) else value
            shown = "null" if shown is None else ("{}" if shown == {} else repr(shown))
            rows.append((f"{prefix}{f.name}", shown, f.metadata.get("doc", "")))

    walk(ExperimentConfig, "")
    return rows
