"""Load: a coordinator and N SuperNodes (default 20) on loopback TLS, a few rounds; seconds per round, peak memory.

    PYTHONPATH=. python -m simulations.load --data-dir ../shared/data/medmnist [--hospitals 20] [--rounds 3]

Every hospital is a real ``medkd client start`` daemon with its own folder, key and port (RetinaMNIST split
IID over the hospitals, teachers of 2 epochs trained on first query). Peak memory is the largest sum over
every process the script started (coordinator, SuperLink, ServerApp, SuperNodes, SuperExecs, ClientApps, the
study's ``server run``), sampled every 0.5 s, as PSS (shared pages split among processes) and as summed RSS.
Writes ``--out/load.json``.
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

from common.processes import command_line, descendants, pss_bytes, rss_bytes
from simulations.loopback import Deployment


class TreeMemory:
    """Samples the memory of every process this one started (all its descendants) in a background thread.

    Keeps the peak of the summed resident memory (RSS, which counts a shared library once per process) and of
    the summed proportional set size (PSS, which splits shared pages among their processes: the memory the
    study really occupies), and the largest number of processes seen at once.
    """

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.peak_rss, self.peak_pss, self.peak_processes = every_s, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = descendants(os.getpid())
            self.peak_processes = max(self.peak_processes, len(pids))
            self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in pids))
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in pids))
            self._stop.wait(self.every_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _follow_study(dep: Deployment, out: Path, *, timeout_s: float) -> bool:
    """After ``server run`` returned early: wait while the coordinator's ServerApp still runs; True if it finished.

    Under heavy load Flower 1.42's SuperLink can fail a request with SQLite's "database is locked"; when that hits
    the log stream, ``flwr run --stream`` (and so ``server run``) ends while the study goes on.
    """
    deadline = time.monotonic() + timeout_s
    coordinator = dep.processes["coordinator"].pid
    while time.monotonic() < deadline:
        if (out / "metrics.json").exists() and json.loads((out / "metrics.json").read_text()).get("final"):
            return True
        if not any("flwr-serverapp" in command_line(p) for p in descendants(coordinator)):
            return False
        time.sleep(2.0)
    return False


def run(*, data_dir: Path, hospitals: int, rounds: int, out: Path, reply_timeout_s: int) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    dep = Deployment(root=Path(tempfile.mkdtemp(prefix="medkd-load-")), data_dir=data_dir)
    setting = (f"federation.hospitals={hospitals}", "federation.partition=iid", "teacher.epochs=2",
               "teacher.patience=2", "federation.wait_for_nodes_s=1200")
    try:
        start = time.perf_counter()
        dep.federation(hospitals=hospitals, overrides=setting)
        ready_s = time.perf_counter() - start
        load_before = os.getloadavg()
        with TreeMemory() as memory:  # the coordinator, the hospitals and the study, all started from here
            done = dep.run_study(dep.root / "study", f"rounds={rounds}", *setting,
                                 f"federation.reply_timeout_s={reply_timeout_s}",
                                 timeout=3600)
            stream_broke = done.returncode != 0 and _follow_study(dep, dep.root / "study", timeout_s=3600)
        load_after = os.getloadavg()
        if done.returncode != 0 and not stream_broke:
            raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
        rounds_doc = dep.metrics(dep.root / "study")["rounds"]
    finally:
        dep.close()
    seconds = [r["seconds"] for r in rounds_doc]
    result = {"hospitals": hospitals, "rounds": rounds, "seconds_per_round": seconds,
              "query_seconds_per_round": [r["query_seconds"] for r in rounds_doc],
              "mean_after_first_s": statistics.mean(seconds[1:] or seconds),
              "replies_ok": [r["replies_ok"] for r in rounds_doc], "reply_timeout_s": reply_timeout_s,
              "log_stream_broke": stream_broke,
              "peak_rss_bytes": memory.peak_rss,
              "peak_pss_bytes": memory.peak_pss, "peak_processes": memory.peak_processes, "startup_s": ready_s,
              "load_average_before_study": load_before, "load_average_after_study": load_after,
              "cpus": os.cpu_count(), "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    (out / "load.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding retinamnist.npz")
    parser.add_argument("--hospitals", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs") / "load")
    parser.add_argument("--reply-timeout-s", type=int, default=300,
                        help="a round waits this long for a reply that never comes (e.g. lost by the SuperLink)")
    args = parser.parse_args(argv)
    r = run(data_dir=args.data_dir.resolve(), hospitals=args.hospitals, rounds=args.rounds, out=args.out,
            reply_timeout_s=args.reply_timeout_s)
    print(f"{r['hospitals']} SuperNodes, {r['rounds']} rounds on {r['cpus']} CPUs; daemons up and registered in "
          f"{r['startup_s']:.0f} s; load average {r['load_average_before_study'][0]:.1f} before the study, "
          f"{r['load_average_after_study'][0]:.1f} after")
    print("seconds per round: " + ", ".join(f"{s:.1f}" for s in r["seconds_per_round"])
          + f" (mean after the first: {r['mean_after_first_s']:.1f}; until the last reply: "
          + ", ".join(f"{s:.1f}" for s in r["query_seconds_per_round"]) + f"; valid replies: {r['replies_ok']})")
    print(f"peak memory of all its processes ({r['peak_processes']} at most): {r['peak_pss_bytes'] / 2**30:.2f} GiB "
          f"PSS (shared pages counted once), {r['peak_rss_bytes'] / 2**30:.2f} GiB summed RSS; machine "
          f"{r['memory_total_bytes'] / 2**30:.0f} GiB")
    if r["log_stream_broke"]:
        print("note: `server run`'s log stream broke (SuperLink error under load); the study was followed to its end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
