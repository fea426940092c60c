"""The oracle bound on fidelity per USD (scheduler.simulate.ratio_bound): C(F) is the exact LP value
and never above what an assignment costs, the bound never below what an assignment reaches, a free
way to reach the target is infinity rather than a division by zero, and on a real run the bound sits
above every policy that meets the fidelity target."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction
from typing import Any

import pytest

from scheduler.simulate import (
    JobOption,
    SimConfig,
    cost_curve,
    load_backends,
    min_cost,
    ratio_bound,
    report_markdown,
    simulate,
)

Jobs = list[list[JobOption]]


def _instance(rng: random.Random, *, coarse: bool) -> Jobs:
    """2-5 jobs of 2-4 options, some free; ``coarse`` rounds to one decimal so that ties, repeated
    points and collinear hull points occur."""
    def value(lo: float, hi: float) -> float:
        x = rng.uniform(lo, hi)
        return round(x, 1) if coarse else x

    return [[(value(0.3, 1.0), 0.0 if rng.random() < 0.15 else value(0.5, 10.0))
             for _ in range(rng.randint(2, 4))] for _ in range(rng.randint(2, 5))]


def _assignments(jobs: Jobs) -> list[tuple[Fraction, Fraction]]:
    """(Σf, Σc) of every one-option-per-job assignment, exactly."""
    return [(sum((Fraction(f) for f, _ in pick), Fraction(0)), sum((Fraction(c) for _, c in pick), Fraction(0)))
            for pick in itertools.product(*jobs)]


def _dual(jobs: Jobs, lam: Fraction, fidelity: Fraction) -> Fraction:
    """The Lagrangian dual λF + Σ_j min_o (c_o − λ f_o): a lower bound on the LP at any λ ≥ 0."""
    return lam * fidelity + sum((min(Fraction(c) - lam * Fraction(f) for f, c in options) for options in jobs),
                                Fraction(0))


def _targets(rng: random.Random, jobs: Jobs) -> list[Fraction]:
    lo = sum((Fraction(min(f for f, _ in o)) for o in jobs), Fraction(0))
    hi = sum((Fraction(max(f for f, _ in o)) for o in jobs), Fraction(0))
    return [lo, hi, *(lo + (hi - lo) * Fraction(rng.random()) for _ in range(6))]


@pytest.mark.parametrize("coarse", [False, True])
def test_bound_is_above_every_assignment_and_cost_below(coarse: bool) -> None:
    rng = random.Random(f"bound|{coarse}")
    checked = 0
    for _ in range(150):
        jobs = _instance(rng, coarse=coarse)
        sums = _assignments(jobs)
        curve = cost_curve(jobs)
        for target in _targets(rng, jobs):
            bound = ratio_bound(jobs, float(target))
            target = Fraction(float(target))  # the bound sees F* as a float
            reaching = [(f, c) for f, c in sums if f >= target]
            if not reaching:
                assert bound.fidelity_per_usd is None and bound.min_cost_usd == math.inf
                continue
            lp = min_cost(curve, target)
            assert lp is not None and lp <= min(c for _, c in reaching)
            assert Fraction(bound.min_cost_usd) <= lp
            best = max(math.inf if c == 0 else f / c for f, c in reaching)
            assert bound.fidelity_per_usd is not None
            if best == math.inf:
                assert bound.fidelity_per_usd == math.inf
            else:
                assert bound.fidelity_per_usd == math.inf or Fraction(bound.fidelity_per_usd) >= best
            checked += 1
    assert checked > 500


def test_cost_curve_is_the_exact_lp_value() -> None:
    """At each F, C(F) equals the Lagrangian dual at the slope of the segment holding F (so it is a
    valid lower bound on every assignment's cost) and no λ gives a higher dual (so it is tight);
    scipy's LP solver agrees."""
    from scipy.optimize import linprog  # scikit-learn's dependency: always installed

    rng = random.Random("dual")
    for _ in range(60):
        jobs = _instance(rng, coarse=rng.random() < 0.5)
        curve = cost_curve(jobs)
        slopes = [Fraction(0), *((c1 - c0) / (f1 - f0) for (f0, c0), (f1, c1) in itertools.pairwise(curve))]
        assert slopes == sorted(slopes)  # C is convex
        for target in _targets(rng, jobs):
            lp = min_cost(curve, target)
            assert lp is not None
            duals = [_dual(jobs, lam, target) for lam in slopes]
            assert max(duals) == lp
            assert all(_dual(jobs, Fraction(rng.uniform(0, 50)), target) <= lp for _ in range(5))
            flat = [o for options in jobs for o in options]
            eq = [[1.0 if k == j else 0.0 for k, options in enumerate(jobs) for _ in options] for j in range(len(jobs))]
            solved = linprog([c for _, c in flat], A_ub=[[-f for f, _ in flat]], b_ub=[-float(target)],
                             A_eq=eq, b_eq=[1.0] * len(jobs), bounds=(0, None), method="highs")
            assert solved.status == 0 and solved.fun == pytest.approx(float(lp), abs=1e-7)


def test_a_free_way_to_the_target_is_an_infinite_bound() -> None:
    jobs: Jobs = [[(0.9, 0.0), (0.95, 4.0)], [(0.8, 0.0), (0.99, 2.0)], [(0.7, 0.0)]]
    free = ratio_bound(jobs, 2.3)  # the free options sum to 2.4
    assert free.fidelity_per_usd == math.inf and free.min_cost_usd == 0.0
    assert free.to_json()["outcome"] == "unbounded" and free.to_json()["fidelity_per_usd"] is None
    # past what the free options reach, money is needed and the bound is finite again
    paid = ratio_bound(jobs, 2.5)
    assert paid.fidelity_per_usd is not None and 0 < paid.fidelity_per_usd < math.inf
    assert paid.min_cost_usd == pytest.approx(2.0 * 0.1 / 0.19)  # the cheapest 0.1 of fidelity: job 2's upgrade
    unreachable = ratio_bound(jobs, 2.7)  # the best options sum to 2.64
    assert unreachable.fidelity_per_usd is None and unreachable.to_json()["outcome"] == "unreachable"


@pytest.fixture(scope="module")
def tiny_run() -> dict[str, Any]:
    return simulate(SimConfig(jobs=60, seed=5), backends=load_backends())


def _meets_fidelity_target(policies: dict[str, Any]) -> list[str]:
    mf = policies["max-fidelity"]["mean_fidelity"]
    return [p for p, m in policies.items() if m["mean_fidelity"] is not None and m["mean_fidelity"] >= 0.97 * mf]


def test_the_bound_of_a_real_run_is_above_every_policy_that_meets_the_fidelity_target(
        tiny_run: dict[str, Any]) -> None:
    routing, free = tiny_run["oracle_bound"]["routing"], tiny_run["oracle_bound"]["routing_and_em_method"]
    policies = tiny_run["policies"]
    assert routing["outcome"] == "bounded" and math.isfinite(routing["fidelity_per_usd"])
    # the jobs counted are what max-fidelity completes, and F* is 97 % of its mean fidelity on them
    assert routing["jobs"] == policies["max-fidelity"]["completed"]
    assert routing["fidelity_target"] == pytest.approx(
        0.97 * policies["max-fidelity"]["mean_fidelity"] * routing["jobs"], abs=1e-4)
    qualifying = _meets_fidelity_target(policies)
    assert "max-fidelity" in qualifying
    for p in qualifying:
        assert routing["fidelity_per_usd"] >= policies[p]["fidelity_per_usd"], p
    # choosing the EM method as well only adds options
    assert free["fidelity_per_usd"] >= routing["fidelity_per_usd"]
    assert free["max_fidelity"] >= routing["max_fidelity"]


def test_the_report_states_the_bound(tiny_run: dict[str, Any]) -> None:
    text = report_markdown(tiny_run, "qai scheduler simulate --jobs 60 --seed 5")
    section = text[text.index("## Can any routing meet both targets?"):text.index("## Per policy")]
    bound = tiny_run["oracle_bound"]["routing"]["fidelity_per_usd"]
    assert f"**{math.ceil(bound * 10_000) / 10_000:.4f}**" in section
    assert f"F* = {tiny_run['oracle_bound']['routing']['fidelity_target']:.2f}" in section
    assert "arrival" in section and "upper bound" in section


def test_a_co_selecting_v1_is_bounded_by_the_free_method_bound() -> None:
    """v1 on the value profile chooses the EM method too: the routing-only bound does not cover it,
    the routing-and-method bound must."""
    run = simulate(SimConfig(jobs=60, seed=5, v1_profile="value"), backends=load_backends())
    free = run["oracle_bound"]["routing_and_em_method"]
    assert free["outcome"] == "bounded"
    qualifying = _meets_fidelity_target(run["policies"])
    assert "v1" in qualifying  # the value profile keeps within 3 % of max-fidelity here
    for p in qualifying:
        assert free["fidelity_per_usd"] >= run["policies"][p]["fidelity_per_usd"], p
