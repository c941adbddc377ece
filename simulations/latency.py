"""Round latency of a deployed medkd study against a minimal Flower round, on one machine over loopback TLS.

    PYTHONPATH=. python -m simulations.latency --data-dir ../shared/data/medmnist [--hospitals 3] [--rounds 3]

Starts a coordinator and ``--hospitals`` hospitals (``medkd server start`` / ``client start``, TLS, node
authentication; teachers trained beforehand), runs a medkd study and then the minimal app in
``simulations/roundtrip_app`` (numpy echo) on the same daemons, and prints seconds per round (rounds after the
first), their ratio, and where a medkd round's extra time goes: the ClientApp process's imports, the hospital's
data split and teacher load, the answer itself, and the coordinator's distillation and evaluation. Writes
``--out/latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.loopback import REPO, Deployment

ROUNDTRIP_APP = REPO / "simulations" / "roundtrip_app"


def hospital_breakdown(folder: Path, env: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of each step a ClientApp process takes to answer one query, in a fresh process.

    CPU seconds (all threads) are what the step costs on a shared machine; wall seconds include waiting for a
    core.
    """
    code = f"""
import json, time
marks = [(time.perf_counter(), time.process_time())]
def mark():
    marks.append((time.perf_counter(), time.process_time()))
import flwr.app, flwr.clientapp
mark()
import client.app
mark()
from pathlib import Path
from client.hospital import load_hospital
from client.teacher import load_or_train_teacher
from client.serve import teacher_outputs
from common.split import make_split
h = load_hospital(Path({str(folder / 'policy.yaml')!r}))
split = make_split(h.cfg)
mark()
teacher, info = load_or_train_teacher(cfg=h.cfg, split=split, hospital=h.index, hospital_dir=h.folder)
mark()
import numpy as np
images = split.proxy_on(next(teacher.parameters()).device).take(np.arange(135))
out = teacher_outputs(teacher, images, output=h.cfg.query.output, temperature=2.0, amp=False)
mark()
names = ["import flwr", "import medkd ClientApp (torch, ...)", "policy + data split", "teacher load",
         "answer 135 samples"]
print(json.dumps({{n: (b[0] - a[0], b[1] - a[1]) for n, a, b in zip(names, marks, marks[1:])}}))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                          cwd=REPO)
    return {k: tuple(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _python_start(env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of starting and ending an empty Python process (what every fresh ClientApp pays)."""
    start, cpu = time.perf_counter(), os.times()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, capture_output=True, cwd=REPO)
    after = os.times()
    return time.perf_counter() - start, (after.children_user + after.children_system
                                         - cpu.children_user - cpu.children_system)


def run(*, data_dir: Path, hospitals: int, rounds: int, out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    dep = Deployment(root=Path(tempfile.mkdtemp(prefix="medkd-latency-")), data_dir=data_dir)
    try:
        dep.federation(hospitals=hospitals, train_teachers=True, overrides=(f"federation.hospitals={hospitals}",))
        study = dep.run_study(dep.root / "study", f"rounds={rounds}", f"federation.hospitals={hospitals}")
        if study.returncode != 0:
            raise RuntimeError(study.stdout[-3000:] + study.stderr[-3000:])
        doc_rounds = dep.metrics(dep.root / "study")["rounds"]
        medkd_rounds = [r["seconds"] for r in doc_rounds]
        query_rounds = [r["query_seconds"] for r in doc_rounds]
        load_during = os.getloadavg()
        trip = dep.root / "roundtrip.json"
        env = {**dep.env(), "FLWR_HOME": str(dep.coordinator / "flwr-home")}
        done = subprocess.run(["flwr", "run", str(ROUNDTRIP_APP), "medkd", "--stream", "--run-config",
                               f'rounds={rounds} nodes={hospitals} out="{trip}"'], env=env, capture_output=True,
                              text=True, timeout=900)
        if not trip.exists():
            raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
        minimal_rounds = json.loads(trip.read_text())["seconds_per_round"]
        steps = {"python start": _python_start(dep.env()), **hospital_breakdown(dep.root / "H0", dep.env())}
    finally:
        dep.close()
    medkd_s = statistics.mean(medkd_rounds[1:] or medkd_rounds)
    query_s = statistics.mean(query_rounds[1:] or query_rounds)
    minimal_s = statistics.mean(minimal_rounds[1:] or minimal_rounds)
    result = {"hospitals": hospitals, "rounds": rounds, "medkd_seconds_per_round": medkd_rounds,
              "medkd_query_seconds_per_round": query_rounds, "minimal_seconds_per_round": minimal_rounds,
              "medkd_mean_s": medkd_s, "medkd_query_mean_s": query_s, "coordinator_mean_s": medkd_s - query_s,
              "minimal_mean_s": minimal_s, "ratio": medkd_s / minimal_s,
              "clientapp_steps_s": {k: {"wall": w, "cpu": c} for k, (w, c) in steps.items()},
              "load_average_after_medkd_study": load_during, "load_average_at_end": os.getloadavg(),
              "cpus": os.cpu_count()}
    (out / "latency.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding retinamnist.npz")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs") / "latency")
    args = parser.parse_args(argv)
    r = run(data_dir=args.data_dir.resolve(), hospitals=args.hospitals, rounds=args.rounds, out=args.out)
    rounds_text = ", ".join(f"{s:.1f}" for s in r["medkd_seconds_per_round"])
    print(f"medkd round    {r['medkd_mean_s']:6.2f} s  (rounds after the first; all rounds: {rounds_text})")
    print(f"  hospitals' part (queries out until the last reply)  {r['medkd_query_mean_s']:6.2f} s")
    print(f"  coordinator's part (aggregate, distil, validate)    {r['coordinator_mean_s']:6.2f} s")
    print(f"minimal round  {r['minimal_mean_s']:6.2f} s  (all rounds: "
          f"{', '.join(f'{s:.2f}' for s in r['minimal_seconds_per_round'])})")
    print(f"ratio {r['ratio']:.1f}x  ({r['hospitals']} hospitals on {r['cpus']} CPUs; load average "
          f"{r['load_average_after_medkd_study'][0]:.1f} after the medkd study, "
          f"{r['load_average_at_end'][0]:.1f} at the end)")
    print("one medkd ClientApp process answering a query, step by step (a fresh process):")
    print(f"  {'step':<40} {'wall s':>7} {'CPU s':>7}")
    for step, t in r["clientapp_steps_s"].items():
        print(f"  {step:<40} {t['wall']:7.2f} {t['cpu']:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
