"""EM regression harness (issue 5, in progress): device calibration snapshots and noisy simulation
built only for the qubits a circuit uses."""

from harness.calibration import CalibrationSnapshot, scaled, snapshot_from_backend
from harness.noise import active_qubits, compact_circuit, compact_noise_model, simulator

__all__ = ["CalibrationSnapshot", "active_qubits", "compact_circuit", "compact_noise_model", "scaled",
           "simulator", "snapshot_from_backend"]
