"""The ``medkd`` command line.

``medkd simulate [--config FILE] [--method M] [--set k=v ...] [--out DIR]``
``medkd policies [--config FILE] [--set k=v ...] --hospitals-dir DIR``
``medkd bench [--methods NAME ...] [--partitions P ...] [--seeds S ...] [--out DIR] ...`` (see simulations/bench.py)
``medkd audit verify|report|canary|rotate-key ...`` (see simulations/audit_cli.py)
``medkd certs|client|server ...``: a real deployment on Flower's SuperLink/SuperNode (see simulations/deploy_cli.py)

Exit codes: 0 success, 2 invalid config or arguments, 1 any other medkd error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig, Method, load_config, parse_overrides
from simulations.exits import guarded

logger = logging.getLogger("medkd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd", description="Federated knowledge distillation for hospitals.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run K hospitals on this machine (Flower simulation engine)")
    sim.add_argument("--config", type=Path, default=None,
                     help="experiment YAML (default: RetinaMNIST, 5 hospitals, Dirichlet alpha 0.5)")
    sim.add_argument("--method", choices=[m.value for m in Method], default=None,
                     help="fedkd (default), fedavg, centralized or local; overrides the config's 'method'")
    sim.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="override config keys, e.g. --set rounds=3 federation.alpha=0.1 (repeatable)")
    sim.add_argument("--out", type=Path, default=None,
                     help="results folder (default: runs/<method>-<time>); an existing one is resumed")
    sim.add_argument("--hospitals-dir", type=Path, default=None,
                     help="hospital folders (teacher, outbound log); default <out>/hospitals")
    sim.add_argument("--fresh", action="store_true", help="delete the checkpoint in --out and start over")
    sim.add_argument("-v", "--verbose", action="store_true", help="debug logging (also Flower's)")
    pol = sub.add_parser("policies", help="write one hospital policy per simulated hospital (for `flwr run .`)")
    pol.add_argument("--config", type=Path, default=None, help="experiment YAML the policies are derived from")
    pol.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="override config keys, as for simulate")
    pol.add_argument("--hospitals-dir", type=Path, required=True,
                     help="where H<i>/policy.yaml are written; point $MEDKD_HOSPITALS here for `flwr run .`")
    bench = sub.add_parser("bench", add_help=False,
                           help="benchmark grid: variants x partitions x seeds (`medkd bench --help`)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of simulations.bench")
    audit = sub.add_parser("audit", add_help=False,
                           help="verify, report on and audit what left each hospital (`medkd audit --help`)")
    audit.add_argument("audit_args", nargs=argparse.REMAINDER, help="arguments of simulations.audit_cli")
    return parser


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, rich_tracebacks=False, log_time_format="%H:%M:%S")
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:  # Flower and Ray set their own levels; show only their warnings
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.split(".")[0] not in ("flwr", "ray"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _print_split(cfg: ExperimentConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from common.split import make_split

    split = make_split(cfg)
    table = Table(title=f"{split.data.name}: {cfg.federation.hospitals} hospitals, {cfg.federation.partition.value}"
                  + (f" alpha={cfg.federation.alpha}" if cfg.federation.partition.value != "iid" else ""))
    table.add_column("holder")
    table.add_column("size", justify="right")
    for c in range(split.data.n_classes):
        table.add_column(f"class {c}", justify="right")
    for row in split.size_table():
        table.add_row(str(row["name"]), str(row["size"]), *[str(n) for n in row["class_counts"]])
    table.add_row("test", str(split.data.test.labels.shape[0]),
                  *[str(int((split.data.test.labels == c).sum())) for c in range(split.data.n_classes)])
    Console(stderr=True).print(table)


def _print_result(out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    doc = json.loads((out_dir / "metrics.json").read_text())
    console = Console()
    selected = doc["final"].get("selected_round")
    if len(doc["rounds"]) > 1 or doc["method"] in ("fedkd", "fedavg"):
        table = Table(title=f"{doc['method']} rounds")
        for col in ("round", "val AUC", "test AUC", "test acc", "up B/hospital", "down B/hospital", "ok", "rejected",
                    "s"):
            table.add_column(col, justify="right")
        for r in doc["rounds"]:
            up = r["bytes_up"].values() or [0]
            down = r["bytes_down"].values() or [0]
            mark = " *" if r["round"] == selected else ""
            table.add_row(f"{r['round']}{mark}", _figure(r.get("val_auc")), _figure(r.get("test_auc")),
                          _figure(r.get("test_acc")),
                          f"{sum(up) / len(up):,.0f}", f"{sum(down) / len(down):,.0f}", str(r["replies_ok"]),
                          str(r["replies_rejected"]), f"{r['seconds']:.1f}")
        console.print(table)
    final = doc["final"]
    extra = ""
    if doc["method"] == "local":
        extra = (f" (mean over hospitals; best by validation: {final['best_hospital']}, test AUC "
                 f"{final['best_test_auc']:.4f}")
        if final.get("aggregate_test_auc") is not None:
            extra += (f"; the teachers' aggregate, the student's ceiling: validation AUC "
                      f"{final['aggregate_val_auc']:.4f}, test AUC {final['aggregate_test_auc']:.4f}")
        extra += ")"
    elif selected is not None:
        extra = f" (round {selected} of {len(doc['rounds'])}, chosen by validation AUC {final['val_auc']:.4f})"
    console.print(f"[bold]final student test AUC {final['test_auc']:.4f}[/bold], accuracy {final['test_acc']:.4f}"
                  f"{extra} — method {doc['method']}, {final['seconds']:.0f} s")
    console.print(f"privacy: {doc['privacy']}")
    _print_privacy(console, doc)
    console.print(f"results: {out_dir}/metrics.json, {out_dir}/config.yaml")


def _print_privacy(console: Any, doc: dict[str, Any]) -> None:
    """The run's privacy summary: per hospital its mechanism and ε after each round (from its own ledger)."""
    from rich.table import Table

    summary = doc.get("privacy_summary") or {}
    if not any("epsilon" in entry for entry in summary.values()):
        return
    rounds = [str(r["round"]) for r in doc["rounds"]]
    table = Table(title="privacy summary: ε spent after each round (each hospital's ledger, dp-accounting PLD)")
    for col in ("hospital", "mechanism", "δ", *[f"r{r}" for r in rounds]):
        table.add_column(col, justify="left" if col in ("hospital", "mechanism") else "right")
    for name, entry in sorted(summary.items()):
        per_round = entry.get("epsilon_per_round", {})
        table.add_row(name, str(entry.get("mechanism")), f"{entry['delta']:g}" if "delta" in entry else "-",
                      *[f"{per_round[r]:.3f}" if r in per_round else "-" for r in rounds])
    console.print(table)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_simulate(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    if args.method:
        overrides["method"] = args.method
    cfg = load_config(args.config, overrides=overrides)  # raises ConfigError before any work
    out_dir = args.out or Path("runs") / f"{cfg.method.value}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.supervised:  # from the console: run in a child we can always stop cleanly (simulations/supervise.py)
        from simulations.supervise import supervise

        return supervise([*args.raw_argv, *([] if args.out else ["--out", str(out_dir)])], out_dir=out_dir,
                         verbose=args.verbose)
    _setup_logging(args.verbose)
    if args.fresh:
        for name in ("checkpoint.pt", "student.pt", "metrics.json"):
            (out_dir / name).unlink(missing_ok=True)
    from simulations.run import simulate

    logger.info("medkd simulate: method %s, %d rounds, results in %s", cfg.method.value, cfg.rounds, out_dir)
    _print_split(cfg)
    simulate(cfg, out_dir=out_dir, hospitals_dir=args.hospitals_dir)
    _print_result(out_dir)
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from simulations.run import prepare_hospitals

    cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
    _setup_logging(False)
    prepare_hospitals(cfg, args.hospitals_dir)
    logger.info("simulated hospitals under `flwr run .` read these when MEDKD_HOSPITALS=%s", args.hospitals_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench parses its own options (argparse cannot pass options through a subparser)
        from simulations.bench import main as bench_main

        return bench_main(argv[1:], prog="medkd bench")
    if argv[:1] == ["audit"]:
        from simulations.audit_cli import main as audit_main

        return audit_main(argv[1:])
    if argv[:1] in (["certs"], ["client"], ["server"]):  # deployment commands (docs/deployment.md)
        from simulations.deploy_cli import main as deploy_main

        return deploy_main(argv)
    args = _parser().parse_args(argv)
    if args.command == "simulate":  # a console run (no argv given) is supervised; a child or a caller is not
        from simulations.supervise import is_child

        args.supervised = from_console and not is_child()
        args.raw_argv = argv[1:]
    commands = {"simulate": cmd_simulate, "policies": cmd_policies}
    if args.command not in commands:
        return 2
    return guarded(lambda: commands[args.command](args))


if __name__ == "__main__":
    raise SystemExit(main())
