"""Process trees: descendants, orphans adopted by a subreaper, and stop_tree ending what a stopped parent left."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common.processes import alive, command_line, descendants, processes_in_folder, stop_tree

# a parent that exits on SIGTERM and leaves a child behind that ignores SIGTERM (like a Flower process whose
# parent-watch never fires): only SIGKILL ends the child
_LEAVES_A_CHILD = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('child up', flush=True); time.sleep(120)"], stdout=sys.stdout)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
time.sleep(120)
"""


def _wait_for_children(pid: int, n: int) -> list[int]:
    deadline = time.monotonic() + 20
    while len(found := descendants(pid)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_stop_tree_ends_the_child_a_stopped_parent_left_behind(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _LEAVES_A_CHILD], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None and parent.stdout.readline().strip() == "child up"
    [child] = _wait_for_children(parent.pid, 1)
    assert "SIG_IGN" in command_line(child)
    start = time.monotonic()
    ended = stop_tree(parent, grace_s=10.0, leftover_grace_s=0.5, kill_grace_s=1.0)
    assert time.monotonic() - start < 5.0
    assert parent.returncode == 0  # the parent itself stopped cleanly on SIGTERM
    assert not alive(child)
    assert [e.split()[:2] for e in ended] == [["SIGTERM", str(child)], ["SIGKILL", str(child)]]


def test_whole_tree_signal_and_nothing_to_do_for_a_finished_process() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    kids = _wait_for_children(proc.pid, 2)
    assert stop_tree(proc, whole_tree=True, grace_s=5.0) == []  # sleep and sh stop on SIGTERM: nothing to force
    assert not any(alive(p) for p in kids) and proc.returncode is not None
    assert stop_tree(proc, grace_s=1.0) == []  # already gone: no signal to a reaped PID


def test_subreaper_adopts_orphans_and_finds_them_by_folder(tmp_path: Path) -> None:
    script = f"""
import json, os, subprocess, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from common.processes import become_subreaper, descendants, processes_in_folder, stop_tree
assert become_subreaper()
env = {{**os.environ, "FLWR_HOME": {str(tmp_path / 'flwr-home')!r}}}
sh = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, text=True, env=env)
orphan = int(sh.stdout.readline()); sh.wait()  # its parent is gone: the sleep is now this process's child
time.sleep(0.2)
found = [orphan in descendants(os.getpid()), orphan in processes_in_folder({str(tmp_path)!r})]
ended = stop_tree(sh, grace_s=2.0, leftover_grace_s=0.2, adopted=True)
print(json.dumps([found, ended, os.path.exists(f"/proc/{{orphan}}")]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found, ended, still_there = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == [True, True]
    assert len(ended) == 1 and ended[0].startswith("SIGTERM ") and "sleep 60" in ended[0]
    assert not still_there  # killed and reaped: not even a zombie is left
    assert processes_in_folder(tmp_path) == []
