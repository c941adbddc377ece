"""``medkd bench``: a benchmark grid anyone can rerun — variants x partitions x seeds.

Usage (``python -m simulations.bench`` takes the same arguments)::

    medkd bench [--methods NAME ...] [--variant NAME=METHOD:KEY=VAL,KEY=VAL ...]
                [--partitions iid 0.1 0.3 0.5 1.0] [--seeds 0 1 2]
                [--config FILE] [--set KEY=VALUE ...] [--out runs/bench] [--jobs N] [--only-report]

Variants are named lists of config overrides plus a ``method``. Defined by default:

===============  ===========  =====================================================================
name             method       overrides
===============  ===========  =====================================================================
fedkd-era        fedkd        aggregator=era, selector.kind=none
fedkd-mean       fedkd        aggregator=mean, selector.kind=none
fedkd-density    fedkd        aggregator=density, selector.kind=density_ratio
fedkd-label      fedkd        aggregator=label_aware, selector.kind=none, policy.answers.label_counts=true
fedavg           fedavg       (none)
centralized      centralized  (none)
local            local        (none); also reported as ``local-best`` (hospital chosen by validation) and
                              ``local-aggregate`` (the teachers' aggregate, the student's ceiling)
===============  ===========  =====================================================================

``--variant fedkd-x=fedkd:aggregator=era,distill.max_entropy=0.9`` defines or replaces one (repeatable;
values cannot contain commas). ``--methods`` picks variants in the order given (default: every defined
one). A partition is ``iid`` (``federation.partition=iid``) or a Dirichlet alpha (``federation.partition=
dirichlet federation.alpha=<alpha>``); a seed sets ``seed``. Overrides apply in the order ``--config``,
``--set``, partition, seed, variant. Every config is resolved (and validated) by
:func:`common.config.load_config` before anything runs.

Layout of ``--out``:

- ``runs/<hash>/``: one ``medkd simulate`` process per run, ``<hash>`` = first 16 hex digits of the
  SHA-256 of its resolved ``config.yaml``; ``log.txt`` holds its output. A run whose ``metrics.json``
  has a ``final`` block is reused, so an interrupted bench resumes, and changing any setting gives
  new run folders.
- ``hospitals/<hash>/``: teachers shared by every run with equal ``data``, ``federation``,
  ``teacher`` and ``seed`` settings (a selector is fingerprinted and retrained apart). Those runs form one job and run one after another
  (``local`` first: it trains every teacher); up to ``--jobs`` jobs run at once.
- ``bench.csv``, ``bench.md``, ``bench.json``, ``auc_per_round.png``, ``auc_vs_uplink.png`` (see
  :mod:`simulations.bench_report`). ``--only-report`` rebuilds them from the runs of the grid given by
  the other arguments, running nothing.

Exit codes: 0 every run finished, 1 some run failed (the others still ran), 2 invalid arguments or config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.config import config_to_dict, dump_config, load_config, parse_overrides
from common.errors import ConfigError
from simulations.bench_report import RunRecord, read_finished_metrics, write_report

logger = logging.getLogger(__name__)

DEFAULT_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fedkd-era": ("fedkd", ("aggregator=era", "selector.kind=none")),
    "fedkd-mean": ("fedkd", ("aggregator=mean", "selector.kind=none")),
    "fedkd-density": ("fedkd", ("aggregator=density", "selector.kind=density_ratio")),
    "fedkd-label": ("fedkd", ("aggregator=label_aware", "selector.kind=none", "policy.answers.label_counts=true")),
    "fedavg": ("fedavg", ()),
    "centralized": ("centralized", ()),
    "local": ("local", ()),
}
DEFAULT_PARTITIONS = ("iid", "0.1", "0.3", "0.5", "1.0")
DEFAULT_SEEDS = (0, 1, 2)
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # simulate subprocesses import this same code tree
# settings that decide a hospital's teacher (its selector.pt is fingerprinted apart, and retrained when it changes);
# a DP mechanism adds the hospitals' privacy settings, so that each budget is spent in a folder of its own
HOSPITAL_KEYS = ("data", "federation", "teacher", "seed")


@dataclass(frozen=True)
class Variant:
    """A named method plus ``key=value`` config overrides."""

    name: str
    method: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One grid cell, resolved: its config text and where it runs."""

    variant: str
    method: str
    partition: str
    seed: int
    config_text: str
    run_hash: str
    run_dir: Path
    hospitals_dir: Path

    @property
    def label(self) -> str:
        return f"{self.variant} {self.partition} seed {self.seed}"


def short_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parse_variant(spec: str) -> Variant:
    """Parse ``NAME=METHOD[:KEY=VAL,KEY=VAL]`` (the method and keys are checked later, by ``load_config``)."""
    name, sep, rest = spec.partition("=")
    method, _, items = rest.partition(":")
    if not sep or not name.strip() or not method.strip():
        raise ConfigError("--variant", [f"{spec!r}: expected NAME=METHOD:KEY=VAL,KEY=VAL"])
    overrides = tuple(item.strip() for item in items.split(",") if item.strip())
    parse_overrides(list(overrides))  # each item must be key=value
    return Variant(name=name.strip(), method=method.strip(), overrides=overrides)


def partition_overrides(partition: str) -> dict[str, Any]:
    """``iid`` -> iid split; a number -> Dirichlet label skew with that alpha."""
    if partition == "iid":
        return {"federation.partition": "iid"}
    try:
        alpha = float(partition)
    except ValueError:
        raise ConfigError("--partitions", [f"{partition!r}: expected 'iid' or a Dirichlet alpha such as 0.5"]) from None
    return {"federation.partition": "dirichlet", "federation.alpha": alpha}


def build_grid(*, config: Path | None, base: dict[str, Any], variants: Sequence[Variant],
               partitions: Sequence[str], seeds: Sequence[int], out: Path) -> list[Run]:
    """Resolve every run's config (all problems raised at once, before anything runs).

    Raises
    ------
    ConfigError
        Listing each invalid variant / partition / key, prefixed with the variant name.
    """
    runs: list[Run] = []
    problems: dict[str, None] = {}  # ordered set: one variant's bad key shows once, not once per cell
    for variant in variants:
        for partition in partitions:
            for seed in seeds:
                overrides = {**base, **partition_overrides(partition), "seed": seed, "method": variant.method,
                             **parse_overrides(list(variant.overrides))}
                try:
                    cfg = load_config(config, overrides=overrides)
                except ConfigError as e:
                    problems.update({f"{variant.name}: {p}": None for p in e.problems})
                    continue
                text = dump_config(cfg)
                plain = config_to_dict(cfg)
                side = {k: plain[k] for k in HOSPITAL_KEYS if k in plain}
                privacy = [config_to_dict(cfg.policy_rules(i).privacy) for i in range(cfg.federation.hospitals)]
                if any(p["mechanism"] != "none" for p in privacy):  # DP teachers and ledgers live apart
                    side["privacy"] = privacy
                hospital_side = json.dumps(side, sort_keys=True)
                run_hash = short_hash(text)
                runs.append(Run(variant=variant.name, method=cfg.method.value, partition=partition, seed=seed,
                                config_text=text, run_hash=run_hash, run_dir=out / "runs" / run_hash,
                                hospitals_dir=out / "hospitals" / short_hash(hospital_side)))
    if problems:
        raise ConfigError(str(config) if config else "<defaults>", list(problems))
    return runs


def plan_jobs(runs: Sequence[Run]) -> list[list[Run]]:
    """Group runs sharing a hospitals dir into jobs (``local`` first, then grid order); one run per run dir."""
    jobs: dict[Path, list[Run]] = {}
    seen: set[str] = set()
    for run in runs:
        if run.run_hash not in seen:
            seen.add(run.run_hash)
            jobs.setdefault(run.hospitals_dir, []).append(run)
    return [sorted(job, key=lambda r: r.method != "local") for job in jobs.values()]


def _subprocess_env() -> dict[str, str]:
    """This environment with the project root first on ``PYTHONPATH`` (whatever the working directory)."""
    paths = [str(PROJECT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class _Executor:
    """Runs jobs on threads, each waiting on one ``medkd simulate`` subprocess at a time."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = 0
        self.status: dict[str, str] = {}
        self.stop = threading.Event()
        self.procs: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()

    def run_job(self, job: Sequence[Run]) -> None:
        for run in job:
            if self.stop.is_set():
                return
            with self.lock:
                self.started += 1
                k = self.started
            self.status[run.run_hash] = self._run_one(run, k)

    def _run_one(self, run: Run, k: int) -> str:
        prefix = f"[{k}/{self.total}] {run.label}"
        if read_finished_metrics(run.run_dir) is not None:
            logger.info("%s: reused (%s)", prefix, run.run_dir)
            return "reused"
        config_path = run.run_dir / "config.yaml"
        if not config_path.exists() or config_path.read_text(encoding="utf-8") != run.config_text:
            atomic_write_text(config_path, run.config_text)
        cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config_path),
               "--out", str(run.run_dir), "--hospitals-dir", str(run.hospitals_dir)]
        log_path = run.run_dir / "log.txt"
        logger.info("%s: running (log %s)", prefix, log_path)
        start = time.perf_counter()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_subprocess_env())
            with self.lock:
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        if code != 0 or read_finished_metrics(run.run_dir) is None:
            logger.error("%s: FAILED (exit %d) after %.0f s; see %s; continuing with the other runs",
                         prefix, code, time.perf_counter() - start, log_path)
            return "failed"
        logger.info("%s: done in %.0f s", prefix, time.perf_counter() - start)
        return "done"

    def interrupt(self) -> None:
        self.stop.set()
        with self.lock:
            for proc in self.procs:
                proc.terminate()


def execute(runs: Sequence[Run], *, jobs: int) -> dict[str, str]:
    """Run the grid, at most ``jobs`` jobs at once; return ``{run hash: done|reused|failed}``."""
    planned = plan_jobs(runs)
    executor = _Executor(total=sum(len(j) for j in planned))
    logger.info("bench: %d runs in %d jobs, %d at a time", executor.total, len(planned), jobs)
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="bench-job") as pool:
        futures = [pool.submit(executor.run_job, job) for job in planned]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            logger.warning("bench: interrupted; stopping running simulations (rerun the same command to resume)")
            executor.interrupt()
            raise
    return executor.status


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help="variants to run, in order (default: every defined one; built in: "
                        f"{', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        metavar="NAME=METHOD:KEY=VAL,...", help="define or replace a variant (repeatable)")
    parser.add_argument("--partitions", nargs="+", default=list(DEFAULT_PARTITIONS), metavar="P",
                        help=f"'iid' or Dirichlet alphas (default: {' '.join(DEFAULT_PARTITIONS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
                        help=f"seeds (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--config", type=Path, default=None, help="experiment YAML applied to every run")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every run (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="bench folder (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="jobs (groups of runs sharing teachers) at once (default: %(default)s)")
    parser.add_argument("--only-report", action="store_true", help="rebuild tables and plots; run nothing")
    return parser


def _select_variants(names: Sequence[str] | None, specs: Sequence[str]) -> list[Variant]:
    defined = {name: Variant(name, method, overrides) for name, (method, overrides) in DEFAULT_VARIANTS.items()}
    for spec in specs:
        variant = parse_variant(spec)
        defined[variant.name] = variant
    names = list(names) if names else list(defined)
    unknown = [n for n in names if n not in defined]
    if unknown:
        raise ConfigError("--methods", [f"{n!r}: unknown variant; defined: {', '.join(defined)}" for n in unknown])
    if len(set(names)) != len(names):
        raise ConfigError("--methods", [f"a variant is listed twice: {' '.join(names)}"])
    return [defined[n] for n in names]


def main(argv: list[str] | None = None, *, prog: str = "python -m simulations.bench") -> int:
    """Run (or with ``--only-report`` only report) the grid; see the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.jobs < 1:
        sys.stderr.write(f"{prog}: --jobs must be >= 1, got {args.jobs}\n")
        return 2
    out = args.out.resolve()
    try:
        for flag, values in (("--partitions", args.partitions), ("--seeds", args.seeds)):
            if len(set(values)) != len(values):
                raise ConfigError(flag, [f"a value is listed twice: {' '.join(map(str, values))}"])
        variants = _select_variants(args.methods, args.variants)
        runs = build_grid(config=args.config, base=parse_overrides(args.overrides), variants=variants,
                          partitions=args.partitions, seeds=args.seeds, out=out)
    except ConfigError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    status = {} if args.only_report else execute(runs, jobs=args.jobs)
    records = []
    for run in runs:
        metrics = read_finished_metrics(run.run_dir)
        state = status.get(run.run_hash, "reused" if metrics is not None else "missing")
        records.append(RunRecord(variant=run.variant, method=run.method, partition=run.partition, seed=run.seed,
                                 run_hash=run.run_hash, run_dir=run.run_dir, hospitals_dir=run.hospitals_dir,
                                 status=state, metrics=metrics))
    unfinished = [r for r in records if r.metrics is None]
    if args.only_report and len(unfinished) == len(records):
        logger.error("bench: no finished run of this grid under %s; pass the grid arguments of the bench", out)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, records, variants=[v.name for v in variants], partitions=args.partitions,
                 command=shlex.join([*shlex.split(prog), *argv]))
    for r in unfinished:
        logger.warning("bench: %s not finished (%s); see %s", f"{r.variant} {r.partition} seed {r.seed}", r.status,
                       r.run_dir / "log.txt")
    logger.info("bench: %d of %d runs finished; report in %s", len(records) - len(unfinished), len(records),
                out / "bench.md")
    sys.stdout.write((out / "bench.md").read_text(encoding="utf-8"))
    return 1 if any(r.status == "failed" for r in records) or (unfinished and not args.only_report) else 0


if __name__ == "__main__":
    raise SystemExit(main())
