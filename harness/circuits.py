"""Seeded, deterministic circuit families for the error-mitigation benchmark harness.

Every circuit here is *logical*: device-agnostic, unitary only (no measurements, barriers or
resets) and built from standard gates, so that the harness can transpile it to any device, attach
its own measurement bases and compare noisy or mitigated expectation values with the exact ideal
values of :func:`ideal_expectations`. Generation is pure: the same arguments always give equal
circuits, ids and observables, because every random choice draws from one ``numpy`` generator
seeded by ``(seed, family, num_qubits, index)``.

Families and their variants:

* ``random`` / ``layered``: layers of random one-qubit rotations and a random subset of CX/CZ on the
  even or odd bonds of a line (every device embeds a line, so routing adds no SWAPs);
* ``trotter`` / ``tfim``, ``heisenberg``, ``h2``: first-order Trotter evolution of a simple product
  state under a 1-D transverse-field Ising chain, a Heisenberg XXX chain, or the H2 molecule;
* ``variational`` / ``hea-vqe``, ``qaoa-maxcut``: a hardware-efficient ansatz with random angles
  measured on the TFIM Hamiltonian, and QAOA on a seeded (3-regular where possible) graph.

Observables are ``SparsePauliOp`` on the circuit's qubits, in qiskit's little-endian convention
(qubit 0 is the rightmost letter of a label); they are built with ``from_sparse_list`` so that the
code names qubits by index and never spells labels by hand.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
from qiskit import QuantumCircuit
from qiskit.quantum_info import SparsePauliOp, Statevector

from sdk.errors import QaiError

FAMILIES = ("random", "trotter", "variational")
MIN_QUBITS, MAX_QUBITS = 2, 8
# The dense eigen-solve of observable_range costs O(4^n) memory; 10 qubits is 16 MiB of complex128.
MAX_DENSE_QUBITS = 10
# Layers / Trotter steps / ansatz reps / QAOA p when the caller does not choose.
DEFAULT_DEPTHS: dict[str, int] = {"random": 5, "trotter": 4, "variational": 2}
# Cap on depth and count so that a malformed request cannot ask for an unbounded amount of work.
MAX_DEPTH = 200
MAX_COUNT = 10_000

_ERROR_CODE = "harness.bad_circuit_request"
_TWO_PI = 2.0 * math.pi

# --- H2 molecule, STO-3G, bond length 0.735 Å (electronic energy only, no nuclear repulsion) ------------------
# Both forms come from PySCF integrals as published in Qiskit's own test suites; their exact ground
# energies agree (-1.857275030 Ha, the FCI electronic energy; FCI total = -1.137306 Ha after adding the nuclear
# repulsion 0.7199689944 Ha), and the Hartree-Fock reference gives -1.836968 Ha (HF total -1.116999 Ha).
#
# 2 qubits: parity mapping with two-qubit reduction, as used by Qiskit's VQE tests and tutorials
# (qiskit-terra test/python/algorithms/test_vqe.py, ``H2_op``). Labels are little-endian: "IZ" is Z on qubit 0.
# Hartree-Fock is |01> (X on qubit 0).
H2_PARITY_2Q: tuple[tuple[str, float], ...] = (
    ("II", -1.052373245772859),
    ("IZ", 0.39793742484318045),
    ("ZI", -0.39793742484318045),
    ("ZZ", -0.01128010425623538),
    ("XX", 0.18093119978423156),
)
# 4 qubits: Jordan-Wigner mapping, spin orbitals in block order (alpha 0, 1 then beta 2, 3), copied from
# qiskit-nature test/second_q/mappers/test_jordan_wigner_mapper.py (``REF_H2``). Hartree-Fock occupies the
# lowest alpha and beta orbitals: X on qubits 0 and 2.
H2_JW_4Q: tuple[tuple[str, float], ...] = (
    ("IIII", -0.81054798160031430),
    ("ZIII", -0.22575349071287365),
    ("IZII", +0.17218393211855787),
    ("ZZII", +0.12091263243164174),
    ("IIZI", -0.22575349071287362),
    ("ZIZI", +0.17464343053355980),
    ("IZZI", +0.16614543242281926),
    ("IIIZ", +0.17218393211855818),
    ("ZIIZ", +0.16614543242281926),
    ("IZIZ", +0.16892753854646372),
    ("IIZZ", +0.12091263243164174),
    ("XXXX", +0.04523279999117751),
    ("YYXX", +0.04523279999117751),
    ("XXYY", +0.04523279999117751),
    ("YYYY", +0.04523279999117751),
)
H2_BOND_LENGTH_ANGSTROM = 0.735
H2_NUCLEAR_REPULSION = 0.7199689944
H2_FCI_ELECTRONIC_ENERGY = -1.857275030202382
H2_HF_ELECTRONIC_ENERGY = -1.836967991202984
_H2_FORMS: dict[int, tuple[str, tuple[tuple[str, float], ...], tuple[int, ...]]] = {
    # num_qubits -> (encoding, terms, qubits flipped to prepare Hartree-Fock)
    2: ("parity-2q-reduced", H2_PARITY_2Q, (0,)),
    4: ("jordan-wigner", H2_JW_4Q, (0, 2)),
}


@dataclass(frozen=True)
class CircuitSpec:
    """One benchmark circuit and what to measure on it.

    ``seed`` is the seed of the ``generate`` call; the circuit's own generator seed, derived from
    ``(seed, family, num_qubits, index)``, is ``params["rng_seed"]`` (64-bit, hex) and its position
    ``params["index"]``. Not hashable (it holds a circuit and dicts); compare with ``==``.
    """

    circuit_id: str
    family: str
    variant: str
    num_qubits: int
    depth: int
    seed: int
    circuit: QuantumCircuit
    observables: dict[str, SparsePauliOp]
    params: dict[str, float | int | str]


# --------------------------------------------------------------------------------------------------- helpers


def _bad(message: str, **details: object) -> QaiError:
    return QaiError(_ERROR_CODE, message, status=422, details=dict(details))


def _is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    # bool is an int subclass; True qubits is a bug in the caller, not a request for one qubit.
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _rng_seed(seed: int, family: str, num_qubits: int, index: int) -> int:
    """A 64-bit seed from the full identity of one circuit. Hashing (not adding) keeps neighbouring
    (seed, index) pairs from sharing streams: seed 1 index 2 and seed 2 index 1 are unrelated."""
    digest = hashlib.sha256(f"qai.harness.circuits|{seed}|{family}|{num_qubits}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _r(value: float) -> float:
    """Physical parameters are rounded before use so the params dict rebuilds the exact circuit."""
    return round(float(value), 6)


def _sparse(terms: Sequence[tuple[str, Sequence[int], float]], num_qubits: int) -> SparsePauliOp:
    return SparsePauliOp.from_sparse_list([(p, list(q), c) for p, q, c in terms], num_qubits=num_qubits)


def line_bonds(num_qubits: int, parity: int | None = None) -> list[tuple[int, int]]:
    """Nearest-neighbour pairs (i, i+1) of a line; with ``parity`` only those with i % 2 == parity."""
    return [(i, i + 1) for i in range(num_qubits - 1) if parity is None or i % 2 == parity]


def variants_for(family: str, num_qubits: int) -> tuple[str, ...]:
    """The variants ``generate`` cycles through (by index) for this family and size."""
    if family == "random":
        return ("layered",)
    if family == "trotter":
        return ("tfim", "heisenberg", "h2") if num_qubits in _H2_FORMS else ("tfim", "heisenberg")
    if family == "variational":
        return ("hea-vqe", "qaoa-maxcut")
    raise _bad(f"unknown circuit family {family!r}", family=family, families=list(FAMILIES))


# ----------------------------------------------------------------------------------------------- observables


def z_on(num_qubits: int, qubit: int) -> SparsePauliOp:
    return _sparse([("Z", [qubit], 1.0)], num_qubits)


def mean_z(num_qubits: int) -> SparsePauliOp:
    """Magnetisation (1/n) Σ Z_i."""
    return _sparse([("Z", [i], 1.0 / num_qubits) for i in range(num_qubits)], num_qubits)


def mean_zz(num_qubits: int) -> SparsePauliOp:
    """Nearest-neighbour correlation (1/(n-1)) Σ Z_i Z_{i+1} along the line."""
    bonds = line_bonds(num_qubits)
    return _sparse([("ZZ", [i, j], 1.0 / len(bonds)) for i, j in bonds], num_qubits)


def z_parity(num_qubits: int) -> SparsePauliOp:
    """Z on every qubit: the most noise-sensitive observable (its expectation decays with every error)."""
    return _sparse([("Z" * num_qubits, list(range(num_qubits)), 1.0)], num_qubits)


def tfim_hamiltonian(num_qubits: int, j: float, h: float) -> SparsePauliOp:
    """Open-chain transverse-field Ising model H = -J Σ Z_i Z_{i+1} - h Σ X_i."""
    terms: list[tuple[str, Sequence[int], float]] = [("ZZ", [a, b], -j) for a, b in line_bonds(num_qubits)]
    terms += [("X", [i], -h) for i in range(num_qubits)]
    return _sparse(terms, num_qubits)


def heisenberg_hamiltonian(num_qubits: int, j: float) -> SparsePauliOp:
    """Open-chain Heisenberg XXX model H = J Σ (X_i X_{i+1} + Y_i Y_{i+1} + Z_i Z_{i+1})."""
    terms = [(p, [a, b], j) for a, b in line_bonds(num_qubits) for p in ("XX", "YY", "ZZ")]
    return _sparse(terms, num_qubits)


def h2_hamiltonian(num_qubits: int) -> SparsePauliOp:
    """The electronic H2 Hamiltonian (STO-3G, 0.735 Å) in its 2-qubit parity or 4-qubit Jordan-Wigner form."""
    if num_qubits not in _H2_FORMS:
        raise _bad(f"the H2 Hamiltonian has {sorted(_H2_FORMS)} qubit forms, not {num_qubits}", num_qubits=num_qubits)
    return SparsePauliOp.from_list(list(_H2_FORMS[num_qubits][1]))


def maxcut_hamiltonian(num_qubits: int, edges: Sequence[tuple[int, int]]) -> SparsePauliOp:
    """MaxCut cost C = Σ_(i,j)∈E (1 - Z_i Z_j) / 2: the number of cut edges, in [0, |E|]."""
    terms: list[tuple[str, Sequence[int], float]] = [("", [], 0.5 * len(edges))]
    terms += [("ZZ", [a, b], -0.5) for a, b in edges]
    return _sparse(terms, num_qubits).simplify()


# -------------------------------------------------------------------------------------------- circuit pieces


def append_pauli_rotation(qc: QuantumCircuit, label: str, theta: float) -> None:
    """Append exp(-i θ/2 P) for one Pauli string P (a little-endian label without phase), in standard gates.

    Weight 1 and uniform weight-2 strings map onto rx/ry/rz and rxx/ryy/rzz directly; any other
    string is rotated into the Z basis (H for X, H·S† for Y), a CX ladder computes the parity onto
    the highest qubit, rz applies the phase, and everything is undone. This is what a Pauli-evolution
    synthesis would emit, written out so the circuit stays plain.
    """
    support = [(q, p) for q, p in enumerate(reversed(label)) if p != "I"]
    if not support:
        return  # exp(-iθ/2 I) is a global phase, invisible to every expectation value
    qubits = [q for q, _ in support]
    letters = {p for _, p in support}
    if len(support) == 1:
        getattr(qc, "r" + support[0][1].lower())(theta, qubits[0])
        return
    if len(support) == 2 and len(letters) == 1:
        getattr(qc, "r" + 2 * support[0][1].lower())(theta, qubits[0], qubits[1])
        return
    for q, p in support:
        if p == "X":
            qc.h(q)
        elif p == "Y":
            qc.sdg(q)
            qc.h(q)
    for a, b in itertools.pairwise(qubits):
        qc.cx(a, b)
    qc.rz(theta, qubits[-1])
    for a, b in reversed(list(itertools.pairwise(qubits))):
        qc.cx(a, b)
    for q, p in support:
        if p == "X":
            qc.h(q)
        elif p == "Y":
            qc.h(q)
            qc.s(q)


def tfim_trotter_circuit(num_qubits: int, j: float, h: float, dt: float, steps: int) -> QuantumCircuit:
    """First-order Trotter evolution of |0..0> under the TFIM for ``steps`` steps of ``dt``.

    One step is exp(+iJ dt Σ ZZ) exp(+ih dt Σ X); rzz(θ) = exp(-iθ/2 ZZ) so θ = -2J dt, likewise rx.
    Bonds go even then odd so each half is one layer of parallel gates.
    """
    qc = QuantumCircuit(num_qubits)
    for _ in range(steps):
        for parity in (0, 1):
            for a, b in line_bonds(num_qubits, parity):
                qc.rzz(-2.0 * j * dt, a, b)
        for q in range(num_qubits):
            qc.rx(-2.0 * h * dt, q)
    return qc


def heisenberg_trotter_circuit(num_qubits: int, j: float, dt: float, steps: int) -> QuantumCircuit:
    """First-order Trotter evolution of the Néel state |..0101> (X on odd qubits) under the XXX chain.

    XX, YY and ZZ on one bond commute, so each bond's factor is exact; the Trotter error comes only from
    splitting the even and odd bonds. Every factor commutes with Σ Z_i, so magnetisation is conserved
    exactly by the circuit, which the tests check.
    """
    qc = QuantumCircuit(num_qubits)
    for q in range(1, num_qubits, 2):
        qc.x(q)
    for _ in range(steps):
        for parity in (0, 1):
            for a, b in line_bonds(num_qubits, parity):
                qc.rxx(2.0 * j * dt, a, b)
                qc.ryy(2.0 * j * dt, a, b)
                qc.rzz(2.0 * j * dt, a, b)
    return qc


def pauli_trotter_circuit(
    hamiltonian: SparsePauliOp, initial_flips: Sequence[int], dt: float, steps: int
) -> QuantumCircuit:
    """First-order Trotter evolution of a computational basis state (X on ``initial_flips``) under any
    real-coefficient Pauli sum, term by term in the operator's order: exp(-i c dt P) per term."""
    qc = QuantumCircuit(hamiltonian.num_qubits)
    for q in initial_flips:
        qc.x(q)
    for _ in range(steps):
        for pauli, coeff in zip(hamiltonian.paulis, hamiltonian.coeffs, strict=True):
            append_pauli_rotation(qc, pauli.to_label(), 2.0 * float(np.real(coeff)) * dt)
    return qc


def hea_circuit(num_qubits: int, thetas: Sequence[float], reps: int) -> QuantumCircuit:
    """Hardware-efficient ansatz: ``reps`` of (ry, rz on every qubit, then a CX ladder along the line),
    followed by a final ry, rz layer, as in qiskit's EfficientSU2. Needs 2n(reps+1) angles."""
    need = 2 * num_qubits * (reps + 1)
    if len(thetas) != need:
        raise _bad(f"the ansatz needs {need} angles, got {len(thetas)}", need=need, got=len(thetas))
    qc = QuantumCircuit(num_qubits)
    it = iter(thetas)
    for rep in range(reps + 1):
        for q in range(num_qubits):
            qc.ry(next(it), q)
            qc.rz(next(it), q)
        if rep < reps:
            for a, b in line_bonds(num_qubits):
                qc.cx(a, b)
    return qc


def qaoa_circuit(
    num_qubits: int, edges: Sequence[tuple[int, int]], gammas: Sequence[float], betas: Sequence[float]
) -> QuantumCircuit:
    """QAOA for MaxCut from |+..+>: per layer exp(-iγC) then exp(-iβ Σ X).

    exp(-iγ(1 - ZZ)/2) equals exp(+iγ/2 ZZ) up to a global phase, i.e. rzz(-γ); the mixer is rx(2β).
    """
    if len(gammas) != len(betas):
        raise _bad("QAOA needs as many gammas as betas", gammas=len(gammas), betas=len(betas))
    qc = QuantumCircuit(num_qubits)
    for q in range(num_qubits):
        qc.h(q)
    for gamma, beta in zip(gammas, betas, strict=True):
        for a, b in edges:
            qc.rzz(-gamma, a, b)
        for q in range(num_qubits):
            qc.rx(2.0 * beta, q)
    return qc


# ----------------------------------------------------------------------------------------------------- graphs


def _connected(num_qubits: int, edges: Sequence[tuple[int, int]]) -> bool:
    adj: dict[int, set[int]] = {q: set() for q in range(num_qubits)}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    seen, stack = {0}, [0]
    while stack:
        for nxt in adj[stack.pop()] - seen:
            seen.add(nxt)
            stack.append(nxt)
    return len(seen) == num_qubits


def random_3_regular_edges(num_qubits: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A connected simple 3-regular graph by the pairing (configuration) model with rejection.

    Needs an even n >= 4. For n <= 8 a random pairing of the 3n stubs is simple and connected with
    probability ~10% (measured for n = 4, 6, 8), so the bounded loop below practically never runs out.
    """
    if num_qubits < 4 or num_qubits % 2:
        raise _bad(f"a 3-regular graph needs an even number of vertices >= 4, not {num_qubits}", num_qubits=num_qubits)
    stubs = np.repeat(np.arange(num_qubits), 3)
    for _ in range(10_000):
        pairs = rng.permutation(stubs).reshape(-1, 2)
        edges = sorted({(int(min(a, b)), int(max(a, b))) for a, b in pairs})
        if len(edges) == len(pairs) and all(a != b for a, b in edges) and _connected(num_qubits, edges):
            return edges
    raise RuntimeError("no simple connected 3-regular pairing found")  # pragma: no cover - probability ~0


def ring_with_chords_edges(num_qubits: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """For sizes without a 3-regular graph: a ring (a single edge for n = 2) plus seeded random chords
    added while both ends have degree < 3, so the graph is connected with maximum degree 3."""
    if num_qubits == 2:
        return [(0, 1)]
    edges = {(i, i + 1) for i in range(num_qubits - 1)} | {(0, num_qubits - 1)}
    degree = dict.fromkeys(range(num_qubits), 2)
    candidates = [(a, b) for a in range(num_qubits) for b in range(a + 1, num_qubits) if (a, b) not in edges]
    for k in rng.permutation(len(candidates)):
        a, b = candidates[int(k)]
        if degree[a] < 3 and degree[b] < 3:
            edges.add((a, b))
            degree[a] += 1
            degree[b] += 1
    return sorted(edges)


# ----------------------------------------------------------------------------------------------- the families


# What a family builder returns: the circuit, its observables and the parameters that built it.
_Built = tuple[QuantumCircuit, dict[str, SparsePauliOp], dict[str, float | int | str]]


def _build_random(n: int, depth: int, rng: np.random.Generator) -> _Built:
    qc = QuantumCircuit(n)
    for layer in range(depth):
        for q in range(n):
            theta, phi, lam = rng.uniform(0.0, _TWO_PI, size=3)
            qc.u(float(theta), float(phi), float(lam), q)
        # Alternate even/odd bonds so consecutive layers entangle across the whole line; a 2-qubit line has
        # no odd bond, so it reuses the even one rather than leaving a layer unentangled.
        bonds = line_bonds(n, layer % 2) or line_bonds(n, 0)
        chosen = [bond for bond in bonds if rng.random() < 0.5]
        if not chosen:  # a layer without any 2q gate would make depth a poor proxy for hardness
            chosen = [bonds[int(rng.integers(len(bonds)))]]
        for a, b in chosen:
            if rng.random() < 0.5:
                qc.cz(a, b)
            elif rng.random() < 0.5:
                qc.cx(a, b)
            else:
                qc.cx(b, a)
    observables = {"Z0": z_on(n, 0), "ZZ_mean": mean_zz(n), "Zall": z_parity(n)}
    return qc, observables, {"coupling": "line", "two_qubit_gate_probability": 0.5}


def _build_trotter(n: int, depth: int, variant: str, rng: np.random.Generator) -> _Built:
    if variant == "tfim":
        j, h, dt = 1.0, _r(rng.uniform(0.5, 1.5)), _r(rng.uniform(0.1, 0.3))
        qc = tfim_trotter_circuit(n, j, h, dt, depth)
        obs = {"H": tfim_hamiltonian(n, j, h), "Mz": mean_z(n)}
        return qc, obs, {"J": j, "h": h, "dt": dt, "initial_state": "zeros", "trotter_order": 1}
    if variant == "heisenberg":
        j, dt = _r(rng.uniform(0.5, 1.5)), _r(rng.uniform(0.1, 0.3))
        qc = heisenberg_trotter_circuit(n, j, dt, depth)
        obs = {"H": heisenberg_hamiltonian(n, j), "Mz": mean_z(n)}
        return qc, obs, {"J": j, "dt": dt, "initial_state": "neel", "trotter_order": 1}
    if variant == "h2":
        encoding, _, flips = _H2_FORMS[n]
        dt = _r(rng.uniform(0.2, 0.6))
        ham = h2_hamiltonian(n)
        qc = pauli_trotter_circuit(ham, flips, dt, depth)
        return qc, {"H": ham, "Z0": z_on(n, 0)}, {
            "dt": dt, "initial_state": "hartree-fock", "trotter_order": 1, "encoding": encoding,
            "basis": "sto-3g", "bond_length_angstrom": H2_BOND_LENGTH_ANGSTROM,
            "energy": "electronic", "nuclear_repulsion": H2_NUCLEAR_REPULSION,
        }
    raise _bad(f"unknown trotter variant {variant!r}", variant=variant)  # pragma: no cover - variants_for guards


def _build_variational(n: int, depth: int, variant: str, rng: np.random.Generator) -> _Built:
    if variant == "hea-vqe":
        thetas = [float(t) for t in rng.uniform(0.0, _TWO_PI, size=2 * n * (depth + 1))]
        j, h = 1.0, 1.0  # the critical point, where the ground state is the most entangled
        return hea_circuit(n, thetas, depth), {"H": tfim_hamiltonian(n, j, h)}, {
            "ansatz": "ry-rz+cx-ladder", "entanglement": "linear", "hamiltonian": "tfim", "J": j, "h": h,
            "num_parameters": len(thetas),
        }
    if variant == "qaoa-maxcut":
        if n >= 4 and n % 2 == 0:
            graph, edges = "random-3-regular", random_3_regular_edges(n, rng)
        else:
            graph, edges = ("single-edge" if n == 2 else "ring+chords-max-degree-3"), ring_with_chords_edges(n, rng)
        gammas = [_r(g) for g in rng.uniform(0.0, math.pi, size=depth)]
        betas = [_r(b) for b in rng.uniform(0.0, math.pi / 2, size=depth)]
        return qaoa_circuit(n, edges, gammas, betas), {"C": maxcut_hamiltonian(n, edges)}, {
            "graph": graph, "edges": json.dumps([list(e) for e in edges]), "num_edges": len(edges),
            "gammas": json.dumps(gammas), "betas": json.dumps(betas),
        }
    raise _bad(f"unknown variational variant {variant!r}", variant=variant)  # pragma: no cover


def _validate(family: object, num_qubits: object, count: object, seed: object, depth: object) -> None:
    if not isinstance(family, str) or family not in FAMILIES:
        raise _bad(f"unknown circuit family {family!r}; choose one of {', '.join(FAMILIES)}",
                   family=str(family), families=list(FAMILIES))
    if not _is_int(num_qubits) or not MIN_QUBITS <= int(num_qubits) <= MAX_QUBITS:
        raise _bad(f"num_qubits must be an integer in {MIN_QUBITS}..{MAX_QUBITS}, got {num_qubits!r}",
                   num_qubits=str(num_qubits))
    if not _is_int(count) or not 1 <= int(count) <= MAX_COUNT:
        raise _bad(f"count must be an integer in 1..{MAX_COUNT}, got {count!r}", count=str(count))
    if not _is_int(seed):
        raise _bad(f"seed must be an integer, got {seed!r}", seed=str(seed))
    if depth is not None and (not _is_int(depth) or not 1 <= int(depth) <= MAX_DEPTH):
        raise _bad(f"depth must be an integer in 1..{MAX_DEPTH}, got {depth!r}", depth=str(depth))


def generate(family: str, num_qubits: int, count: int, seed: int, *, depth: int | None = None) -> list[CircuitSpec]:
    """``count`` circuits of ``family`` on ``num_qubits`` qubits; circuit ``index`` uses variant
    ``variants_for(family, num_qubits)[index % len(variants)]`` and its own generator seeded by
    ``(seed, family, num_qubits, index)``, so a longer request extends a shorter one unchanged."""
    _validate(family, num_qubits, count, seed, depth)
    n, seed = int(num_qubits), int(seed)
    layers = int(depth) if depth is not None else DEFAULT_DEPTHS[family]
    variants = variants_for(family, n)
    specs: list[CircuitSpec] = []
    for index in range(int(count)):
        variant = variants[index % len(variants)]
        rng_seed = _rng_seed(seed, family, n, index)
        rng = np.random.default_rng(rng_seed)
        if family == "random":
            qc, observables, extra = _build_random(n, layers, rng)
        elif family == "trotter":
            qc, observables, extra = _build_trotter(n, layers, variant, rng)
        else:
            qc, observables, extra = _build_variational(n, layers, variant, rng)
        circuit_id = f"{family}-{variant}-n{n}-d{layers}-s{seed}-i{index}"
        qc.name = circuit_id
        params: dict[str, float | int | str] = {"index": index, "rng_seed": f"{rng_seed:016x}", **extra}
        specs.append(CircuitSpec(circuit_id=circuit_id, family=family, variant=variant, num_qubits=n,
                                 depth=layers, seed=seed, circuit=qc, observables=observables, params=params))
    return specs


# ------------------------------------------------------------------------------------------ exact references


def ideal_expectations(spec: CircuitSpec) -> dict[str, float]:
    """Exact noiseless expectation values from the statevector (n <= 8, so at most 256 amplitudes)."""
    state = Statevector(spec.circuit)
    out: dict[str, float] = {}
    for name, op in spec.observables.items():
        value = complex(state.expectation_value(op))
        if abs(value.imag) > 1e-9:  # a Hermitian observable cannot have one; this means a malformed operator
            raise _bad(f"observable {name!r} of {spec.circuit_id} is not Hermitian", observable=name)
        out[name] = value.real
    return out


def _spectrum(op: SparsePauliOp) -> npt.NDArray[np.float64]:
    """All eigenvalues, ascending. A Z-only sum is diagonal, so its spectrum is its diagonal; a sum whose matrix
    is real (an even number of Y in every term) goes to the real symmetric solver, ~10x faster than the complex
    one at 8 qubits; everything else is diagonalised as a dense Hermitian matrix."""
    if op.num_qubits > MAX_DENSE_QUBITS:
        raise _bad(f"observable on {op.num_qubits} qubits is too large for a dense eigen-solve "
                   f"(max {MAX_DENSE_QUBITS})", num_qubits=op.num_qubits)
    if not np.allclose(np.imag(op.coeffs), 0.0, atol=1e-12):
        raise _bad("observable has complex coefficients, so it is not Hermitian")
    if not op.paulis.x.any():
        diagonal: npt.NDArray[np.float64] = np.sort(np.real(op.to_matrix(sparse=True).diagonal()))
        return diagonal
    matrix: npt.NDArray[np.complex128] = op.to_matrix()
    if not np.allclose(matrix, matrix.conj().T, atol=1e-12):
        raise _bad("observable is not Hermitian")
    if not np.any(matrix.imag):
        return np.asarray(np.linalg.eigvalsh(np.ascontiguousarray(matrix.real)), dtype=np.float64)
    return np.asarray(np.linalg.eigvalsh(matrix), dtype=np.float64)


def observable_range(op: SparsePauliOp) -> tuple[float, float]:
    """Exact (min, max) eigenvalue of a Hermitian Pauli sum by dense diagonalisation (n <= 10)."""
    eig = _spectrum(op)
    return float(eig[0]), float(eig[-1])


def observable_norm(op: SparsePauliOp) -> float:
    """Spectral norm max(|λ_min|, |λ_max|): the scale for normalising errors across observables."""
    lo, hi = observable_range(op)
    return max(abs(lo), abs(hi))


# ---------------------------------------------------------------------------------------------------- features

_NON_GATES = frozenset({"barrier", "measure", "reset", "delay", "snapshot"})


def _gate_counts(qc: QuantumCircuit) -> tuple[int, int]:
    """(1q, 2q) counts: every instruction acting on 1 or 2 qubits, except directives and non-unitary ops."""
    one = two = 0
    for inst in qc.data:
        if inst.operation.name in _NON_GATES:
            continue
        width = len(inst.qubits)
        if width == 1:
            one += 1
        elif width == 2:
            two += 1
    return one, two


def observable_features(op: SparsePauliOp) -> dict[str, float]:
    """One observable's encoding, as ML-QEM takes it (Liao et al. 2024 encode the measured Pauli
    terms): largest and mean Pauli weight, number of non-identity terms and the identity
    coefficient (the value full depolarisation drives the expectation to)."""
    weights: list[int] = []
    identity = 0.0
    for pauli, coeff in zip(op.simplify().paulis, op.simplify().coeffs, strict=True):
        weight = int(np.count_nonzero(pauli.x | pauli.z))
        if weight:
            weights.append(weight)
        else:
            identity += float(np.real(coeff))
    return {"obs_weight": float(max(weights, default=0)),
            "obs_mean_weight": float(np.mean(weights)) if weights else 0.0,
            "obs_terms": float(len(weights)), "obs_identity": identity}


def mapping_entropy(transpiled: QuantumCircuit) -> float:
    """Shannon entropy (bits) of how a compiled circuit's gate operations spread over its physical
    qubits: low when a few qubits carry the work (and their errors dominate), log2(n) when even."""
    load: dict[int, int] = {}
    for inst in transpiled.data:
        if inst.operation.name in _NON_GATES:
            continue
        for q in inst.qubits:
            index = transpiled.find_bit(q).index
            load[index] = load.get(index, 0) + 1
    total = sum(load.values())
    if not total:
        return 0.0
    return float(-sum(c / total * math.log2(c / total) for c in load.values()))


def gate_features(logical: QuantumCircuit, transpiled: QuantumCircuit | None = None) -> dict[str, float | int]:
    """Gate-count and shape features of a circuit and, when given, its compiled form. Measurements
    count the measured qubits; a unitary circuit (measured by the harness in every basis) counts all."""
    one, two = _gate_counts(logical)
    measured = {logical.find_bit(inst.qubits[0]).index for inst in logical.data if inst.operation.name == "measure"}
    features: dict[str, float | int] = {
        "num_qubits": logical.num_qubits,
        "logical_depth": int(logical.depth(lambda inst: inst.operation.name not in _NON_GATES)),
        "logical_2q_count": two,
        "logical_1q_count": one,
        "measurements": len(measured) or logical.num_qubits,
    }
    if transpiled is not None:
        t_one, t_two = _gate_counts(transpiled)
        features["transpiled_depth"] = int(transpiled.depth(lambda inst: inst.operation.name not in _NON_GATES))
        features["transpiled_2q_count"] = t_two
        features["transpiled_1q_count"] = t_one
        features["mapping_entropy"] = mapping_entropy(transpiled)
    return features


def circuit_features(spec: CircuitSpec, transpiled: QuantumCircuit | None = None) -> dict[str, float | int]:
    """Size and cost features of a benchmark circuit, for regressions of mitigation error on hardness.

    ``depth`` is the spec's layer count; ``logical_depth`` the circuit's gate depth. Observable features
    cover all observables: the largest Pauli weight and the total number of non-identity terms.
    """
    weights: list[int] = []
    terms = 0
    for op in spec.observables.values():
        for pauli in op.simplify().paulis:
            weight = int(np.count_nonzero(pauli.x | pauli.z))
            if weight:
                weights.append(weight)
                terms += 1
    return {"depth": spec.depth, **gate_features(spec.circuit, transpiled), "num_observables": len(spec.observables),
            "observable_max_weight": max(weights, default=0), "observable_num_terms": terms}
