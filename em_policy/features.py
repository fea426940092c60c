"""The features the EM policy engine and ML-QEM learn from, named once.

Training rows come from the harness's Parquet (``feat_*``, ``dev_*`` and ``obs_*`` columns, see
docs/em-metrics.md); a prediction request computes the same columns server-side from OpenQASM 2 or 3
and a calibration snapshot, with the harness's own compilation (``compile_for_device``) and feature
functions, so a feature means the same thing in training and in serving.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sdk.errors import QaiError

if TYPE_CHECKING:
    import pandas as pd
    from qiskit import QuantumCircuit
    from qiskit.quantum_info import SparsePauliOp

    from harness.calibration import CalibrationSnapshot

CIRCUIT_FEATURES = ("feat_num_qubits", "feat_logical_depth", "feat_logical_2q_count", "feat_logical_1q_count",
                    "feat_measurements", "feat_transpiled_depth", "feat_transpiled_2q_count",
                    "feat_transpiled_1q_count", "feat_mapping_entropy")
DEVICE_FEATURES = ("dev_1q_error", "dev_2q_error", "dev_readout_error", "dev_t1_us", "dev_t2_us",
                   "dev_circuit_fidelity")
# The observable in units of its norm around its maximally mixed value c0, so circuits with energies
# of -1.9 and cut sizes of 4 share one scale: x_scaled = (x - c0) / ||O||.
OBSERVABLE_FEATURES = ("obs_weight", "obs_mean_weight", "obs_terms", "obs_lo", "obs_hi")
HISTORY_FEATURES = ("hist_unmitigated_fidelity", "hist_best_fidelity", "hist_count")
BUDGET_FEATURES = ("log2_budget_ratio",)
POLICY_FEATURES = CIRCUIT_FEATURES + DEVICE_FEATURES + OBSERVABLE_FEATURES + HISTORY_FEATURES + BUDGET_FEATURES
MLQEM_FEATURES = CIRCUIT_FEATURES + DEVICE_FEATURES + OBSERVABLE_FEATURES + ("noisy_scaled", "noisy_rescaled")

MAX_QASM_BYTES = 256 * 1024
MAX_QUBITS = 8  # exact observable ranges and the harness's circuits stop at 8 qubits
MISSING_HISTORY = -1.0  # trees split it off; a count of 0 says why


def scaled(value: Any, identity: Any, norm: Any) -> Any:
    return (value - identity) / norm


def unscaled(value: Any, identity: Any, norm: Any) -> Any:
    return value * norm + identity


def similarity_bucket(transpiled_2q: float) -> int:
    """Circuits are "similar" for history when their compiled 2-qubit gate counts share a
    power-of-two bucket: 2-qubit gates carry most of the error budget."""
    return math.floor(math.log2(1.0 + max(0.0, float(transpiled_2q))))


def add_derived(frame: pd.DataFrame) -> pd.DataFrame:
    """Harness rows plus the derived observable columns (and ``noisy_scaled`` where ``noisy`` is known)."""
    out = frame.copy()
    norm = out["obs_norm"].astype(float)
    c0 = out["obs_identity"].astype(float)
    out["obs_lo"] = scaled(out["obs_min"].astype(float), c0, norm)
    out["obs_hi"] = scaled(out["obs_max"].astype(float), c0, norm)
    if "noisy" in out:
        out["noisy_scaled"] = scaled(out["noisy"].astype(float), c0, norm)
        out["noisy_rescaled"] = out["noisy_scaled"] / out["dev_circuit_fidelity"].clip(lower=0.05)
    return out


# ------------------------------------------------------------------------------------------------ history


@dataclass(frozen=True)
class History:
    """Past fidelities per (calibration snapshot, similarity bucket): the mean unmitigated fidelity and
    the mean of the best method's fidelity, over the circuits measured there."""

    table: dict[str, dict[int, tuple[float, float, int]]]

    @classmethod
    def from_groups(cls, groups: pd.DataFrame) -> History:
        """``groups``: one row per (circuit, observable, snapshot) with ``unmitigated_fidelity``,
        ``best_fidelity`` and ``feat_transpiled_2q_count``."""
        table: dict[str, dict[int, tuple[float, float, int]]] = {}
        buckets = groups["feat_transpiled_2q_count"].map(similarity_bucket)
        for (snap, bucket), g in groups.groupby([groups["calibration_snapshot_id"], buckets]):
            table.setdefault(str(snap), {})[int(bucket)] = (
                float(g["unmitigated_fidelity"].mean()), float(g["best_fidelity"].mean()), len(g))
        return cls(table)

    def lookup(self, snapshot_id: str, transpiled_2q: float, *, exclude: tuple[float, float] | None = None
               ) -> tuple[float, float, int]:
        """The history features; ``exclude`` removes one circuit's own (unmitigated, best) values
        (leave-one-out, so a training row never sees itself)."""
        cells = self.table.get(snapshot_id)
        if not cells:
            return MISSING_HISTORY, MISSING_HISTORY, 0
        bucket = similarity_bucket(transpiled_2q)
        u, b, n = cells.get(bucket, _pooled(cells))
        if exclude is not None and bucket in cells:
            if n <= 1:
                u, b, n = _pooled({k: v for k, v in cells.items() if k != bucket}) if len(cells) > 1 else (
                    MISSING_HISTORY, MISSING_HISTORY, 0)
            else:
                u, b, n = (u * n - exclude[0]) / (n - 1), (b * n - exclude[1]) / (n - 1), n - 1
        return u, b, n

    def to_json(self) -> dict[str, Any]:
        return {s: {str(k): list(v) for k, v in sorted(cells.items())} for s, cells in sorted(self.table.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> History:
        return cls({s: {int(k): (float(v[0]), float(v[1]), int(v[2])) for k, v in cells.items()}
                    for s, cells in data.items()})


def _pooled(cells: Mapping[int, tuple[float, float, int]]) -> tuple[float, float, int]:
    n = sum(c[2] for c in cells.values())
    if not n:
        return MISSING_HISTORY, MISSING_HISTORY, 0
    return (sum(c[0] * c[2] for c in cells.values()) / n, sum(c[1] * c[2] for c in cells.values()) / n, n)


# ------------------------------------------------------------------------------------- serving: QASM in


def parse_qasm(text: str) -> QuantumCircuit:
    """OpenQASM 3 (``OPENQASM 3``) or 2 text as a circuit; anything else is ``em_policy.invalid_qasm``."""
    from qiskit import qasm2, qasm3

    if len(text.encode()) > MAX_QASM_BYTES:
        raise QaiError("em_policy.invalid_qasm", f"the circuit is larger than {MAX_QASM_BYTES} bytes", status=413)
    head = _without_leading_comments(text)
    try:
        if head.startswith("OPENQASM 2"):
            circuit = qasm2.loads(text, custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
        elif head.startswith("OPENQASM"):
            circuit = qasm3.loads(text)
        else:
            raise QaiError("em_policy.invalid_qasm", "the circuit must start with an OPENQASM 2 or 3 header",
                           status=422)
    except QaiError:
        raise
    except Exception as exc:  # the parsers raise their own error types, with the line in the message
        raise QaiError("em_policy.invalid_qasm", f"invalid OpenQASM: {str(exc)[:400]}", status=422) from None
    if circuit.num_qubits == 0:
        raise QaiError("em_policy.invalid_qasm", "the circuit has no qubits", status=422)
    if circuit.num_qubits > MAX_QUBITS:
        raise QaiError("em_policy.features_out_of_range",
                       f"{circuit.num_qubits} qubits: the policy supports circuits of up to {MAX_QUBITS}", status=422,
                       details={"feature": "feat_num_qubits", "value": circuit.num_qubits, "max": MAX_QUBITS})
    return circuit


def _without_leading_comments(text: str) -> str:
    """The text from its first statement on: ``//`` and ``/* */`` comments may precede the header."""
    rest = text.lstrip()
    while rest.startswith(("//", "/*")):
        end = rest.find("\n") if rest.startswith("//") else rest.find("*/")
        if end < 0:
            return ""
        rest = rest[end + (1 if rest.startswith("//") else 2):].lstrip()
    return rest


MAX_COEFFICIENT = 1e6


def parse_observable(observable: Mapping[str, float] | None, num_qubits: int) -> SparsePauliOp:
    """Pauli labels (qubit 0 rightmost, Qiskit's order) to coefficients; default Z⊗…⊗Z (parity)."""
    from qiskit.quantum_info import SparsePauliOp

    if observable is not None and not observable:
        raise QaiError("em_policy.invalid_observable", "the observable has no terms (omit it for Z on every qubit)",
                       status=422)
    terms = dict(observable) if observable else {"Z" * num_qubits: 1.0}
    if len(terms) > 4**MAX_QUBITS:
        raise QaiError("em_policy.invalid_observable", "too many Pauli terms", status=422)
    for label, coeff in terms.items():
        if len(label) != num_qubits or set(label) - set("IXYZ"):
            raise QaiError("em_policy.invalid_observable", f"Pauli label {label!r} is not {num_qubits} of I, X, Y, Z",
                           status=422)
        if not (math.isfinite(float(coeff)) and abs(float(coeff)) <= MAX_COEFFICIENT):
            raise QaiError("em_policy.invalid_observable",
                           f"coefficient of {label} must be finite and at most {MAX_COEFFICIENT:g} in size", status=422)
    op = SparsePauliOp.from_list(sorted(terms.items())).simplify()
    if all(set(p.to_label()) <= {"I"} for p in op.paulis):
        raise QaiError("em_policy.invalid_observable", "the observable is a multiple of the identity", status=422)
    return op


def unitary_part(circuit: QuantumCircuit) -> QuantumCircuit:
    """The circuit without measurements, barriers and classical bits: what the harness compiles and
    measures in each basis itself."""
    from qiskit import QuantumCircuit

    out = QuantumCircuit(circuit.num_qubits)
    measured: set[int] = set()
    for inst in circuit.data:
        qubits = {circuit.find_bit(q).index for q in inst.qubits}
        if inst.operation.name == "measure":
            measured |= qubits
            continue
        if inst.operation.name == "barrier":
            continue
        if qubits & measured:
            raise QaiError("em_policy.invalid_qasm", f"{inst.operation.name!r} acts on a qubit after its measurement "
                           "(mid-circuit measurement is not supported)", status=422)
        if inst.clbits or inst.operation.name in ("reset", "delay") or getattr(inst.operation, "condition", None):
            raise QaiError("em_policy.invalid_qasm", f"unsupported instruction {inst.operation.name!r} (mid-circuit "
                           "classical control or reset)", status=422)
        out.append(inst.operation, [out.qubits[circuit.find_bit(q).index] for q in inst.qubits])
    return out


def circuit_row(circuit: QuantumCircuit, observable: SparsePauliOp, snapshot: CalibrationSnapshot, *,
                seed: int = 0) -> dict[str, float]:
    """The harness's feature columns for a user circuit on a snapshot: compiled exactly as the harness
    compiles (noise-aware layout, seeded), then the same feature functions."""
    from harness.circuits import CircuitSpec, gate_features, observable_features, observable_range
    from harness.tasks import compile_for_device, device_features

    unitary = unitary_part(circuit)
    if snapshot.num_qubits < unitary.num_qubits:
        raise QaiError("em_policy.circuit_too_large", f"{unitary.num_qubits} qubits do not fit {snapshot.backend_id} "
                       f"({snapshot.num_qubits})", status=422)
    digest = _circuit_digest(unitary)
    spec = CircuitSpec(circuit_id=f"qasm-{digest}", family="user", variant="qasm", num_qubits=unitary.num_qubits,
                       depth=0, seed=seed, circuit=unitary, observables={"O": observable}, params={})
    try:
        compiled = compile_for_device(spec, snapshot, seed)
    except QaiError:
        raise
    except Exception as exc:
        raise QaiError("em_policy.invalid_qasm", f"the circuit does not compile for {snapshot.backend_id}: "
                       f"{str(exc)[:300]}", status=422) from None
    lo, hi = observable_range(observable)
    enc = observable_features(observable)
    norm = max(abs(lo), abs(hi))
    measured = gate_features(circuit)["measurements"]
    row: dict[str, float] = {f"feat_{k}": float(v) for k, v in gate_features(unitary, compiled.circuit).items()}
    row["feat_measurements"] = float(measured)
    row.update({k: float(v) for k, v in device_features(snapshot, compiled).items()})
    row.update(enc)
    row.update({"obs_min": lo, "obs_max": hi, "obs_norm": norm,
                "obs_lo": scaled(lo, enc["obs_identity"], norm), "obs_hi": scaled(hi, enc["obs_identity"], norm)})
    return row


def _circuit_digest(circuit: QuantumCircuit) -> str:
    import hashlib

    from qiskit import qasm2

    return hashlib.sha256(qasm2.dumps(circuit).encode()).hexdigest()[:16]


def matrix(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, columns: Sequence[str]) -> np.ndarray[Any, Any]:
    """The feature matrix in ``columns`` order, float64."""
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        return np.asarray(rows.loc[:, list(columns)].to_numpy(dtype=np.float64))
    return np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64)
