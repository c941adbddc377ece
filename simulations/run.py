"""``medkd simulate``: K hospitals on one machine through Flower's simulation engine.

FedKD and FedAvg run real ClientApps exchanging real messages (Ray backend);
``centralized`` and ``local`` need no federation and run in-process on the
same splits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.config import ExperimentConfig, Method, dump_config
from common.errors import MedkdError

logger = logging.getLogger(__name__)


def run_flower_simulation(cfg: ExperimentConfig, out_dir: Path, hospitals_dir: Path) -> None:
    """Run the ServerApp and ``cfg.federation.hospitals`` ClientApps in Flower's simulation engine."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    from simulations.faults import make_fault_mod

    mods = [make_fault_mod(dict(cfg.federation.faults))] if cfg.federation.faults else None
    client_app = make_client_app(hospitals_dir, query_mods=mods)
    run_simulation(server_app=make_server_app(cfg, out_dir), client_app=client_app,
                   num_supernodes=cfg.federation.hospitals, backend_config=backend_config)


def prepare_hospitals(cfg: ExperimentConfig, hospitals_dir: Path) -> None:
    """Write each simulated hospital's policy into its folder and read it back (as the hospital will).

    Raises
    ------
    PolicyError
        If a written policy does not validate (e.g. contradictory ``policy`` rules in the experiment).
    """
    from common.policy import load_policy, write_policies

    for path in write_policies(cfg, hospitals_dir):
        load_policy(path)
    logger.info("wrote %d hospital policies under %s", cfg.federation.hospitals, hospitals_dir)
    warn_label_skew(cfg)


def warn_label_skew(cfg: ExperimentConfig) -> list[str]:
    """Warn, by hospital name, about single-class hospitals and thin classes (the simulation knows the split)."""
    from common.split import class_warnings, make_split

    warnings = []
    for row in make_split(cfg).size_table()[:-1]:  # the last row is the proxy set
        warnings += class_warnings(str(row["name"]), list(row["class_counts"]), below=cfg.federation.warn_class_below)
    for text in warnings:
        logger.warning("%s", text)
    return warnings


def simulate(cfg: ExperimentConfig, *, out_dir: Path, hospitals_dir: Path | None = None) -> dict[str, Any]:
    """Run ``cfg.method`` and return the ``final`` block of ``<out_dir>/metrics.json``.

    Hospital folders (teacher, outbound log) live in ``hospitals_dir``
    (default ``<out_dir>/hospitals``); pointing several runs at one folder
    lets them share the same trained teachers.
    """
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    hospitals_dir = hospitals_dir or out_dir / "hospitals"
    atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
    if cfg.method in (Method.FEDKD, Method.FEDAVG):
        prepare_hospitals(cfg, hospitals_dir)
        run_flower_simulation(cfg, out_dir, hospitals_dir)
        metrics_path = out_dir / "metrics.json"
        if not metrics_path.exists():
            raise MedkdError(f"the simulation ended without writing {metrics_path}")
        final = json.loads(metrics_path.read_text())["final"]
        if not final:
            raise MedkdError(f"the simulation ended before its last round; see {metrics_path}")
        return final
    from simulations.baselines import run_centralized, run_local

    if cfg.method == Method.CENTRALIZED:
        return run_centralized(cfg, out_dir)
    return run_local(cfg, out_dir, hospitals_dir)
