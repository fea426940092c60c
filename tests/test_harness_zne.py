"""Folding, estimation and extrapolation: the pure pieces of the harness's ZNE and readout methods."""

from __future__ import annotations

import math

import numpy as np
import pytest
from qiskit import QuantumCircuit, transpile
from qiskit.quantum_info import Operator, SparsePauliOp, Statevector

from harness.estimation import (
    append_measurement,
    confusion_from_calibration,
    distribution,
    estimate,
    estimator,
    inverse_confusion,
    measurement_bases,
)
from harness.folding import fold, fold_gates, fold_global, two_qubit_gate_count
from harness.methods import Method, extrapolate, parse_method, sensitivities
from sdk.errors import QaiError


def device_circuit() -> QuantumCircuit:
    """A small circuit in IBM's ECR basis (rz, sx, x, ecr), as a transpiler leaves it."""
    qc = QuantumCircuit(3)
    qc.h(0)
    qc.cx(0, 1)
    qc.ry(0.4, 2)
    qc.cx(1, 2)
    qc.rx(1.1, 0)
    qc.cx(2, 0)
    return transpile(qc, basis_gates=["rz", "sx", "x", "ecr"], coupling_map=[[0, 1], [1, 0], [1, 2], [2, 1],
                                                                                  [2, 0], [0, 2]],
                     optimization_level=1, seed_transpiler=1)


@pytest.mark.parametrize("scale", [1.0, 1.5, 2.0, 3.0, 4.2, 5.0])
@pytest.mark.parametrize("folding", ["global", "gate"])
def test_folding_keeps_the_operator_and_scales_noisy_gates(scale: float, folding: str) -> None:
    base = device_circuit()
    folded = fold(base, scale, folding, seed=7)
    assert Operator(folded).equiv(Operator(base))
    assert Operator(folded) == Operator(base)  # global phase tracked exactly
    assert set(folded.count_ops()) <= {"rz", "sx", "x", "ecr"}  # still the device basis
    physical = sum(1 for i in base.data if i.operation.name != "rz")
    physical_folded = sum(1 for i in folded.data if i.operation.name != "rz")
    assert abs(physical_folded / physical - scale) <= 2 / physical  # within one folded gate pair


def test_odd_scale_factors_fold_every_gate_exactly() -> None:
    base = device_circuit()
    for scale in (3, 5):
        assert two_qubit_gate_count(fold_global(base, scale)) == scale * two_qubit_gate_count(base)
        assert two_qubit_gate_count(fold_gates(base, scale, seed=1)) == scale * two_qubit_gate_count(base)


def test_gate_folding_is_seeded() -> None:
    base = device_circuit()
    assert fold_gates(base, 2.0, seed=3) == fold_gates(base, 2.0, seed=3)
    picks = {tuple(i.operation.name for i in fold_gates(base, 2.0, seed=s).data) for s in range(6)}
    assert len(picks) > 1


def test_folding_refuses_bad_input() -> None:
    base = device_circuit()
    with pytest.raises(QaiError) as e:
        fold_global(base, 0.5)
    assert e.value.code == "zne.bad_scale_factor"
    measured = base.copy()
    measured.measure_all()
    with pytest.raises(QaiError) as e:
        fold_global(measured, 3)
    assert e.value.code == "zne.not_unitary"
    odd = QuantumCircuit(1)
    odd.h(0)
    with pytest.raises(QaiError) as e:
        fold_global(odd, 3)
    assert e.value.code == "zne.unfoldable_gate"
    with pytest.raises(QaiError) as e:
        fold(base, 3, "sideways", seed=0)
    assert e.value.code == "zne.unknown_folding"


def test_bases_group_qubitwise_commuting_terms() -> None:
    h = SparsePauliOp.from_list([("II", -1.0), ("ZI", 0.4), ("IZ", -0.4), ("ZZ", 0.1), ("XX", 0.2), ("YY", 0.2)])
    mz = SparsePauliOp.from_list([("ZI", 0.5), ("IZ", 0.5)])
    bases = measurement_bases([h, mz])
    assert sorted(bases) == ["XX", "YY", "ZZ"]
    assert measurement_bases([h, mz]) == bases  # deterministic


@pytest.mark.parametrize("basis", ["ZZZ", "XYZ", "YXX", "XXX", "YYY"])
def test_basis_change_measures_the_right_pauli(basis: str) -> None:
    """Exact probabilities after the device-basis rotation give the statevector's expectation."""
    qc = QuantumCircuit(3)
    qc.ry(0.7, 0)
    qc.rx(1.3, 1)
    qc.h(2)
    qc.rz(0.5, 2)
    qc.cx(0, 1)
    layout = (2, 0, 1)  # logical qubit i sits on compact qubit layout[i]
    placed = QuantumCircuit(3)
    placed.compose(qc, qubits=list(layout), inplace=True)
    measured = append_measurement(placed, basis, layout)
    probs = Statevector(measured.remove_final_measurements(inplace=False)).probabilities_dict()
    # clbit i holds logical qubit i, i.e. compact qubit layout[i]
    counts = {}
    for key, p in probs.items():
        bits = "".join(key[2 - layout[i]] for i in reversed(range(3)))
        counts[bits] = counts.get(bits, 0) + round(p * 1_000_000)
    op = SparsePauliOp(basis)
    est = estimator(op, [basis])
    got = estimate(est, {basis: distribution(counts, 3)}).value
    assert got == pytest.approx(Statevector(qc).expectation_value(op).real, abs=1e-4)


def test_estimate_variance_is_the_per_shot_variance_over_shots() -> None:
    est = estimator(SparsePauliOp("Z"), ["Z"])
    e = estimate(est, {"Z": distribution({"0": 750, "1": 250}, 1)})
    assert e.value == pytest.approx(0.5)
    assert e.variance == pytest.approx((1 - 0.25) / 1000)


def test_readout_inversion_recovers_the_true_distribution() -> None:
    """Simulate tensored readout noise on a known distribution; inversion restores ⟨ZZ⟩ and ⟨Z0⟩."""
    rng = np.random.default_rng(0)
    p01, p10 = [0.02, 0.05], [0.08, 0.03]
    true = np.array([0.6, 0.1, 0.05, 0.25])  # outcomes 00, 01, 10, 11 (bit i = qubit i)
    a = [np.array([[1 - p01[i], p10[i]], [p01[i], 1 - p10[i]]]) for i in range(2)]
    noisy = np.kron(a[1], a[0]) @ true
    shots = 400_000
    counts = {format(k, "02b"): int(c) for k, c in enumerate(rng.multinomial(shots, noisy))}
    zeros = {format(k, "02b"): int(c) for k, c in enumerate(rng.multinomial(shots, np.kron(a[1], a[0])[:, 0]))}
    ones = {format(k, "02b"): int(c) for k, c in enumerate(rng.multinomial(shots, np.kron(a[1], a[0])[:, 3]))}
    inverse = inverse_confusion(confusion_from_calibration(zeros, ones, 2))
    for label, exact in (("ZZ", 0.6 - 0.1 - 0.05 + 0.25), ("IZ", 0.6 - 0.1 + 0.05 - 0.25)):
        est = estimator(SparsePauliOp(label), ["ZZ"])
        raw = estimate(est, {"ZZ": distribution(counts, 2)})
        fixed = estimate(est.corrected(inverse), {"ZZ": distribution(counts, 2)})
        assert abs(fixed.value - exact) < 5 * math.sqrt(fixed.variance) + 0.005
        assert abs(fixed.value - exact) < abs(raw.value - exact)
        assert fixed.variance > raw.variance  # inversion costs shots


def test_methods_parse_and_name() -> None:
    m = parse_method("zne-richardson-global")
    assert (m.kind, m.factory, m.folding, m.scale_factors, m.name) == ("zne", "richardson", "global",
                                                                       (1.0, 2.0, 3.0), "zne-richardson-global")
    assert parse_method("zne-linear-gate@1,3,5").scale_factors == (1.0, 3.0, 5.0)
    assert parse_method("readout").name == "readout"
    for bad, code in (("zne-cubic-global", "harness.bad_method"), ("zne-poly2-global@1,2", "harness.bad_method"),
                      ("zne-linear-global@2,3", "harness.bad_method"), ("zne-linear-global@1,x", "harness.bad_method"),
                      ("ml-qem@1,2", "harness.bad_method")):
        with pytest.raises(QaiError) as e:
            parse_method(bad)
        assert e.value.code == code
    # ml-qem parses unbound; a run binds it to a model (or refuses it: tests/test_policy.py)
    assert (parse_method("ml-qem").kind, parse_method("ml-qem").source) == ("ml-qem", None)


def test_extrapolation_is_mitiqs_and_sensitivities_are_exact_for_linear_estimators() -> None:
    from mitiq.zne.inference import RichardsonFactory

    m = Method("zne", "richardson", "global", (1.0, 2.0, 3.0))
    ys = [0.8, 0.65, 0.52]
    assert extrapolate(m, ys) == pytest.approx(RichardsonFactory.extrapolate([1, 2, 3], ys))
    assert sensitivities(m, ys) == pytest.approx([3.0, -3.0, 1.0], abs=1e-6)  # Richardson weights at 1,2,3
    lin = Method("zne", "linear", "global", (1.0, 3.0))
    assert extrapolate(lin, [0.8, 0.6]) == pytest.approx(0.9)
    exp = Method("zne", "exp", "global", (1.0, 2.0, 3.0))
    # an exactly exponential decay towards the asymptote is recovered
    decay = [0.1 + 0.7 * math.exp(-0.3 * s) for s in (1, 2, 3)]
    assert extrapolate(exp, decay, asymptote=0.1) == pytest.approx(0.8, abs=1e-9)
