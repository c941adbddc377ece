"""Tables, plots and confidence intervals of a ``medkd bench`` grid (see :mod:`simulations.bench`).

Everything here reads finished runs' ``metrics.json`` files and writes
``bench.csv``, ``bench.md``, ``bench.json``, ``auc_per_round.png`` and
``auc_vs_uplink.png`` into the bench folder. Nothing here runs training.

The 95 % interval of a mean over n seeds is the Student-t interval
``mean ± t(0.975, n-1) · std / sqrt(n)`` (std with n-1 in the denominator);
``t`` comes from a hard-coded table for df 1..30 and the normal 1.96 above,
so no scipy is needed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

PRIVACY_LINE = "privacy: no formal DP guarantee (no DP mechanism was enabled in these runs)"


def privacy_line(records: Sequence[RunRecord]) -> str:
    """The grid's privacy statement: no formal DP guarantee, unless some run's hospitals used a mechanism."""
    dp = sorted({r.variant for r in records if r.metrics and any(
        "epsilon" in h for h in (r.metrics.get("privacy_summary") or {}).values())})
    if not dp:
        return PRIVACY_LINE
    return (f"privacy: differential privacy in variants {', '.join(dp)} (each hospital's ε in its run's "
            f"metrics.json, privacy_summary); no formal DP guarantee in the others")
CSV_COLUMNS = ("variant", "method", "partition", "n_seeds", "test_auc_mean", "test_auc_std", "ci95_low", "ci95_high",
               "val_auc_mean", "uplink_bytes_per_hospital_round", "per_seed")
FEDERATED = ("fedkd", "fedavg")
# Two-sided 95 % Student-t critical values t(0.975, df) for df = 1..30.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.96


def t_critical_95(df: int) -> float:
    """t(0.975, df): the multiplier of the standard error for a two-sided 95 % interval."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T_975[df - 1] if df <= len(T_975) else Z_975


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values with sample std and 95 % interval (None when n < 2)."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample standard deviation and Student-t 95 % interval of the mean of ``values``."""
    if not values:
        raise ValueError("cannot summarize an empty list of values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Summary(n=1, mean=mean, std=None, ci_low=None, ci_high=None)
    std = statistics.stdev(values)
    half = t_critical_95(len(values) - 1) * std / math.sqrt(len(values))
    return Summary(n=len(values), mean=mean, std=std, ci_low=mean - half, ci_high=mean + half)


@dataclass(frozen=True)
class RunRecord:
    """One grid cell and what its run left behind (``metrics`` is None unless it finished)."""

    variant: str
    method: str
    partition: str
    seed: int
    run_hash: str
    run_dir: Path
    hospitals_dir: Path
    status: str  # done | reused | failed | missing
    metrics: dict[str, Any] | None


def read_finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``metrics.json`` if it exists, parses and has a non-null ``final``; else None."""
    try:
        doc = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("final") is not None else None


def uplink_per_hospital_round(metrics: dict[str, Any]) -> float | None:
    """Mean over rounds and hospitals of ``bytes_up``; None when no bytes went up."""
    values = [b for r in metrics.get("rounds", []) for b in (r.get("bytes_up") or {}).values()]
    return statistics.fmean(values) if values else None


def _cumulative_uplink(metrics: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(round, cumulative mean bytes up per hospital, test AUC) for each round."""
    points, total = [], 0.0
    for r in metrics.get("rounds", []):
        ups = list((r.get("bytes_up") or {}).values())
        total += statistics.fmean(ups) if ups else 0.0
        points.append((int(r["round"]), total, float(r["test_auc"])))
    return points


def _mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summary_rows(records: Sequence[RunRecord], *, variants: Sequence[str],
                 partitions: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (variant, partition) with finished runs, plus ``<local variant>-best`` and ``-aggregate`` rows.

    ``-best``: the hospital chosen on validation (its validation AUC in the val column). ``-aggregate``: the
    teachers' aggregate evaluated directly, the student's ceiling (:mod:`simulations.ceiling`).
    """
    rows = []
    for variant in variants:
        for partition in partitions:
            cell = sorted((r for r in records if r.variant == variant and r.partition == partition
                           and r.metrics is not None), key=lambda r: r.seed)
            if not cell:
                continue
            method = cell[0].method
            finals = [r.metrics["final"] for r in cell]  # type: ignore[index]
            federated = method in FEDERATED
            uplinks = [u for r in cell if (u := uplink_per_hospital_round(r.metrics or {})) is not None]
            rows.append(_row(variant, method, partition, [float(f["test_auc"]) for f in finals],
                             val=[float(f["val_auc"]) for f in finals if f.get("val_auc") is not None],
                             uplink=_mean_or_none(uplinks) if federated else None))
            if method == "local":
                best = [f for f in finals if f.get("best_test_auc") is not None]
                if best:
                    rows.append(_row(f"{variant}-best", method, partition, [float(f["best_test_auc"]) for f in best],
                                     val=[float(f["best_val_auc"]) for f in best if f.get("best_val_auc") is not None],
                                     uplink=None))
                fused = [f for f in finals if f.get("aggregate_test_auc") is not None]
                if fused:
                    rows.append(_row(f"{variant}-aggregate", method, partition,
                                     [float(f["aggregate_test_auc"]) for f in fused],
                                     val=[float(f["aggregate_val_auc"]) for f in fused], uplink=None))
    return rows


def _row(variant: str, method: str, partition: str, aucs: list[float], *, val: list[float],
         uplink: float | None) -> dict[str, Any]:
    s = summarize(aucs)
    return {"variant": variant, "method": method, "partition": partition, "n_seeds": s.n,
            "test_auc_mean": s.mean, "test_auc_std": s.std, "ci95_low": s.ci_low, "ci95_high": s.ci_high,
            "val_auc_mean": _mean_or_none(val), "uplink_bytes_per_hospital_round": uplink, "per_seed": aucs}


def uplink_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{fedkd variant: {partition: fedavg uplink / that variant's uplink}}`` (first fedavg variant)."""
    fedavg = {}
    for row in rows:
        if row["method"] == "fedavg" and row["uplink_bytes_per_hospital_round"]:
            fedavg.setdefault(row["partition"], row["uplink_bytes_per_hospital_round"])
    ratios: dict[str, dict[str, float]] = {}
    for row in rows:
        up = row["uplink_bytes_per_hospital_round"]
        if row["method"] == "fedkd" and up and row["partition"] in fedavg:
            ratios.setdefault(row["variant"], {})[row["partition"]] = fedavg[row["partition"]] / up
    return ratios


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """``bench.csv``: AUCs with 6 decimals, bytes with 1, per-seed AUCs joined by ``;`` in seed order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["variant"], r["method"], r["partition"], r["n_seeds"], _num(r["test_auc_mean"], 6),
                         _num(r["test_auc_std"], 6), _num(r["ci95_low"], 6), _num(r["ci95_high"], 6),
                         _num(r["val_auc_mean"], 6), _num(r["uplink_bytes_per_hospital_round"], 1),
                         ";".join(f"{a:.6f}" for a in r["per_seed"])])
    return buf.getvalue()


def format_auc(row: dict[str, Any]) -> str:
    """``0.7204 ± 0.0123 [0.69, 0.75]`` (mean ± std [95 % CI]); just the mean for a single seed."""
    if row["test_auc_std"] is None:
        return f"{row['test_auc_mean']:.4f}"
    return f"{row['test_auc_mean']:.4f} ± {row['test_auc_std']:.4f} [{row['ci95_low']:.2f}, {row['ci95_high']:.2f}]"


def markdown_text(rows: Sequence[dict[str, Any]], *, records: Sequence[RunRecord], command: str) -> str:
    """``bench.md``: the table, uplink ratios, unfinished runs, the privacy line and the command."""
    header = ("| variant | method | partition | seeds | test AUC: mean ± std [95% CI] | val AUC "
              "| uplink B/hospital/round |")
    lines = ["# medkd benchmark", "", header,
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        up = r["uplink_bytes_per_hospital_round"]
        lines.append(f"| {r['variant']} | {r['method']} | {r['partition']} | {r['n_seeds']} | {format_auc(r)} | "
                     f"{_num(r['val_auc_mean'], 4)} | {'' if up is None else f'{up:,.0f}'} |")
    lines.append("")
    ratios = uplink_ratios(rows)
    for variant, by_partition in ratios.items():
        parts = ", ".join(f"{p} {ratio:,.1f}x" for p, ratio in by_partition.items())
        lines.append(f"uplink bytes per hospital per round, fedavg / {variant}: {parts}")
    if not ratios:
        lines.append("uplink ratio fedavg / fedkd: n/a (needs finished fedavg and fedkd runs)")
    unfinished = [r for r in records if r.metrics is None]
    for r in unfinished:
        lines.append(f"not finished: {r.variant} {r.partition} seed {r.seed} ({r.status}; see {r.run_dir / 'log.txt'})")
    lines += ["", privacy_line(records), "", f"command: `{command}`"]
    return "\n".join(lines) + "\n"


def _mean_curves(records: Sequence[RunRecord], variant: str, partition: str) -> list[tuple[int, float, float]]:
    """(round, mean cumulative uplink per hospital, mean test AUC) over the seeds of one cell."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        if r.variant == variant and r.partition == partition and r.metrics is not None:
            for rnd, up, auc in _cumulative_uplink(r.metrics):
                by_round.setdefault(rnd, []).append((up, auc))
    return [(rnd, statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts))
            for rnd, pts in sorted(by_round.items())]


def _plot(path: Path, records: Sequence[RunRecord], *, variants: Sequence[str], partitions: Sequence[str],
          uplink_x: bool) -> None:
    from matplotlib.figure import Figure  # Figure + savefig uses the Agg canvas; no pyplot global state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(3.6 * max(1, len(partitions)), 3.2))
    axes = fig.subplots(1, max(1, len(partitions)), squeeze=False, sharey=True)[0]
    methods = {r.variant: r.method for r in records}
    for ax, partition in zip(axes, partitions):
        drawn = False
        for variant in variants:
            if methods.get(variant) not in FEDERATED:
                continue
            curve = _mean_curves(records, variant, partition)
            if uplink_x:
                curve = [c for c in curve if c[1] > 0]
            if curve:
                xs = [c[1] if uplink_x else c[0] for c in curve]
                ax.plot(xs, [c[2] for c in curve], marker="o", markersize=3, label=variant)
                drawn = True
        ax.set_title(f"partition {partition}", fontsize=9)
        ax.set_xlabel("cumulative uplink bytes per hospital" if uplink_x else "round", fontsize=8)
        if uplink_x and drawn:
            ax.set_xscale("log")
        elif not uplink_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished fedkd/fedavg runs", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("test AUC (mean over seeds)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(path, buf.getvalue())


def write_report(out: Path, records: Sequence[RunRecord], *, variants: Sequence[str], partitions: Sequence[str],
                 command: str) -> list[dict[str, Any]]:
    """Write bench.csv, bench.md, bench.json and the two PNG plots into ``out``; return the summary rows."""
    rows = summary_rows(records, variants=variants, partitions=partitions)
    atomic_write_text(out / "bench.csv", csv_text(rows))
    atomic_write_text(out / "bench.md", markdown_text(rows, records=records, command=command))
    atomic_write_json(out / "bench.json", {
        "command": command, "privacy": privacy_line(records), "variants": list(variants),
        "partitions": list(partitions),
        "summary": rows, "uplink_ratio_fedavg_over": uplink_ratios(rows),
        "runs": [{"variant": r.variant, "method": r.method, "partition": r.partition, "seed": r.seed,
                  "hash": r.run_hash, "run_dir": str(r.run_dir), "hospitals_dir": str(r.hospitals_dir),
                  "status": r.status, "final": r.metrics["final"] if r.metrics else None} for r in records],
    })
    _plot(out / "auc_per_round.png", records, variants=variants, partitions=partitions, uplink_x=False)
    _plot(out / "auc_vs_uplink.png", records, variants=variants, partitions=partitions, uplink_x=True)
    return rows
