"""The trace-driven evaluation: seeded and deterministic, every job accounted for, the crypto
filter never broken, the real engine behind v1, priority classes honoured in each queue."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import scheduler.simulate as sim
from scheduler import engine
from scheduler.engine import PRIORITY_CLASSES
from scheduler.simulate import (
    CRYPTO_FILTERING,
    POLICIES,
    SimBackend,
    SimConfig,
    World,
    arrival_times,
    crypto_ok,
    fits,
    load_backends,
    report_markdown,
    simulate,
)
from sdk.canonical import canonical_json
from sdk.cli import app as qai
from sdk.errors import QaiError

CONFIG = SimConfig(jobs=150, seed=11)


@pytest.fixture(scope="module")
def backends() -> list[SimBackend]:
    return load_backends()


@pytest.fixture(scope="module")
def result(backends: list[SimBackend]) -> dict[str, Any]:
    return simulate(CONFIG, backends=backends)


def _outcomes(backends: Sequence[SimBackend], policy: str, config: SimConfig = CONFIG) -> list[sim.Outcome]:
    return sim._Run(World(config, backends), policy).run(None)


def test_same_seed_same_numbers_other_seed_other_numbers(backends: list[SimBackend],
                                                         result: dict[str, Any]) -> None:
    again = simulate(CONFIG, backends=backends)
    assert canonical_json(again) == canonical_json(result)
    other = simulate(replace(CONFIG, seed=12), backends=backends)
    assert other["policies"]["v1"]["mean_jct_seconds"] != result["policies"]["v1"]["mean_jct_seconds"]


def test_every_job_is_accounted_for(result: dict[str, Any]) -> None:
    assert list(result["policies"]) == list(POLICIES)
    for m in result["policies"].values():
        assert m["submitted"] == CONFIG.jobs
        assert m["completed"] + m["dropped"] == m["submitted"]
        assert sum(m["routed"].values()) == m["completed"]


def test_crypto_filtering_policies_never_break_the_crypto_policy(result: dict[str, Any]) -> None:
    for policy, m in result["policies"].items():
        assert m["crypto_filter"] == (policy in CRYPTO_FILTERING)
        if m["crypto_filter"]:
            assert m["crypto_violations"] == 0, policy
    assert result["policies"]["v1"]["crypto_violations"] == 0
    # the metric counts something: the crypto-blind balancers do land jobs on the wrong links
    blind = [m["crypto_violations"] for p, m in result["policies"].items() if p not in CRYPTO_FILTERING]
    assert sum(blind) > 0
    target = result["targets"]["0 crypto-policy violations for every crypto-filtering policy"]
    assert target["met"] is True and set(target["value"]) == set(CRYPTO_FILTERING)


@pytest.mark.parametrize("policy", POLICIES)
def test_runs_are_physically_consistent(backends: list[SimBackend], policy: str) -> None:
    by_id = {b.backend_id: b for b in backends}
    outcomes = _outcomes(backends, policy)
    busy: dict[str, list[tuple[float, float]]] = {}
    for o in outcomes:
        if o.dropped is not None:
            assert o.end is None and o.backend_id is None
            continue
        assert o.backend_id is not None and o.start is not None and o.end is not None and o.queued_at is not None
        b = by_id[o.backend_id]
        assert fits(o.job, b)  # every policy respects qubits and max_shots
        assert o.crypto_violation == (not crypto_ok(o.job, b))
        assert o.job.arrival <= o.queued_at <= o.start < o.end
        assert o.fidelity is not None and 0.0 <= o.fidelity <= 1.0
        assert o.cost == pytest.approx(b.cost_per_shot * o.job.shots * (3.0 if o.method == sim.ZNE_METHOD else 1.0))
        busy.setdefault(o.backend_id, []).append((o.start, o.end))
    for intervals in busy.values():  # one job at a time per backend
        intervals.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(intervals))


def test_metrics_match_the_outcomes(backends: list[SimBackend], result: dict[str, Any]) -> None:
    outcomes = _outcomes(backends, "cheapest")
    m = result["policies"]["cheapest"]
    done = [o for o in outcomes if o.end is not None]
    jct = sorted(o.end - o.job.arrival for o in done if o.end is not None)
    fidelity = sum(o.fidelity for o in done if o.fidelity is not None)
    assert m["mean_jct_seconds"] == pytest.approx(sum(jct) / len(jct), abs=1e-5)
    assert m["p95_jct_seconds"] == pytest.approx(jct[-(-95 * len(jct) // 100) - 1], abs=1e-5)
    assert jct[0] <= m["mean_jct_seconds"] <= jct[-1] and m["p95_jct_seconds"] <= jct[-1]
    assert m["fidelity_per_usd"] == pytest.approx(fidelity / sum(o.cost for o in done), rel=1e-5)
    late = [o for o in outcomes if o.job.deadline_seconds is not None
            and (o.end is None or o.end - o.job.arrival > o.job.deadline_seconds)]
    assert m["sla_violations"] == len(late)
    assert m["deadline_jobs"] == sum(1 for o in outcomes if o.job.deadline_seconds is not None)
    cmp = result["v1_vs_max_fidelity"]
    v1, mf = result["policies"]["v1"], result["policies"]["max-fidelity"]
    assert cmp["mean_jct_change_pct"] == pytest.approx(
        100 * (v1["mean_jct_seconds"] - mf["mean_jct_seconds"]) / mf["mean_jct_seconds"], abs=1e-3)
    assert cmp["fidelity_loss_pct"] == pytest.approx(
        100 * (mf["mean_fidelity"] - v1["mean_fidelity"]) / mf["mean_fidelity"], abs=1e-3)
    # max-fidelity does choose the best predicted fidelity: nobody beats it on prediction
    assert mf["mean_predicted_fidelity"] == max(p["mean_predicted_fidelity"] for p in result["policies"].values())


def test_v1_decides_through_the_real_engine(backends: list[SimBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = engine.decide

    def spy(inputs: dict[str, Any], plugins: Any) -> dict[str, Any]:
        body = real(inputs, plugins)
        calls.append(body)
        return body

    monkeypatch.setattr(sim, "decide", spy)
    outcomes = _outcomes(backends, "v1")
    assert len(calls) >= CONFIG.jobs
    chosen = [b["chosen"]["backend_id"] for b in calls if b["chosen"] is not None]
    assert chosen == [o.backend_id for o in sorted(outcomes, key=lambda o: (o.queued_at or 0.0, o.job.index))
                      if o.backend_id is not None]
    assert all(b["chosen"]["model_version"] == sim.MODEL_VERSION for b in calls if b["chosen"] is not None)


def test_v1_under_the_value_profile_runs_the_method_the_engine_co_selected(
        backends: list[SimBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = engine.decide

    def spy(inputs: dict[str, Any], plugins: Any) -> dict[str, Any]:
        body = real(inputs, plugins)
        if body["chosen"] is not None:
            b = next(b for b in inputs["backends"] if b["backend_id"] == body["chosen"]["backend_id"])
            calls.append({**body["chosen"], "policy_method": b["prediction"]["method"],
                          "profile": inputs["profile"]["name"]})
        return body

    monkeypatch.setattr(sim, "decide", spy)
    config = replace(CONFIG, v1_profile="value")
    outcomes = sorted((o for o in _outcomes(backends, "v1", config) if o.backend_id is not None),
                      key=lambda o: (o.queued_at or 0.0, o.job.index))
    assert {c["profile"] for c in calls} == {"value"}
    assert [(c["backend_id"], c["em_method"]) for c in calls] == [(o.backend_id, o.method) for o in outcomes]
    by_method = {m: sim.shot_multiplier(m) for m in {c["em_method"] for c in calls}}
    for c, o in zip(calls, outcomes, strict=True):  # priced and timed as the chosen method, not the policy's
        spec = next(b for b in backends if b.backend_id == o.backend_id)
        assert o.cost == pytest.approx(spec.cost_per_shot * o.job.shots * by_method[c["em_method"]])
        assert c["expected_fidelity"] == o.predicted_fidelity
    assert any(c["em_method"] != c["policy_method"] for c in calls)  # it does co-select
    with pytest.raises(QaiError) as err:
        SimConfig(v1_profile="nope")
    assert err.value.code == "scheduler.bad_simulation"


def test_priority_classes_order_each_backend_queue(backends: list[SimBackend]) -> None:
    """No job starts while a job of a more urgent class waits in the same backend's queue."""
    config = replace(CONFIG, arrival_rate=0.2, jobs=200)  # busy enough for queues to form
    for policy in ("max-fidelity", "v1"):
        outcomes = [o for o in _outcomes(backends, policy, config) if o.start is not None]
        for o in outcomes:
            rank = PRIORITY_CLASSES.index(o.job.priority_class)
            jumped = [w for w in outcomes if w.backend_id == o.backend_id
                      and PRIORITY_CLASSES.index(w.job.priority_class) < rank
                      and w.queued_at is not None and o.start is not None and w.start is not None
                      and w.queued_at < o.start < w.start]
            assert not jumped, (policy, o.job.job_id, [w.job.job_id for w in jumped])


def test_the_trace_has_its_peak_and_its_mix() -> None:
    config = SimConfig(jobs=1000, seed=3, arrival_rate=0.05)
    times = arrival_times(config)
    assert times == sorted(times) and len(times) == 1000
    start = config.jobs / config.arrival_rate / 3
    in_peak = sum(start <= t < start + config.peak_seconds for t in times)
    before = sum(start - config.peak_seconds <= t < start for t in times)
    assert in_peak > 3 * before  # 5x the rate for 10 minutes
    assert arrival_times(replace(config, peak=False)) != times
    jobs = sim.make_jobs(config)
    assert {j.crypto_mode for j in jobs} == {"classical", "hybrid", "pqc-required"}
    assert {j.priority_class for j in jobs} == set(PRIORITY_CLASSES)
    assert {j.family for j in jobs} == {"random", "trotter", "variational"}
    assert any(j.deadline_seconds is not None for j in jobs) and any(j.deadline_seconds is None for j in jobs)
    assert all(2 <= j.num_qubits <= config.max_qubits and j.shot_budget >= j.shots for j in jobs)
    assert all(j.deadline_seconds is not None for j in jobs if j.priority_class == "critical")


def test_drift_makes_predictions_differ_from_outcomes(backends: list[SimBackend]) -> None:
    world = World(CONFIG, backends)
    b = backends[-1].backend_id
    assert world.drift(b, 0.0) == sim.Drift()  # the walk starts at the snapshot's own figures
    later = [world.drift(b, t) for t in (3600.0, 7200.0, 36000.0)]
    assert len(set(later)) == 3
    # the published calibration lags the true one until the next publication
    assert world.published(b, 3599.0) == world.drift(b, 0.0) != world.drift(b, 3599.0)
    fresh = World(CONFIG, backends)
    assert fresh.drift(b, 36000.0) == world.drift(b, 36000.0)  # a value depends on its time only


def test_report_states_the_command_the_table_and_the_targets(result: dict[str, Any]) -> None:
    text = report_markdown(result, "qai scheduler simulate --jobs 150 --seed 11")
    assert "qai scheduler simulate --jobs 150 --seed 11" in text
    for policy in POLICIES:
        assert f"| {policy} |" in text
    for target in result["targets"]:
        assert target in text


def test_cli_writes_the_report_and_json(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    r = CliRunner().invoke(qai, ["scheduler", "simulate", "--jobs", "60", "--seed", "5", "--no-sensitivity",
                                           "--report", str(report), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["report"] == str(report) and set(data["policies"]) == set(POLICIES)
    text = report.read_text()
    assert (f"qai scheduler simulate --jobs 60 --seed 5 --arrival-rate 0.03 --peak --max-qubits 32 --foreign-load "
            f"--queue-view provider --profile default --no-sensitivity --report {report}") in text
    bad = CliRunner().invoke(qai, ["scheduler", "simulate", "--jobs", "10", "--queue-view", "psychic", "--no-report",
                                             "--json"])
    assert bad.exit_code == 2 and json.loads(bad.stdout)["error"]["code"] == "scheduler.bad_simulation"
