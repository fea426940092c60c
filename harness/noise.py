"""Noisy simulation of a device from its calibration, built only for the qubits a circuit uses.

``AerSimulator.from_backend`` builds a noise model for every qubit and coupler of the device
(seconds for a 133-qubit device) and simulates on a register of the device's width. Here the
circuit is transpiled to the device first; the physical qubits it touches are then remapped to a
compact register, and the noise model is built for those qubits alone, from the same physics as
Aer's basic device model (``qiskit_aer.noise.device.models``):

* each gate: a thermal-relaxation channel for its duration (T1, T2 truncated to 2*T1, zero
  temperature), composed with a depolarizing channel whose strength makes the total average gate
  infidelity equal the calibrated gate error;
* each measurement: the asymmetric readout error P(1|0), P(0|1).

Models are cached per (snapshot, physical qubits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from qiskit import QuantumCircuit
from qiskit.circuit import Qubit
from qiskit_aer.noise import NoiseModel, QuantumError, ReadoutError, depolarizing_error, thermal_relaxation_error

from harness.calibration import ONE_QUBIT_GATES, TWO_QUBIT_GATES, CalibrationSnapshot, qubits_key

_SNAPSHOTS: dict[str, CalibrationSnapshot] = {}  # id -> snapshot, so the model cache can key by id


def _relaxation(snap: CalibrationSnapshot, physical: Sequence[int], duration: float) -> QuantumError | None:
    if duration <= 0:
        return None
    error: QuantumError | None = None
    # qiskit's tensor order: the first qubit of the gate is the least significant (Aer's expand)
    for q in physical:
        t1, t2 = snap.t1(q), min(snap.t2(q), 2 * snap.t1(q))
        single = thermal_relaxation_error(t1, t2, duration)
        error = single if error is None else error.expand(single)
    return error


def _relaxation_fidelity(snap: CalibrationSnapshot, physical: Sequence[int], duration: float) -> float:
    """Average gate fidelity of the relaxation channel, in closed form. One qubit's Pauli transfer
    matrix is diag(1, e^(-t/T2), e^(-t/T2), e^(-t/T1)); a tensor product's process fidelity is the
    product of its factors' Tr(R)/4; F_avg = (d F_pro + 1) / (d + 1)."""
    f_pro = 1.0
    for q in physical:
        t1, t2 = snap.t1(q), min(snap.t2(q), 2 * snap.t1(q))
        f_pro *= (1 + 2 * math.exp(-duration / t2) + math.exp(-duration / t1)) / 4
    dim = 2.0 ** len(physical)
    return (dim * f_pro + 1) / (dim + 1)


def _depolarizing(num_qubits: int, gate_error: float, relax_fid: float) -> QuantumError | None:
    """The depolarizing part: F(total) = F(relax) - p (d F(relax) - 1) / d solved for p."""
    if gate_error <= 1 - relax_fid:
        return None  # relaxation alone already explains the measured error
    dim = 2**num_qubits
    gate_error = min(gate_error, dim / (dim + 1))
    p = dim * (gate_error - (1 - relax_fid)) / (dim * relax_fid - 1)
    return depolarizing_error(min(p, 4**num_qubits / (4**num_qubits - 1)), num_qubits)


def gate_error_channel(snap: CalibrationSnapshot, gate: str, physical: Sequence[int]) -> QuantumError | None:
    props = snap.gates.get(gate, {}).get(qubits_key(list(physical)))
    if props is None:
        return None
    relax = _relaxation(snap, physical, props["duration"])
    relax_fid = _relaxation_fidelity(snap, physical, props["duration"]) if relax is not None else 1.0
    depol = _depolarizing(len(physical), props["error"], relax_fid) if props["error"] > 0 else None
    if depol is not None and relax is not None:
        return depol.compose(relax)
    return depol or relax


def compact_noise_model(snap: CalibrationSnapshot, physical: Sequence[int], *, readout: bool = True) -> NoiseModel:
    """The noise of ``physical`` qubits of the device, as qubits ``0..len(physical)-1``."""
    _SNAPSHOTS[snap.id] = snap
    return _compact_noise_model(snap.id, tuple(physical), readout)


@lru_cache(maxsize=512)
def _compact_noise_model(snapshot_id: str, physical: tuple[int, ...], readout: bool) -> NoiseModel:
    snap = _SNAPSHOTS[snapshot_id]
    index = {p: i for i, p in enumerate(physical)}
    model = NoiseModel(basis_gates=[g for g in snap.basis_gates if g not in ("measure", "reset", "delay")])
    for gate in ONE_QUBIT_GATES:
        for p in physical:
            err = gate_error_channel(snap, gate, [p])
            if err is not None:
                model.add_quantum_error(err, gate, [index[p]])
    for gate in TWO_QUBIT_GATES:
        for key in snap.gates.get(gate, {}):
            a, b = (int(x) for x in key.split(","))
            if a in index and b in index:
                err = gate_error_channel(snap, gate, [a, b])
                if err is not None:
                    model.add_quantum_error(err, gate, [index[a], index[b]])
    if readout:
        for p in physical:
            ro = snap.readout_errors[str(p)]
            if ro["p01"] or ro["p10"]:
                model.add_readout_error(ReadoutError([[1 - ro["p01"], ro["p01"]], [ro["p10"], 1 - ro["p10"]]]),
                                        [index[p]])
    return model


def active_qubits(circuit: QuantumCircuit) -> list[int]:
    """The device qubits a transpiled circuit acts on, in ascending order."""
    used = {circuit.find_bit(q).index for inst in circuit.data for q in inst.qubits
            if inst.operation.name not in ("barrier", "delay")}
    return sorted(used)


def compact_circuit(circuit: QuantumCircuit, physical: Sequence[int]) -> QuantumCircuit:
    """``circuit`` (on the device's qubits) rewritten on ``len(physical)`` qubits, ``physical[i]`` → ``i``."""
    index = {p: i for i, p in enumerate(physical)}
    out = QuantumCircuit(len(physical), circuit.num_clbits, name=circuit.name, global_phase=circuit.global_phase)
    out.metadata = dict(circuit.metadata or {})
    qmap: dict[Qubit, Qubit] = {}
    for q in circuit.qubits:
        i = circuit.find_bit(q).index
        if i in index:
            qmap[q] = out.qubits[index[i]]
    cmap = dict(zip(circuit.clbits, out.clbits, strict=True))
    for inst in circuit.data:
        if inst.operation.name == "delay" or any(q not in qmap for q in inst.qubits):
            if inst.operation.name in ("barrier", "delay"):
                continue
            raise ValueError(f"{inst.operation.name} acts on a qubit outside {list(physical)}")
        out.append(inst.operation, [qmap[q] for q in inst.qubits], [cmap[c] for c in inst.clbits])
    return out


DENSITY_MATRIX_MAX_QUBITS = 10


def default_method(num_qubits: int) -> str:
    """Density matrix (exact, one evolution for all shots, which are then sampled) for small
    registers; noisy statevector trajectories, one per shot, beyond."""
    return "density_matrix" if num_qubits <= DENSITY_MATRIX_MAX_QUBITS else "statevector"


def simulator(snap: CalibrationSnapshot, physical: Sequence[int], *, method: str | None = None,
              readout: bool = True, seed: int | None = None) -> Any:
    """An AerSimulator with the compact noise model; no transpilation happens after this."""
    from qiskit_aer import AerSimulator

    return AerSimulator(noise_model=compact_noise_model(snap, physical, readout=readout),
                        method=method or default_method(len(physical)), seed_simulator=seed)


def device_target(snap: CalibrationSnapshot) -> Any:
    """A transpiler ``Target`` built from the snapshot alone (gate errors and durations, readout):
    layout and routing then prefer the device's best qubits, as they would against the vendor's
    own target, and an imported vendor calibration needs no Qiskit backend object."""
    _SNAPSHOTS[snap.id] = snap
    return _device_target(snap.id)


@lru_cache(maxsize=64)
def _device_target(snapshot_id: str) -> Any:
    from qiskit.circuit import Measure, Parameter
    from qiskit.circuit.library import CXGate, CZGate, ECRGate, IGate, RZGate, SXGate, XGate
    from qiskit.transpiler import InstructionProperties, Target

    snap = _SNAPSHOTS[snapshot_id]
    gates = {"sx": SXGate(), "x": XGate(), "id": IGate(), "ecr": ECRGate(), "cz": CZGate(), "cx": CXGate()}
    target = Target(num_qubits=snap.num_qubits)
    target.add_instruction(RZGate(Parameter("θ")),
                           {(q,): InstructionProperties(error=0.0, duration=0.0) for q in range(snap.num_qubits)})
    for name, per in snap.gates.items():
        target.add_instruction(gates[name], {
            tuple(int(x) for x in key.split(",")): InstructionProperties(error=v["error"], duration=v["duration"])
            for key, v in per.items()})
    lengths = snap.raw_metrics.get("readout_length") or [0.0] * snap.num_qubits
    target.add_instruction(Measure(), {
        (q,): InstructionProperties(error=(ro["p01"] + ro["p10"]) / 2, duration=float(lengths[q]) or None)
        for q, ro in ((int(k), v) for k, v in snap.readout_errors.items())})
    return target
