"""EM regression harness: device calibration snapshots, noisy simulation built only for the qubits a
circuit uses, circuit families, ZNE/readout mitigation, vendor adapters and Parquet datasets.

The public names are loaded on first use: ``qai`` registers the harness commands at start-up, and
importing Qiskit and Aer there would slow every command down.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CalibrationSnapshot": "harness.calibration", "scaled": "harness.calibration",
    "snapshot_from_backend": "harness.calibration",
    "active_qubits": "harness.noise", "compact_circuit": "harness.noise", "compact_noise_model": "harness.noise",
    "simulator": "harness.noise",
    "CircuitSpec": "harness.circuits", "generate": "harness.circuits", "FAMILIES": "harness.circuits",
    "Method": "harness.methods", "parse_method": "harness.methods",
    "RunConfig": "harness.run", "AdapterConfig": "harness.run", "build_tasks": "harness.run",
    "run_tasks": "harness.run", "sorted_rows": "harness.run",
    "Task": "harness.tasks", "run_task": "harness.tasks",
    "BackendInfo": "harness.catalog", "catalog": "harness.catalog", "catalog_snapshot": "harness.catalog",
    "persist_run": "harness.service", "verify_run": "harness.service",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
