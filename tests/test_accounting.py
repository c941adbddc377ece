"""Tests for common.accounting (dp-accounting wrappers) and client.ledger (a hospital's privacy ledger)."""

from __future__ import annotations

import json
import multiprocessing
import warnings
from pathlib import Path

import dp_accounting
import pytest

from client.ledger import LEDGER_FILE, BudgetExhausted, LedgerError, PrivacyLedger, replay
from common.accounting import (AccountingError, GaussianEvent, SampledGaussianEvent, epsilon, event_from_dict,
                               noise_for_epsilon)
from common.errors import MedkdError

DELTA = 1e-5
DPSGD = SampledGaussianEvent(noise_multiplier=1.0, sample_rate=0.01, steps=1000)


# --------------------------------------------------------------------------- accounting


def test_published_dpsgd_check_pld_and_rdp() -> None:
    # σ = 1, q = 0.01, T = 1000, δ = 1e-5: PLD ε ≈ 1.83, RDP ε ≈ 2.10.
    # dp-accounting's own tests and docs (0.6.0) do not state this setting; the figures are confirmed by
    # independent implementations in Opacus 1.6.0: RDPAccountant gives 2.1014 (same orders and RDP -> DP
    # conversion), PRVAccountant (Gopi et al., NeurIPS 2021, eps_error 0.01) 1.838; see the test below.
    pld_eps = epsilon([DPSGD], DELTA, "pld")
    rdp_eps = epsilon([DPSGD], DELTA, "rdp")
    assert pld_eps == pytest.approx(1.83, abs=0.01)
    assert rdp_eps == pytest.approx(2.10, abs=0.01)
    assert pld_eps < rdp_eps  # PLD is the tighter bound


def test_independent_implementations_agree_opacus() -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(DPSGD.noise_multiplier, DPSGD.sample_rate, DPSGD.steps)]
    rdp_accountant, prv_accountant = RDPAccountant(), PRVAccountant()
    rdp_accountant.history, prv_accountant.history = list(history), list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_rdp, opacus_prv = rdp_accountant.get_epsilon(DELTA), prv_accountant.get_epsilon(DELTA)
    assert epsilon([DPSGD], DELTA, "rdp") == pytest.approx(opacus_rdp, abs=1e-3)
    assert epsilon([DPSGD], DELTA, "pld") == pytest.approx(opacus_prv, abs=0.02)  # PRV's eps_error is 0.01


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_more_steps_more_epsilon_more_noise_less(accountant: str) -> None:
    by_steps = [epsilon([SampledGaussianEvent(1.0, 0.01, t)], DELTA, accountant) for t in (10, 100, 500)]
    assert by_steps[0] < by_steps[1] < by_steps[2]
    by_noise = [epsilon([SampledGaussianEvent(s, 0.01, 100)], DELTA, accountant) for s in (0.8, 1.0, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2]
    # composing two runs of 50 steps is composing 100 steps
    half = SampledGaussianEvent(1.0, 0.01, 50)
    assert epsilon([half, half], DELTA, accountant) == pytest.approx(by_steps[1], rel=1e-3)


def test_no_events_spend_nothing() -> None:
    assert epsilon([], DELTA) == 0.0


def test_gaussian_event_matches_the_analytic_gaussian_mechanism() -> None:
    # Balle & Wang (ICML 2018), the library's closed form: PLD is pessimistic, within its discretisation
    exact = dp_accounting.get_epsilon_gaussian(1.0, DELTA)
    one = epsilon([GaussianEvent(1.0, 1)], DELTA)
    assert exact - 1e-9 <= one <= exact + 2e-3
    # k releases with noise σ compose to one release with σ / sqrt(k)
    assert epsilon([GaussianEvent(2.0, 4)], DELTA) == pytest.approx(one, abs=2e-3)
    assert epsilon([GaussianEvent(2.0, 1)] * 4, DELTA) == pytest.approx(one, abs=2e-3)
    # sampling every record every step is no sampling
    assert epsilon([SampledGaussianEvent(2.0, 1.0, 4)], DELTA) == pytest.approx(one, abs=2e-3)
    assert epsilon([GaussianEvent(1.0, 1)], DELTA, "rdp") > one  # RDP is looser


def test_events_round_trip_through_json() -> None:
    for event in (DPSGD, GaussianEvent(noise_multiplier=3.25, count=7), SampledGaussianEvent(1.1, 1, 3)):
        back = event_from_dict(json.loads(json.dumps(event.to_dict())))
        assert back == event and type(back) is type(event)
    assert GaussianEvent(2, 3).to_dict() == {"kind": "gaussian", "noise_multiplier": 2.0, "count": 3}


@pytest.mark.parametrize(("make", "match"), [
    (lambda: SampledGaussianEvent(0.0, 0.01, 10), "noise_multiplier"),
    (lambda: SampledGaussianEvent(-1.0, 0.01, 10), "noise_multiplier"),
    (lambda: SampledGaussianEvent(float("nan"), 0.01, 10), "noise_multiplier"),
    (lambda: SampledGaussianEvent(1.0, 0.0, 10), "sample_rate"),
    (lambda: SampledGaussianEvent(1.0, 1.5, 10), "sample_rate"),
    (lambda: SampledGaussianEvent(1.0, 0.01, 0), "steps"),
    (lambda: SampledGaussianEvent(1.0, 0.01, 2.5), "steps"),
    (lambda: GaussianEvent(1.0, True), "count"),
    (lambda: GaussianEvent("1", 1), "noise_multiplier"),
    (lambda: epsilon([DPSGD], 0.0), "delta"),
    (lambda: epsilon([DPSGD], 1.0), "delta"),
    (lambda: epsilon([DPSGD], DELTA, "gdp"), "accountant"),
    (lambda: epsilon([(1.0, 0.01, 10)], DELTA), r"events\[0\]"),
    (lambda: noise_for_epsilon(0.0, DELTA, 0.01, 10), "target_epsilon"),
    (lambda: noise_for_epsilon(1.0, 2.0, 0.01, 10), "delta"),
    (lambda: noise_for_epsilon(1.0, DELTA, 0.0, 10), "sample_rate"),
    (lambda: noise_for_epsilon(1.0, DELTA, 0.01, 0), "steps"),
    (lambda: event_from_dict({"kind": "laplace", "scale": 1.0}), "event.kind"),
    (lambda: event_from_dict({"kind": "gaussian", "noise_multiplier": 1.0}), "missing count"),
    (lambda: event_from_dict({"kind": "gaussian", "noise_multiplier": 1.0, "count": 1, "x": 0}), "unknown x"),
])
def test_bad_inputs_raise_value_errors_naming_the_parameter(make, match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        make()
    assert isinstance(caught.value, AccountingError) and isinstance(caught.value, MedkdError)


def test_noise_for_epsilon_round_trips() -> None:
    target, q, steps = 2.0, 0.1, 20
    sigma = noise_for_epsilon(target, DELTA, q, steps)
    reached = epsilon([SampledGaussianEvent(sigma, q, steps)], DELTA)
    assert reached <= target  # never less private than asked
    assert reached == pytest.approx(target, abs=5e-3)  # and not much noisier than needed
    assert epsilon([SampledGaussianEvent(sigma - 0.01, q, steps)], DELTA) > target  # the smallest such σ


# --------------------------------------------------------------------------- ledger

BUDGET = 1.0
RELEASE = GaussianEvent(noise_multiplier=15.0, count=1)  # ε ≈ 0.22 alone; ~16 of them fit in ε = 1


def _charge(ledger: PrivacyLedger, event=RELEASE, round: int | None = 1):
    return ledger.charge(event, mechanism="gnmax", description="proxy answers", run_id=7, round=round)


def test_charges_survive_a_restart_and_replay_exactly(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, delta=DELTA, budget_epsilon=5.0)
    events = [SampledGaussianEvent(1.0, 0.05, 10), GaussianEvent(10.0, 3), GaussianEvent(20.0, 1)]
    entries = [ledger.charge(e, mechanism="dp-sgd teacher" if i == 0 else "gnmax", description=f"release {i}",
                             run_id=3, round=None if i == 0 else i) for i, e in enumerate(events)]
    assert [e.sequence for e in entries] == [1, 2, 3]
    assert entries[0].epsilon_after < entries[1].epsilon_after < entries[2].epsilon_after
    assert all(e.epsilon_after < e.epsilon_after_rdp for e in entries)
    assert entries[-1].epsilon_after == epsilon(events, DELTA)

    restarted = PrivacyLedger(tmp_path, delta=DELTA, budget_epsilon=5.0)
    assert restarted.entries() == entries
    assert restarted.spent() == entries[-1].epsilon_after
    assert restarted.spent("rdp") == entries[-1].epsilon_after_rdp
    assert replay(tmp_path / LEDGER_FILE, DELTA) == entries[-1].epsilon_after  # exactly, not approximately

    lines = (tmp_path / LEDGER_FILE).read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["mechanism"] == "dp-sgd teacher" and first["round"] is None and first["run_id"] == 3
    assert first["event"] == {"kind": "sampled_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 10}
    assert first["delta"] == DELTA and set(first) >= {"time", "description", "epsilon_after", "epsilon_after_rdp"}


def test_a_new_hospital_has_spent_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "H0", delta=DELTA, budget_epsilon=BUDGET)
    assert ledger.entries() == [] and ledger.spent() == 0.0
    assert not (tmp_path / "H0").exists()  # reading creates nothing
    with pytest.raises(LedgerError, match="no privacy ledger"):
        replay(tmp_path / "H0" / LEDGER_FILE, DELTA)


def test_exceeding_the_budget_is_refused_and_leaves_the_file_unchanged(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, delta=DELTA, budget_epsilon=BUDGET)
    big = GaussianEvent(noise_multiplier=2.0, count=1)  # ε ≈ 2.2 alone
    assert ledger.would_exceed(big) and not ledger.would_exceed(RELEASE)
    _charge(ledger)
    _charge(ledger)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    spent = ledger.spent()
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted") as caught:
        _charge(ledger, big)
    message = str(caught.value)
    assert f"{spent:.4f}" in message and f"{caught.value.would_be:.4f}" in message and "budget 1" in message
    assert caught.value.spent == spent and caught.value.would_be > BUDGET and caught.value.budget == BUDGET
    assert isinstance(caught.value, MedkdError)
    assert (tmp_path / LEDGER_FILE).read_bytes() == before  # byte-identical
    _charge(ledger)  # a release that still fits is booked
    assert [e.sequence for e in ledger.entries()] == [1, 2, 3]


def test_a_torn_last_line_is_reported_not_dropped(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, delta=DELTA, budget_epsilon=BUDGET)
    _charge(ledger)
    _charge(ledger)
    path = tmp_path / LEDGER_FILE
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines(keepends=True)[-1][:40])  # a crash in the middle of a third write
    torn = path.read_bytes()
    for read in (ledger.entries, ledger.spent, lambda: replay(path, DELTA)):
        with pytest.raises(LedgerError, match=rf"{LEDGER_FILE}: line 3 is incomplete"):
            read()
    with pytest.raises(LedgerError, match="line 3"):
        _charge(ledger)  # never appends after a torn line
    assert path.read_bytes() == torn


@pytest.mark.parametrize(("mangle", "match"), [
    (lambda lines: [lines[0], b"not json\n"], "line 2 is not a valid ledger entry"),
    (lambda lines: [lines[1], lines[0]], "line 1 has sequence 2, expected 1"),
    (lambda lines: [lines[0], lines[0]], "line 2 has sequence 1, expected 2"),
    (lambda lines: [lines[0], lines[1].replace(b'"count": 1', b'"count": 0')], "line 2 .*count"),
    (lambda lines: [lines[0], b"\n", lines[1]], "line 2 is not a valid ledger entry"),
])
def test_a_corrupt_line_is_reported_with_its_number(tmp_path: Path, mangle, match: str) -> None:
    ledger = PrivacyLedger(tmp_path, delta=DELTA, budget_epsilon=BUDGET)
    _charge(ledger)
    _charge(ledger)
    path = tmp_path / LEDGER_FILE
    path.write_bytes(b"".join(mangle(path.read_bytes().splitlines(keepends=True))))
    with pytest.raises(LedgerError, match=match):
        ledger.entries()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"delta": 0.0, "budget_epsilon": 1.0}, "delta"),
    ({"delta": DELTA, "budget_epsilon": 0.0}, "budget_epsilon"),
    ({"delta": DELTA, "budget_epsilon": float("inf")}, "budget_epsilon"),
])
def test_bad_ledger_settings_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PrivacyLedger(tmp_path, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mechanism": ""}, "mechanism"),
    ({"run_id": -1}, "run_id"),
    ({"round": "3"}, "round"),
    ({"description": None}, "description"),
])
def test_bad_charge_arguments_are_refused_before_anything_is_written(tmp_path: Path, kwargs: dict,
                                                                      match: str) -> None:
    ledger = PrivacyLedger(tmp_path, delta=DELTA, budget_epsilon=BUDGET)
    args = {"mechanism": "gnmax", "description": "", "run_id": 1, "round": 1} | kwargs
    with pytest.raises(AccountingError, match=match):
        ledger.charge(RELEASE, **args)
    with pytest.raises(AccountingError, match="event"):
        ledger.charge((15.0, 1), mechanism="gnmax", description="", run_id=1, round=1)
    assert not (tmp_path / LEDGER_FILE).exists()


def _charge_until_refused(folder: str, worker: int, barrier, results) -> None:
    """Process body: charge RELEASE until the budget refuses; report how many were booked."""
    ledger = PrivacyLedger(Path(folder), delta=DELTA, budget_epsilon=BUDGET)
    barrier.wait()
    booked = 0
    while True:
        try:
            ledger.charge(RELEASE, mechanism="gnmax", description=f"worker {worker}", run_id=worker, round=booked)
        except BudgetExhausted:
            break
        booked += 1
    results.put((worker, booked))


def test_two_processes_never_charge_past_the_budget(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # real, fresh processes, as two ClientApps would be
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_charge_until_refused, args=(str(tmp_path), i, barrier, results))
               for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    booked = dict(results.get(timeout=5) for _ in workers)

    ledger = PrivacyLedger(tmp_path, delta=DELTA, budget_epsilon=BUDGET)
    entries = ledger.entries()
    fits = len(entries)  # exactly as many releases as the budget allows in total, none more
    assert fits == booked[0] + booked[1] > 1
    assert epsilon([RELEASE] * fits, DELTA) <= BUDGET < epsilon([RELEASE] * (fits + 1), DELTA)
    assert [e.sequence for e in entries] == list(range(1, fits + 1))
    assert all(e.epsilon_after <= BUDGET for e in entries)
    assert ledger.spent() == entries[-1].epsilon_after <= BUDGET
    assert replay(tmp_path / LEDGER_FILE, DELTA) == entries[-1].epsilon_after
    assert ledger.would_exceed(RELEASE)
