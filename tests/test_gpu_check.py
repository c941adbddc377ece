"""The GPU check's serving figures, run on the CPU: the whole outbound path against the forward passes it needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simulations.gpu_check import card_name, serving_figures


@pytest.mark.parametrize(("selector", "passes"), [("none", 1), ("density_ratio", 2), ("max_softmax", 1)])
def test_serving_figures_name_the_card_and_count_the_forward_passes(tmp_path: Path, selector: str,
                                                                   passes: int) -> None:
    cpu = torch.device("cpu")
    row = serving_figures(cpu, tmp_path, model="smallcnn", n=256, card=card_name(cpu), quick=True, selector=selector)
    assert row["card"].startswith("CPU (") and row["selector"] == selector and row["batch"] == 256
    assert row["raw_forward_passes"] == passes  # max_softmax reuses the teacher's logits: no second pass
    assert row["path_images_per_s"] > 0 and row["raw_forward_images_per_s"] > 0
    assert row["ratio_path_over_raw"] == pytest.approx(row["path_images_per_s"] / row["raw_forward_images_per_s"],
                                                       rel=0.01)
    log = (tmp_path / f"serve-smallcnn-{selector}" / "outbound.jsonl").read_text().splitlines()
    assert len(log) >= 3 and all('"status": "sent"' in line for line in log)  # every timed answer left the gate
