"""``medkd bench``: report maths and files on hand-written metrics, hash keying, and one real grid (slow)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from common.config import dump_config, load_config
from common.errors import ConfigError
from simulations import bench
from simulations.bench import Variant, build_grid, parse_variant, plan_jobs
from simulations.bench_report import RunRecord, summarize, t_critical_95, write_report
from simulations.cli import main as cli_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Only keys that exist in the config today; the built-in variants may use keys still being added.
ERA = "fedkd-era=fedkd:aggregator=era"
MEAN = "fedkd-mean=fedkd:aggregator=mean"
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _metrics(*, method: str, aucs: list[float], bytes_up: list[dict[str, int]] | None = None,
             final_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A metrics.json document: one round per AUC, the last AUC as the final one."""
    ups = bytes_up or [{} for _ in aucs]
    rounds = [{"round": i + 1, "test_auc": a, "bytes_up": up} for i, (a, up) in enumerate(zip(aucs, ups))]
    return {"method": method, "rounds": rounds,
            "final": {"test_auc": aucs[-1], "seconds": 1.0, **(final_extra or {})}}


def _record(tmp: Path, variant: str, method: str, partition: str, seed: int, doc: dict[str, Any] | None) -> RunRecord:
    run_dir = tmp / "runs" / f"{variant}-{partition}-{seed}"
    run_dir.mkdir(parents=True)
    if doc is not None:
        (run_dir / "metrics.json").write_text(json.dumps(doc))
    return RunRecord(variant=variant, method=method, partition=partition, seed=seed, run_hash=f"h{seed}",
                     run_dir=run_dir, hospitals_dir=tmp / "hospitals", status="done" if doc else "failed",
                     metrics=doc)


def _csv_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as fh:
        return {(r["variant"], r["partition"]): r for r in csv.DictReader(fh)}


# --- statistics -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423), (31, 1.96),
                                              (1000, 1.96)])
def test_t_critical_values(df: int, expected: float) -> None:
    assert t_critical_95(df) == pytest.approx(expected, abs=1e-4)


def test_t_table_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t_critical_95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


def test_t_critical_rejects_zero_degrees_of_freedom() -> None:
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_critical_95(0)


def test_summarize_hand_computed() -> None:
    s = summarize([0.70, 0.72, 0.74])
    half = 4.3027 * 0.02 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n) = 0.049683
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.72), pytest.approx(0.02))
    assert s.ci_low == pytest.approx(0.72 - half, abs=1e-6) and s.ci_high == pytest.approx(0.72 + half, abs=1e-6)
    one = summarize([0.6])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 0.6, None, None, None)


# --- report files from hand-written metrics ----------------------------------------------------------------------


@pytest.fixture
def report_records(tmp_path: Path) -> list[RunRecord]:
    """fedkd-era and fedavg (3 seeds, 2 partitions), local (2 seeds), centralized (1 seed), one failed run."""
    records = []
    for partition, shift in (("iid", 0.0), ("0.1", -0.1)):
        for seed, auc in zip((0, 1, 2), (0.70, 0.72, 0.74)):
            records.append(_record(tmp_path, "fedkd-era", "fedkd", partition, seed, _metrics(
                method="fedkd", aucs=[0.6 + shift, auc + shift],
                bytes_up=[{"H0": 100, "H1": 300}, {"H0": 200, "H1": 200}],  # mean 200 B per hospital and round
                final_extra={"val_auc": 0.8 + 0.01 * seed})))
            records.append(_record(tmp_path, "fedavg", "fedavg", partition, seed, _metrics(
                method="fedavg", aucs=[0.5, 0.60 + 0.01 * seed],
                bytes_up=[{"H0": 10_000, "H1": 30_000}, {"H0": 20_000, "H1": 20_000}])))  # mean 20000
    for seed, (mean_auc, best_auc) in enumerate(((0.60, 0.65), (0.62, 0.69))):
        records.append(_record(tmp_path, "local", "local", "iid", seed, _metrics(
            method="local", aucs=[mean_auc], final_extra={"best_test_auc": best_auc, "best_val_auc": 0.7 + seed / 10,
                                                          "best_hospital": "H1", "aggregate_val_auc": 0.75,
                                                          "aggregate_test_auc": 0.70 + seed / 100})))
    records.append(_record(tmp_path, "centralized", "centralized", "iid", 0, _metrics(method="centralized",
                                                                                     aucs=[0.81])))
    records.append(_record(tmp_path, "centralized", "centralized", "iid", 1, None))
    return records


def test_report_tables_from_handwritten_metrics(tmp_path: Path, report_records: list[RunRecord]) -> None:
    out = tmp_path / "report"
    out.mkdir()
    write_report(out, report_records, variants=["fedkd-era", "fedavg", "centralized", "local"],
                 partitions=["iid", "0.1"], command="medkd bench --seeds 0 1 2")
    rows = _csv_rows(out / "bench.csv")
    assert list(rows) == [("fedkd-era", "iid"), ("fedkd-era", "0.1"), ("fedavg", "iid"), ("fedavg", "0.1"),
                          ("centralized", "iid"), ("local", "iid"), ("local-best", "iid"), ("local-aggregate", "iid")]
    era = rows[("fedkd-era", "iid")]
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert era["method"] == "fedkd" and era["n_seeds"] == "3"
    assert float(era["test_auc_mean"]) == pytest.approx(0.72, abs=1e-6)
    assert float(era["test_auc_std"]) == pytest.approx(0.02, abs=1e-6)
    assert float(era["ci95_low"]) == pytest.approx(0.72 - half, abs=1e-6)
    assert float(era["ci95_high"]) == pytest.approx(0.72 + half, abs=1e-6)
    assert float(era["val_auc_mean"]) == pytest.approx(0.81, abs=1e-6)
    assert float(era["uplink_bytes_per_hospital_round"]) == pytest.approx(200.0)
    assert era["per_seed"] == "0.700000;0.720000;0.740000"
    assert float(rows[("fedkd-era", "0.1")]["test_auc_mean"]) == pytest.approx(0.62, abs=1e-6)
    assert float(rows[("fedavg", "iid")]["uplink_bytes_per_hospital_round"]) == pytest.approx(20_000.0)
    assert rows[("fedavg", "iid")]["val_auc_mean"] == ""  # absent in fedavg's metrics: tolerated, left empty
    central = rows[("centralized", "iid")]  # one of two seeds finished: a mean but no spread
    assert (central["n_seeds"], central["test_auc_std"], central["ci95_low"], central["per_seed"]) == \
        ("1", "", "", "0.810000")
    assert central["uplink_bytes_per_hospital_round"] == ""
    local, best = rows[("local", "iid")], rows[("local-best", "iid")]
    assert float(local["test_auc_mean"]) == pytest.approx(0.61) and local["uplink_bytes_per_hospital_round"] == ""
    assert (best["method"], best["n_seeds"]) == ("local", "2")
    assert float(best["test_auc_mean"]) == pytest.approx(0.67) and best["per_seed"] == "0.650000;0.690000"
    assert float(best["val_auc_mean"]) == pytest.approx(0.75)
    fused = rows[("local-aggregate", "iid")]  # the teachers' aggregate, evaluated directly
    assert (fused["method"], fused["n_seeds"], fused["per_seed"]) == ("local", "2", "0.700000;0.710000")
    assert float(fused["val_auc_mean"]) == pytest.approx(0.75)

    md = (out / "bench.md").read_text()
    assert "| fedkd-era | fedkd | iid | 3 | 0.7200 ± 0.0200 [0.67, 0.77] | 0.8100 | 200 |" in md
    assert "| centralized | centralized | iid | 1 | 0.8100 |" in md
    assert "fedavg / fedkd-era: iid 100.0x, 0.1 100.0x" in md
    assert "privacy: no formal DP guarantee (no DP mechanism was enabled in these runs)" in md
    assert "command: `medkd bench --seeds 0 1 2`" in md
    assert "not finished: centralized iid seed 1 (failed; see" in md

    doc = json.loads((out / "bench.json").read_text())
    assert doc["command"] == "medkd bench --seeds 0 1 2" and len(doc["runs"]) == len(report_records)
    first = doc["runs"][0]
    assert {k: first[k] for k in ("variant", "partition", "seed", "hash")} == \
        {"variant": "fedkd-era", "partition": "iid", "seed": 0, "hash": "h0"}
    assert first["final"]["test_auc"] == 0.70 and doc["runs"][-1]["final"] is None
    assert doc["uplink_ratio_fedavg_over"] == {"fedkd-era": {"iid": 100.0, "0.1": 100.0}}


def test_report_plots_are_small_valid_pngs(tmp_path: Path, report_records: list[RunRecord]) -> None:
    from matplotlib.image import imread

    out = tmp_path / "report"
    out.mkdir()
    write_report(out, report_records, variants=["fedkd-era", "fedavg", "centralized", "local"],
                 partitions=["iid", "0.1"], command="x")
    for name in ("auc_per_round.png", "auc_vs_uplink.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 200_000
        height, width = imread(out / name).shape[:2]
        assert width > height > 100  # two partitions side by side


# --- grid: variants, hashing, shared hospitals --------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("fedkd-x=fedkd:aggregator=era,rounds=3", Variant("fedkd-x", "fedkd", ("aggregator=era", "rounds=3"))),
    ("plain=fedavg", Variant("plain", "fedavg", ())),
    ("c=centralized:", Variant("c", "centralized", ())),
])
def test_parse_variant(spec: str, expected: Variant) -> None:
    assert parse_variant(spec) == expected


@pytest.mark.parametrize("spec", ["noequals", "=fedkd:aggregator=era", "x=", "x=fedkd:aggregator"])
def test_parse_variant_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_variant(spec)


def _grid(out: Path, *, base: dict[str, Any] | None = None, variants: tuple[str, ...] = (ERA, MEAN, "local=local"),
          partitions: tuple[str, ...] = ("iid", "0.5"), seeds: tuple[int, ...] = (0, 1)) -> list[bench.Run]:
    return build_grid(config=None, base=base or {}, variants=[parse_variant(v) for v in variants],
                      partitions=partitions, seeds=seeds, out=out)


def test_run_dir_is_keyed_by_the_full_config_hash(tmp_path: Path) -> None:
    one = _grid(tmp_path, base={"rounds": 1})
    again = _grid(tmp_path, base={"rounds": 1})
    two = _grid(tmp_path, base={"rounds": 2})
    assert [r.run_dir for r in one] == [r.run_dir for r in again]
    assert not {r.run_dir for r in one} & {r.run_dir for r in two}
    assert len({r.run_hash for r in one}) == len(one) == 3 * 2 * 2
    for run in one:
        assert run.run_hash == hashlib.sha256(run.config_text.encode()).hexdigest()[:16]
        assert run.run_dir == tmp_path / "runs" / run.run_hash
    path = tmp_path / "config.yaml"  # the text is the resolved config, method included, and loads back as is
    path.write_text(one[0].config_text)
    cfg = load_config(path)
    assert dump_config(cfg) == one[0].config_text and cfg.method.value == "fedkd" and cfg.rounds == 1
    assert cfg.aggregator.value == "era" and cfg.federation.partition.value == "iid" and cfg.seed == 0
    dirichlet = next(r for r in one if r.partition == "0.5")
    assert "partition: dirichlet" in dirichlet.config_text and "alpha: 0.5" in dirichlet.config_text


def test_variants_apply_after_partition_and_seed(tmp_path: Path) -> None:
    runs = _grid(tmp_path, base={"rounds": 1}, variants=("r5=fedkd:rounds=5", "mine=fedkd:seed=7"),
                 partitions=("iid",), seeds=(0,))
    assert "\nrounds: 5\n" in runs[0].config_text and runs[1].config_text.startswith("seed: 7\n")


def test_hospitals_dir_is_shared_by_runs_with_equal_hospital_settings(tmp_path: Path) -> None:
    runs = _grid(tmp_path)
    by_cell: dict[tuple[str, int], set[Path]] = {}
    for r in runs:
        by_cell.setdefault((r.partition, r.seed), set()).add(r.hospitals_dir)
    assert all(len(dirs) == 1 for dirs in by_cell.values())  # era, mean and local differ only off the hospital side
    assert len({next(iter(d)) for d in by_cell.values()}) == 4  # partitions x seeds
    assert all(r.hospitals_dir.parent == tmp_path / "hospitals" for r in runs)
    rounds = _grid(tmp_path, base={"rounds": 7})  # not hospital-side: same teachers
    assert {r.hospitals_dir for r in rounds} == {r.hospitals_dir for r in runs}
    epochs = _grid(tmp_path, base={"teacher.epochs": 2})  # hospital-side: other teachers
    assert not {r.hospitals_dir for r in epochs} & {r.hospitals_dir for r in runs}

    jobs = plan_jobs(runs)
    assert len(jobs) == 4 and all(len(job) == 3 for job in jobs)
    assert all(job[0].method == "local" and {r.variant for r in job} == {"fedkd-era", "fedkd-mean", "local"}
               for job in jobs)


def test_identical_variants_share_one_run(tmp_path: Path) -> None:
    runs = _grid(tmp_path, variants=(ERA, "era-again=fedkd:aggregator=era"), partitions=("iid",), seeds=(0,))
    assert runs[0].run_dir == runs[1].run_dir and len(plan_jobs(runs)) == 1 and len(plan_jobs(runs)[0]) == 1


def test_bad_variant_key_is_reported_by_the_config_validator(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = bench.main(["--out", str(tmp_path), "--variant", "x=fedkd:aggregatr=era", "--methods", "x", "local",
                       "--seeds", "0", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("x: aggregatr: unknown key") == 1  # once, not once per grid cell
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "fedkd-nope"], "'fedkd-nope': unknown variant"),
    (["--methods", "local", "local"], "listed twice"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--partitions", "iid", "alpha"], "'alpha': expected 'iid' or a Dirichlet alpha"),
    (["--partitions", "-1", "--methods", "local"], "federation.alpha"),
])
def test_bad_grid_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                            message: str) -> None:
    assert bench.main(["--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- --only-report and the CLI ----------------------------------------------------------------------------------


def test_only_report_reads_existing_runs_and_runs_nothing(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--variant", ERA, "--methods", "fedkd-era", "local", "--partitions", "iid",
            "--seeds", "0", "1", "--set", "rounds=2"]
    runs = _grid(tmp_path, base={"rounds": 2}, variants=(ERA, "local=local"), partitions=("iid",), seeds=(0, 1))
    assert cli_main(["bench", *args, "--only-report"]) == 1  # nothing finished yet
    for run in runs[:-1]:  # local seed 1 never finished
        run.run_dir.mkdir(parents=True)
        auc = 0.70 + 0.02 * run.seed
        (run.run_dir / "metrics.json").write_text(json.dumps(_metrics(
            method=run.method, aucs=[auc], bytes_up=[{"H0": 50}] if run.method == "fedkd" else None,
            final_extra={"best_test_auc": 0.9} if run.method == "local" else None)))
    assert cli_main(["bench", *args, "--only-report"]) == 0
    rows = _csv_rows(tmp_path / "bench.csv")
    assert list(rows) == [("fedkd-era", "iid"), ("local", "iid"), ("local-best", "iid")]
    assert rows[("fedkd-era", "iid")]["per_seed"] == "0.700000;0.720000"
    assert rows[("local", "iid")]["n_seeds"] == "1"
    md = (tmp_path / "bench.md").read_text()
    assert f"command: `medkd bench {' '.join(args)} --only-report`" in md
    assert "not finished: local iid seed 1 (missing" in md
    for run in runs:  # nothing was run: no config or log written into any run folder
        assert not (run.run_dir / "log.txt").exists() and not (run.run_dir / "config.yaml").exists()
    assert (tmp_path / "auc_per_round.png").read_bytes()[:8] == PNG_MAGIC


def test_failed_runs_are_reported_and_the_others_still_run(tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "bench"
    code = bench.main(["--out", str(out), "--variant", "c=centralized", "--methods", "c", "local",
                       "--partitions", "1.0", "--seeds", "0", "--config", TINY,
                       "--set", f"data.data_dir={empty}", "data.download=false", "--jobs", "1"])
    assert code == 1
    logs = sorted(out.glob("runs/*/log.txt"))
    assert len(logs) == 2 and all("retinamnist.npz not found" in p.read_text() for p in logs)
    md = (out / "bench.md").read_text()
    assert md.count("(failed; see ") == 2


# --- one real grid (slow) ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_end_to_end_then_reused(tmp_path: Path, medmnist_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = ["--out", str(tmp_path), "--variant", ERA, "--methods", "fedkd-era", "local", "--partitions", "1.0",
            "--seeds", "0", "--config", TINY,
            "--set", "rounds=1", "teacher.epochs=1", "distill.epochs=1", f"data.data_dir={medmnist_dir}",
            "data.download=false", "--jobs", "1"]
    with caplog.at_level(logging.INFO, logger="simulations.bench"):
        assert bench.main(args) == 0
    first = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert first[0].startswith("[1/2] local 1.0 seed 0: running")  # local trains the shared teachers first
    assert any(m.startswith("[2/2] fedkd-era 1.0 seed 0: done in") for m in first)
    rows = _csv_rows(tmp_path / "bench.csv")
    assert list(rows) == [("fedkd-era", "1.0"), ("local", "1.0"), ("local-best", "1.0"), ("local-aggregate", "1.0")]
    for row in rows.values():
        assert row["n_seeds"] == "1" and 0.0 <= float(row["test_auc_mean"]) <= 1.0
    assert float(rows[("fedkd-era", "1.0")]["uplink_bytes_per_hospital_round"]) > 0
    assert len(list((tmp_path / "hospitals").iterdir())) == 1  # one set of teachers for both runs
    run_files = sorted(p for p in (tmp_path / "runs").rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in run_files}
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 2

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="simulations.bench"):
        assert bench.main(args) == 0
    second = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert len(second) == 2 and all(": reused" in m for m in second)
    assert {p: p.stat().st_mtime_ns for p in run_files} == mtimes  # no simulate process touched a run folder
    assert sorted(p for p in (tmp_path / "runs").rglob("*") if p.is_file()) == run_files
    assert _csv_rows(tmp_path / "bench.csv") == rows
