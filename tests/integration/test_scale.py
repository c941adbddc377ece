"""The scale benchmark script end to end on a small federation: real tiled PneumoniaMNIST, real Flower simulations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_scale_script_prints_rounds_memory_and_marginal_cost(medmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "scale"
    done = subprocess.run([sys.executable, "-m", "simulations.scale", "--hospitals", "2", "4", "--rounds", "2",
                           "--out", str(out), "--source", str(medmnist_dir / "pneumoniamnist_kaggle.npz")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "scale.json").read_text())
    assert [r["hospitals"] for r in rows] == [2, 4]
    for row in rows:
        assert row["replies_ok"] == [row["hospitals"]] * 2  # every hospital answered every round
        assert row["teacher_training_s"] > 0 and row["seconds_per_round"] > 0
        assert row["seconds_per_round"] == row["round_seconds"][1]  # rounds 2.. only: round 1 starts Ray
        assert 500 < row["peak_rss_mb"] < 20_000  # the whole process tree, Ray's workers included
        hospitals = sorted(p.name for p in (out / f"h{row['hospitals']}" / "hospitals").iterdir())
        assert hospitals == [f"H{i}" for i in range(row["hospitals"])]
    table = done.stdout.strip().splitlines()
    assert table[0].startswith("| hospitals | teacher training") and len(table) == 4
    assert table[3].split("|")[5].strip().endswith(" ms")  # marginal seconds per extra hospital, 2 -> 4
    assert (out / "scale.md").read_text().strip() == done.stdout.strip()
