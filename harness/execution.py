"""One execution: a compact, measured circuit in the device basis, run with shots on a calibrated
device (simulated). The unit every adapter (``local-aer``, ``ibm-like``, ``braket-like``) accepts.

Nothing transpiles the circuit after this point: folding must survive to the simulator, so gates
such as ``sx · rz(π) · sx†`` are never cancelled.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

from qiskit import QuantumCircuit, qpy

from harness.calibration import CalibrationSnapshot
from harness.noise import default_method, simulator


@dataclass(frozen=True)
class ExecutionRequest:
    backend_id: str
    snapshot_id: str  # the calibration the run must use; a vendor with another one refuses
    physical: tuple[int, ...]  # device qubits that compact qubits 0..n-1 stand for
    circuit: QuantumCircuit  # compact, measured, device basis
    shots: int
    seed: int

    def circuit_b64(self) -> str:
        return circuit_to_b64(self.circuit)


@dataclass(frozen=True)
class ExecutionResult:
    counts: dict[str, int]  # bitstring (clbit 0 rightmost, qiskit order) -> count
    shots: int
    simulation_method: str  # density_matrix or statevector
    attempts: int = 1  # submissions it took (retries after 429s, faults and timeouts)
    vendor_job_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def circuit_to_b64(circuit: QuantumCircuit) -> str:
    buf = io.BytesIO()
    qpy.dump(circuit, buf)
    return base64.b64encode(buf.getvalue()).decode()


def circuit_from_b64(data: str) -> QuantumCircuit:
    circuits = qpy.load(io.BytesIO(base64.b64decode(data, validate=True)))
    if len(circuits) != 1 or not isinstance(circuits[0], QuantumCircuit):
        raise ValueError("expected exactly one circuit")
    return circuits[0]


def run_local(snap: CalibrationSnapshot, request: ExecutionRequest) -> ExecutionResult:
    """Run on Aer with the compact noise model of ``request.physical``; deterministic in ``seed``."""
    if snap.id != request.snapshot_id:
        raise ValueError(f"calibration {request.snapshot_id} requested, {snap.id} loaded")
    method = default_method(len(request.physical))
    sim = simulator(snap, request.physical, method=method, seed=request.seed)
    counts = sim.run(request.circuit, shots=request.shots).result().get_counts()
    return ExecutionResult(counts={k: int(v) for k, v in sorted(counts.items())}, shots=request.shots,
                           simulation_method=method)
