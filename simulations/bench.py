"""Side-by-side comparison of FedKD and the baselines over several seeds, in one run.

    python -m simulations.bench --seeds 0 1 2 --out runs/bench [--config FILE] [--set k=v ...]

For each seed it runs, on identical splits: ``fedkd`` with each aggregator in
``--aggregators`` (default mean and era; they share the seed's teachers),
``fedavg``, ``centralized`` and ``local`` — each as its own ``medkd
simulate`` process, so every Flower simulation starts clean. It then writes
``<out>/bench.md`` and ``<out>/bench.json``: test AUC mean +- std per method,
and uplink bytes per hospital per round for FedKD vs FedAvg with their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json, atomic_write_text

logger = logging.getLogger("medkd.bench")


def _run(label: str, args: list[str], out: Path) -> dict[str, Any]:
    metrics = out / "metrics.json"
    if metrics.exists() and json.loads(metrics.read_text()).get("final"):
        logger.info("%s: already done in %s", label, out)
    else:
        start = time.perf_counter()
        logger.info("%s: running", label)
        cmd = [sys.executable, "-m", "simulations.cli", "simulate", *args, "--out", str(out)]
        with open(out.parent / f"{out.name}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed (exit {proc.returncode}); see {out.parent / (out.name + '.log')}")
        logger.info("%s: done in %.0f s", label, time.perf_counter() - start)
    return json.loads(metrics.read_text())


def _uplink_per_hospital_round(doc: dict[str, Any]) -> float:
    values = [b for r in doc["rounds"] for b in r["bytes_up"].values()]
    return statistics.fmean(values) if values else 0.0


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} +- {statistics.stdev(values):.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--aggregators", nargs="+", default=["mean", "era"])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    base = (["--config", str(args.config)] if args.config else []) + (["--set", *args.overrides] if args.overrides else [])
    rows: dict[str, dict[str, list[float]]] = {}
    uplink: dict[str, list[float]] = {"fedkd": [], "fedavg": []}

    def add(name: str, key: str, value: float) -> None:
        rows.setdefault(name, {}).setdefault(key, []).append(value)

    for seed in args.seeds:
        seed_dir = args.out / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        hospitals = ["--hospitals-dir", str(seed_dir / "hospitals")]
        for agg in args.aggregators:
            doc = _run(f"seed {seed} fedkd/{agg}", [*base, "--method", "fedkd", "--set", f"seed={seed}",
                                                     f"aggregator={agg}", *hospitals], seed_dir / f"fedkd-{agg}")
            add(f"fedkd ({agg})", "auc", doc["final"]["test_auc"])
            add(f"fedkd ({agg})", "seconds", doc["final"]["seconds"])
            uplink["fedkd"].append(_uplink_per_hospital_round(doc))
        for method in ("fedavg", "centralized", "local"):
            doc = _run(f"seed {seed} {method}", [*base, "--method", method, "--set", f"seed={seed}", *hospitals],
                       seed_dir / method)
            if method == "local":
                add("local (mean hospital)", "auc", doc["final"]["test_auc"])
                add("local (best hospital)", "auc", doc["final"]["best_test_auc"])
            else:
                add(method, "auc", doc["final"]["test_auc"])
                add(method, "seconds", doc["final"]["seconds"])
            if method == "fedavg":
                uplink["fedavg"].append(_uplink_per_hospital_round(doc))

    fedkd_up, fedavg_up = statistics.fmean(uplink["fedkd"]), statistics.fmean(uplink["fedavg"])
    lines = [f"# medkd benchmark: seeds {args.seeds}", "",
             "| method | test AUC (mean +- std) | runs |", "|---|---|---|"]
    for name, values in rows.items():
        lines.append(f"| {name} | {_fmt(values['auc'])} | {len(values['auc'])} |")
    lines += ["", "| uplink bytes per hospital per round | bytes |", "|---|---|",
              f"| fedkd | {fedkd_up:,.0f} |", f"| fedavg | {fedavg_up:,.0f} |",
              f"| ratio fedavg / fedkd | {fedavg_up / fedkd_up:,.1f}x |", "",
              "privacy: no formal DP guarantee (no DP mechanism was enabled in these runs)"]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "bench.md", text)
    atomic_write_json(args.out / "bench.json", {"seeds": args.seeds, "results": rows, "uplink": uplink,
                                                "uplink_ratio": fedavg_up / fedkd_up})
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
