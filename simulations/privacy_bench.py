"""What differential privacy costs the student: test AUC at ε ∈ {1, 2, 4, 8} against no DP, over seeds.

    python -m simulations.privacy_bench [--studies dp_sgd pate] [--epsilons 1 2 4 8] [--seeds 0 1 2]
                                        [--out runs/privacy] [--jobs 2] [--only-report]

Two studies, each run through ``medkd bench`` (so runs are keyed by their
resolved config, resumable and parallel; every DP variant has hospital
folders, teachers and ledgers of its own):

``dp_sgd``
    The default experiment (RetinaMNIST, 5 hospitals, Dirichlet α = 0.5)
    with ``privacy.mechanism: dp_sgd_teacher``: each hospital's teacher is
    trained once with DP-SGD calibrated to ε (δ = 1e-5, record-level) and
    answers for free afterwards. Selectors are off (their outputs are not
    covered by DP-SGD), so the aggregator is ``era``; the no-DP row runs the
    same recipe.
``pate``
    The PneumoniaMNIST copy, 4 hospitals, iid (about 780 private images
    each), ``privacy.mechanism: pate`` with 20 disjoint teachers per hospital
    and noisy vote histograms. A hospital's ε is spent per answered proxy
    sample, so the study answers few samples: 4 rounds x 32 new samples =
    128 answers per hospital, and the per-answer noise multiplier is
    calibrated (PLD, data-independent bound) so that the 128 answers spend
    exactly ε. The no-DP row runs the same recipe with ordinary teachers.

Writes ``<out>/<study>/bench.*`` (the bench's own report) and
``<out>/privacy.md`` / ``privacy.json``: per study and ε, mean ± std test
AUC over seeds, per-seed values and the loss against no DP.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.accounting import gaussian_noise_for_epsilon
from common.atomic import atomic_write_json, atomic_write_text
from simulations.bench import main as bench_main

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
PATE_ROUNDS, PATE_BATCH, PATE_PARTITIONS = 4, 32, 20
# Both studies compare a DP mechanism with the same recipe without it. A DP-SGD teacher is one network, so the
# no-DP row trains one network too; T = 2 is the recipe the README's privacy table was measured with.
SAME_RECIPE = ["teacher.ensemble=1", "distill.temperature=2.0"]


def _study_args(study: str, epsilons: list[float]) -> tuple[list[str], list[str], list[str]]:
    """(bench arguments before the variants, variant specs, variant names in table order)."""
    if study == "dp_sgd":
        base = ["--config", str(ROOT / "configs" / "retinamnist_5sites.yaml"), "--partitions", "0.5",
                "--set", "aggregator=era", "selector.kind=none", *SAME_RECIPE]
        variants = ["no-dp=fedkd:policy.privacy.mechanism=none"]
        for eps in epsilons:
            variants.append(f"dp-sgd-eps{eps:g}=fedkd:policy.privacy.mechanism=dp_sgd_teacher,"
                            f"policy.privacy.target_epsilon={eps:g},policy.privacy.budget_epsilon={eps * 1.001:g},"
                            f"policy.privacy.delta={DELTA:g}")
    elif study == "pate":
        answers = PATE_ROUNDS * PATE_BATCH
        base = ["--config", str(ROOT / "configs" / "pneumonia_imbalanced.yaml"), "--partitions", "iid",
                "--set", "aggregator=mean", "selector.kind=none", f"rounds={PATE_ROUNDS}",
                f"distill.proxy_batch={PATE_BATCH}", "distill.epochs=30", *SAME_RECIPE]
        variants = ["no-dp=fedkd:policy.privacy.mechanism=none"]
        for eps in epsilons:
            z = gaussian_noise_for_epsilon(eps, DELTA, answers, tol=1e-4)
            variants.append(f"pate-eps{eps:g}=fedkd:policy.privacy.mechanism=pate,"
                            f"policy.privacy.partitions={PATE_PARTITIONS},policy.privacy.noise_multiplier={z:.6f},"
                            f"policy.privacy.budget_epsilon={eps * 1.001:g},policy.privacy.delta={DELTA:g}")
    else:
        raise ValueError(f"unknown study {study!r}; expected dp_sgd or pate")
    names = [spec.split("=", 1)[0] for spec in variants]
    return base, variants, names


def _table(study: str, rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    by_name = {row["variant"]: row for row in rows}
    reference = by_name.get("no-dp")
    out = []
    for name in names:
        row = by_name.get(name)
        if row is None:
            continue
        loss = None if reference is None else reference["test_auc_mean"] - row["test_auc_mean"]
        out.append({"study": study, "variant": name, "n_seeds": row["n_seeds"], "test_auc_mean": row["test_auc_mean"],
                    "test_auc_std": row["test_auc_std"], "per_seed": row["per_seed"], "loss_vs_no_dp": loss})
    return out


def _markdown(tables: list[dict[str, Any]], command: str) -> str:
    lines = ["| study | variant | seeds | test AUC mean ± std | per seed | AUC points lost vs no DP |",
             "|---|---|---|---|---|---|"]
    for r in tables:
        per_seed = ", ".join(f"{x:.4f}" for x in r["per_seed"])
        loss = "—" if r["loss_vs_no_dp"] is None or r["variant"] == "no-dp" else f"{100 * r['loss_vs_no_dp']:.1f}"
        lines.append(f"| {r['study']} | {r['variant']} | {r['n_seeds']} | {r['test_auc_mean']:.4f} ± "
                     f"{r['test_auc_std']:.4f} | {per_seed} | {loss} |")
    lines.append("")
    lines.append(f"δ = {DELTA:g} everywhere. dp_sgd: RetinaMNIST, 5 hospitals, Dirichlet α = 0.5, record-level "
                 "(add/remove one training image), ε of the one DP-SGD training per hospital. pate: PneumoniaMNIST "
                 f"copy, 4 hospitals iid, {PATE_PARTITIONS} disjoint teachers per hospital, "
                 f"{PATE_ROUNDS * PATE_BATCH} answers per hospital, record-level, data-independent Gaussian bound. "
                 "ε from dp-accounting PLD.")
    lines.append("")
    lines.append(f"Command: `{command}`")
    return "\n".join(lines) + "\n"


def _pate_diagnostic(study_dir: Path) -> dict[str, Any] | None:
    """What the PATE teachers know before noise (simulations/pate_votes.py), over every PATE hospital folder."""
    from simulations.pate_votes import vote_report

    import yaml

    reports, seen = [], set()
    for policy in sorted(study_dir.glob("hospitals/*/H*/policy.yaml")):
        # every ε trains the same teachers (same data, seed and recipe; only the noise differs): one folder each
        key = (yaml.safe_load(policy.read_text())["share"]["seed"], policy.parent.name)
        if (policy.parent / "pate" / "teachers.pt").exists() and key not in seen:
            seen.add(key)
            reports.append(vote_report(policy.parent))
    if not reports:
        return None
    teachers = sum(r["teachers"] for r in reports)
    constant = sum(r["teachers_with_one_class_for_every_input"] for r in reports)
    aucs = [r["proxy_auc_of_noiseless_vote_share"] for r in reports if "proxy_auc_of_noiseless_vote_share" in r]
    text = (f"PATE teachers before noise (`python -m simulations.pate_votes`, {len(reports)} hospital folders: one per "
            f"seed and hospital, "
            f"{teachers} teachers of about {reports[0]['records_per_teacher']:g} records each): {constant} of "
            f"{teachers} predict one class for every proxy sample")
    if aucs:
        text += (f"; AUC of the noiseless vote share on the proxy labels {np.mean(aucs):.3f} "
                 f"(min {min(aucs):.3f}, max {max(aucs):.3f})")
    return {"hospitals": len(reports), "teachers": teachers, "constant": constant, "vote_auc": aucs,
            "text": text + "."}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.privacy_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", default=["dp_sgd", "pate"], choices=["dp_sgd", "pate"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/privacy"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only-report", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tables: list[dict[str, Any]] = []
    status = 0
    for study in args.studies:
        base, variants, names = _study_args(study, args.epsilons)
        bench_args = [*base, "--seeds", *map(str, args.seeds), "--out", str(args.out / study), "--jobs",
                      str(args.jobs), "--methods", *names]
        for spec in variants:
            bench_args += ["--variant", spec]
        if args.only_report:
            bench_args.append("--only-report")
        status = max(status, bench_main(bench_args, prog="python -m simulations.bench"))
        rows = json.loads((args.out / study / "bench.json").read_text())["summary"]
        tables.extend(_table(study, rows, names))
    command = "python -m simulations.privacy_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    text = _markdown(tables, command)
    diagnostic = _pate_diagnostic(args.out / "pate") if "pate" in args.studies else None
    if diagnostic:
        text += "\n" + diagnostic["text"] + "\n"
    atomic_write_text(args.out / "privacy.md", text)
    atomic_write_json(args.out / "privacy.json", {"delta": DELTA, "rows": tables,
                                                  "mean": {r["variant"]: r["test_auc_mean"] for r in tables},
                                                  "pate_teachers": diagnostic})
    sys.stdout.write(text)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
