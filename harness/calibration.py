"""Device calibration snapshots: what a noisy simulation of a real device is built from.

A snapshot is plain data (JSON-safe), taken from a Qiskit ``BackendV2`` (the fake backends of
``qiskit-ibm-runtime`` carry real IBM calibrations) or imported from a vendor calibration JSON in
the same shape. Its ``id`` is derived from its content, so the same calibration always has the
same id and a changed one never reuses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from sdk.canonical import canonical_json
from sdk.errors import QaiError

# Gates whose error and duration are taken from the device; rz is virtual (zero error, zero time).
ONE_QUBIT_GATES = ("sx", "x", "id")
TWO_QUBIT_GATES = ("ecr", "cz", "cx")


def qubits_key(qubits: tuple[int, ...] | list[int]) -> str:
    """``(3, 4)`` → ``"3,4"``: JSON object keys for per-qubit-tuple data."""
    return ",".join(str(q) for q in qubits)


@dataclass(frozen=True)
class CalibrationSnapshot:
    backend_id: str
    created_at: datetime
    num_qubits: int
    basis_gates: list[str]
    # gate -> "q0[,q1]" -> {"error": probability, "duration": seconds}
    gates: dict[str, dict[str, dict[str, float]]]
    # "q" -> {"p01": P(read 1 | prepared 0), "p10": P(read 0 | prepared 1)}
    readout_errors: dict[str, dict[str, float]]
    # "t1", "t2" (seconds) and "readout_length" per qubit; whatever else the vendor reports
    raw_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        digest = hashlib.sha256(canonical_json(self._content())).hexdigest()[:12]
        return f"{self.backend_id}@{self.created_at.strftime('%Y%m%dT%H%M%SZ')}-{digest}"

    @property
    def two_qubit_gate(self) -> str:
        names = [g for g in TWO_QUBIT_GATES if g in self.gates]
        if not names:
            raise QaiError("calibration.no_two_qubit_gate", f"{self.backend_id} has no 2-qubit gate")
        return names[0]

    @property
    def coupling_map(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in (k.split(",") for k in self.gates[self.two_qubit_gate])]

    def t1(self, q: int) -> float:
        return float(self.raw_metrics["t1"][q])

    def t2(self, q: int) -> float:
        return float(self.raw_metrics["t2"][q])

    def _content(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.astimezone(UTC).isoformat()
        return d

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **self._content()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CalibrationSnapshot:
        """A vendor calibration in this module's shape; the ``id``, if given, must match."""
        try:
            snap = cls(
                backend_id=str(data["backend_id"]),
                created_at=datetime.fromisoformat(data["created_at"]).astimezone(UTC),
                num_qubits=int(data["num_qubits"]),
                basis_gates=[str(g) for g in data["basis_gates"]],
                gates={g: {k: {"error": float(v["error"]), "duration": float(v["duration"])}
                           for k, v in per.items()} for g, per in data["gates"].items()},
                readout_errors={k: {"p01": float(v["p01"]), "p10": float(v["p10"])}
                                for k, v in data["readout_errors"].items()},
                raw_metrics=dict(data.get("raw_metrics", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QaiError("calibration.malformed", f"not a calibration snapshot: {type(exc).__name__}: {exc}",
                           status=422) from exc
        _check(snap)
        if "id" in data and data["id"] != snap.id:
            raise QaiError("calibration.id_mismatch", f"id {data['id']} does not match the content ({snap.id})",
                           status=422)
        return snap


def _check(snap: CalibrationSnapshot) -> None:
    """Physical sanity: probabilities in [0, 1], positive T1, T2 <= 2 T1, qubits on the device."""
    n = snap.num_qubits
    for name in ("t1", "t2"):
        values = snap.raw_metrics.get(name)
        if not isinstance(values, list) or len(values) != n or not all(float(v) > 0 for v in values):
            raise QaiError("calibration.malformed", f"raw_metrics.{name} must list a positive time per qubit",
                           status=422)
    for q in range(n):
        if snap.t2(q) > 2 * snap.t1(q) * (1 + 1e-9):
            raise QaiError("calibration.unphysical", f"qubit {q}: T2 {snap.t2(q)} exceeds 2*T1", status=422)
    for gate, per in snap.gates.items():
        for key, v in per.items():
            qubits = [int(x) for x in key.split(",")]
            if not all(0 <= x < n for x in qubits) or not 0 <= v["error"] <= 1 or v["duration"] < 0:
                raise QaiError("calibration.malformed", f"{gate} on {key}: {v}", status=422)
    for key, v in snap.readout_errors.items():
        if not 0 <= int(key) < n or not (0 <= v["p01"] <= 1 and 0 <= v["p10"] <= 1):
            raise QaiError("calibration.malformed", f"readout of qubit {key}: {v}", status=422)


def snapshot_from_backend(backend: Any) -> CalibrationSnapshot:
    """The calibration a ``BackendV2`` carries (gate errors and durations, readout, T1/T2)."""
    target = backend.target
    gates: dict[str, dict[str, dict[str, float]]] = {}
    for name in (*ONE_QUBIT_GATES, *TWO_QUBIT_GATES):
        if name not in target.operation_names:
            continue
        per: dict[str, dict[str, float]] = {}
        for qargs, props in target[name].items():
            if qargs is None or props is None or props.error is None:
                continue
            per[qubits_key(qargs)] = {"error": float(props.error), "duration": float(props.duration or 0.0)}
        gates[name] = dict(sorted(per.items()))
    props = backend.properties() if hasattr(backend, "properties") else None
    readout: dict[str, dict[str, float]] = {}
    lengths: list[float] = []
    for q in range(backend.num_qubits):
        m = target["measure"].get((q,))
        error = float(m.error) if m is not None and m.error is not None else 0.0
        p01 = p10 = error
        if props is not None:
            try:
                p01 = float(props.qubit_property(q, "prob_meas1_prep0")[0])
                p10 = float(props.qubit_property(q, "prob_meas0_prep1")[0])
            except Exception:  # a backend without the asymmetric figures: the symmetric error stands
                p01 = p10 = error
        readout[str(q)] = {"p01": p01, "p10": p10}
        lengths.append(float(m.duration or 0.0) if m is not None else 0.0)
    t1 = [float(target.qubit_properties[q].t1) for q in range(backend.num_qubits)]
    t2 = [min(float(target.qubit_properties[q].t2), 2 * t1[q]) for q in range(backend.num_qubits)]
    updated = getattr(props, "last_update_date", None) if props is not None else None
    created = updated.astimezone(UTC) if isinstance(updated, datetime) else datetime(1970, 1, 1, tzinfo=UTC)
    snap = CalibrationSnapshot(
        backend_id=backend.name, created_at=created.replace(microsecond=0), num_qubits=backend.num_qubits,
        basis_gates=sorted(g for g in target.operation_names
                           if g in (*ONE_QUBIT_GATES, *TWO_QUBIT_GATES, "rz", "measure", "reset", "delay")),
        gates=gates, readout_errors=readout, raw_metrics={"t1": t1, "t2": t2, "readout_length": lengths},
    )
    _check(snap)
    return snap


def scaled(snap: CalibrationSnapshot, *, gate_error: float = 1.0, two_qubit_error: float | None = None,
           readout: float = 1.0, relaxation: bool = True) -> CalibrationSnapshot:
    """A what-if copy: errors scaled (0 gives an ideal device); ``relaxation=False`` makes T1/T2
    so long that they do not matter. For physics tests and sensitivity studies."""
    two = gate_error if two_qubit_error is None else two_qubit_error
    gates = {g: {k: {"error": min(1.0, v["error"] * (two if g in TWO_QUBIT_GATES else gate_error)),
                     "duration": v["duration"]} for k, v in per.items()} for g, per in snap.gates.items()}
    ro = {k: {"p01": min(1.0, v["p01"] * readout), "p10": min(1.0, v["p10"] * readout)}
          for k, v in snap.readout_errors.items()}
    metrics = dict(snap.raw_metrics)
    if not relaxation:
        metrics["t1"] = [1e6] * snap.num_qubits
        metrics["t2"] = [2e6] * snap.num_qubits
    tag = json.dumps([gate_error, two, readout, relaxation])
    return CalibrationSnapshot(backend_id=f"{snap.backend_id}~{hashlib.sha256(tag.encode()).hexdigest()[:6]}",
                               created_at=snap.created_at, num_qubits=snap.num_qubits,
                               basis_gates=snap.basis_gates, gates=gates, readout_errors=ro, raw_metrics=metrics)


def degraded(snap: CalibrationSnapshot, factor: float, created_at: datetime) -> CalibrationSnapshot:
    """The same device recalibrated at ``created_at`` with every error rate × ``factor``: gate and
    readout errors, and the relaxation rates 1/T1 and 1/T2 (so T1 and T2 ÷ ``factor``). Drift
    injection for the nightly pipeline's tests and what-if studies."""
    worse = scaled(snap, gate_error=factor, readout=factor)
    metrics = dict(snap.raw_metrics)
    for key in ("t1", "t2"):
        if key in metrics:
            metrics[key] = [float(v) / factor for v in metrics[key]]
    return CalibrationSnapshot(backend_id=snap.backend_id, created_at=created_at, num_qubits=snap.num_qubits,
                               basis_gates=snap.basis_gates, gates=worse.gates, readout_errors=worse.readout_errors,
                               raw_metrics=metrics)


class PinnedSnapshot(CalibrationSnapshot):
    """A snapshot whose content-derived id is computed once. ``CalibrationSnapshot.id`` hashes the
    whole calibration on every access (tens of ms for a 127-qubit device); code that reads it per
    request or per execution holds a pinned copy. Its content must not be changed afterwards."""

    @cached_property
    def id(self) -> str:
        return super().id


def pinned(snapshot: CalibrationSnapshot) -> CalibrationSnapshot:
    if isinstance(snapshot, PinnedSnapshot):
        return snapshot
    return PinnedSnapshot(**{f.name: getattr(snapshot, f.name) for f in fields(snapshot)})
