"""Load: a coordinator and N SuperNodes (default 20) on loopback TLS, a few rounds; seconds per round, peak memory.

    PYTHONPATH=. python -m simulations.load --data-dir ../shared/data/medmnist [--hospitals 20] [--rounds 3]

Every hospital is a real ``medkd client start`` daemon with its own folder, key and port (RetinaMNIST split
IID over the hospitals, teachers of 2 epochs trained on first query). Peak memory is the largest sum of
resident memory over the whole process tree (coordinator, SuperLink, ServerApp, SuperNodes, ClientApps),
sampled every 0.5 s. Writes ``--out/load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common.processes import tree_rss_bytes
from simulations.loopback import Deployment


class TreeMemory:
    """Samples the summed resident memory of some process trees in a background thread; keeps the peak."""

    def __init__(self, roots: list[int], every_s: float = 0.5) -> None:
        self.roots, self.every_s, self.peak = roots, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.roots))
            self._stop.wait(self.every_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(*, data_dir: Path, hospitals: int, rounds: int, out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    dep = Deployment(root=Path(tempfile.mkdtemp(prefix="medkd-load-")), data_dir=data_dir)
    setting = (f"federation.hospitals={hospitals}", "federation.partition=iid", "teacher.epochs=2",
               "teacher.patience=2")
    try:
        start = time.perf_counter()
        dep.federation(hospitals=hospitals, overrides=setting)
        ready_s = time.perf_counter() - start
        roots = [p.pid for p in dep.processes.values()]
        with TreeMemory(roots) as memory:
            done = dep.run_study(dep.root / "study", f"rounds={rounds}", *setting, "federation.reply_timeout_s=1200",
                                 timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
        rounds_doc = dep.metrics(dep.root / "study")["rounds"]
    finally:
        dep.close()
    seconds = [r["seconds"] for r in rounds_doc]
    result = {"hospitals": hospitals, "rounds": rounds, "seconds_per_round": seconds,
              "mean_after_first_s": statistics.mean(seconds[1:] or seconds),
              "replies_ok": [r["replies_ok"] for r in rounds_doc], "peak_rss_bytes": memory.peak,
              "startup_s": ready_s, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    (out / "load.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding retinamnist.npz")
    parser.add_argument("--hospitals", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs") / "load")
    args = parser.parse_args(argv)
    r = run(data_dir=args.data_dir.resolve(), hospitals=args.hospitals, rounds=args.rounds, out=args.out)
    print(f"{r['hospitals']} SuperNodes, {r['rounds']} rounds on {r['cpus']} CPUs (load average "
          f"{r['load_average'][0]:.1f}); daemons up and registered in {r['startup_s']:.0f} s")
    print("seconds per round: " + ", ".join(f"{s:.1f}" for s in r["seconds_per_round"])
          + f" (valid replies: {r['replies_ok']})")
    print(f"peak memory of the whole process tree: {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
