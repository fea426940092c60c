"""The mitiq.Calibrator baseline: mapping Mitiq strategies to harness methods, the executor, and a
small deterministic Calibrator run on fake_manila."""

from __future__ import annotations

import json
from typing import Any

import cirq
import pytest
from mitiq import MeasurementResult
from mitiq.calibration import Calibrator
from mitiq.calibration.settings import ZNE_SETTINGS, MitigationTechnique, Strategy
from mitiq.zne.inference import AdaExpFactory, ExpFactory, LinearFactory, PolyFactory, RichardsonFactory
from mitiq.zne.scaling import fold_all, fold_gates_at_random, fold_global
from qiskit import QuantumCircuit, transpile

from em_policy import calibrator as calmod
from em_policy.calibrator import (
    CalibratorChoice,
    SnapshotExecutor,
    build_settings,
    choose_method,
    describe_strategy,
    map_strategy,
    planned_executions,
    run_calibrator,
)
from harness.catalog import catalog_snapshot
from harness.methods import parse_method
from harness.noise import device_target
from sdk.errors import QaiError


def zne(factory: Any, scale_noise: Any) -> Strategy:
    return Strategy(0, MitigationTechnique.ZNE, {"factory": factory, "scale_noise": scale_noise})


@pytest.fixture(scope="module")
def manila() -> Any:
    return catalog_snapshot("fake_manila")


# --- mapping (pure) ----------------------------------------------------------------------------

EXACT = [
    (LinearFactory([1.0, 2.0, 3.0]), fold_global, "zne-linear-global"),
    (LinearFactory([1.0, 2.0, 3.0]), fold_gates_at_random, "zne-linear-gate"),
    (RichardsonFactory([1.0, 2.0, 3.0]), fold_global, "zne-richardson-global"),
    (RichardsonFactory([1.0, 2.0, 3.0]), fold_gates_at_random, "zne-richardson-gate"),
    (PolyFactory([1.0, 1.5, 2.0, 2.5, 3.0], order=2), fold_global, "zne-poly2-global"),
    (PolyFactory([1.0, 1.5, 2.0, 2.5, 3.0], order=2), fold_gates_at_random, "zne-poly2-gate"),
]


@pytest.mark.parametrize(("factory", "scale_noise", "expected"), EXACT)
def test_exact_mappings_have_no_note(factory: Any, scale_noise: Any, expected: str) -> None:
    method, note = map_strategy(describe_strategy(zne(factory, scale_noise)))
    assert (method, note) == (expected, "")
    assert parse_method(method).name == expected


@pytest.mark.parametrize(("scale_noise", "folding"), [(fold_global, "global"), (fold_gates_at_random, "gate")])
def test_exp_factory_maps_to_exp_and_notes_the_asymptote(scale_noise: Any, folding: str) -> None:
    method, note = map_strategy(describe_strategy(zne(ExpFactory([1.0, 2.0, 3.0]), scale_noise)))
    assert method == f"zne-exp-{folding}"
    assert "asymptote" in note and "fits it" in note
    _, fixed = map_strategy(describe_strategy(zne(ExpFactory([1.0, 2.0, 3.0], asymptote=0.5), scale_noise)))
    assert "fixes it at 0.5" in fixed


def test_non_default_scale_factors_name_the_exact_harness_equivalent() -> None:
    method, note = map_strategy(describe_strategy(zne(RichardsonFactory([1.0, 3.0, 5.0]), fold_global)))
    assert method == "zne-richardson-global"
    assert "zne-richardson-global@1,3,5" in note
    assert parse_method("zne-richardson-global@1,3,5").scale_factors == (1.0, 3.0, 5.0)
    method, note = map_strategy(describe_strategy(zne(LinearFactory([1.0, 3.0, 5.0]), fold_gates_at_random)))
    assert (method, "zne-linear-gate@1,3,5" in note) == ("zne-linear-gate", True)


@pytest.mark.parametrize(("factory", "expected", "fragment"), [
    (PolyFactory([1.0, 2.0, 3.0], order=1), "zne-linear-global", "order=1"),
    (PolyFactory([1.0, 1.5, 2.0, 2.5, 3.0], order=3), "zne-poly2-global", "order=3"),
])
def test_other_poly_orders_map_to_the_nearest_with_a_note(factory: Any, expected: str, fragment: str) -> None:
    method, note = map_strategy(describe_strategy(zne(factory, fold_global)))
    assert method == expected
    assert fragment in note


def test_adaptive_exp_maps_to_exp_with_a_note() -> None:
    description = {"technique": "ZNE", "factory": type(AdaExpFactory(steps=4)).__name__,
                   "scale_factors": [1.0, 2.0, 3.0], "scale_method": "fold_global"}
    method, note = map_strategy(description)
    assert method == "zne-exp-global"
    assert "AdaExpFactory" in note


def test_unrepresentable_folding_maps_to_gate_with_a_note() -> None:
    method, note = map_strategy(describe_strategy(zne(LinearFactory([1.0, 2.0, 3.0]), fold_all)))
    assert method == "zne-linear-gate"
    assert "fold_all" in note


def test_unknown_factory_or_folding_is_refused() -> None:
    base = describe_strategy(zne(LinearFactory([1.0, 2.0, 3.0]), fold_global))
    for bad in ({**base, "factory": "MysteryFactory"}, {**base, "scale_method": "mystery_scaling"}):
        with pytest.raises(QaiError) as err:
            map_strategy(bad)
        assert err.value.code == "em_policy.calibrator_failed" and err.value.status == 500


def test_raw_and_pec_map_to_unmitigated() -> None:
    assert map_strategy({"technique": "RAW"}) == ("unmitigated", "")
    method, note = map_strategy({"technique": "PEC", "noise_level": 0.01})
    assert method == "unmitigated" and "PEC" in note


def test_describe_strategy_is_mitiqs_summary_and_json() -> None:
    description = describe_strategy(zne(PolyFactory([1.0, 2.0, 3.0], order=2), fold_gates_at_random))
    assert description == {"technique": "ZNE", "factory": "PolyFactory", "scale_factors": [1.0, 2.0, 3.0],
                           "scale_method": "fold_gates_at_random", "order": 2.0}
    json.dumps(description)


def test_no_improvement_means_unmitigated() -> None:
    description = describe_strategy(zne(LinearFactory([1.0, 2.0, 3.0]), fold_global))
    assert choose_method(description, mitigated_error=0.01, unmitigated_error=0.02) == ("zne-linear-global", "")
    for worse in (0.02, 0.05, float("nan"), float("inf")):
        method, note = choose_method(description, mitigated_error=worse, unmitigated_error=0.02)
        assert method == "unmitigated"
        assert note.startswith("no improvement") and "zne-linear-global" in note


# --- settings and executor ---------------------------------------------------------------------

def test_settings_are_seeded_and_default_is_mitiqs() -> None:
    a, b, c = build_settings("default", seed=1), build_settings("default", seed=1), build_settings("default", seed=2)
    pa, pb, pc = a.make_problems(), b.make_problems(), c.make_problems()
    assert [p.type for p in pa] == [bench["circuit_type"] for bench in ZNE_SETTINGS.benchmarks]
    rb = [i for i, p in enumerate(pa) if p.type == "rb"]
    assert rb and all(pa[i].circuit == pb[i].circuit for i in rb)
    assert any(pa[i].circuit != pc[i].circuit for i in rb)
    assert [describe_strategy(s) for s in a.make_strategies()] == [
        describe_strategy(s) for s in ZNE_SETTINGS.make_strategies()]
    assert planned_executions("default") == 4 * (8 * 3 + 1)
    assert planned_executions("small") == 2 * (3 + 3 + 1)
    with pytest.raises(QaiError) as err:
        build_settings("huge")
    assert err.value.code == "em_policy.bad_calibrator_settings"


def test_corrected_settings_prepare_the_w_state() -> None:
    def w_probabilities(name: str) -> dict[str, float]:
        problem = next(p for p in build_settings(name).make_problems() if p.type == "w")
        state = cirq.final_state_vector(problem.circuit, qubit_order=sorted(problem.circuit.all_qubits()))
        return {f"{i:02b}": round(float(abs(a) ** 2), 6) for i, a in enumerate(state) if abs(a) > 1e-9}

    assert w_probabilities("default") == {"00": 1.0}  # Mitiq 1.1's circuit lacks the initial X
    assert w_probabilities("corrected") == {"01": 0.5, "10": 0.5}


def test_executor_orders_bits_by_logical_qubit_and_keeps_folds(manila: Any) -> None:
    qc = QuantumCircuit(3, 3)
    qc.x(0)
    qc.measure([0, 1, 2], [2, 0, 1])  # clbits deliberately permuted
    executor = SnapshotExecutor(manila, shots=500, seed=3)
    assert executor.snapshot.id == manila.id  # the id is cached, not changed
    result = executor.execute(qc)
    assert isinstance(result, MeasurementResult)
    dist = result.prob_distribution()
    assert max(dist, key=dist.__getitem__) == "100"  # qubit 0 first
    assert (executor.executions, executor.shots_spent) == (1, 500)
    # A folded identity (cx·cx·cx) keeps its three CNOTs through level-2 transpilation.
    folded = QuantumCircuit(2)
    for _ in range(3):
        folded.cx(0, 1)
    kept = transpile(calmod._barriered(folded), target=device_target(manila), optimization_level=2,
                     seed_transpiler=1)
    assert kept.count_ops().get("cx", 0) == 3
    assert transpile(folded, target=device_target(manila), optimization_level=2,
                     seed_transpiler=1).count_ops().get("cx", 0) == 1


# --- a real (small) Calibrator run -------------------------------------------------------------

def test_small_run_on_manila_is_valid_and_replays(manila: Any) -> None:
    choice = run_calibrator(manila, shots=1000, seed=5, settings="small")
    assert isinstance(choice, CalibratorChoice)
    assert choice.backend_id == "fake_manila" and choice.calibration_snapshot_id == manila.id
    assert choice.method == "unmitigated" or parse_method(choice.method).name == choice.method
    assert choice.circuits_executed == planned_executions("small") == 14
    assert choice.shots_spent == choice.circuits_executed * 1000 > 0
    assert choice.strategy["technique"] == "ZNE"
    assert choice.strategy["scale_method"] in ("fold_global", "fold_gates_at_random")
    json.dumps(choice.to_json())
    assert run_calibrator(manila, shots=1000, seed=5, settings="small") == choice


def test_mitiq_errors_become_calibrator_failed(manila: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Calibrator, log: Any = None) -> None:
        raise ValueError("extrapolation exploded")

    monkeypatch.setattr(Calibrator, "run", broken)
    with pytest.raises(QaiError) as err:
        run_calibrator(manila, shots=100, settings="small")
    assert err.value.code == "em_policy.calibrator_failed" and err.value.status == 500
    assert "extrapolation exploded" in err.value.message and "fake_manila" in err.value.message


def test_bad_shots_are_refused(manila: Any) -> None:
    with pytest.raises(QaiError) as err:
        run_calibrator(manila, shots=0, settings="small")
    assert err.value.code == "em_policy.bad_calibrator_settings"
