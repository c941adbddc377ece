"""``medkd server run DIR --config FILE``: submit a study to the coordinator's SuperLink and stream its progress.

The study is this repository's Flower app, submitted with ``flwr run`` over the ``medkd`` connection of
``DIR/flwr-home/config.toml`` (TLS, verified with the study CA). The ServerApp runs beside the SuperLink and
writes ``metrics.json``, ``checkpoint.pt`` and ``student.pt`` into ``--out`` exactly as ``medkd simulate`` does;
running the same command again with the same ``--out`` resumes after the last completed round.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import subprocess
from pathlib import Path
from types import FrameType

from common.atomic import atomic_write_text
from common.config import dump_config, load_config, parse_overrides
from common.errors import MedkdError
from common.runconfig import APP_ROOT
from server.daemon import CONNECTION, flwr_env, superlink_running

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(r"Successfully started run (\d+)")
_FLOWER_NOISE = re.compile(r"^\s*(\x1b\[\d+m)?INFO\s*(\x1b\[0m)?\s*:\s*$")  # Flower's empty INFO lines


def run_config_text(*, config: Path, overrides: list[str], out: Path) -> str:
    """The ``--run-config`` value (TOML key=value pairs; JSON string escapes are valid TOML basic strings)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in (("config", str(config)), ("set", " ".join(overrides)),
                                                         ("out", str(out))))


def submit_study(folder: Path, *, config: Path, overrides: list[str], out: Path, app: Path = APP_ROOT) -> int:
    """Submit the study, stream its log, and return 0 when ``out/metrics.json`` holds final results.

    Ctrl-C or SIGTERM stops the run on the SuperLink (``flwr stop``); the last checkpoint in ``out`` is kept.

    Raises
    ------
    ConfigError
        If the experiment config is invalid (checked here, before anything is submitted).
    MedkdError
        If the coordinator's SuperLink is not running.
    """
    folder, config, out = Path(folder).resolve(), Path(config).resolve(), Path(out).resolve()
    cfg = load_config(config, overrides=parse_overrides(overrides))
    if not superlink_running(folder):
        raise MedkdError(f"the coordinator's SuperLink is not running; start it with `medkd server start {folder}`")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    argv = ["flwr", "run", str(app), CONNECTION, "--stream", "--run-config",
            run_config_text(config=config, overrides=overrides, out=out)]
    logger.info("submitting %s (%d rounds, %d hospitals) to the coordinator; results in %s", config.name, cfg.rounds,
                cfg.federation.hospitals, out)
    proc = subprocess.Popen(argv, env=flwr_env(folder), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id: list[str] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        if run_id:
            subprocess.run(["flwr", "stop", run_id[0], CONNECTION], env=flwr_env(folder), capture_output=True,
                           timeout=60)
        proc.terminate()
        logger.warning("stopped run %s; the last completed round is kept in %s; run the same command to resume",
                       run_id[0] if run_id else "?", out / "checkpoint.pt")

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert proc.stdout is not None  # set by stdout=PIPE; not an input check
        for line in proc.stdout:
            if (match := _RUN_ID.search(line)) and not run_id:
                run_id.append(match.group(1))
            if not _FLOWER_NOISE.match(line):
                sys.stdout.write(line)  # the coordinator's progress, relayed to the `medkd server run` console
                sys.stdout.flush()
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    metrics = out / "metrics.json"
    if not metrics.exists() or not json.loads(metrics.read_text()).get("final"):
        logger.error("run %s ended (flwr exit %d) without final results in %s; run the same command to resume",
                     run_id[0] if run_id else "?", code, metrics)
        return 1
    return 0
