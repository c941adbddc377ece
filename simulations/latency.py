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


def _timed_python(code: str, env: dict[str, str]) -> float:
    """Wall seconds of a fresh ``python -c code`` (what a fresh ClientApp process pays)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def hospital_breakdown(folder: Path, env: dict[str, str]) -> dict[str, float]:
    """Seconds for each step a ClientApp process takes to answer one query, measured in a fresh process."""
    code = f"""
import json, time
t0 = time.perf_counter()
import flwr.app, flwr.clientapp
t1 = time.perf_counter()
import client.app
t2 = time.perf_counter()
from pathlib import Path
from client.hospital import load_hospital
from client.teacher import load_or_train_teacher
from client.serve import teacher_outputs
from common.split import make_split
h = load_hospital(Path({str(folder / 'policy.yaml')!r}))
split = make_split(h.cfg)
t3 = time.perf_counter()
teacher, info = load_or_train_teacher(cfg=h.cfg, split=split, hospital=h.index, hospital_dir=h.folder)
t4 = time.perf_counter()
import numpy as np
images = split.proxy_on(next(teacher.parameters()).device).take(np.arange(135))
out = teacher_outputs(teacher, images, output=h.cfg.query.output, temperature=2.0, amp=False)
t5 = time.perf_counter()
print(json.dumps({{"import flwr": t1 - t0, "import medkd ClientApp (torch, ...)": t2 - t1,
                   "policy + data split": t3 - t2, "teacher load": t4 - t3, "answer 135 samples": t5 - t4}}))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                          cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(*, data_dir: Path, hospitals: int, rounds: int, out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    dep = Deployment(root=Path(tempfile.mkdtemp(prefix="medkd-latency-")), data_dir=data_dir)
    try:
        dep.federation(hospitals=hospitals, train_teachers=True, overrides=(f"federation.hospitals={hospitals}",))
        study = dep.run_study(dep.root / "study", f"rounds={rounds}", f"federation.hospitals={hospitals}")
        if study.returncode != 0:
            raise RuntimeError(study.stdout[-3000:] + study.stderr[-3000:])
        medkd_rounds = [r["seconds"] for r in dep.metrics(dep.root / "study")["rounds"]]
        trip = dep.root / "roundtrip.json"
        env = {**dep.env(), "FLWR_HOME": str(dep.coordinator / "flwr-home")}
        done = subprocess.run(["flwr", "run", str(ROUNDTRIP_APP), "medkd", "--stream", "--run-config",
                               f'rounds={rounds} nodes={hospitals} out="{trip}"'], env=env, capture_output=True,
                              text=True, timeout=900)
        if not trip.exists():
            raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
        minimal_rounds = json.loads(trip.read_text())["seconds_per_round"]
        steps = hospital_breakdown(dep.root / "H0", dep.env())
        steps["python start"] = _timed_python("pass", dep.env())
    finally:
        dep.close()
    medkd_s = statistics.mean(medkd_rounds[1:] or medkd_rounds)
    minimal_s = statistics.mean(minimal_rounds[1:] or minimal_rounds)
    result = {"hospitals": hospitals, "rounds": rounds, "medkd_seconds_per_round": medkd_rounds,
              "minimal_seconds_per_round": minimal_rounds, "medkd_mean_s": medkd_s, "minimal_mean_s": minimal_s,
              "ratio": medkd_s / minimal_s, "clientapp_steps_s": steps, "load_average": os.getloadavg(),
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
    print(f"medkd round   {r['medkd_mean_s']:.1f} s  (rounds: {', '.join(f'{s:.1f}' for s in r['medkd_seconds_per_round'])})")
    print(f"minimal round {r['minimal_mean_s']:.2f} s (rounds: "
          f"{', '.join(f'{s:.2f}' for s in r['minimal_seconds_per_round'])})")
    print(f"ratio {r['ratio']:.1f}x  ({r['hospitals']} hospitals, {r['cpus']} CPUs, load average "
          f"{r['load_average'][0]:.1f})")
    print("one medkd ClientApp process, step by step (fresh process, seconds):")
    for step, s in r["clientapp_steps_s"].items():
        print(f"  {step:<40} {s:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
