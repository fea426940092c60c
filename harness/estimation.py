"""Expectation values of Pauli observables from measured histograms, with their variances.

An observable O = c₀·I + Σ c_t P_t is measured in a few *bases* (one Pauli axis per qubit): the
non-identity terms are grouped greedily into qubit-wise commuting groups, each group measured by
one circuit. In basis b a shot with outcome x contributes v_b(x) = Σ_{t∈b} c_t (−1)^{|x ∧ S_t|},
where S_t is the support of P_t, so

    Ô = c₀ + Σ_b mean_b(v_b),   Var(Ô) = Σ_b Var_b(v_b) / N_b,

with Var_b the per-shot variance under the measured distribution. Readout mitigation keeps this
form: with a tensor-product confusion matrix A = ⊗ A_i, the unbiased per-shot value is
w_b = (A⁻¹)ᵀ v_b (Bravyi et al., "Mitigating measurement errors in multiqubit experiments",
PRA 103, 042605, 2021), so mitigated estimates and their variances come out of the same code.

Bitstrings follow Qiskit: classical bit i is bit i of the integer (the rightmost character);
the harness measures logical qubit i into classical bit i.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from qiskit import QuantumCircuit
from qiskit.quantum_info import SparsePauliOp

from sdk.errors import QaiError

Vector = NDArray[np.float64]


def _terms(op: SparsePauliOp) -> list[tuple[str, float]]:
    out = []
    for label, coeff in op.simplify(atol=1e-12).to_list():
        if abs(complex(coeff).imag) > 1e-9:
            raise QaiError("harness.non_hermitian", f"observable term {label} has a complex coefficient", status=422)
        out.append((label, float(complex(coeff).real)))
    return out


def identity_coefficient(op: SparsePauliOp) -> float:
    """Tr(O)/2ⁿ: the value of O in the maximally mixed state, where strong noise drives it."""
    return sum(c for label, c in _terms(op) if set(label) == {"I"})


def _compatible(basis: list[str], label: str) -> bool:
    # label is big-endian text: character k is qubit n-1-k, like basis
    return all(p == "I" or b in ("-", p) for b, p in zip(basis, label, strict=True))


def measurement_bases(observables: Sequence[SparsePauliOp]) -> list[str]:
    """Bases (big-endian labels over X/Y/Z, qubits no term needs measured in Z) covering every
    non-identity term of every observable: a greedy qubit-wise commuting grouping, in a
    deterministic order (terms sorted, so the same observables always give the same bases)."""
    if not observables:
        return []
    n = observables[0].num_qubits
    labels = sorted({label for op in observables for label, _ in _terms(op) if set(label) != {"I"}})
    groups: list[list[str]] = []
    for label in labels:
        for g in groups:
            if _compatible(g, label):
                for k, p in enumerate(label):
                    if p != "I":
                        g[k] = p
                break
        else:
            groups.append(["-" if p == "I" else p for p in label])
    return ["".join("Z" if b == "-" else b for b in g) for g in groups] or ["Z" * n]


def append_measurement(circuit: QuantumCircuit, basis: str, qubits: Sequence[int]) -> QuantumCircuit:
    """``circuit`` followed by the basis change of ``basis`` on ``qubits`` (logical qubit i sits on
    ``qubits[i]``) in the device basis, and a measurement of logical qubit i into clbit i.

    X is measured after H = rz(π/2)·sx·rz(π/2); Y after S†·H, which collapses to sx·rz(π/2)
    (both up to global phase). The sx gates are real, noisy pulses: the basis change costs what
    it costs on the device."""
    n = len(qubits)
    if len(basis) != n:
        raise QaiError("harness.bad_basis", f"basis {basis} for {n} qubits", status=422)
    out = QuantumCircuit(circuit.num_qubits, n, global_phase=circuit.global_phase)
    out.compose(circuit, inplace=True)
    for i, q in enumerate(qubits):
        axis = basis[n - 1 - i]
        if axis == "X":
            out.rz(math.pi / 2, q)
            out.sx(q)
            out.rz(math.pi / 2, q)
        elif axis == "Y":
            out.sx(q)
            out.rz(math.pi / 2, q)
        elif axis != "Z":
            raise QaiError("harness.bad_basis", f"basis {basis} has {axis!r}", status=422)
    for i, q in enumerate(qubits):
        out.measure(q, i)
    return out


def _parity_signs(n: int, mask: int) -> Vector:
    x = np.arange(2**n, dtype=np.int64)
    bits = np.zeros(2**n, dtype=np.int64)
    m = x & mask
    while m.any():
        bits ^= m & 1
        m >>= 1
    return np.where(bits == 1, -1.0, 1.0)


def _mask(label: str) -> int:
    n = len(label)
    return sum(1 << i for i in range(n) if label[n - 1 - i] != "I")


@dataclass(frozen=True)
class Estimator:
    """How one observable is read off the bases' histograms: a constant plus, per basis, a per-shot
    value vector over all 2^n outcomes."""

    constant: float
    values: dict[str, Vector]  # basis -> v_b

    def corrected(self, inverse_confusion: Sequence[NDArray[np.float64]]) -> Estimator:
        """The same estimator with readout errors inverted: w_b = (⊗ A_i⁻¹)ᵀ v_b."""
        return Estimator(self.constant, {b: _apply_transposed(inverse_confusion, v) for b, v in self.values.items()})


def estimator(op: SparsePauliOp, bases: Sequence[str]) -> Estimator:
    n = op.num_qubits
    constant = 0.0
    values: dict[str, Vector] = {}
    for label, coeff in _terms(op):
        if set(label) == {"I"}:
            constant += coeff
            continue
        basis = next((b for b in bases if _compatible(list(b), label)), None)
        if basis is None:
            raise QaiError("harness.no_basis", f"no measured basis covers {label}", status=422)
        values.setdefault(basis, np.zeros(2**n))
        values[basis] = values[basis] + coeff * _parity_signs(n, _mask(label))
    return Estimator(constant, values)


def distribution(counts: Mapping[str, int], n: int) -> tuple[Vector, int]:
    """Histogram → (probability vector over 2^n outcomes, shots)."""
    p = np.zeros(2**n)
    for key, c in counts.items():
        p[int(key.replace(" ", ""), 2)] += c
    shots = int(p.sum())
    if shots <= 0:
        raise QaiError("harness.empty_histogram", "a histogram with no shots", status=422)
    return p / shots, shots


@dataclass(frozen=True)
class Estimate:
    value: float
    variance: float  # of the estimate (per-shot variance / shots, summed over bases)


def estimate(est: Estimator, histograms: Mapping[str, tuple[Vector, int]]) -> Estimate:
    """``histograms``: basis -> (distribution, shots)."""
    value, variance = est.constant, 0.0
    for basis, v in est.values.items():
        p, shots = histograms[basis]
        mean = float(p @ v)
        value += mean
        variance += max(float(p @ (v * v)) - mean * mean, 0.0) / shots
    return Estimate(value, variance)


# --- readout --------------------------------------------------------------------------------------


def confusion_from_calibration(zeros: Mapping[str, int], ones: Mapping[str, int], n: int
                               ) -> list[NDArray[np.float64]]:
    """Per-qubit confusion matrices A_i[read, prepared] from two calibration runs: every qubit
    prepared in |0⟩, and every qubit prepared in |1⟩ (the tensored model of Bravyi et al.)."""
    p0, _ = distribution(zeros, n)
    p1, _ = distribution(ones, n)
    x = np.arange(2**n)
    out = []
    for i in range(n):
        bit = (x >> i) & 1
        p01 = float(p0[bit == 1].sum())  # read 1 though 0 was prepared
        p10 = float(p1[bit == 0].sum())
        out.append(np.array([[1 - p01, p10], [p01, 1 - p10]]))
    return out


def inverse_confusion(confusion: Sequence[NDArray[np.float64]]) -> list[NDArray[np.float64]]:
    out = []
    for i, a in enumerate(confusion):
        # det = 1 − p01 − p10; below 0.1 the inverse amplifies the variance more than 100×
        if abs(np.linalg.det(a)) < 0.1:
            raise QaiError("readout.singular", f"qubit {i}'s readout is too close to a coin flip to invert "
                           f"(P(1|0) = {a[1, 0]:.3f}, P(0|1) = {a[0, 1]:.3f})", status=422)
        out.append(np.asarray(np.linalg.inv(a), dtype=np.float64))
    return out


def _apply_transposed(matrices: Sequence[NDArray[np.float64]], v: Vector) -> Vector:
    """(⊗_i M_i)ᵀ v for qubit i = bit i of the outcome index, without forming the 2^n matrix."""
    n = len(matrices)
    t = v.reshape([2] * n)  # axis k is bit n-1-k (C order: the last axis is the lowest bit)
    for i, m in enumerate(matrices):
        axis = n - 1 - i
        t = np.moveaxis(np.asarray(np.tensordot(m.T, t, axes=([1], [axis])), dtype=np.float64), 0, axis)
    return np.asarray(t.reshape(-1), dtype=np.float64)
