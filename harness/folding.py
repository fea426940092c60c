"""Unitary folding of transpiled circuits: noise scaling for zero-noise extrapolation.

These are Mitiq's two folding schemes (``mitiq.zne.scaling.fold_global`` and
``fold_gates_at_random``; Giurgica-Tiron et al., "Digital zero noise extrapolation for quantum
error mitigation", 2020), re-stated for circuits that are already in a device's basis and
layout. Folding before transpilation is useless: the transpiler cancels ``G G† G`` back to ``G``.
Mitiq itself converts Qiskit circuits through Cirq and OpenQASM 2, which loses the device basis
(``ecr`` has no OpenQASM 2 definition), so the harness folds here and executes the result as is.

One difference from Mitiq, on purpose: fractional folds count *physical* gates only. ``rz`` is
virtual on these devices (a frame change, no error, no duration), so folding it scales no noise;
counting it would make a "scale factor 2" circuit carry far less than twice the noise.

Inverses stay in the device basis: ``rz(θ)† = rz(-θ)``, ``x``, ``ecr``, ``cz`` and ``cx`` are
self-inverse, and ``sx† = rz(π)·sx·rz(π)`` up to a global phase of π/2 (which is tracked, so the
folded circuit's operator equals the original one's exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import CircuitInstruction
from qiskit.circuit.library import RZGate, SXGate

from sdk.errors import QaiError

FOLDINGS = ("global", "gate")
VIRTUAL_GATES = frozenset({"rz"})  # frame changes: no error, no duration
SELF_INVERSE = frozenset({"x", "ecr", "cz", "cx", "id"})
SKIPPED = frozenset({"barrier"})


def _check_scale(scale_factor: float) -> None:
    if not (math.isfinite(scale_factor) and scale_factor >= 1):
        raise QaiError("zne.bad_scale_factor", f"scale factor must be a real number >= 1, got {scale_factor}",
                       status=422)


def _unitary_ops(circuit: QuantumCircuit) -> list[CircuitInstruction]:
    ops = []
    for inst in circuit.data:
        name = inst.operation.name
        if name in SKIPPED:
            continue
        if name in ("measure", "reset") or inst.clbits:
            raise QaiError("zne.not_unitary", f"fold before measuring: the circuit has {name}", status=422)
        ops.append(inst)
    return ops


def _inverse(inst: CircuitInstruction) -> tuple[list[CircuitInstruction], float]:
    """The inverse of one device-basis instruction, as device-basis instructions plus a global phase."""
    op, qubits = inst.operation, inst.qubits
    if op.name in SELF_INVERSE:
        return [inst], 0.0
    if op.name == "rz":
        return [CircuitInstruction(RZGate(-float(op.params[0])), qubits)], 0.0
    if op.name == "sx":
        # rz(π)·sx·rz(π) = -i·sx†, so sx† = e^{iπ/2}·rz(π)·sx·rz(π)
        return [CircuitInstruction(RZGate(math.pi), qubits), CircuitInstruction(SXGate(), qubits),
                CircuitInstruction(RZGate(math.pi), qubits)], math.pi / 2
    raise QaiError("zne.unfoldable_gate", f"{op.name} is not a device-basis gate this harness can invert",
                   status=422, details={"gate": op.name})


def _inverse_sequence(ops: Sequence[CircuitInstruction]) -> tuple[list[CircuitInstruction], float]:
    out: list[CircuitInstruction] = []
    phase = 0.0
    for inst in reversed(ops):
        inv, p = _inverse(inst)
        out.extend(inv)
        phase += p
    return out, phase


def _physical(inst: CircuitInstruction) -> bool:
    return inst.operation.name not in VIRTUAL_GATES


def _rebuild(circuit: QuantumCircuit, ops: list[CircuitInstruction], phase: float) -> QuantumCircuit:
    out = circuit.copy_empty_like()
    out.global_phase = circuit.global_phase + phase
    for inst in ops:
        out.append(inst)
    return out


def fold_global(circuit: QuantumCircuit, scale_factor: float) -> QuantumCircuit:
    """U → U (U†U)^k, then the last physical gates folded until the scale factor is reached
    (Mitiq's ``fold_global``). Odd integer factors fold exactly; others to the nearest gate."""
    _check_scale(scale_factor)
    ops = _unitary_ops(circuit)
    inverse, inverse_phase = _inverse_sequence(ops)
    folds, fraction = divmod(scale_factor - 1, 2)
    out_ops = list(ops)
    phase = 0.0
    for _ in range(int(folds)):
        out_ops += inverse + ops
        phase += inverse_phase
    physical_count = sum(_physical(i) for i in ops)
    to_fold = round(fraction * physical_count / 2)
    if to_fold > 0:
        # the shortest tail holding `to_fold` physical gates
        start, seen = len(ops), 0
        while seen < to_fold:
            start -= 1
            seen += _physical(ops[start])
        tail = ops[start:]
        tail_inverse, tail_phase = _inverse_sequence(tail)
        out_ops += tail_inverse + tail
        phase += tail_phase
    return _rebuild(circuit, out_ops, phase)


def fold_gates(circuit: QuantumCircuit, scale_factor: float, *, seed: int) -> QuantumCircuit:
    """Every physical gate G → G (G†G)^k, and a seeded random subset of them folded once more
    until the scale factor is reached (Mitiq's ``fold_gates_at_random``), each fold in place."""
    _check_scale(scale_factor)
    ops = _unitary_ops(circuit)
    folds, fraction = divmod(scale_factor - 1, 2)
    physical_at = [i for i, inst in enumerate(ops) if _physical(inst)]
    extra_count = round(fraction * len(physical_at) / 2)
    rng = np.random.default_rng(seed)
    extra = set(rng.choice(physical_at, size=extra_count, replace=False).tolist()) if extra_count else set()
    out_ops: list[CircuitInstruction] = []
    phase = 0.0
    for i, inst in enumerate(ops):
        out_ops.append(inst)
        if not _physical(inst):
            continue
        inverse, inverse_phase = _inverse(inst)
        for _ in range(int(folds) + (i in extra)):
            out_ops += [*inverse, inst]
            phase += inverse_phase
    return _rebuild(circuit, out_ops, phase)


def fold(circuit: QuantumCircuit, scale_factor: float, folding: str, *, seed: int) -> QuantumCircuit:
    if folding == "global":
        return fold_global(circuit, scale_factor)
    if folding == "gate":
        return fold_gates(circuit, scale_factor, seed=seed)
    raise QaiError("zne.unknown_folding", f"unknown folding {folding!r}", status=422,
                   details={"foldings": list(FOLDINGS)})


def two_qubit_gate_count(circuit: QuantumCircuit) -> int:
    return sum(1 for inst in circuit.data if len(inst.qubits) == 2 and inst.operation.name not in SKIPPED)
