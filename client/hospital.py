"""Which hospital this ClientApp is, read from the hospital's own side only, and the policy checks on requests.

A ClientApp finds its policy from its SuperNode's ``node_config`` (set by
the hospital's operator when starting the daemon; in simulation, by the
simulation engine), never from the coordinator's ``run_config``:

1. ``node_config["policy"]``: the path of the policy file;
2. ``node_config["hospital-dir"]``: a folder holding ``policy.yaml``;
3. ``node_config["partition-id"]`` (simulation): ``<root>/H<id>/policy.yaml``,
   where ``<root>`` is the folder bound by ``medkd simulate``, else
   ``$MEDKD_HOSPITALS``, else ``~/.local/share/medkd/hospitals``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.config import ExperimentConfig
from common.errors import MedkdError, PolicyRefusal
from common.payload import Query
from common.policy import POLICY_FILE, HospitalPolicy, hospital_experiment, load_policy

logger = logging.getLogger(__name__)

HOSPITALS_ENV = "MEDKD_HOSPITALS"
OUTBOUND_LOG = "outbound.jsonl"
LOCAL_LOG = "hospital.log"


class HospitalSetupError(MedkdError, ValueError):
    """This ClientApp cannot tell which hospital it is (its node_config names no policy)."""


@dataclass(frozen=True)
class Hospital:
    """Who answers: the hospital's policy, its folder, and the experiment view built from the policy alone."""

    policy: HospitalPolicy
    policy_path: Path
    folder: Path
    cfg: ExperimentConfig

    @property
    def name(self) -> str:
        return self.policy.hospital

    @property
    def index(self) -> int:
        """The hospital's share of ``data.dataset`` (simulated sites)."""
        return self.policy.share.index


def hospitals_root(bound: Path | None) -> Path:
    """Root of simulated hospitals' folders: ``bound`` (``medkd simulate``), ``$MEDKD_HOSPITALS`` or the default."""
    if bound is not None:
        return Path(bound)
    env = os.environ.get(HOSPITALS_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "medkd" / "hospitals"


def locate_policy(node_config: Mapping[str, object], root: Path) -> Path:
    """Path of this hospital's policy file, from its ``node_config`` (see the module docstring).

    Raises
    ------
    HospitalSetupError
        If the node_config names none of ``policy``, ``hospital-dir``, ``partition-id``.
    """
    if node_config.get("policy"):
        return Path(str(node_config["policy"])).expanduser()
    if node_config.get("hospital-dir"):
        return Path(str(node_config["hospital-dir"])).expanduser() / POLICY_FILE
    if "partition-id" in node_config:
        try:
            partition = int(str(node_config["partition-id"]))
        except ValueError:
            raise HospitalSetupError(f"node_config partition-id is not an integer: "
                                     f"{str(node_config['partition-id'])[:20]!r}") from None
        return root / f"H{partition}" / POLICY_FILE
    raise HospitalSetupError("node_config names no hospital policy: start the SuperNode with "
                             "--node-config 'policy=\"/path/to/policy.yaml\"' (or hospital-dir=...)")


_LOADED: OrderedDict[tuple[str, int, int], Hospital] = OrderedDict()
_LOADED_CAPACITY = 4096  # a few kB each: one per simulated hospital a process serves


def load_hospital(policy_path: Path) -> Hospital:
    """Load (and cache while the file is unchanged) the hospital whose policy is at ``policy_path``.

    Raises
    ------
    PolicyError
        If the policy file is missing or invalid.
    """
    try:
        stat = policy_path.stat()
        key = (str(policy_path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    if key is not None and key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    policy = load_policy(policy_path)
    hospital = Hospital(policy=policy, policy_path=policy_path, folder=policy.folder_path(policy_path),
                        cfg=hospital_experiment(policy))
    if key is not None:
        _LOADED[key] = hospital
        while len(_LOADED) > _LOADED_CAPACITY:
            _LOADED.popitem(last=False)
    return hospital


@dataclass
class _LogTally:
    """What has been read of one outbound log: its identity, how far, and the sent indices per run."""

    inode: int
    offset: int
    per_run: dict[int, int]


_TALLIES: dict[Path, _LogTally] = {}
_TALLIES_LOCK = threading.Lock()


def released_indices(folder: Path, *, run_id: int) -> int:
    """Proxy samples this hospital has released in run ``run_id``, counted from its own outbound log.

    The log only grows (whole lines, appended by the gate), so each process
    reads each byte of it once: later calls read only what was appended since
    (a log that was replaced or truncated is read again from its start). A
    query costs the new lines, not the log's whole history.
    """
    path = folder / OUTBOUND_LOG
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return 0
    with _TALLIES_LOCK, f:
        stat = os.fstat(f.fileno())
        tally = _TALLIES.get(path)
        if tally is None or tally.inode != stat.st_ino or stat.st_size < tally.offset:
            tally = _TALLIES[path] = _LogTally(inode=stat.st_ino, offset=0, per_run={})
        f.seek(tally.offset)
        chunk = f.read(stat.st_size - tally.offset)
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        for line in chunk[:end].splitlines():
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(entry, dict) and entry.get("status") == "sent":
                run = entry.get("run_id")
                if isinstance(run, int):
                    tally.per_run[run] = tally.per_run.get(run, 0) + int(entry.get("n_indices", 0))
        tally.offset += end
        return tally.per_run.get(run_id, 0)


def check_query(query: Query, policy: HospitalPolicy, *, released: int) -> None:
    """Refuse a query outside the hospital's policy; the error names the policy key.

    Raises
    ------
    PolicyRefusal
        For an output kind, dtype or temperature the policy does not allow,
        or more indices than allowed per query or per run.
    """
    rules = policy.outputs
    if query.output not in rules.kinds:
        raise PolicyRefusal(f"output {query.output.value!r} is not released (allowed: "
                            f"{[k.value for k in rules.kinds]})", field="outputs.kinds")
    if query.dtype not in rules.dtypes:
        raise PolicyRefusal(f"dtype {query.dtype.value!r} is not released (allowed: "
                            f"{[d.value for d in rules.dtypes]})", field="outputs.dtypes")
    if query.temperature < rules.min_temperature:
        raise PolicyRefusal(f"temperature {query.temperature} is below {rules.min_temperature}",
                            field="outputs.min_temperature")
    if query.temperature > rules.max_temperature:
        raise PolicyRefusal(f"temperature {query.temperature} is above {rules.max_temperature}",
                            field="outputs.max_temperature")
    size = int(query.indices.size)
    if size > policy.limits.max_indices_per_query:
        raise PolicyRefusal(f"query asks for {size} samples, more than {policy.limits.max_indices_per_query}",
                            field="limits.max_indices_per_query")
    if released + size > policy.limits.max_indices_per_run:
        raise PolicyRefusal(f"{released} samples already released in this run; {size} more would pass "
                            f"{policy.limits.max_indices_per_run}", field="limits.max_indices_per_run")


def ignored_run_config(run_config: Mapping[str, object]) -> dict[str, str]:
    """The coordinator's run-config entries a hospital ignores (all of them): key -> value, shortened."""
    return {str(k): str(v)[:200] for k, v in run_config.items() if str(v).strip()}


__all__ = ["Hospital", "HospitalSetupError", "hospitals_root", "locate_policy", "load_hospital",
           "released_indices", "check_query", "ignored_run_config", "OUTBOUND_LOG", "LOCAL_LOG"]
