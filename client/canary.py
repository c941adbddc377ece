"""``medkd audit canary``: an empirical ε lower bound for a hospital, from canaries seen only through its outputs.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). For each run:

1. take ``m`` images no hospital trains on as canaries and give each a
   random *wrong* label; include each in the hospital's private training set
   independently with probability 1/2. ``pool`` ``proxy`` draws them from the
   public proxy set; ``heldout`` from the proxy set plus the data set's
   official test and validation images (up to ~4x the proxy set), which are
   appended to the scratch copy's proxy set so that they are asked for
   through the same query path (the scratch proxy manifest hash changes
   accordingly);
2. train the hospital's teacher exactly as in production
   (:func:`client.teacher.load_or_train_teacher` on its policy, in a scratch
   copy of the hospital folder: its own teacher, audit log and ledger), and
   ask for the canaries' outputs through the real outbound path: the query
   handler of the ClientApp (:func:`client.app.answer_query`) behind the
   hospital's gate (ledger charge, audit log, wire bytes), then the
   coordinator's reply checks (:func:`common.payload.parse_reply`).
   *Audit-mode training* (``audit_mode``) changes the recipe in the scratch
   copy, and the bound then audits that recipe, not the production one: no
   early stopping (every epoch runs, the last weights are kept), no
   augmentation, and optionally ``epochs`` epochs. A teacher kept at its
   best validation epoch after a few epochs barely memorises single
   records, so its one-run bound stays near 0 (see the README);
3. score each canary by the released probability p of its assigned label
   and guess "in" for the ``k_plus`` highest scores and "out" for the
   ``k_minus`` lowest, abstaining on the rest. With ``reference`` (the
   default) the score is log p - log p_ref, where p_ref is what a reference
   copy of the hospital, trained the same way on the same data without any
   canary, releases through its own gate: it removes how plausible each
   wrong label is anyway, which otherwise drowns the membership signal. The
   reference never depends on which canaries were included, so the bound
   stays valid;
4. turn (guesses, correct) into an ε lower bound at confidence
   1 - ``alpha`` (:mod:`common.audit_bound`); with several runs the guesses
   are pooled (each canary is in one run only, so the pooled audit is still
   one (ε, δ)-DP mechanism per canary), and the Clopper–Pearson bound is
   reported next to it. A grid of (k+, k-) (``k_grid``) is evaluated on the
   same scores and reported in full; its best entry is bounded at
   ``alpha`` / (grid size) (Bonferroni), so picking the best of the grid
   keeps confidence 1 - ``alpha``.

The upper bound is what the scratch hospital's privacy ledger says it spent
(replayed in a fresh accountant); without a DP mechanism there is none ("no
formal DP guarantee"). A lower bound above the upper bound means a broken
mechanism or accounting: :class:`CanaryViolation`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, Metadata

from common.audit_bound import abstaining_guesses, clopper_pearson_epsilon, one_run_epsilon
from common.config import OutputKind
from common.data import ImageSplit
from common.errors import MedkdError
from common.names import ProxySource
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content, parse_reply
from common.split import FederatedSplit, proxy_manifest_hash

logger = logging.getLogger(__name__)

NO_GUARANTEE = "no formal DP guarantee"


class CanaryPool(StrEnum):
    """Where canaries come from: images no hospital trains on, given random wrong labels."""

    PROXY = "proxy"  # the public proxy set (m <= its size)
    HELDOUT = "heldout"  # the proxy set plus the official test and validation images (appended to the proxy)


class CanaryError(MedkdError, RuntimeError):
    """The canary audit could not run (for example the hospital refused the canary query)."""


class CanaryViolation(MedkdError, RuntimeError):
    """The empirical lower bound exceeds the ledger's ε: a mechanism or accounting bug."""


def canary_candidates(split: FederatedSplit, pool: CanaryPool) -> ImageSplit:
    """The images canaries are drawn from (N, ...) with their true labels: the proxy set first, then for
    ``heldout`` the official test images and the validation images outside the proxy set."""
    proxy = split.proxy
    if pool == CanaryPool.PROXY:
        return proxy
    data = split.data
    val_rest = np.arange(len(data.val), dtype=np.int64)
    if split.proxy_source == ProxySource.VAL:
        val_rest = np.setdiff1d(val_rest, split.proxy_indices)
    return ImageSplit(images=np.concatenate([proxy.images, data.test.images, data.val.images[val_rest]]),
                      labels=np.concatenate([proxy.labels, data.test.labels, data.val.labels[val_rest]]))


def plant_canaries(split: FederatedSplit, hospital: int, *, m: int, rng: np.random.Generator,
                   pool: CanaryPool = CanaryPool.PROXY) -> tuple[FederatedSplit, np.ndarray, np.ndarray, np.ndarray]:
    """A split whose hospital ``hospital`` also holds the included canaries.

    Returns ``(split, positions, labels, included)``: the canaries' positions in the returned split's proxy set
    (m,), their assigned wrong labels (m,) and whether each was included (m,) bool. With ``pool`` ``proxy`` the
    proxy set and its manifest hash are unchanged; with ``heldout`` the canaries from outside the proxy set are
    appended to it (with their true labels, as public proxy samples) and the manifest hash is recomputed.
    """
    candidates = canary_candidates(split, pool)
    n_proxy, n_pool, n_classes = len(split.proxy), len(candidates), split.data.n_classes
    if not 0 < m <= n_pool:
        raise CanaryError(f"m must be in 1..{n_pool} (the size of canary pool '{pool.value}'), got {m}")
    chosen = np.sort(rng.choice(n_pool, size=m, replace=False)).astype(np.int64)
    labels = (candidates.labels[chosen] + rng.integers(1, n_classes, size=m)) % n_classes
    included = rng.random(m) < 0.5
    extra = chosen[chosen >= n_proxy]  # canaries from outside the proxy set: appended to it, in this order
    positions = np.where(chosen < n_proxy, chosen, n_proxy + np.searchsorted(extra, chosen)).astype(np.int64)
    data, train = split.data, split.data.train
    first = len(train)
    grown = ImageSplit(images=np.concatenate([train.images, candidates.images[chosen[included]]]),
                       labels=np.concatenate([train.labels, labels[included]]).astype(np.int64))
    proxy_indices, proxy_hash = split.proxy_indices, split.proxy_hash
    val = data.val
    if extra.size:
        extra_images, extra_labels = candidates.images[extra], candidates.labels[extra].astype(np.int64)
        if split.proxy_source == ProxySource.TRAIN:
            proxy_indices = np.concatenate([proxy_indices, len(grown) + np.arange(extra.size, dtype=np.int64)])
            grown = ImageSplit(images=np.concatenate([grown.images, extra_images]),
                               labels=np.concatenate([grown.labels, extra_labels]))
        else:
            proxy_indices = np.concatenate([proxy_indices, len(val) + np.arange(extra.size, dtype=np.int64)])
            val = ImageSplit(images=np.concatenate([val.images, extra_images]),
                             labels=np.concatenate([val.labels, extra_labels]))
    tag = hashlib.sha256(data.sha256.encode() + pool.value.encode() + chosen.tobytes() + labels.tobytes()
                         + included.tobytes()).hexdigest()
    planted_data = replace(data, train=grown, val=val, sha256=tag)
    hospital_indices = list(split.hospital_indices)
    hospital_indices[hospital] = np.concatenate([hospital_indices[hospital],
                                                 np.arange(first, first + int(included.sum()), dtype=np.int64)])
    if extra.size:
        src = grown if split.proxy_source == ProxySource.TRAIN else val
        proxy_hash = proxy_manifest_hash(src.images[proxy_indices])
    planted = FederatedSplit(data=planted_data, proxy_source=split.proxy_source, proxy_indices=proxy_indices,
                             hospital_indices=hospital_indices, proxy_hash=proxy_hash)
    return planted, positions, labels.astype(np.int64), included


def released_scores(hospital: Any, split: FederatedSplit, positions: np.ndarray, labels: np.ndarray, *,
                    run_id: int) -> np.ndarray:
    """The released probability of each canary's assigned label (m,), asked through the hospital's gate."""
    from client.app import answer_query, hospital_gate

    rules = hospital.policy.outputs
    output = OutputKind.PROBS if OutputKind.PROBS in rules.kinds else rules.kinds[0]
    dtype = sorted(rules.dtypes, key=lambda d: d.value != "float32")[0]
    temperature = min(max(1.0, rules.min_temperature), rules.max_temperature)
    gate = hospital_gate(hospital, run_id=run_id)
    step = hospital.policy.limits.max_indices_per_query
    scores = []
    for round_, start in enumerate(range(0, positions.size, step), start=1):
        chunk = positions[start:start + step]
        query = Query(round=round_, proxy_hash=split.proxy_hash, indices=chunk, temperature=temperature,
                      output=output, dtype=dtype)
        request = Message(content=make_query_content(query), metadata=Metadata(
            run_id=run_id, message_id=f"canary-{run_id}-{round_}", src_node_id=1, dst_node_id=2,
            reply_to_message_id="", group_id=str(round_), created_at=time.time(), ttl=3600.0,
            message_type=QUERY_MESSAGE_TYPE))
        reply = gate.guard(request, lambda msg: answer_query(msg, hospital, split=split))
        if reply.has_error():
            raise CanaryError(f"hospital {hospital.name} refused the canary query: {reply.error.reason}")
        parsed = parse_reply(reply.content, n_samples=chunk.size, n_classes=split.data.n_classes, output=output,
                             dtype=dtype, simplex_tolerance=1e-2, hospital=hospital.name)
        probs = parsed.outputs
        if output == OutputKind.LOGITS:
            probs = np.exp(probs - probs.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
        scores.append(probs[np.arange(chunk.size), labels[start:start + step]])
    return np.concatenate(scores)


def ledger_epsilon(folder: Path) -> tuple[float | None, float | None, str]:
    """(ε spent, δ, mechanism) from the privacy ledger in ``folder``: (None, None, "none") without one."""
    from client.ledger import LEDGER_FILE, read_entries, replay

    path = Path(folder) / LEDGER_FILE
    entries = read_entries(path) if path.is_file() else []
    if not entries:
        return None, None, "none"
    delta = entries[-1].delta
    return replay(path, delta), delta, ",".join(sorted({e.mechanism for e in entries}))


def check_bounds(result: dict[str, Any]) -> None:
    """Raise :class:`CanaryViolation` (carrying ``result``) if a lower bound (the declared k, or the grid's best)
    exceeds the ledger's upper bound."""
    lower, upper = result["eps_lower_bound"], result["eps_upper_bound"]
    if result.get("eps_lower_bound_grid_bonferroni") is not None:
        lower = max(lower, result["eps_lower_bound_grid_bonferroni"])
    if upper is not None and lower > upper + 1e-9:
        error = CanaryViolation(f"empirical ε lower bound {lower:.4f} exceeds the ledger's ε {upper:.4f} "
                                f"(δ={result['delta']:g}): the mechanism or its accounting is broken")
        error.result = result  # type: ignore[attr-defined]
        raise error


def audit_policy(policy: Any, *, audit_mode: bool, epochs: int | None) -> Any:
    """The policy the scratch copy trains with: the hospital's own, or in audit mode no early stopping
    (``teacher.patience`` 0: last weights), no augmentation and optionally ``epochs`` epochs."""
    if not audit_mode:
        if epochs is not None:
            raise CanaryError("changing the teacher's epochs changes its recipe: use audit-mode training")
        return policy
    teacher = replace(policy.teacher, patience=0, augment=False, epochs=epochs or policy.teacher.epochs)
    return replace(policy, teacher=teacher)


def describe_training(policy: Any, *, audit_mode: bool) -> str:
    """One line saying which recipe the audited teacher followed."""
    t = policy.teacher
    if not audit_mode:
        return (f"production recipe (the hospital's policy: up to {t.epochs} epochs, early stopping patience "
                f"{t.patience}, augmentation {'on' if t.augment else 'off'})")
    return (f"audit-mode training: {t.epochs} epochs, no early stopping (last weights), no augmentation; "
            "the bound audits this recipe, not the hospital's production recipe")


def _scratch_hospital(folder: Path, policy: Any) -> Any:
    """A fresh copy of the hospital in ``folder`` (no teacher, log or ledger from before), loaded as the ClientApp does."""
    from client.hospital import load_hospital
    from common.policy import POLICY_FILE, write_policy

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_policy(folder / POLICY_FILE, replace(policy, folder=None), comment="canary audit scratch copy")
    return load_hospital(folder / POLICY_FILE)


def _teacher_facts(folder: Path) -> dict[str, Any]:
    """Epochs and local validation figures of the teacher trained in ``folder`` (empty if unreadable)."""
    from client.teacher import TEACHER_FILE, TeacherInfo
    from common.atomic import load_saved

    loaded = load_saved(folder / TEACHER_FILE, TeacherInfo, what="canary teacher checkpoint")
    if loaded is None:
        return {}
    info = loaded[1]
    val_auc = info.val_auc if math.isfinite(info.val_auc) else None  # a DP teacher has none (strict JSON: no NaN)
    return {"best_epoch": info.best_epoch, "epochs_run": info.epochs_run, "val_auc": val_auc,
            "seconds": info.seconds}


def grid_bounds(scores: list[np.ndarray], included: list[np.ndarray], *, m_total: int,
                k_grid: tuple[tuple[int, int], ...], delta: float, alpha: float) -> list[dict[str, Any]]:
    """Every (k+, k-) of ``k_grid`` on the same per-run scores: guesses, correct, the bound at ``alpha`` and at
    ``alpha`` / len(k_grid) (Bonferroni: the best entry of the grid at that level keeps confidence 1 - alpha)."""
    rows = []
    for k_plus, k_minus in k_grid:
        r = v = 0
        for s, inc in zip(scores, included, strict=True):
            dr, dv = abstaining_guesses(s, inc, k_plus=k_plus, k_minus=k_minus)
            r, v = r + dr, v + dv
        rows.append({"k_plus": k_plus, "k_minus": k_minus, "guesses": r, "correct": v,
                     "eps_lower_bound": one_run_epsilon(m_total, r, v, delta=delta, significance=alpha),
                     "eps_lower_bound_bonferroni": one_run_epsilon(m_total, r, v, delta=delta,
                                                                   significance=alpha / len(k_grid))})
    return rows


def run_canary_audit(policy_path: Path, *, m: int, k_plus: int, k_minus: int, runs: int = 1, seed: int = 0,
                     alpha: float = 0.05, delta: float = 1e-5, work_dir: Path, reference: bool = True,
                     pool: CanaryPool = CanaryPool.PROXY, audit_mode: bool = False, epochs: int | None = None,
                     k_grid: tuple[tuple[int, int], ...] = ()) -> dict[str, Any]:
    """Run the audit ``runs`` times on the hospital whose policy is ``policy_path``; returns the JSON result.

    ``pool``: where the canaries come from (:class:`CanaryPool`); ``audit_mode``/``epochs``: the scratch
    teacher's recipe (:func:`audit_policy`); ``k_grid``: further (k+, k-) reported on the same scores
    (:func:`grid_bounds`).

    Raises
    ------
    CanaryViolation
        If a lower bound exceeds the ledger's ε (the result is attached as ``.result``).
    """
    from common.policy import load_policy
    from common.split import make_split

    import torch

    bad = [f"{a}:{b}" for a, b in ((k_plus, k_minus), *k_grid) if a < 0 or b < 0 or a + b > m]
    if bad:
        raise CanaryError(f"guesses k+:k- must be >= 0 and add up to at most m={m}; got {', '.join(bad)}")
    if epochs is not None and epochs < 1:
        raise CanaryError(f"epochs must be >= 1, got {epochs}")
    start = time.perf_counter()
    original = audit_policy(load_policy(policy_path), audit_mode=audit_mode, epochs=epochs)
    torch.set_num_threads(original.threads)  # the hospital's CPU budget, as its ClientApp uses (client/app.py)
    rng = np.random.default_rng(seed)
    all_scores, all_included, per_run = [], [], []
    upper: float | None = None
    mechanism, ledger_delta = "none", None
    guesses = correct = 0
    for run in range(1, runs + 1):
        folder = Path(work_dir) / f"run-{run}"
        hospital = _scratch_hospital(folder, original)
        split = make_split(hospital.cfg)
        planted, positions, labels, included = plant_canaries(split, hospital.index, m=m, rng=rng, pool=pool)
        logger.info("canary run %d/%d: %d canaries (pool %s), %d included in %s's private set; %s", run, runs, m,
                    pool.value, int(included.sum()), hospital.name, describe_training(original,
                                                                                     audit_mode=audit_mode))
        released = released_scores(hospital, planted, positions, labels, run_id=run)
        scores = np.log(np.maximum(released, 1e-7))
        if reference:  # the same proxy set (canaries included), the hospital's own private set without canaries
            twin = _scratch_hospital(Path(work_dir) / f"reference-{run}", original)
            without = replace(planted, hospital_indices=list(split.hospital_indices))
            scores = scores - np.log(np.maximum(released_scores(twin, without, positions, labels, run_id=run), 1e-7))
        r, v = abstaining_guesses(scores, included, k_plus=k_plus, k_minus=k_minus)
        guesses, correct = guesses + r, correct + v
        all_scores.append(scores)
        all_included.append(included)
        eps_run, ledger_delta, mechanism = ledger_epsilon(folder)
        upper = eps_run if upper is None or (eps_run is not None and eps_run > upper) else upper
        per_run.append({"run": run, "guesses": r, "correct": v, "included": int(included.sum()),
                        "eps_lower_bound": one_run_epsilon(m, r, v, delta=ledger_delta or delta,
                                                           significance=alpha),
                        "eps_ledger": eps_run, "teacher": _teacher_facts(folder),
                        "mean_score_in": float(scores[included].mean()),
                        "mean_score_out": float(scores[~included].mean()),
                        "mean_released_in": float(released[included].mean()),
                        "mean_released_out": float(released[~included].mean())})
    used_delta = ledger_delta or delta
    lower = one_run_epsilon(m * runs, guesses, correct, delta=used_delta, significance=alpha)
    grid = grid_bounds(all_scores, all_included, m_total=m * runs, k_grid=k_grid, delta=used_delta, alpha=alpha)
    result: dict[str, Any] = {
        "hospital": original.hospital, "m": m, "k_plus": k_plus, "k_minus": k_minus, "runs": runs,
        "canaries": f"pool '{pool.value}': images no hospital trains on, each given a random wrong label, each "
                    "included with probability 1/2",
        "training": describe_training(original, audit_mode=audit_mode),
        "score": "log p(canary label) - log p_reference" if reference else "log p(canary label)",
        "guesses": guesses, "correct": correct, "alpha": alpha, "delta": used_delta,
        "eps_lower_bound": lower,
        "eps_lower_bound_clopper_pearson": clopper_pearson_epsilon(guesses, correct, significance=alpha)
        if runs > 1 and guesses else None,
        "k_grid": grid,
        "eps_lower_bound_grid_bonferroni": max((g["eps_lower_bound_bonferroni"] for g in grid), default=None),
        "eps_upper_bound": upper, "mechanism": mechanism,
        "guarantee": NO_GUARANTEE if upper is None else f"({upper:.4f}, {used_delta:g})-DP from the ledger",
        "per_run": per_run, "seconds": time.perf_counter() - start,
    }
    check_bounds(result)
    if not math.isfinite(lower):
        logger.warning("the lower bound is unbounded: every guess was right and the search passed ε = 1e4")
    return result
