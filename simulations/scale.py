"""Scale benchmark: seconds per round and memory for 10, 100, 1000 simulated hospitals on one machine.

``python -m simulations.scale [--hospitals 10 100 1000] [--rounds 3] [--out runs/scale] [--source NPZ]``

For each federation size, in a fresh child process:

1. a MedMNIST-format set large enough for the largest federation is tiled
   from a real one (``--source``, default the PneumoniaMNIST copy in
   ``$MEDKD_DATA``; :func:`simulations.synthetic.tile_dataset`), once;
2. every hospital's policy is written and its teacher trained in-process
   (timed, and reported apart: teacher training is not part of a round);
3. ``medkd simulate`` runs ``--rounds`` FedKD rounds (smallcnn, 28 px, iid,
   CPU) through Flower's simulation engine.

The parent samples the resident memory of the child's whole process tree
(Ray's workers included) every 0.2 s. It prints one table: teacher
training seconds, seconds per round (mean of rounds 2.., as the server
measured them), peak RSS, and the marginal cost per extra hospital between
consecutive sizes, in seconds per round and in MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.processes import tree_rss_bytes

MIN_SAMPLES = 12  # private images per hospital at the smallest
PROXY_FRACTION, PROXY_BATCH = 0.05, 64  # every round asks PROXY_BATCH proxy samples not asked before


def _child(hospitals: int, *, rounds: int, data: Path, workdir: Path, result: Path, in_flight: int) -> None:
    """One federation size: pretrain teachers (timed), then simulate ``rounds`` rounds; write a JSON result."""
    import logging

    from client.hospital import load_hospital
    from client.teacher import load_or_train_teacher
    from common.config import build_config
    from common.split import make_split
    from simulations.run import prepare_hospitals, simulate

    logging.basicConfig(level=logging.WARNING)
    raw = {
        "seed": 0, "rounds": rounds, "aggregator": "mean", "selector": {"kind": "none"},  # the figures' recipe
        "data": {"dataset": str(data), "download": False, "proxy_fraction": PROXY_FRACTION, "max_test_samples": 256},
        "federation": {"hospitals": hospitals, "partition": "iid", "min_samples": MIN_SAMPLES,
                       "wait_for_nodes_s": 600, "reply_timeout_s": 3600, **({"max_in_flight": in_flight}
                                                                              if in_flight else {})},
        "teacher": {"model": "smallcnn", "epochs": 3, "patience": 3, "ensemble": 1},  # one network per hospital
        "student": {"model": "smallcnn"},
        "distill": {"proxy_batch": PROXY_BATCH, "epochs": 1},
    }
    cfg = build_config(raw, source=f"scale-{hospitals}")
    hospitals_dir = workdir / "hospitals"
    prepare_hospitals(cfg, hospitals_dir)
    start = time.perf_counter()
    for index in range(hospitals):
        hospital = load_hospital(hospitals_dir / f"H{index}" / "policy.yaml")
        load_or_train_teacher(cfg=hospital.cfg, split=make_split(hospital.cfg), hospital=hospital.index,
                              hospital_dir=hospital.folder)
    teacher_s = time.perf_counter() - start
    start = time.perf_counter()
    simulate(cfg, out_dir=workdir / "run", hospitals_dir=hospitals_dir)
    wall_s = time.perf_counter() - start
    doc = json.loads((workdir / "run" / "metrics.json").read_text())
    seconds = [r["seconds"] for r in doc["rounds"]]
    result.write_text(json.dumps({"hospitals": hospitals, "teacher_training_s": teacher_s, "simulate_wall_s": wall_s,
                                  "round_seconds": seconds,
                                  "replies_ok": [r["replies_ok"] for r in doc["rounds"]]}))


def measure(hospitals: int, *, rounds: int, data: Path, workdir: Path, in_flight: int) -> dict[str, Any]:
    """Run one size in a child process and sample its process tree's memory."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / "result.json"
    cmd = [sys.executable, "-m", "simulations.scale", "--child", str(hospitals), "--rounds", str(rounds),
           "--data", str(data), "--workdir", str(workdir), "--max-in-flight", str(in_flight)]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(workdir / "child.log", "w"))
    peak = {"bytes": 0}

    def sample() -> None:
        while child.poll() is None:
            peak["bytes"] = max(peak["bytes"], tree_rss_bytes([child.pid]))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    sampler.join()
    if code != 0 or not result.exists():
        raise RuntimeError(f"{hospitals} hospitals: the run failed (exit {code}); see {workdir / 'child.log'}")
    doc = json.loads(result.read_text())
    later = doc["round_seconds"][1:] or doc["round_seconds"]
    doc["seconds_per_round"] = sum(later) / len(later)
    doc["peak_rss_mb"] = peak["bytes"] / 2**20
    return doc


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| hospitals | teacher training (s, apart) | seconds per round (rounds 2..) | peak RSS, process tree (MB) "
             "| marginal s per hospital per round | marginal MB per hospital |",
             "|---|---|---|---|---|---|"]
    previous = None
    for row in rows:
        marginal_s = marginal_mb = "—"
        if previous is not None:
            extra = row["hospitals"] - previous["hospitals"]
            marginal_s = f"{(row['seconds_per_round'] - previous['seconds_per_round']) / extra * 1000:.1f} ms"
            marginal_mb = f"{(row['peak_rss_mb'] - previous['peak_rss_mb']) / extra:.2f}"
        lines.append(f"| {row['hospitals']} | {row['teacher_training_s']:.1f} | {row['seconds_per_round']:.2f} "
                     f"({', '.join(f'{s:.2f}' for s in row['round_seconds'])}) | {row['peak_rss_mb']:.0f} | "
                     f"{marginal_s} | {marginal_mb} |")
        previous = row
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--source", type=Path, default=None,
                        help="real MedMNIST .npz to tile (default: pneumoniamnist_kaggle.npz in $MEDKD_DATA)")
    parser.add_argument("--max-in-flight", type=int, default=8,
                        help="federation.max_in_flight of the runs (0: all hospitals at once; default 8)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, rounds=args.rounds, data=args.data, workdir=args.workdir,
               result=args.workdir / "result.json", in_flight=args.max_in_flight)
        return 0

    from simulations.synthetic import tile_dataset

    source = args.source or Path(os.environ.get("MEDKD_DATA", "~/.local/share/medkd")).expanduser() / \
        "pneumoniamnist_kaggle.npz"
    if not source.is_file():
        print(f"scale: source data set {source} not found (set MEDKD_DATA or --source)", file=sys.stderr)
        return 1
    biggest = max(args.hospitals)
    data = args.out / f"tiled-{biggest}.npz"
    if not data.exists():
        enough_proxy = int(args.rounds * PROXY_BATCH / PROXY_FRACTION)  # new proxy samples for every round
        tile_dataset(source, data, n_train=max(int(biggest * MIN_SAMPLES * 1.5 / 0.95), enough_proxy) + 64)
    rows = []
    for hospitals in sorted(args.hospitals):
        print(f"scale: {hospitals} hospitals ...", file=sys.stderr, flush=True)
        rows.append(measure(hospitals, rounds=args.rounds, data=data, workdir=args.out / f"h{hospitals}",
                            in_flight=args.max_in_flight))
        print(table(rows), file=sys.stderr, flush=True)
    text = table(rows)
    (args.out / "scale.md").write_text(text + "\n")
    (args.out / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
