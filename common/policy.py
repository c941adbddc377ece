"""A hospital's policy: the hospital's own file, and the only source of what it does and what leaves it.

The coordinator never configures a hospital. Each hospital reads
``policy.yaml`` from its own folder (or the file its SuperNode's
``node_config["policy"]`` names) and that file alone decides

- where the hospital's data and folder are (``data``, ``share``, ``folder``);
- how its teacher is trained (``teacher``) and when it abstains (``selector``);
- which message kinds it answers (``answers``: teacher outputs always;
  FedAvg model weights only if it opted in, for baseline studies);
- which output kinds, wire dtypes and temperatures it allows (``outputs``);
- how many proxy indices it answers per query and per run (``limits``);
- which differential-privacy mechanism protects what leaves, and its budget
  (``privacy``; see :mod:`client.privacy`).

A coordinator's query can only *request* within these limits; a request
outside them is refused with an error reply naming the policy key. Paths or
config text sent by the coordinator are never opened, parsed or written.

``medkd simulate`` writes one policy per simulated hospital from the
experiment YAML (:func:`policy_from_experiment`, :func:`write_policies`);
the ClientApp then reads it back through :func:`load_policy`, the same code
path a deployed hospital uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from common.atomic import atomic_write_text
from common.config import (DEVICE_PATTERN, MODEL_NAMES, DataConfig, ExperimentConfig, FederationConfig, Method,
                           PartitionName, PolicyAnswers, PolicyLimits, PolicyOutputs, PolicyPrivacy, PolicyRules, PrivacyMechanism,
                           ProxySource, SelectorConfig, TeacherConfig, privacy_conflicts)
from common.errors import PolicyError
from common.schema import build_dataclass, documented, reference_rows, to_plain

__all__ = ["POLICY_FILE", "HospitalPolicy", "load_policy", "build_policy", "write_policy",
           "policy_from_experiment", "write_policies", "hospital_experiment", "policy_reference"]

POLICY_FILE = "policy.yaml"
HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PolicyData:
    dataset: str = documented("retinamnist", doc="this hospital's data: a MedMNIST-format .npz path, or a MedMNIST "
                              "flag looked up in data_dir")
    data_dir: str | None = documented(None, doc="where a MedMNIST flag is looked up; default $MEDKD_DATA, else "
                                      "~/.local/share/medkd")
    download: bool = documented(False, doc="may the hospital download a missing MedMNIST flag (MD5-verified)")
    proxy_source: ProxySource = documented(ProxySource.TRAIN, doc="official split the public proxy set is carved "
                                           "from (must match the coordinator's, checked by the manifest hash)")
    proxy_fraction: float = documented(0.25, ge=0.0, lt=1.0, doc="fraction of proxy_source that is the public "
                                       "proxy set (never part of this hospital's private data)")
    local_val_fraction: float = documented(0.15, gt=0.0, lt=0.5, doc="fraction of the private data held out for "
                                           "the teacher's early stopping and local AUC")


@dataclass(frozen=True)
class PolicyShare:
    hospitals: int = documented(1, ge=1, le=1000, doc="simulated sites: how many hospitals share data.dataset "
                                "(1 = this hospital holds all of it)")
    index: int = documented(0, ge=0, doc="simulated sites: which share is this hospital's (0-based)")
    partition: PartitionName = documented(PartitionName.IID, doc="simulated sites: iid | dirichlet | quantity")
    alpha: float = documented(0.5, gt=0.0, doc="simulated sites: Dirichlet concentration of the partition")
    min_samples: int = documented(20, ge=1, doc="simulated sites: smallest share the partition may give")
    seed: int = documented(0, ge=0, doc="seed of the proxy/partition split and of the teacher's training")


@dataclass(frozen=True)
class HospitalPolicy:
    hospital: str = documented("", doc="this hospital's name (letters, digits, '_', '.', '-'; at most 64); "
                               "required")
    folder: str | None = documented(None, doc="the hospital's folder (teacher, outbound log, local log); default "
                                    "the folder holding this policy file")
    threads: int = documented(1, ge=1, doc="CPU threads for the teacher")
    device: str = documented("auto", doc="where the teacher trains and answers: auto (CUDA when present) | cpu | "
                             "cuda | cuda:<i>")
    amp: bool = documented(True, doc="bf16 autocast for the teacher on CUDA (ignored on the CPU)")
    audit_archive: bool = documented(True, doc="keep the exact bytes of every reply in audit_payloads/ so "
                                     "`medkd audit verify` can re-hash them")
    data: PolicyData = field(default_factory=PolicyData)
    share: PolicyShare = field(default_factory=PolicyShare)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    answers: PolicyAnswers = field(default_factory=PolicyAnswers)
    outputs: PolicyOutputs = field(default_factory=PolicyOutputs)
    limits: PolicyLimits = field(default_factory=PolicyLimits)
    privacy: PolicyPrivacy = field(default_factory=PolicyPrivacy)

    def folder_path(self, policy_path: Path) -> Path:
        """The hospital's folder: ``folder`` (relative to the policy file) or the policy file's folder."""
        if self.folder:
            folder = Path(self.folder).expanduser()
            return folder if folder.is_absolute() else policy_path.parent / folder
        return policy_path.parent


def _cross_checks(policy: HospitalPolicy, problems: list[str]) -> None:
    if not DEVICE_PATTERN.fullmatch(policy.device):
        problems.append(f"device: expected auto, cpu, cuda or cuda:<index>, got {policy.device!r}")
    if not HOSPITAL_NAME.match(policy.hospital):
        problems.append(f"hospital: expected a name of letters, digits, '_', '.', '-' (at most 64), "
                        f"got {policy.hospital!r}")
    if policy.share.index >= policy.share.hospitals:
        problems.append(f"share.index: must be < share.hospitals ({policy.share.hospitals}), got {policy.share.index}")
    if policy.teacher.per_hospital:
        problems.append("teacher.per_hospital: not used in a hospital policy; set teacher.model")
    if policy.teacher.model not in MODEL_NAMES:
        problems.append(f"teacher.model: expected one of {', '.join(MODEL_NAMES)}, got {policy.teacher.model!r}")
    if policy.outputs.min_temperature > policy.outputs.max_temperature:
        problems.append(f"outputs.min_temperature: must be <= outputs.max_temperature "
                        f"({policy.outputs.max_temperature}), got {policy.outputs.min_temperature}")
    for key in ("kinds", "dtypes"):
        if not getattr(policy.outputs, key):
            problems.append(f"outputs.{key}: must name at least one")
    if policy.limits.max_indices_per_query > policy.limits.max_indices_per_run:
        problems.append(f"limits.max_indices_per_query: must be <= limits.max_indices_per_run "
                        f"({policy.limits.max_indices_per_run}), got {policy.limits.max_indices_per_query}")
    if policy.data.proxy_fraction <= 0:
        problems.append("data.proxy_fraction: must be > 0 (the public proxy set is what the hospital labels)")
    problems.extend(privacy_conflicts(policy.privacy.mechanism, selector=policy.selector.kind,
                                      label_counts=policy.answers.label_counts, prefix="", selector_key="selector"))
    if policy.privacy.mechanism != PrivacyMechanism.NONE and policy.answers.fedavg_weights:
        problems.append(f"answers.fedavg_weights: must be false under privacy.mechanism "
                        f"{policy.privacy.mechanism.value} (model weights are not covered by the mechanism)")


def build_policy(raw: Any, *, source: str = "<policy>") -> HospitalPolicy:
    """Validate a raw mapping into a :class:`HospitalPolicy`.

    Raises
    ------
    PolicyError
        With every problem found, each naming its dotted policy key.
    """
    if not isinstance(raw, dict):
        raise PolicyError(source, [f"<top>: expected a mapping of policy keys, got {type(raw).__name__}"])
    problems: list[str] = []
    if "hospital" not in raw:
        problems.append("hospital: required (this hospital's name)")
    policy = build_dataclass(HospitalPolicy, raw, problems=problems)
    if policy is not None and not problems:
        _cross_checks(policy, problems)
    if problems or policy is None:
        raise PolicyError(source, problems or ["could not build the policy"])
    return policy


def load_policy(path: Path) -> HospitalPolicy:
    """Read and validate the hospital policy at ``path``.

    Raises
    ------
    PolicyError
        If the file is missing, not YAML, or any key is invalid (all listed at once).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(str(path), [f"cannot read the policy file: {e.strerror or e}"]) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(str(path), [f"not valid YAML: {e}"]) from e
    return build_policy(raw, source=str(path))


def write_policy(path: Path, policy: HospitalPolicy, *, comment: str = "") -> None:
    """Write ``policy`` as YAML atomically (a header comment first, if given)."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    atomic_write_text(Path(path), header + yaml.safe_dump(to_plain(policy), sort_keys=False))


def policy_from_experiment(cfg: ExperimentConfig, index: int, *, name: str) -> HospitalPolicy:
    """The policy of simulated hospital ``index`` for experiment ``cfg`` (``medkd simulate``'s convenience).

    The data share, teacher settings and the experiment's ``policy`` rules
    go into the file; for ``method: fedavg`` the simulated hospitals opt in
    to sending weights, since that baseline study is what the run is for.
    """
    rules = cfg.policy_rules(index)
    answers = rules.answers
    if cfg.method == Method.FEDAVG and not answers.fedavg_weights:
        answers = replace(answers, fedavg_weights=True)
    data = PolicyData(dataset=cfg.data.dataset, data_dir=cfg.data.data_dir, download=cfg.data.download,
                      proxy_source=cfg.data.proxy_source, proxy_fraction=cfg.data.proxy_fraction,
                      local_val_fraction=cfg.data.local_val_fraction)
    share = PolicyShare(hospitals=cfg.federation.hospitals, index=index, partition=cfg.federation.partition,
                        alpha=cfg.federation.alpha, min_samples=cfg.federation.min_samples, seed=cfg.seed)
    teacher = replace(cfg.teacher, model=cfg.teacher_model(index), per_hospital={})
    return HospitalPolicy(hospital=name, folder=None, threads=max(1, int(cfg.federation.client_cpus)),
                          device=cfg.device, amp=cfg.amp, data=data,
                          share=share, teacher=teacher, selector=cfg.selector, answers=answers,
                          outputs=rules.outputs, limits=rules.limits, privacy=rules.privacy)


def write_policies(cfg: ExperimentConfig, hospitals_dir: Path) -> list[Path]:
    """Write ``<hospitals_dir>/H<i>/policy.yaml`` for every simulated hospital; returns the paths."""
    from common.split import hospital_name

    paths = []
    for index in range(cfg.federation.hospitals):
        name = hospital_name(index)
        path = Path(hospitals_dir) / name / POLICY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_policy(path, policy_from_experiment(cfg, index, name=name),
                     comment=f"Policy of simulated hospital {name}, written by medkd from the experiment config.\n"
                             "The hospital reads only this file; the coordinator cannot change it.")
        paths.append(path)
    return paths


def hospital_experiment(policy: HospitalPolicy) -> ExperimentConfig:
    """The hospital's own view, as an :class:`ExperimentConfig` built from its policy alone.

    It lets the hospital reuse the split and teacher code (``make_split``,
    ``load_or_train_teacher``) without any setting from the coordinator.
    """
    data = DataConfig(dataset=policy.data.dataset, data_dir=policy.data.data_dir, download=policy.data.download,
                      proxy_source=policy.data.proxy_source, proxy_fraction=policy.data.proxy_fraction,
                      local_val_fraction=policy.data.local_val_fraction)
    federation = FederationConfig(hospitals=policy.share.hospitals, partition=policy.share.partition,
                                  alpha=policy.share.alpha, min_samples=policy.share.min_samples)
    return ExperimentConfig(seed=policy.share.seed, data=data, federation=federation, teacher=policy.teacher,
                            selector=policy.selector, device=policy.device, amp=policy.amp,
                            policy=PolicyRules(answers=policy.answers, outputs=policy.outputs, limits=policy.limits,
                                               privacy=policy.privacy))


def policy_reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every policy key; used to write the README reference."""
    return reference_rows(HospitalPolicy)
