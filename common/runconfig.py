"""Reading the experiment from Flower's ``run_config`` (the ``flwr run .`` path).

``medkd simulate`` binds the config to the apps directly; under ``flwr run``
the apps receive ``[tool.flwr.app.config]`` from pyproject.toml, overridable
with ``--run-config``:

- ``config``: YAML file, absolute or relative to the app's root folder;
- ``set``: space-separated ``key=value`` overrides (as ``medkd simulate --set``);
- ``out``: results folder (default ``~/medkd-runs/run-<run id>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from common.config import ExperimentConfig, load_config, parse_overrides

APP_ROOT = Path(__file__).resolve().parents[1]


def config_from_run_config(run_config: Mapping[str, object]) -> ExperimentConfig:
    """Load and validate the experiment named by ``run_config``."""
    name = str(run_config.get("config", "") or "")
    path = None
    if name:
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = APP_ROOT / path
    overrides = parse_overrides(str(run_config.get("set", "") or "").split())
    return load_config(path, overrides=overrides)


def out_dir_from_run_config(run_config: Mapping[str, object], run_id: int) -> Path:
    """Results folder of this run (server outputs, and hospital folders in simulation)."""
    out = str(run_config.get("out", "") or "")
    return Path(out).expanduser() if out else Path.home() / "medkd-runs" / f"run-{run_id}"
