"""Shared fixtures: the real MedMNIST files in ../shared/data and small configs over them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, Metadata, RecordDict

from common.config import ExperimentConfig, build_config

SHARED_DATA = Path(os.environ.get("MEDKD_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
MEDMNIST_DIR = SHARED_DATA / "medmnist"


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    """Folder holding the real MedMNIST .npz files (skips the test when absent)."""
    if not (MEDMNIST_DIR / "retinamnist.npz").exists():
        if os.environ.get("CI", "").lower() == "true":  # in CI, missing data is a failure, not a skip
            pytest.fail(f"real MedMNIST data not found in {MEDMNIST_DIR}; CI must run the data tests")
        pytest.skip(f"real MedMNIST data not found in {MEDMNIST_DIR} (set MEDKD_TEST_DATA to the shared data folder)")
    return MEDMNIST_DIR


@pytest.fixture
def tiny_config(medmnist_dir: Path):
    """Builder of a small RetinaMNIST config (3 hospitals, short training) with optional overrides."""

    def make(**overrides: object) -> ExperimentConfig:
        raw = {
            "seed": 0, "rounds": 2, "aggregator": "mean", "selector": {"kind": "none"},
            "data": {"dataset": "retinamnist", "data_dir": str(medmnist_dir), "download": False,
                     "proxy_fraction": 0.25},
            "federation": {"hospitals": 3, "partition": "dirichlet", "alpha": 1.0, "wait_for_nodes_s": 120},
            "teacher": {"epochs": 10, "patience": 4, "ensemble": 1},  # tests/test_teacher_ensemble.py: 5
            "distill": {"proxy_batch": 64, "epochs": 3},
        }
        return build_config(raw, source="tiny", overrides=dict(overrides))

    return make


def request_message(content: RecordDict, *, message_type: str, dst_node_id: int, round: int = 1,
                    message_id: str = "m-1") -> Message:
    """A message as the SuperLink delivers it to a ClientApp (explicit metadata; no running Flower needed)."""
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=1, dst_node_id=dst_node_id,
                        reply_to_message_id="", group_id=str(round), created_at=time.time(), ttl=600.0,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)


def finite_probs(n: int, c: int, seed: int = 0) -> np.ndarray:
    """(n, c) rows on the probability simplex."""
    x = np.random.default_rng(seed).random((n, c)) + 0.05
    return (x / x.sum(axis=1, keepdims=True)).astype(np.float32)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run tests marked slow (real Flower simulations on real data)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow integration test: run with `pytest --slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
