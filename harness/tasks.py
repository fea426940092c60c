"""One harness task: a circuit on a calibrated backend, measured with every requested method.

A task transpiles the circuit to the device (noise-aware layout, seeded), folds the transpiled
circuit for ZNE, adds each measurement basis, runs every execution through an adapter and turns
the histograms into rows, one per (observable, method). Tasks are pure functions of their inputs:
every seed is derived from the run seed and the task's own names, never from the order in which
a process pool or a Dask cluster happens to run them, so rows replay identically.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

import numpy as np
from qiskit import QuantumCircuit, transpile
from qiskit.quantum_info import SparsePauliOp

from harness.calibration import TWO_QUBIT_GATES, CalibrationSnapshot, qubits_key
from harness.circuits import (
    CircuitSpec,
    circuit_features,
    ideal_expectations,
    observable_features,
    observable_norm,
    observable_range,
)
from harness.estimation import (
    Estimate,
    Estimator,
    append_measurement,
    confusion_from_calibration,
    distribution,
    estimate,
    estimator,
    identity_coefficient,
    inverse_confusion,
    measurement_bases,
)
from harness.execution import ExecutionRequest, ExecutionResult
from harness.folding import fold, two_qubit_gate_count
from harness.methods import Method, extrapolate, sensitivities
from harness.noise import active_qubits, compact_circuit, device_target
from sdk.canonical import canonical_json
from sdk.errors import QaiError

HARNESS_VERSION = "1.0"  # bump whenever a change could alter measured numbers
TRANSPILE_OPTIMIZATION_LEVEL = 2  # level 2 scores layouts by the calibrated errors; level 1 takes any perfect one
JOB_NAMESPACE = uuid.UUID("5f0f2d6e-8f7c-4f57-9a55-1c1d3c7a0e11")

Runner = Callable[[ExecutionRequest], ExecutionResult]  # an adapter's execute, with its retries


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from names: the same names give the same seed in every process."""
    return int.from_bytes(hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()[:4], "big") >> 1


@dataclass(frozen=True)
class Task:
    spec: CircuitSpec
    snapshot: CalibrationSnapshot
    methods: tuple[Method, ...]
    shots: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.spec.circuit_id}@{self.snapshot.id}"

    @property
    def job_id(self) -> str:
        return str(uuid.uuid5(JOB_NAMESPACE, f"{HARNESS_VERSION}|{self.seed}|{self.key}|{self.shots}"))


@dataclass(frozen=True)
class Execution:
    """One circuit to run: ``label`` names it within its task (``base/ZZ``, ``global@3/XX``, ``cal/1``)."""

    label: str
    circuit: QuantumCircuit
    seed: int


@dataclass
class TaskOutput:
    task_key: str
    rows: list[dict[str, Any]]
    histogram: bytes  # canonical JSON of every execution's counts, stored in the object store
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Submissions it took, retries included: depends on the vendor's luck, so it is kept out of the
    # content-addressed histogram and the rows (which must replay identically).
    attempts: int = 0


@dataclass(frozen=True)
class Compiled:
    circuit: QuantumCircuit  # compact, unitary, device basis
    physical: tuple[int, ...]
    logical: tuple[int, ...]  # compact position of logical qubit i
    transpiled_2q: int
    seconds: float


def compile_for_device(spec: CircuitSpec, snap: CalibrationSnapshot, seed: int) -> Compiled:
    started = time.perf_counter()
    transpiled = transpile(spec.circuit, target=device_target(snap), optimization_level=TRANSPILE_OPTIMIZATION_LEVEL,
                           seed_transpiler=derive_seed(seed, "transpile", spec.circuit_id, snap.id))
    placed = transpiled.layout.final_index_layout() if transpiled.layout is not None else list(range(spec.num_qubits))
    physical = tuple(sorted(set(active_qubits(transpiled)) | set(placed)))
    compact = compact_circuit(transpiled, physical)
    return Compiled(circuit=compact, physical=physical, logical=tuple(physical.index(p) for p in placed),
                    transpiled_2q=two_qubit_gate_count(compact), seconds=time.perf_counter() - started)


def scaled_circuits(methods: Sequence[Method]) -> list[tuple[str, float]]:
    """(folding, scale factor) pairs to run besides the unscaled circuit, shared by the methods."""
    return sorted({(m.folding or "", s) for m in methods if m.kind == "zne" for s in m.scale_factors if s != 1.0})


def plan(task: Task, compiled: Compiled, bases: Sequence[str]) -> list[Execution]:
    out: list[Execution] = []
    n = task.spec.num_qubits
    variants = [("base", 1.0, compiled.circuit)]
    for folding, scale in scaled_circuits(task.methods):
        fold_seed = derive_seed(task.seed, "fold", task.key, folding, scale)
        variants.append((f"{folding}@{scale:g}", scale, fold(compiled.circuit, scale, folding, seed=fold_seed)))
    for prefix, _, circuit in variants:
        for basis in bases:
            label = f"{prefix}/{basis}"
            out.append(Execution(label, append_measurement(circuit, basis, compiled.logical),
                                 derive_seed(task.seed, "run", task.key, label)))
    if any(m.kind == "readout" for m in task.methods):
        for bit in (0, 1):
            prep = QuantumCircuit(compiled.circuit.num_qubits)
            if bit:
                for q in compiled.logical:
                    prep.x(q)
            label = f"cal/{bit}"
            out.append(Execution(label, append_measurement(prep, "Z" * n, compiled.logical),
                                 derive_seed(task.seed, "run", task.key, label)))
    return out


def device_features(snap: CalibrationSnapshot, compiled: Compiled) -> dict[str, float]:
    """What the policy engine learns the device from: errors and coherence on the qubits in use,
    and the product of gate and readout fidelities of the compiled circuit (a crude success proxy)."""
    qubits = compiled.physical
    one = [snap.gates["sx"][str(q)]["error"] for q in qubits if str(q) in snap.gates.get("sx", {})]
    two_name = next(g for g in TWO_QUBIT_GATES if g in snap.gates)
    two: list[float] = []
    log_fidelity = 0.0
    for inst in compiled.circuit.data:
        phys = [compiled.physical[compiled.circuit.find_bit(q).index] for q in inst.qubits]
        props = snap.gates.get(inst.operation.name, {}).get(qubits_key(phys))
        if props is not None:
            log_fidelity += math.log(max(1e-12, 1 - props["error"]))
            if len(phys) == 2:
                two.append(props["error"])
    readout = [(snap.readout_errors[str(q)]["p01"] + snap.readout_errors[str(q)]["p10"]) / 2
               for q in (compiled.physical[i] for i in compiled.logical)]
    log_fidelity += sum(math.log(max(1e-12, 1 - r)) for r in readout)
    coupler = [v["error"] for k, v in snap.gates[two_name].items()
               if all(int(x) in qubits for x in k.split(","))]
    return {
        "dev_1q_error": fmean(one) if one else 0.0,
        "dev_2q_error": fmean(two) if two else (fmean(coupler) if coupler else 0.0),
        "dev_readout_error": fmean(readout),
        "dev_t1_us": fmean(snap.t1(q) for q in qubits) * 1e6,
        "dev_t2_us": fmean(snap.t2(q) for q in qubits) * 1e6,
        "dev_circuit_fidelity": math.exp(log_fidelity),
    }


def _clip(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def _ratio(mitigated_var: float, raw_var: float, scale: float) -> float:
    # A tiny floor keeps an exactly deterministic outcome (zero variance) from dividing by zero.
    eps = 1e-12 * scale
    return (mitigated_var + eps) / (raw_var + eps)


def _check_exponential(values: Sequence[float], variances: Sequence[float], asymptote: float) -> None:
    """An exponential decay towards the asymptote needs every value on the same side of it and
    resolvably away from it; otherwise the fit (and its variance) means nothing."""
    gaps = [v - asymptote for v in values]
    if any(g * gaps[0] <= 0 for g in gaps) or any(abs(g) <= math.sqrt(var) for g, var in
                                                   zip(gaps, variances, strict=True)):
        raise QaiError("zne.extrapolation_failed", "exp: a value is within one standard error of, or across, the "
                       f"asymptote {asymptote:g}", status=422)


_MODELS: dict[tuple[str, str], Any] = {}  # per worker process: bundles are loaded once


def mlqem_value(method: Method, row: Mapping[str, Any]) -> tuple[float, float]:
    """ML-QEM's mitigated value for one row (features and ``noisy``), and the model's training shots
    amortised per job, from the bound policy bundle (checked against its sha256)."""
    import pandas as pd

    from em_policy.bundle import loads

    digest = str(method.options.get("bundle_sha256", ""))
    if not method.source or not digest:
        raise QaiError("harness.method_unavailable", "ml-qem has no model bound", status=422)
    key = (method.source, digest)
    model = _MODELS.get(key)
    if model is None:
        try:
            with open(method.source, "rb") as f:
                data = f.read()
        except OSError as exc:  # e.g. a Dask worker on another host: the bundle file is not there
            raise QaiError("harness.method_unavailable", f"cannot read the ml-qem bundle {method.source}: {exc}",
                           status=422) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise QaiError("harness.model_changed", f"{method.source} no longer has sha256 {digest}", status=409)
        model = _MODELS[key] = loads(data)
    value = float(model.mitigate(pd.DataFrame([dict(row)]))[0])
    return value, float(model.metadata["amortized_training_shots"])


def failed_task(task: Task, exc: BaseException, seconds: float) -> TaskOutput:
    """Rows for a task that could not run at all (compilation, an unexpected bug): every
    (observable, method) recorded as failed with the error's code, so the run stands."""
    code = exc.code if isinstance(exc, QaiError) else "harness.task_failed"
    message = exc.message if isinstance(exc, QaiError) else f"{type(exc).__name__}: {str(exc)[:300]}"
    spec, snap = task.spec, task.snapshot
    rows = [{
        "job_id": task.job_id, "circuit_id": spec.circuit_id, "family": spec.family, "variant": spec.variant,
        "num_qubits": spec.num_qubits, "backend_id": snap.backend_id, "calibration_snapshot_id": snap.id,
        "seed": task.seed, "harness_version": HARNESS_VERSION, "observable": name, "method": m.name,
        "parameters": canonical_json(m.parameters()).decode(), "shots": 0, "runtime_seconds": seconds,
        "status": "failed", "error_code": code,
    } for name in sorted(spec.observables) for m in task.methods]
    failures = [{"task": task.key, "code": code, "message": message}]
    histogram = canonical_json({"job_id": task.job_id, "circuit_id": spec.circuit_id,
                                "calibration_snapshot_id": snap.id, "seed": task.seed, "error": code})
    return TaskOutput(task.key, rows, histogram, failures)


def run_task(task: Task, runner: Runner) -> TaskOutput:
    """Execute ``task`` through ``runner`` and measure every method on every observable."""
    spec, snap = task.spec, task.snapshot
    compiled = compile_for_device(spec, snap, task.seed)
    observables: dict[str, SparsePauliOp] = dict(sorted(spec.observables.items()))
    bases = measurement_bases(list(observables.values()))
    executions = plan(task, compiled, bases)
    n = spec.num_qubits
    hist: dict[str, tuple[np.ndarray[Any, Any], int]] = {}
    counts: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    failed: dict[str, QaiError] = {}
    sim_methods: set[str] = set()
    attempts = 0
    for ex in executions:
        started = time.perf_counter()
        try:
            result = runner(ExecutionRequest(snap.backend_id, snap.id, compiled.physical, ex.circuit, task.shots,
                                             ex.seed))
            counts[ex.label] = result.counts
            hist[ex.label] = distribution(result.counts, n)
            sim_methods.add(result.simulation_method)
            attempts += result.attempts
        except QaiError as exc:
            failed[ex.label] = exc
            attempts += int(getattr(exc, "attempts", 1))
        except Exception as exc:  # a simulator or adapter bug fails this execution's rows, not the run
            failed[ex.label] = QaiError("harness.execution_failed", f"{type(exc).__name__}: {str(exc)[:300]}",
                                        status=500)
            attempts += 1
        seconds[ex.label] = time.perf_counter() - started

    ideal = ideal_expectations(spec)
    features = circuit_features(spec, compiled.circuit)
    dev = device_features(snap, compiled)
    common = {
        "job_id": task.job_id, "circuit_id": spec.circuit_id, "family": spec.family, "variant": spec.variant,
        "num_qubits": n, "backend_id": snap.backend_id, "calibration_snapshot_id": snap.id, "seed": task.seed,
        "harness_version": HARNESS_VERSION, "simulation_method": ",".join(sorted(sim_methods)),
        **{f"feat_{k}": v for k, v in features.items()}, **dev,
    }
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    inverse: list[Any] | QaiError = QaiError("readout.no_calibration", "the readout calibration did not run")
    if "cal/0" in hist and "cal/1" in hist:
        try:
            inverse = inverse_confusion(confusion_from_calibration(counts["cal/0"], counts["cal/1"], n))
        except QaiError as exc:  # a dead readout line: the readout rows fail, the others stand
            inverse = exc
    for name, op in observables.items():
        est = estimator(op, bases)
        used = sorted(est.values)
        lo, hi = observable_range(op)
        norm = observable_norm(op)
        maximally_mixed = identity_coefficient(op)
        encoding = observable_features(op)

        def at(prefix: str, e: Estimator = est, used: list[str] = used) -> Estimate:
            return estimate(e, {b: hist[f"{prefix}/{b}"] for b in used})

        def needed(prefixes: Sequence[str], used: list[str] = used) -> list[str]:
            return [f"{p}/{b}" for p in prefixes for b in used]

        base_labels = needed(["base"])
        raw: Estimate | None = None if any(lb in failed for lb in base_labels) else at("base")
        for method in task.methods:
            labels = list(base_labels)
            if method.kind == "readout":
                labels += ["cal/0", "cal/1"]
            elif method.kind == "zne":
                labels += needed([f"{method.folding}@{s:g}" for s in method.scale_factors if s != 1.0])
            row: dict[str, Any] = {
                **common, "observable": name, "method": method.name,
                "parameters": canonical_json(method.parameters()).decode(),
                "ideal": ideal[name], "obs_min": lo, "obs_max": hi, "obs_norm": norm, **encoding,
                "shots": task.shots * len(labels),
                "runtime_seconds": compiled.seconds + sum(seconds[lb] for lb in labels),
                "noisy": None, "mitigated": None, "mitigated_raw": None, "abs_error": None,
                "unmitigated_fidelity": None, "mitigated_fidelity": None, "shot_multiplier": None,
                "amortized_training_shots": None, "status": "ok", "error_code": None,
            }
            try:
                bad = [lb for lb in labels if lb in failed]
                if bad:
                    raise failed[bad[0]]
                assert raw is not None
                if not used or norm == 0:
                    raise QaiError("harness.trivial_observable", f"{name} is a multiple of the identity", status=422)
                if method.kind == "unmitigated":
                    value, multiplier = raw.value, 1.0
                elif method.kind == "ml-qem":
                    # the model reads the unmitigated value: the same executions, no extra shots
                    value, amortized = mlqem_value(method, {**row, "noisy": _clip(raw.value, lo, hi)})
                    multiplier = 1.0
                    row["amortized_training_shots"] = amortized
                elif method.kind == "readout":
                    if isinstance(inverse, QaiError):
                        raise inverse
                    corrected = at("base", est.corrected(inverse))
                    runs = task.shots * len(used)
                    value = corrected.value
                    multiplier = (_ratio(corrected.variance, raw.variance, norm**2) * runs + 2 * task.shots) / runs
                else:
                    points = [raw if s == 1.0 else at(f"{method.folding}@{s:g}") for s in method.scale_factors]
                    ys = [p.value for p in points]
                    if method.factory == "exp":
                        _check_exponential(ys, [p.variance for p in points], maximally_mixed)
                    value = extrapolate(method, ys, asymptote=maximally_mixed)
                    gamma = sensitivities(method, ys, asymptote=maximally_mixed)
                    variance = sum(g * g * p.variance for g, p in zip(gamma, points, strict=True))
                    multiplier = _ratio(variance, raw.variance, norm**2) * len(method.scale_factors)
                if not (math.isfinite(value) and math.isfinite(multiplier)):
                    raise QaiError("zne.extrapolation_failed", f"{method.name} gave {value} (multiplier {multiplier})",
                                   status=422)
                noisy = _clip(raw.value, lo, hi)
                mitigated = _clip(value, lo, hi)
                row.update({
                    "noisy": noisy, "mitigated": mitigated, "mitigated_raw": value,
                    "abs_error": abs(mitigated - ideal[name]),
                    "unmitigated_fidelity": 1 - abs(noisy - ideal[name]) / (2 * norm),
                    "mitigated_fidelity": 1 - abs(mitigated - ideal[name]) / (2 * norm),
                    "shot_multiplier": multiplier,
                })
            except QaiError as exc:
                row.update({"status": "failed", "error_code": exc.code})
                failures.append({"task": task.key, "observable": name, "method": method.name, "code": exc.code,
                                 "message": exc.message})
            rows.append(row)
    histogram = canonical_json({
        "job_id": task.job_id, "circuit_id": spec.circuit_id, "calibration_snapshot_id": snap.id, "seed": task.seed,
        "shots": task.shots, "physical_qubits": list(compiled.physical), "logical_positions": list(compiled.logical),
        "executions": [{"label": ex.label, "seed": ex.seed, "counts": counts.get(ex.label),
                        "error": failed[ex.label].code if ex.label in failed else None} for ex in executions],
    })
    return TaskOutput(task.key, rows, histogram, failures, attempts=attempts)


def mitiq_cross_check(task: Task, method: Method, observable: str, runner: Runner) -> float:
    """The same ZNE value computed by ``mitiq.zne.execute_with_zne``: Mitiq drives the scale
    factors, our folding is its ``scale_noise`` and the executor runs the harness's executions with
    the harness's seeds. Used by the cross-check test; equal to the harness's own value."""
    from mitiq.zne import execute_with_zne

    from harness.methods import mitiq_factory

    spec, snap = task.spec, task.snapshot
    compiled = compile_for_device(spec, snap, task.seed)
    op = spec.observables[observable]
    bases = measurement_bases(list(dict(sorted(spec.observables.items())).values()))
    est = estimator(op, bases)
    scale_of: dict[int, float] = {}

    def scale_noise(circuit: QuantumCircuit, scale: float) -> QuantumCircuit:
        folded = circuit if scale == 1.0 else fold(
            circuit, scale, str(method.folding), seed=derive_seed(task.seed, "fold", task.key, method.folding, scale))
        scale_of[id(folded)] = scale
        return folded

    def executor(circuit: QuantumCircuit) -> float:
        scale = scale_of[id(circuit)]
        prefix = "base" if scale == 1.0 else f"{method.folding}@{scale:g}"
        hist = {}
        for b in sorted(est.values):
            label = f"{prefix}/{b}"
            result = runner(ExecutionRequest(snap.backend_id, snap.id, compiled.physical,
                                             append_measurement(circuit, b, compiled.logical), task.shots,
                                             derive_seed(task.seed, "run", task.key, label)))
            hist[b] = distribution(result.counts, spec.num_qubits)
        return estimate(est, hist).value

    asymptote = identity_coefficient(op)
    return float(execute_with_zne(compiled.circuit, executor, factory=mitiq_factory(method, asymptote=asymptote),
                                  scale_noise=scale_noise))


def local_runner(snapshots: Mapping[str, CalibrationSnapshot]) -> Runner:
    from harness.execution import run_local

    def run(request: ExecutionRequest) -> ExecutionResult:
        return run_local(snapshots[request.snapshot_id], request)

    return run
