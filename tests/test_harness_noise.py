"""Calibration snapshots and the compact noise model, checked against Aer's own device model."""

from __future__ import annotations

import json
import math

import pytest
from qiskit import QuantumCircuit, transpile
from qiskit.circuit.random import random_circuit
from qiskit.quantum_info import Statevector
from qiskit_aer import AerSimulator
from qiskit_aer.noise import NoiseModel
from qiskit_ibm_runtime.fake_provider import FakeManilaV2, FakeTorino

from harness.calibration import CalibrationSnapshot, scaled, snapshot_from_backend
from harness.noise import active_qubits, compact_circuit, simulator
from sdk.errors import QaiError


@pytest.fixture(scope="module")
def manila() -> tuple[FakeManilaV2, CalibrationSnapshot]:
    backend = FakeManilaV2()
    return backend, snapshot_from_backend(backend)


def _probabilities(sim: AerSimulator, circuit: QuantumCircuit) -> dict[int, float]:
    qc = circuit.copy()
    qc.save_probabilities_dict()
    return {int(k): float(v) for k, v in sim.run(qc).result().data()["probabilities"].items()}


def _marginal(probs: dict[int, float], qubits: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for state, p in probs.items():
        key = sum(((state >> q) & 1) << i for i, q in enumerate(qubits))
        out[key] = out.get(key, 0.0) + p
    return out


def _tvd(a: dict[int, float], b: dict[int, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compact_model_equals_aers_device_model(manila: tuple[FakeManilaV2, CalibrationSnapshot], seed: int) -> None:
    """Exact density-matrix probabilities agree with AerSimulator's model of the whole device."""
    backend, snap = manila
    logical = random_circuit(3, 6, max_operands=2, seed=seed)
    device = transpile(logical, backend, seed_transpiler=seed, optimization_level=1)
    full = AerSimulator(noise_model=NoiseModel.from_backend(backend, readout_error=False), method="density_matrix")
    physical = active_qubits(device)
    compact = simulator(snap, physical, method="density_matrix", readout=False)
    expected = _marginal(_probabilities(full, device), physical)
    got = _probabilities(compact, compact_circuit(device, physical))
    assert _tvd(expected, got) < 1e-9
    ideal = _marginal({int(k, 2): v for k, v in Statevector(device).probabilities_dict().items()}, physical)
    assert _tvd(ideal, got) > 1e-4  # and the noise is really there


def test_readout_error_is_the_calibrated_asymmetric_one(manila: tuple[FakeManilaV2, CalibrationSnapshot]) -> None:
    _, snap = manila
    qc = QuantumCircuit(2, 2)
    qc.x(1)  # qubit 0 prepared in 0, qubit 1 in 1
    qc.measure([0, 1], [0, 1])
    shots = 200_000
    ideal_gates = scaled(snap, gate_error=0.0, relaxation=False)
    counts = simulator(ideal_gates, [3, 4], seed=7).run(qc, shots=shots).result().get_counts()
    p01 = sum(n for k, n in counts.items() if k[-1] == "1") / shots  # read 1 from qubit 0 (device qubit 3)
    p10 = sum(n for k, n in counts.items() if k[-2] == "0") / shots  # read 0 from qubit 1 (device qubit 4)
    for measured, expected in ((p01, snap.readout_errors["3"]["p01"]), (p10, snap.readout_errors["4"]["p10"])):
        assert abs(measured - expected) < 5 * math.sqrt(expected * (1 - expected) / shots) + 1e-9


def test_an_ideal_snapshot_gives_the_ideal_state(manila: tuple[FakeManilaV2, CalibrationSnapshot]) -> None:
    backend, snap = manila
    device = transpile(random_circuit(4, 8, max_operands=2, seed=5), backend, seed_transpiler=5)
    physical = active_qubits(device)
    ideal = scaled(snap, gate_error=0.0, readout=0.0, relaxation=False)
    got = _probabilities(simulator(ideal, physical, method="density_matrix"), compact_circuit(device, physical))
    expected = _marginal({int(k, 2): v for k, v in Statevector(device).probabilities_dict().items()}, physical)
    assert _tvd(expected, got) < 1e-9


def test_error_grows_with_the_two_qubit_error(manila: tuple[FakeManilaV2, CalibrationSnapshot]) -> None:
    backend, snap = manila
    device = transpile(random_circuit(3, 10, max_operands=2, seed=9), backend, seed_transpiler=9)
    physical = active_qubits(device)
    compact = compact_circuit(device, physical)
    ideal = _marginal({int(k, 2): v for k, v in Statevector(device).probabilities_dict().items()}, physical)
    errors = [_tvd(ideal, _probabilities(simulator(scaled(snap, two_qubit_error=f), physical,
                                                    method="density_matrix", readout=False), compact))
              for f in (0.0, 1.0, 3.0, 9.0)]
    assert errors == sorted(errors) and errors[-1] > 2 * errors[1]


def test_a_large_device_builds_only_the_qubits_in_use() -> None:
    backend = FakeTorino()  # 133 qubits, CZ
    snap = snapshot_from_backend(backend)
    assert snap.num_qubits == 133 and snap.two_qubit_gate == "cz" and len(snap.coupling_map) > 100
    device = transpile(random_circuit(3, 5, max_operands=2, seed=3), backend, seed_transpiler=3)
    physical = active_qubits(device)
    sim = simulator(snap, physical, seed=1)
    assert set(sim.options.noise_model.noise_qubits) <= set(range(len(physical)))
    qc = compact_circuit(device, physical)
    qc.measure_all()
    assert sum(sim.run(qc, shots=100).result().get_counts().values()) == 100


def test_snapshots_round_trip_and_bad_ones_are_refused(manila: tuple[FakeManilaV2, CalibrationSnapshot]) -> None:
    _, snap = manila
    data = json.loads(json.dumps(snap.to_json()))
    again = CalibrationSnapshot.from_json(data)
    assert again == snap and again.id == snap.id == data["id"]
    assert snap.id.startswith("fake_manila@")
    for bad, code in [
        ({**data, "id": "other"}, "calibration.id_mismatch"),
        ({**data, "raw_metrics": {**data["raw_metrics"], "t2": [1.0] * 5}}, "calibration.unphysical"),
        ({**data, "readout_errors": {"0": {"p01": 2.0, "p10": 0.0}}}, "calibration.malformed"),
        ({**data, "gates": {"cx": {"0,9": {"error": 0.01, "duration": 1e-7}}}}, "calibration.malformed"),
        ({k: v for k, v in data.items() if k != "num_qubits"}, "calibration.malformed"),
    ]:
        with pytest.raises(QaiError) as err:
            CalibrationSnapshot.from_json(bad)
        assert err.value.code == code
