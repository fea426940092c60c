"""Seeded benchmark circuit families: determinism, shape, exact references and the physics they encode."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import scipy.linalg
from qiskit import QuantumCircuit, transpile
from qiskit.circuit import Gate
from qiskit.quantum_info import Operator, SparsePauliOp, Statevector

from harness.circuits import (
    DEFAULT_DEPTHS,
    FAMILIES,
    H2_FCI_ELECTRONIC_ENERGY,
    H2_HF_ELECTRONIC_ENERGY,
    H2_NUCLEAR_REPULSION,
    CircuitSpec,
    append_pauli_rotation,
    circuit_features,
    gate_features,
    generate,
    h2_hamiltonian,
    heisenberg_trotter_circuit,
    ideal_expectations,
    mapping_entropy,
    maxcut_hamiltonian,
    mean_z,
    mean_zz,
    observable_features,
    observable_norm,
    observable_range,
    pauli_trotter_circuit,
    tfim_hamiltonian,
    tfim_trotter_circuit,
    variants_for,
)
from sdk.errors import QaiError

SIZES = range(2, 9)
COUNT = 6  # enough to visit every variant of every family at least twice


@pytest.fixture(scope="module")
def all_specs() -> dict[tuple[str, int], list[CircuitSpec]]:
    return {(family, n): generate(family, n, COUNT, 17) for family in FAMILIES for n in SIZES}


def _degrees(num_qubits: int, edges: list[list[int]]) -> list[int]:
    degree = [0] * num_qubits
    for a, b in edges:
        degree[a] += 1
        degree[b] += 1
    return degree


# ------------------------------------------------------------------------------------------ determinism, ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 4, 7])
def test_generate_is_deterministic(family: str, n: int) -> None:
    first, second = generate(family, n, 4, 123), generate(family, n, 4, 123)
    assert first == second  # dataclass equality: circuits, observables and params all equal
    for a, b in zip(first, second, strict=True):
        assert a.circuit == b.circuit
        assert a.circuit_id == b.circuit_id
        assert a.observables.keys() == b.observables.keys()
        for name in a.observables:
            assert a.observables[name] == b.observables[name]
        assert a.params == b.params


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_and_indices_give_different_circuits(family: str) -> None:
    one, two = generate(family, 4, 4, 1), generate(family, 4, 4, 2)
    for a, b in zip(one, two, strict=True):
        assert a.variant == b.variant  # the variant depends on the index only...
        assert a.circuit != b.circuit  # ...the seed changes the circuit
    for a, b in itertools.combinations(one, 2):
        assert a.circuit != b.circuit


def test_longer_request_extends_shorter_one() -> None:
    assert generate("trotter", 4, 3, 9) == generate("trotter", 4, 7, 9)[:3]


def test_ids_are_unique_readable_and_record_the_request(
    all_specs: dict[tuple[str, int], list[CircuitSpec]],
) -> None:
    for (family, n), specs in all_specs.items():
        ids = [s.circuit_id for s in specs]
        assert len(set(ids)) == len(ids)
        for index, spec in enumerate(specs):
            assert spec.circuit_id == f"{family}-{spec.variant}-n{n}-d{spec.depth}-s17-i{index}"
            assert re.fullmatch(r"[a-z0-9-]+", spec.circuit_id)
            assert spec.family == family and spec.num_qubits == n and spec.seed == 17
            assert spec.params["index"] == index
            assert spec.depth == DEFAULT_DEPTHS[family]


def test_depth_override_is_used() -> None:
    (spec,) = generate("random", 3, 1, 5, depth=2)
    assert spec.depth == 2 and spec.circuit_id.endswith("-d2-s5-i0")
    assert circuit_features(spec)["logical_1q_count"] == 2 * 3  # one rotation per qubit per layer
    tfim = generate("trotter", 3, 1, 5, depth=7)[0]
    assert tfim.variant == "tfim"
    assert circuit_features(tfim)["logical_2q_count"] == 7 * 2  # 2 bonds per step


# ------------------------------------------------------------------------------------------ shape of the circuits


def test_every_family_and_size_gives_plain_unitary_circuits(
    all_specs: dict[tuple[str, int], list[CircuitSpec]],
) -> None:
    for (family, n), specs in all_specs.items():
        variants = variants_for(family, n)
        assert [s.variant for s in specs] == [variants[i % len(variants)] for i in range(COUNT)]
        for spec in specs:
            assert spec.circuit.num_qubits == n and spec.circuit.num_clbits == 0
            for inst in spec.circuit.data:
                assert isinstance(inst.operation, Gate), inst.operation.name  # no measure/barrier/reset
                assert inst.operation.name not in {"measure", "barrier", "reset", "PauliEvolution"}
                assert len(inst.qubits) <= 2
            assert spec.observables
            for op in spec.observables.values():
                assert op.num_qubits == n
                assert np.allclose(np.imag(op.coeffs), 0.0)
            json.dumps(spec.params)  # JSON-safe


def test_variants_per_size() -> None:
    assert variants_for("random", 5) == ("layered",)
    assert variants_for("trotter", 2) == ("tfim", "heisenberg", "h2")
    assert variants_for("trotter", 4) == ("tfim", "heisenberg", "h2")
    for n in (3, 5, 6, 7, 8):
        assert variants_for("trotter", n) == ("tfim", "heisenberg")
    assert variants_for("variational", 8) == ("hea-vqe", "qaoa-maxcut")


def test_random_layers_use_line_bonds_only(all_specs: dict[tuple[str, int], list[CircuitSpec]]) -> None:
    for n in SIZES:
        for spec in all_specs[("random", n)]:
            assert {k for k in spec.observables} == {"Z0", "ZZ_mean", "Zall"}
            for inst in spec.circuit.data:
                if len(inst.qubits) == 2:
                    a, b = (spec.circuit.find_bit(q).index for q in inst.qubits)
                    assert abs(a - b) == 1 and inst.operation.name in {"cx", "cz"}


# ------------------------------------------------------------------------------------------ exact references


def test_ideal_values_lie_within_the_observable_range(all_specs: dict[tuple[str, int], list[CircuitSpec]]) -> None:
    for specs in all_specs.values():
        for spec in specs:
            ideal = ideal_expectations(spec)
            assert ideal.keys() == spec.observables.keys()
            for name, value in ideal.items():
                assert isinstance(value, float)
                lo, hi = observable_range(spec.observables[name])
                assert lo - 1e-9 <= value <= hi + 1e-9, (spec.circuit_id, name, value, lo, hi)
                assert abs(value) <= observable_norm(spec.observables[name]) + 1e-9


def test_ideal_expectations_match_an_independent_dense_computation() -> None:
    spec = generate("random", 3, 1, 4)[0]
    state = Operator(spec.circuit).data[:, 0]  # the circuit applied to |000>
    for name, op in spec.observables.items():
        dense = float(np.real(np.vdot(state, op.to_matrix() @ state)))
        assert ideal_expectations(spec)[name] == pytest.approx(dense, abs=1e-12)


def test_observable_range_matches_numpy_eigvalsh() -> None:
    rng = np.random.default_rng(0)
    labels = ["".join(rng.choice(list("IXYZ"), size=3)) for _ in range(6)]
    op = SparsePauliOp(labels, coeffs=rng.normal(size=6))
    eig = np.linalg.eigvalsh(op.to_matrix())
    lo, hi = observable_range(op)
    assert lo == pytest.approx(eig[0], abs=1e-12) and hi == pytest.approx(eig[-1], abs=1e-12)
    assert observable_norm(op) == pytest.approx(np.linalg.norm(op.to_matrix(), 2), abs=1e-10)
    # each solver path: diagonal (Z only), real symmetric (even Y count), complex Hermitian (odd Y count)
    real_sym = SparsePauliOp(["XX", "YY", "ZI"], [0.5, -1.0, 0.3])
    complex_herm = SparsePauliOp(["XY", "YZ"], [1.0, 2.0])
    for path in (mean_zz(4), real_sym, complex_herm):
        eig = np.linalg.eigvalsh(path.to_matrix())
        assert observable_range(path) == pytest.approx((eig[0], eig[-1]), abs=1e-12)
    assert observable_range(mean_zz(4)) == pytest.approx((-1.0, 1.0))
    assert observable_range(SparsePauliOp("ZZZ", 2.0)) == pytest.approx((-2.0, 2.0))
    assert observable_norm(SparsePauliOp(["II", "ZI"], [-3.0, 1.0])) == pytest.approx(4.0)


def test_observable_range_rejects_what_it_cannot_solve() -> None:
    with pytest.raises(QaiError) as too_big:
        observable_range(SparsePauliOp("Z" * 11))
    assert too_big.value.code == "harness.bad_circuit_request" and too_big.value.status == 422
    with pytest.raises(QaiError):
        observable_range(SparsePauliOp(["ZZ"], [1j]))


# ------------------------------------------------------------------------------------------ physics


def test_tfim_without_field_keeps_the_all_zero_state() -> None:
    # With h = 0 the Hamiltonian is diagonal, so |0..0> only gains a phase: Mz and every ZZ stay 1 exactly.
    n = 5
    state = Statevector(tfim_trotter_circuit(n, 1.3, 0.0, 0.3, 6))
    assert state.expectation_value(mean_z(n)).real == pytest.approx(1.0, abs=1e-12)
    assert state.expectation_value(mean_zz(n)).real == pytest.approx(1.0, abs=1e-12)


def test_tfim_trotter_converges_to_exact_evolution() -> None:
    n, j, h, total = 4, 1.0, 0.8, 1.0
    ham = tfim_hamiltonian(n, j, h)
    zeros = np.zeros(2**n, dtype=complex)
    zeros[0] = 1.0
    exact = scipy.linalg.expm(-1j * total * ham.to_matrix()) @ zeros
    e0 = -j * (n - 1)  # <0..0| H |0..0>: every ZZ is +1, every X averages 0
    infidelities = []
    for steps in (10, 20, 40, 100):
        state = Statevector(tfim_trotter_circuit(n, j, h, total / steps, steps))
        infidelities.append(1.0 - abs(np.vdot(exact, state.data)) ** 2)
        if steps == 100:
            # at dt = 0.01 the first-order Trotter circuit conserves the energy to a few 1e-3
            assert abs(state.expectation_value(ham).real - e0) < 1e-2
    # first order: the state error is O(dt), so the infidelity falls roughly 4x per halving of dt
    assert infidelities[-1] < 1e-4
    for coarse, fine in itertools.pairwise(infidelities):
        assert fine < coarse / 3


def test_heisenberg_conserves_magnetisation(all_specs: dict[tuple[str, int], list[CircuitSpec]]) -> None:
    for n in SIZES:
        for spec in all_specs[("trotter", n)]:
            if spec.variant != "heisenberg":
                continue
            neel_ones = n // 2  # X on every odd qubit
            ideal = ideal_expectations(spec)
            assert ideal["Mz"] == pytest.approx((n - 2 * neel_ones) / n, abs=1e-12)
            # stronger than the mean: all probability stays in the sector of the Néel Hamming weight
            probs = Statevector(spec.circuit).probabilities()
            in_sector = sum(p for k, p in enumerate(probs) if k.bit_count() == neel_ones)
            assert in_sector == pytest.approx(1.0, abs=1e-12)
            # ...and the state really left the Néel configuration (the test would be vacuous otherwise)
            neel = sum(1 << q for q in range(1, n, 2))
            assert probs[neel] < 1 - 1e-6
    # one bond has no even/odd splitting, so one Trotter step is the exact evolution of the Néel state |10>
    step = Statevector(heisenberg_trotter_circuit(2, 1.0, 0.7, 1))
    exact = scipy.linalg.expm(-0.7j * SparsePauliOp(["XX", "YY", "ZZ"]).to_matrix()) @ Statevector.from_label("10").data
    assert abs(np.vdot(exact, step.data)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("num_qubits", [2, 4])
def test_h2_hamiltonian_matches_the_literature(num_qubits: int) -> None:
    ham = h2_hamiltonian(num_qubits)
    lo, _ = observable_range(ham)
    assert lo == pytest.approx(-1.857275, abs=1e-5)  # FCI electronic energy, STO-3G, 0.735 Å
    assert lo == pytest.approx(H2_FCI_ELECTRONIC_ENERGY, abs=1e-8)
    assert lo + H2_NUCLEAR_REPULSION == pytest.approx(-1.137306, abs=1e-5)  # FCI total energy
    hf = QuantumCircuit(num_qubits)
    for q in (0,) if num_qubits == 2 else (0, 2):
        hf.x(q)
    hf_energy = Statevector(hf).expectation_value(ham).real
    assert hf_energy == pytest.approx(H2_HF_ELECTRONIC_ENERGY, abs=1e-8)
    assert hf_energy + H2_NUCLEAR_REPULSION == pytest.approx(-1.116999, abs=1e-5)  # Hartree-Fock total energy
    with pytest.raises(QaiError):
        h2_hamiltonian(3)


@pytest.mark.parametrize("num_qubits", [2, 4])
def test_h2_trotter_conserves_energy_at_small_dt(num_qubits: int) -> None:
    ham = h2_hamiltonian(num_qubits)
    flips = (0,) if num_qubits == 2 else (0, 2)
    start = Statevector(pauli_trotter_circuit(ham, flips, 0.0, 0)).expectation_value(ham).real
    evolved = Statevector(pauli_trotter_circuit(ham, flips, 0.02, 50)).expectation_value(ham).real
    assert start == pytest.approx(H2_HF_ELECTRONIC_ENERGY, abs=1e-8)
    assert abs(evolved - start) < 1e-3
    specs = [s for s in generate("trotter", num_qubits, 3, 0) if s.variant == "h2"]
    assert len(specs) == 1 and specs[0].params["encoding"] in {"parity-2q-reduced", "jordan-wigner"}


@pytest.mark.parametrize("label", ["Z", "Y", "XX", "YY", "ZZ", "XY", "ZIX", "YZX", "XXYY", "YIZX"])
def test_pauli_rotation_is_exactly_the_exponential(label: str) -> None:
    theta = 0.73
    qc = QuantumCircuit(len(label))
    append_pauli_rotation(qc, label, theta)
    expected = scipy.linalg.expm(-0.5j * theta * SparsePauliOp(label).to_matrix())
    assert np.allclose(Operator(qc).data, expected, atol=1e-12)


def test_qaoa_cost_is_bounded_by_the_edge_count(all_specs: dict[tuple[str, int], list[CircuitSpec]]) -> None:
    for n in SIZES:
        for spec in all_specs[("variational", n)]:
            if spec.variant != "qaoa-maxcut":
                assert spec.observables.keys() == {"H"}
                continue
            edges = json.loads(str(spec.params["edges"]))
            assert len(edges) == spec.params["num_edges"]
            degree = _degrees(n, edges)
            if n >= 4 and n % 2 == 0:
                assert spec.params["graph"] == "random-3-regular" and degree == [3] * n
            else:
                assert spec.params["graph"] != "random-3-regular" and max(degree) <= 3 and min(degree) >= 1
            assert len(json.loads(str(spec.params["gammas"]))) == spec.depth
            cost = ideal_expectations(spec)["C"]
            lo, hi = observable_range(spec.observables["C"])
            assert lo == pytest.approx(0.0, abs=1e-12)  # all qubits on one side cuts nothing
            assert 0.0 < hi <= len(edges)
            assert -1e-12 <= cost <= len(edges) + 1e-12
    # K4 (the only 3-regular graph on 4 vertices) cuts at most 4 of its 6 edges; a triangle at most 2
    k4 = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    assert observable_range(maxcut_hamiltonian(4, k4)) == pytest.approx((0.0, 4.0))
    assert observable_range(maxcut_hamiltonian(3, [(0, 1), (1, 2), (0, 2)])) == pytest.approx((0.0, 2.0))


# ------------------------------------------------------------------------------------------ features


def test_features_logical_and_transpiled() -> None:
    spec = generate("variational", 4, 2, 3)[1]  # QAOA on K4: 6 rzz per layer
    logical = circuit_features(spec)
    assert logical == {
        "num_qubits": 4, "depth": 2, "logical_depth": spec.circuit.depth(), "logical_2q_count": 12,
        "logical_1q_count": 4 + 2 * 4, "measurements": 4, "num_observables": 1, "observable_max_weight": 2,
        "observable_num_terms": 6,
    }
    assert not any(k.startswith("transpiled_") for k in logical)

    line = [[i, i + 1] for i in range(5)] + [[i + 1, i] for i in range(5)]
    compiled = transpile(spec.circuit, basis_gates=["rz", "sx", "x", "cx"], coupling_map=line,
                         optimization_level=1, seed_transpiler=11)
    features = circuit_features(spec, compiled)
    assert {"transpiled_depth", "transpiled_2q_count", "transpiled_1q_count", "mapping_entropy"} <= features.keys()
    assert 0 < features["mapping_entropy"] <= math.log2(compiled.num_qubits)
    assert features["transpiled_2q_count"] == sum(1 for i in compiled.data if len(i.qubits) == 2)
    assert features["transpiled_2q_count"] >= 12  # each rzz needs two CX, and K4 on a line needs swaps
    assert features["transpiled_depth"] == compiled.depth()
    measured = compiled.copy()
    measured.measure_all()  # a barrier and measurements are not gates
    assert circuit_features(spec, measured)["transpiled_2q_count"] == features["transpiled_2q_count"]
    assert circuit_features(spec, measured)["transpiled_1q_count"] == features["transpiled_1q_count"]
    h2 = generate("trotter", 4, 3, 0)[2]
    assert circuit_features(h2)["observable_max_weight"] == 4  # the XXXX/YYYY double-excitation terms


def test_mapping_entropy_and_observable_encoding() -> None:
    even = QuantumCircuit(4)
    for q in range(4):
        even.sx(q)
    assert mapping_entropy(even) == pytest.approx(2.0)  # four qubits equally loaded: log2(4) bits
    lopsided = QuantumCircuit(4)
    for _ in range(7):
        lopsided.sx(0)
    lopsided.sx(1)
    assert mapping_entropy(lopsided) == pytest.approx(-(7 / 8) * math.log2(7 / 8) - (1 / 8) * math.log2(1 / 8))
    assert mapping_entropy(QuantumCircuit(3)) == 0.0
    measured = QuantumCircuit(3, 2)
    measured.h(0)
    measured.measure([0, 1], [0, 1])
    assert gate_features(measured)["measurements"] == 2
    op = SparsePauliOp.from_list([("II", 0.5), ("ZZ", -1.0), ("XI", 0.25)])
    assert observable_features(op) == {"obs_weight": 2.0, "obs_mean_weight": 1.5, "obs_terms": 2.0,
                                       "obs_identity": 0.5}


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("family", "n", "count", "depth"),
    [("nope", 4, 1, None), ("random", 1, 1, None), ("random", 9, 1, None), ("random", 4, 0, None),
     ("trotter", 4, -3, None), ("variational", 4, 1, 0), ("random", True, 1, None), ("random", 4.0, 1, None)],
)
def test_bad_requests_are_rejected(family: str, n: int, count: int, depth: int | None) -> None:
    with pytest.raises(QaiError) as err:
        generate(family, n, count, 0, depth=depth)
    assert err.value.code == "harness.bad_circuit_request"
    assert err.value.status == 422


def test_every_family_and_size_has_finite_references() -> None:
    specs = [s for f in FAMILIES for n in SIZES for s in generate(f, n, 2, 1)]
    values = [ideal_expectations(s) for s in specs]
    assert len(values) == 2 * len(FAMILIES) * len(SIZES)
    assert all(math.isfinite(v) for d in values for v in d.values())
