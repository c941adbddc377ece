"""Config loading: every problem at once, dotted keys, did-you-mean, overrides, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import (AggregatorName, Method, PartitionName, build_config, dump_config, load_config,
                           parse_overrides)
from common.errors import ConfigError
from simulations.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_documented_experiment() -> None:
    cfg = load_config(None)
    assert (cfg.data.dataset, cfg.federation.hospitals, cfg.federation.partition, cfg.federation.alpha) == (
        "retinamnist", 5, PartitionName.DIRICHLET, 0.5)
    assert cfg.method == Method.FEDKD and cfg.aggregator == AggregatorName.DENSITY
    assert cfg.selector.kind == "density_ratio" and cfg.selector.abstain_quantile == 0.0
    assert cfg.quorum() == 3
    assert cfg.teacher.ensemble == 5 and cfg.distill.temperature == 1.0  # the recipe chosen on validation (README)
    # the shipped default experiment file says the same
    shipped = load_config(REPO / "configs" / "retinamnist_5sites.yaml")
    assert (shipped.aggregator, shipped.selector, shipped.federation, shipped.teacher, shipped.distill) == (
        cfg.aggregator, cfg.selector, cfg.federation, cfg.teacher, cfg.distill)


def test_density_aggregator_needs_density_ratios_and_label_aware_needs_counts() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"aggregator": "density", "selector": {"kind": "none"}}, source="x.yaml")
    assert "aggregator: 'density' weights hospitals by the density ratios they send" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_config({"aggregator": "label_aware"}, source="x.yaml")
    assert "set policy.answers.label_counts: true" in str(info.value)
    build_config({"aggregator": "label_aware", "policy": {"answers": {"label_counts": True}}}, source="x.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.rounds >= 1


def test_three_mistakes_reported_together() -> None:
    raw = {"federation": {"alpha": -1}, "teacher": {"epochs": "ten"}, "data": {"datset": "retinamnist"}}
    with pytest.raises(ConfigError) as info:
        build_config(raw, source="bad.yaml")
    message = str(info.value)
    assert message.startswith("medkd: 3 problems in bad.yaml")
    assert "federation.alpha: must be > 0.0, got -1" in message
    assert "teacher.epochs: expected an integer, got 'ten'" in message
    assert "data.datset: unknown key; did you mean 'data.dataset'?" in message
    assert len(info.value.problems) == 3


@pytest.mark.parametrize(("raw", "needle"), [
    ({"aggregator": "meen"}, "aggregator: expected one of 'mean', 'weighted', 'era', 'certainty', 'median', 'density', 'label_aware', got 'meen'; did you mean 'mean'?"),
    ({"federation": {"partition": "dirichlet2"}}, "federation.partition: expected one of"),
    ({"rounds": 0}, "rounds: must be >= 1, got 0"),
    ({"data": {"proxy_fraction": 1.5}}, "data.proxy_fraction: must be < 1.0, got 1.5"),
    ({"federation": {"hospitals": "five"}}, "federation.hospitals: expected an integer, got 'five'"),
    ({"data": {"download": "yes"}}, "data.download: expected true or false, got 'yes'"),
    ({"distill": {"temperature": 0}}, "distill.temperature: must be > 0.0, got 0"),
    ({"teacher": {"model": "resnet19"}}, "teacher.model: expected one of smallcnn, densenet121, resnet18, resnet34, resnet50, got 'resnet19'; did you mean 'resnet18'?"),
    ({"teacher": {"per_hospital": {"7": "resnet18"}}}, "teacher.per_hospital.7: expected a hospital index 0..4"),
    ({"distill": {"ce_weight": 0.5}}, "distill.ce_weight: must be 0 unless data.proxy_labelled is true"),
    ({"federation": {"min_replies": 9}}, "federation.min_replies: must be <= federation.hospitals (5), got 9"),
    ({"roundz": 3}, "roundz: unknown key; did you mean 'rounds'?"),
    ({"data": "retinamnist"}, "data: expected a mapping"),
])
def test_single_problem_messages(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        build_config(raw, source="x.yaml")
    assert needle in str(info.value)


def test_overrides_parse_yaml_scalars_and_apply_to_any_key() -> None:
    overrides = parse_overrides(["rounds=3", "federation.alpha=0.1", "aggregator=era", "data.proxy_labelled=true",
                                 "teacher.per_hospital.1=resnet18", "data.dataset=/tmp/x.npz"])
    cfg = build_config({}, overrides=overrides)
    assert cfg.rounds == 3 and cfg.federation.alpha == 0.1 and cfg.aggregator == AggregatorName.ERA
    assert cfg.data.proxy_labelled is True and cfg.data.dataset == "/tmp/x.npz"
    assert cfg.teacher_model(1) == "resnet18" and cfg.teacher_model(0) == "smallcnn"


def test_override_errors_name_the_item() -> None:
    with pytest.raises(ConfigError, match="--set 'rounds': expected key=value"):
        parse_overrides(["rounds"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = build_config({"aggregator": "median", "federation": {"hospitals": 4}})
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_exits_2_naming_all_three_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "three.yaml"
    config.write_text(yaml.safe_dump({"federation": {"alpha": -1, "hopsitals": 3}, "teacher": {"epochs": "ten"}}))
    out = tmp_path / "out"
    code = main(["simulate", "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 problems" in err and "federation.alpha" in err and "teacher.epochs" in err
    assert "federation.hopsitals: unknown key; did you mean 'federation.hospitals'?" in err
    assert not out.exists()  # nothing started


def test_cli_set_is_repeatable_and_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--set", "rounds=2", "--set", "federation.alpha=-3", "seed=x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "federation.alpha: must be > 0.0, got -3" in err and "seed: expected an integer" in err
