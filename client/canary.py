"""``medkd audit canary``: an empirical ε lower bound for a hospital, from canaries seen only through its outputs.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). For each run:

1. take ``m`` proxy samples as canaries and give each a random *wrong*
   label; include each in the hospital's private training set
   independently with probability 1/2;
2. train the hospital's teacher exactly as in production
   (:func:`client.teacher.load_or_train_teacher` on its policy, in a scratch
   copy of the hospital folder: its own teacher, audit log and ledger), and
   ask for the canaries' outputs through the real outbound path: the query
   handler of the ClientApp (:func:`client.app.answer_query`) behind the
   hospital's gate (ledger charge, audit log, wire bytes), then the
   coordinator's reply checks (:func:`common.payload.parse_reply`);
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
   reported next to it.

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
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, Metadata

from common.audit_bound import abstaining_guesses, clopper_pearson_epsilon, one_run_epsilon
from common.config import OutputKind
from common.data import ImageSplit
from common.errors import MedkdError
from common.payload import QUERY_MESSAGE_TYPE, Query, make_query_content, parse_reply
from common.split import FederatedSplit

logger = logging.getLogger(__name__)

NO_GUARANTEE = "no formal DP guarantee"


class CanaryError(MedkdError, RuntimeError):
    """The canary audit could not run (for example the hospital refused the canary query)."""


class CanaryViolation(MedkdError, RuntimeError):
    """The empirical lower bound exceeds the ledger's ε: a mechanism or accounting bug."""


def plant_canaries(split: FederatedSplit, hospital: int, *, m: int,
                   rng: np.random.Generator) -> tuple[FederatedSplit, np.ndarray, np.ndarray, np.ndarray]:
    """A split whose hospital ``hospital`` also holds the included canaries.

    Returns ``(split, positions, labels, included)``: the canaries' proxy
    positions (m,), their assigned wrong labels (m,) and whether each was
    included (m,) bool. The proxy set and its manifest hash are unchanged.
    """
    proxy = split.proxy
    n_proxy, n_classes = len(proxy), split.data.n_classes
    if not 0 < m <= n_proxy:
        raise CanaryError(f"m must be in 1..{n_proxy} (the proxy set's size), got {m}")
    positions = np.sort(rng.choice(n_proxy, size=m, replace=False)).astype(np.int64)
    labels = (proxy.labels[positions] + rng.integers(1, n_classes, size=m)) % n_classes
    included = rng.random(m) < 0.5
    train = split.data.train
    first = len(train)
    canary_train = ImageSplit(images=np.concatenate([train.images, proxy.images[positions[included]]]),
                              labels=np.concatenate([train.labels, labels[included]]).astype(np.int64))
    tag = hashlib.sha256(split.data.sha256.encode() + positions.tobytes() + labels.tobytes()
                         + included.tobytes()).hexdigest()
    data = replace(split.data, train=canary_train, sha256=tag)
    hospital_indices = list(split.hospital_indices)
    hospital_indices[hospital] = np.concatenate([hospital_indices[hospital],
                                                 np.arange(first, first + int(included.sum()), dtype=np.int64)])
    planted = FederatedSplit(data=data, proxy_source=split.proxy_source, proxy_indices=split.proxy_indices,
                             hospital_indices=hospital_indices, proxy_hash=split.proxy_hash)
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
    """Raise :class:`CanaryViolation` (carrying ``result``) if the lower bound exceeds the ledger's upper bound."""
    lower, upper = result["eps_lower_bound"], result["eps_upper_bound"]
    if upper is not None and lower > upper + 1e-9:
        error = CanaryViolation(f"empirical ε lower bound {lower:.4f} exceeds the ledger's ε {upper:.4f} "
                                f"(δ={result['delta']:g}): the mechanism or its accounting is broken")
        error.result = result  # type: ignore[attr-defined]
        raise error


def _scratch_hospital(folder: Path, policy: Any) -> Any:
    """A fresh copy of the hospital in ``folder`` (no teacher, log or ledger from before), loaded as the ClientApp does."""
    from client.hospital import load_hospital
    from common.policy import POLICY_FILE, write_policy

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_policy(folder / POLICY_FILE, replace(policy, folder=None), comment="canary audit scratch copy")
    return load_hospital(folder / POLICY_FILE)


def run_canary_audit(policy_path: Path, *, m: int, k_plus: int, k_minus: int, runs: int = 1, seed: int = 0,
                     alpha: float = 0.05, delta: float = 1e-5, work_dir: Path, reference: bool = True) -> dict[str, Any]:
    """Run the audit ``runs`` times on the hospital whose policy is ``policy_path``; returns the JSON result.

    Raises
    ------
    CanaryViolation
        If the lower bound exceeds the ledger's ε (the result is attached as ``.result``).
    """
    from common.policy import load_policy
    from common.split import make_split

    start = time.perf_counter()
    original = load_policy(policy_path)
    rng = np.random.default_rng(seed)
    all_scores, all_included, per_run = [], [], []
    upper: float | None = None
    mechanism, ledger_delta = "none", None
    guesses = correct = 0
    for run in range(1, runs + 1):
        folder = Path(work_dir) / f"run-{run}"
        hospital = _scratch_hospital(folder, original)
        split = make_split(hospital.cfg)
        planted, positions, labels, included = plant_canaries(split, hospital.index, m=m, rng=rng)
        logger.info("canary run %d/%d: %d canaries, %d included in %s's private set", run, runs, m,
                    int(included.sum()), hospital.name)
        released = released_scores(hospital, planted, positions, labels, run_id=run)
        scores = np.log(np.maximum(released, 1e-7))
        if reference:
            twin = _scratch_hospital(Path(work_dir) / f"reference-{run}", original)
            scores = scores - np.log(np.maximum(released_scores(twin, split, positions, labels, run_id=run), 1e-7))
        r, v = abstaining_guesses(scores, included, k_plus=k_plus, k_minus=k_minus)
        guesses, correct = guesses + r, correct + v
        all_scores.append(scores)
        all_included.append(included)
        eps_run, ledger_delta, mechanism = ledger_epsilon(folder)
        upper = eps_run if upper is None or (eps_run is not None and eps_run > upper) else upper
        per_run.append({"run": run, "guesses": r, "correct": v, "included": int(included.sum()),
                        "eps_lower_bound": one_run_epsilon(m, r, v, delta=ledger_delta or delta,
                                                           significance=alpha),
                        "eps_ledger": eps_run, "mean_score_in": float(scores[included].mean()),
                        "mean_score_out": float(scores[~included].mean()),
                        "mean_released_in": float(released[included].mean()),
                        "mean_released_out": float(released[~included].mean())})
    used_delta = ledger_delta or delta
    lower = one_run_epsilon(m * runs, guesses, correct, delta=used_delta, significance=alpha)
    result: dict[str, Any] = {
        "hospital": original.hospital, "m": m, "k_plus": k_plus, "k_minus": k_minus, "runs": runs,
        "score": "log p(canary label) - log p_reference" if reference else "log p(canary label)",
        "guesses": guesses, "correct": correct, "alpha": alpha, "delta": used_delta,
        "eps_lower_bound": lower,
        "eps_lower_bound_clopper_pearson": clopper_pearson_epsilon(guesses, correct, significance=alpha)
        if runs > 1 and guesses else None,
        "eps_upper_bound": upper, "mechanism": mechanism,
        "guarantee": NO_GUARANTEE if upper is None else f"({upper:.4f}, {used_delta:g})-DP from the ledger",
        "per_run": per_run, "seconds": time.perf_counter() - start,
    }
    check_bounds(result)
    if not math.isfinite(lower):
        logger.warning("the lower bound is unbounded: every guess was right and the search passed ε = 1e4")
    return result
