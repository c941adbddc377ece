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

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError
from common.names import (DEVICE_PATTERN, FAULT_NAMES, MODEL_NAMES, AggregatorName, LrSchedule,  # noqa: F401
                          Method, OutputKind, PartitionName, PateRelease, PrivacyMechanism, ProxySource, SelectorKind,
                          WireDtype)
from common.schema import apply_overrides, build_dataclass, documented, parse_overrides, reference_rows, to_plain

__all__ = [
    "Method", "AggregatorName", "PartitionName", "OutputKind", "WireDtype", "ProxySource", "SelectorKind",
    "SelectorConfig", "DataConfig", "FederationConfig", "TeacherConfig", "StudentConfig", "DistillConfig",
    "QueryConfig", "FedAvgConfig", "PolicyAnswers", "PolicyOutputs", "PolicyLimits", "PolicyPrivacy", "PolicyRules",
    "PrivacyMechanism", "PateRelease", "ExperimentConfig", "load_config", "build_config", "parse_overrides",
    "config_to_dict", "dump_config",
]

@dataclass(frozen=True)
class DataConfig:
    dataset: str = documented("retinamnist", doc="MedMNIST flag (looked up in data_dir, downloaded if missing) or a path to a MedMNIST-format .npz")
    data_dir: str | None = documented(None, doc="where MedMNIST flags are looked up; default $MEDKD_DATA, else ~/.local/share/medkd")
    download: bool = documented(True, doc="download a missing MedMNIST flag from the official URL (MD5-verified)")
    proxy_source: ProxySource = documented(ProxySource.TRAIN, doc="official split the public proxy set is carved from (train|val); no hospital holds it")
    proxy_fraction: float = documented(0.25, ge=0.0, lt=1.0, doc="fraction of proxy_source used as the public proxy set (stratified)")
    proxy_labelled: bool = documented(False, doc="whether proxy labels may reach the student (enables distill.ce_weight)")
    local_val_fraction: float = documented(0.15, gt=0.0, lt=0.5, doc="fraction of each hospital's private data held out for early stopping and local AUC")
    max_test_samples: int = documented(0, ge=0, doc="evaluate on at most this many test samples (0 = the whole test split)")
    max_val_samples: int = documented(0, ge=0, doc="coordinator's validation set: at most this many samples of the "
                                      "official val split (0 = all of it, less any proxy samples drawn from it)")


@dataclass(frozen=True)
class FederationConfig:
    hospitals: int = documented(5, ge=1, le=1000, doc="number of hospitals (ClientApps)")
    partition: PartitionName = documented(PartitionName.DIRICHLET, doc="iid | dirichlet (label skew) | quantity (size skew)")
    alpha: float = documented(0.5, gt=0.0, doc="Dirichlet concentration for dirichlet/quantity partitions (smaller = more skew)")
    min_samples: int = documented(20, ge=1, doc="smallest private partition a hospital may get")
    min_replies: int = documented(0, ge=0, doc="quorum of valid replies per round; 0 = a majority of hospitals")
    reply_timeout_s: float = documented(900.0, gt=0.0, doc="how long the server waits for a hospital's reply, "
                                        "from when its query is sent")
    wait_for_nodes_s: float = documented(300.0, gt=0.0, doc="how long the server waits for the hospitals to connect")
    client_cpus: float = documented(1.0, gt=0.0, doc="CPUs per simulated ClientApp (Flower simulation backend)")
    max_in_flight: int = documented(0, ge=0, doc="queries in flight at once per round (0 = all hospitals at once), "
                                    "the next sent as soon as a reply comes; for hundreds of simulated hospitals set "
                                    "~4 per simulation worker (8 on 2 cores): Flower's in-memory engine scans "
                                    "every stored message for every node, so rounds grow with hospitals x in-flight")
    warn_class_below: int = documented(5, ge=1, doc="warn, by hospital name, when a hospital's private data holds "
                                       "fewer than this many examples of some class (or a single class)")
    faults: dict[str, str] = documented({}, doc="simulation only: hospital index -> injected reply fault "
                                "(nan|shape|negative|uniform|flip|crash|late), to test validation and robust aggregators")


@dataclass(frozen=True)
class TeacherConfig:
    model: str = documented("smallcnn", doc="default teacher architecture (smallcnn|densenet121|resnet18|resnet34|resnet50)")
    per_hospital: dict[str, str] = documented({}, doc="teacher architecture per hospital index, e.g. {'0': resnet18}")
    epochs: int = documented(40, ge=1, doc="maximum local training epochs")
    patience: int = documented(8, ge=0, doc="early stopping patience (epochs, local val AUC); 0: none, last weights kept")
    batch_size: int = documented(32, ge=1, doc="local training batch size")
    lr: float = documented(1e-3, gt=0.0, doc="Adam learning rate")
    weight_decay: float = documented(1e-4, ge=0.0, doc="Adam weight decay")
    augment: bool = documented(True, doc="random flips during training")
    class_weighted: bool = documented(False, doc="inverse-frequency class weights in the teacher's loss (off: keeps "
                              "teacher probabilities calibrated to the hospital's own label mix, which "
                              "averages better across hospitals)")
    ema_decay: float = documented(0.0, ge=0.0, lt=1.0, doc="validate and keep an exponential moving average of the "
                                  "teacher's weights over every step (a snapshot ensemble); 0 = off")
    ensemble: int = documented(5, ge=1, le=16, doc="members of each hospital's teacher: each is trained from its own "
                               "seed on its own local train/val split of the same private data, and the hospital "
                               "answers with their mean probability (a local deep ensemble); 1 = one network. Plain "
                               "teachers only: dp_sgd_teacher trains one DP-SGD network, pate its partition teachers")
    seed_offset: int = documented(0, ge=0, doc="added to the teacher's initialisation and shuffling seed (robustness "
                                  "checks: the same split, differently initialised teachers)")


@dataclass(frozen=True)
class SelectorConfig:
    kind: SelectorKind = documented(SelectorKind.DENSITY_RATIO, doc="per-sample abstention: none | density_ratio (a "
                                    "private-vs-proxy classifier estimates p_hospital(x)/p_proxy(x); its ratio is "
                                    "also sent, one float16 per sample) | max_softmax (the teacher's confidence); "
                                    "with a selector the hospital also calibrates its outputs on local validation")
    abstain_quantile: float = documented(0.0, ge=0.0, lt=1.0, doc="abstain on proxy samples scoring below this "
                                         "quantile of the hospital's own held-out private samples (0 = never)")
    epochs: int = documented(20, ge=1, doc="density_ratio: most epochs of the private-vs-proxy classifier")
    patience: int = documented(5, ge=1, doc="density_ratio: early-stopping patience (held-out AUC)")


@dataclass(frozen=True)
class StudentConfig:
    model: str = documented("smallcnn", doc="student architecture (same registry as teachers)")


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = documented(1.0, gt=0.0, doc="KD temperature T (teacher probabilities at T; loss scaled by T^2)")
    proxy_batch: int = documented(128, ge=1, doc="proxy samples queried per round (cycled without replacement)")
    epochs: int = documented(15, ge=1, doc="student epochs over the soft-labelled proxy bank per round")
    batch_size: int = documented(32, ge=1, doc="student batch size")
    lr: float = documented(1e-3, gt=0.0, doc="student Adam learning rate")
    weight_decay: float = documented(1e-4, ge=0.0, doc="student Adam weight decay")
    ce_weight: float = documented(0.0, ge=0.0, le=1.0, doc="weight of cross-entropy on proxy labels (needs data.proxy_labelled)")
    era_temperature: float = documented(0.1, gt=0.0, doc="sharpening temperature of the era aggregator (DS-FL)")
    max_entropy: float = documented(1.0, gt=0.0, le=1.0, doc="drop proxy samples whose aggregated soft label has a "
                                    "normalised entropy above this (1 = keep all; Selective-FD's server selector)")
    augment: bool = documented(True, doc="random flips during distillation")
    mixup_alpha: float = documented(0.0, ge=0.0, doc="mixup on proxy samples: mix pairs of images and their soft "
                                    "labels with weight ~ Beta(a, a) (Zhang et al. 2018); 0 = off")
    ema_decay: float = documented(0.0, ge=0.0, lt=1.0, doc="exponential moving average of the student's weights over "
                                  "every distillation step, validated and snapshotted instead of the raw weights; 0 = off")
    lr_schedule: LrSchedule = documented(LrSchedule.CONSTANT, doc="constant | cosine (decay from lr to 0 over "
                                         "rounds x epochs, Loshchilov and Hutter 2017)")


@dataclass(frozen=True)
class QueryConfig:
    output: OutputKind = documented(OutputKind.PROBS, doc="probs (softmax at T) or logits")
    dtype: WireDtype = documented(WireDtype.FLOAT16, doc="float width of outputs on the wire")
    max_indices: int = documented(4096, ge=1, doc="largest query the coordinator sends (each hospital's policy "
                                   "limits.max_indices_per_query decides what it answers)")
    requery_held: bool = documented(False, doc="ask again for proxy samples the coordinator already holds answers "
                                    "for (off: they are asked again only after a hospital announces a new "
                                    "teacher_version; a repeat to an unchanged teacher adds nothing)")
    simplex_tolerance: float = documented(1e-2, gt=0.0, doc="allowed |row sum - 1| for probability replies")


@dataclass(frozen=True)
class FedAvgConfig:
    local_epochs: int = documented(2, ge=1, doc="local epochs per FedAvg round")
    lr: float = documented(1e-3, gt=0.0, doc="local Adam learning rate")
    batch_size: int = documented(32, ge=1, doc="local batch size")


@dataclass(frozen=True)
class PolicyAnswers:
    train_teacher: bool = documented(True, doc="answer `train.teacher` (retrain the teacher on the coordinator's "
                                     "request; the reply carries local sizes and validation figures only)")
    fedavg_weights: bool = documented(False, doc="answer `train` with model weights (the FedAvg *baseline*); "
                                      "off unless the hospital opts in to a baseline study")
    label_counts: bool = documented(False, doc="release the private data's per-class counts when a query asks "
                                    "(the label_aware aggregator); a release, recorded in the outbound log")


@dataclass(frozen=True)
class PolicyOutputs:
    kinds: list[OutputKind] = documented([OutputKind.PROBS, OutputKind.LOGITS],
                                         doc="output kinds the hospital releases (probs | logits)")
    dtypes: list[WireDtype] = documented([WireDtype.FLOAT16, WireDtype.FLOAT32],
                                         doc="wire dtypes the hospital releases (float16 | float32)")
    min_temperature: float = documented(0.5, gt=0.0, doc="lowest temperature a query may ask for")
    max_temperature: float = documented(20.0, gt=0.0, doc="highest temperature a query may ask for")


@dataclass(frozen=True)
class PolicyLimits:
    max_indices_per_query: int = documented(4096, ge=1, doc="most proxy samples answered in one query")
    max_indices_per_run: int = documented(100_000, ge=1, doc="most proxy samples answered in one run (counted "
                                          "from this hospital's outbound log)")


@dataclass(frozen=True)
class PolicyPrivacy:
    mechanism: PrivacyMechanism = documented(PrivacyMechanism.NONE, doc="none (no formal DP guarantee) | "
                                             "dp_sgd_teacher (record-level, Opacus DP-SGD) | pate (record-level, "
                                             "noisy aggregation of disjoint teachers) | hospital_gaussian "
                                             "(hospital-level, clipped outputs plus Gaussian noise)")
    budget_epsilon: float = documented(8.0, gt=0.0, doc="the most ε (PLD, at `delta`) this hospital spends in "
                                       "total; a release past it is refused with 'privacy budget exhausted'")
    delta: float = documented(1e-5, gt=0.0, lt=1.0, doc="δ of every guarantee this hospital states")
    target_epsilon: float = documented(0.0, ge=0.0, doc="dp_sgd_teacher: ε of one teacher training (σ is "
                                       "calibrated to it under PLD); 0 = use noise_multiplier")
    noise_multiplier: float = documented(1.0, gt=0.0, doc="noise std / L2 sensitivity: dp_sgd_teacher's σ "
                                         "(when target_epsilon is 0); pate's and hospital_gaussian's per answer")
    max_grad_norm: float = documented(1.0, gt=0.0, doc="dp_sgd_teacher: per-sample gradient clipping norm")
    partitions: int = documented(10, ge=2, le=1000, doc="pate: disjoint teacher partitions of the private data")
    pate_release: PateRelease = documented(PateRelease.VOTES, doc="pate: votes (noisy vote histogram, GNMax) | "
                                           "probs (noisy sum of the partitions' probability vectors)")
    declared_size: int = documented(1, ge=1, doc="under a DP mechanism, the num_private the hospital announces "
                                    "(a public figure it chooses, not computed from its data; weights aggregators)")


@dataclass(frozen=True)
class PolicyRules:
    """The policy's rules (what may leave), shared by a hospital's file and an experiment's convenience section."""

    answers: PolicyAnswers = field(default_factory=PolicyAnswers)
    outputs: PolicyOutputs = field(default_factory=PolicyOutputs)
    limits: PolicyLimits = field(default_factory=PolicyLimits)
    privacy: PolicyPrivacy = field(default_factory=PolicyPrivacy)


@dataclass(frozen=True)
class ExperimentConfig:
    seed: int = documented(0, ge=0, doc="seed for splits, initialisation and sampling")
    rounds: int = documented(10, ge=1, doc="federated rounds (fedkd, fedavg); centralized and local train once")
    method: Method = documented(Method.FEDKD, doc="fedkd | fedavg | centralized | local")
    aggregator: AggregatorName = documented(AggregatorName.DENSITY, doc="mean | weighted | era | certainty | median | "
                                            "density (needs selector.kind density_ratio) | label_aware (needs "
                                            "policy.answers.label_counts)")
    early_stop_rounds: int = documented(0, ge=0, doc="stop when the student's validation AUC has not improved for "
                                        "this many rounds (0 = run every round); the best round is kept either way")
    device: str = documented("auto", doc="where the student, evaluation and baselines run: auto (CUDA when present) "
                             "| cpu | cuda | cuda:<i>; each hospital's policy sets its teacher's")
    tta: bool = documented(False, doc="flip test-time augmentation: every method's validation and test figures average "
                           "the softmax over all flips of the spatial axes")
    amp: bool = documented(True, doc="bf16 autocast on CUDA (ignored on the CPU, where runs stay fp32 and deterministic)")
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    policy: PolicyRules = field(default_factory=PolicyRules)
    policy_per_hospital: dict[str, PolicyRules] = documented({}, doc="simulation only: policy rules for hospital "
                                                             "index i instead of `policy`, e.g. {'2': {limits: "
                                                             "{max_indices_per_query: 64}}}")

    def teacher_model(self, hospital: int) -> str:
        """Teacher architecture of hospital index ``hospital``."""
        return self.teacher.per_hospital.get(str(hospital), self.teacher.model)

    def policy_rules(self, hospital: int) -> PolicyRules:
        """The policy rules simulated hospital ``hospital`` is given (``medkd simulate`` only)."""
        return self.policy_per_hospital.get(str(hospital), self.policy)

    def quorum(self) -> int:
        """Valid replies needed for a round to update the student."""
        if self.federation.min_replies > 0:
            return self.federation.min_replies
        return self.federation.hospitals // 2 + 1


# --------------------------------------------------------------------------- parsing


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
    for idx in cfg.policy_per_hospital:
        if not idx.isdigit() or int(idx) >= cfg.federation.hospitals:
            problems.append(f"policy_per_hospital.{idx}: expected a hospital index 0..{cfg.federation.hospitals - 1}, "
                            f"got {idx!r}")
    for key, name in models:
        if name not in MODEL_NAMES:
            hint = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(f"{key}: expected one of {', '.join(MODEL_NAMES)}, got {name!r}{extra}")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        problems.append(f"device: expected auto, cpu, cuda or cuda:<index>, got {cfg.device!r}")
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
    if cfg.aggregator == AggregatorName.DENSITY and cfg.selector.kind != SelectorKind.DENSITY_RATIO:
        problems.append(f"aggregator: 'density' weights hospitals by the density ratios they send; set "
                        f"selector.kind: density_ratio (got {cfg.selector.kind.value!r})")
    if cfg.aggregator == AggregatorName.LABEL_AWARE and not any(
            cfg.policy_rules(i).answers.label_counts for i in range(cfg.federation.hospitals)):
        problems.append("aggregator: 'label_aware' needs label counts, but no hospital's policy releases them; "
                        "set policy.answers.label_counts: true")
    for index in range(cfg.federation.hospitals):
        rules = cfg.policy_rules(index)
        key = f"policy_per_hospital.{index}" if str(index) in cfg.policy_per_hospital else "policy"
        for problem in privacy_conflicts(rules.privacy.mechanism, selector=cfg.selector.kind,
                                         label_counts=rules.answers.label_counts, prefix=key + ".",
                                         selector_key="selector"):
            if problem not in problems:
                problems.append(problem)
    if cfg.query.max_indices < cfg.distill.proxy_batch:
        problems.append(
            f"query.max_indices: must be >= distill.proxy_batch ({cfg.distill.proxy_batch}), got {cfg.query.max_indices}"
        )


def privacy_conflicts(mechanism: PrivacyMechanism, *, selector: SelectorKind, label_counts: bool, prefix: str,
                      selector_key: str) -> list[str]:
    """What a hospital may not release under a DP mechanism: outputs computed from private data outside it.

    Selector outputs (mask, density ratio, calibration) and label counts come from private data no mechanism
    covers, so a DP policy must not release them (forbidden rather than charged).
    """
    if mechanism == PrivacyMechanism.NONE:
        return []
    problems = []
    if selector != SelectorKind.NONE:
        problems.append(f"{selector_key}.kind: must be none under {prefix}privacy.mechanism {mechanism.value} "
                        f"(abstention masks, density ratios and calibration come from private data outside the DP "
                        f"mechanism), got {selector.value!r}")
    if label_counts:
        problems.append(f"{prefix}answers.label_counts: must be false under {prefix}privacy.mechanism "
                        f"{mechanism.value} (label counts are private data no mechanism covers)")
    return problems


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
    merged = apply_overrides(raw, overrides or {})
    problems: list[str] = []
    cfg = build_dataclass(ExperimentConfig, merged, problems=problems)
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
    return to_plain(cfg)


def dump_config(cfg: ExperimentConfig) -> str:
    """The fully resolved config as YAML text (loadable by :func:`load_config`)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key; used to write the README reference."""
    return reference_rows(ExperimentConfig)
