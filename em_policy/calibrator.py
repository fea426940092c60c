"""The ``mitiq.Calibrator`` baseline the EM policy engine is compared against.

Mitiq's ``Calibrator`` runs small benchmark problems (GHZ, W state, randomized benchmarking, mirror
circuits) with every ZNE strategy of its settings (factory × scale factors × noise-scaling method)
and picks the strategy with the smallest total squared error on them. ``run_calibrator`` does that
on one calibration snapshot's noisy simulator and maps the winner to a harness method name
(``harness/methods.py``), so the evaluation report can score the Calibrator's choice with the same
rows as the policy's.

How a circuit the Calibrator hands over is run (``SnapshotExecutor``):

* Mitiq folds *before* compiling (it folds the Cirq circuit). Transpiling ``G G† G`` at optimization
  level 2 cancels the folds: an RB circuit folded to λ = 5 compiles to nothing but its measurements,
  so every scale factor would measure the same thing. A barrier is therefore put after every gate
  before transpiling; each gate is then translated on its own, the folds survive and the physical
  gate count scales with λ, while layout and routing still use the snapshot's errors (level 2).
* Transpiled to ``device_target(snapshot)``, remapped to a compact register and run with
  ``harness.execution.run_local``, the harness's own noisy Aer simulation, with ``shots`` shots.
* Every seed is derived with ``harness.tasks.derive_seed`` from ``seed``: the transpiler's (one per
  run), each execution's (from a per-call counter) and, since Mitiq leaves them unseeded, the
  randomized-benchmarking circuits and ``fold_gates_at_random``. The same snapshot, shots, seed
  and settings give the same ``CalibratorChoice``.

Settings: ``default`` is Mitiq's ``ZNE_SETTINGS`` as shipped. Its W-state problem is wrong in Mitiq
1.1: ``generate_w_circuit`` omits the initial X of Cruz et al.'s circuit, so the circuit prepares
|00⟩ while the problem's ideal distribution is the W state (P = 1/2 on 01 and 10). Every strategy
then scores about (1/2 − m)² on it, m being its mitigated (near 0) probability of the W state's
"10", which rewards whichever strategy extrapolates that near-zero value upwards. ``corrected``
is ``ZNE_SETTINGS`` with the X put back; ``small`` is a reduced configuration for tests.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import cirq
from mitiq import MeasurementResult
from mitiq.benchmarks import generate_rb_circuits
from mitiq.calibration import Calibrator, Settings
from mitiq.calibration.settings import ZNE_SETTINGS, BenchmarkProblem, MitigationTechnique, Strategy
from mitiq.zne.inference import LinearFactory, RichardsonFactory
from mitiq.zne.scaling import fold_gates_at_random, fold_global
from qiskit import QuantumCircuit, transpile

from harness.calibration import CalibrationSnapshot, pinned
from harness.execution import ExecutionRequest, run_local
from harness.methods import DEFAULT_SCALE_FACTORS, parse_method
from harness.noise import active_qubits, compact_circuit, device_target
from harness.tasks import TRANSPILE_OPTIMIZATION_LEVEL, derive_seed
from sdk.errors import QaiError

SETTINGS_NAMES = ("default", "corrected", "small")
MAX_SHOTS = 1_000_000

# Mitiq noise-scaling functions -> harness folding. The first two are the same schemes
# (harness/folding.py re-states them for device-basis circuits); the rest have no harness
# equivalent and map to the nearest one, with a note.
EXACT_FOLDING = {"fold_global": "global", "fold_gates_at_random": "gate"}
NEAREST_FOLDING = {"fold_all": "gate", "fold_gates_from_left": "gate", "fold_gates_from_right": "gate",
                   "layer_folding": "gate", "insert_id_layers": "gate"}
# Mitiq factories -> harness factory (PolyFactory depends on its order, see map_strategy).
EXACT_FACTORY = {"LinearFactory": "linear", "RichardsonFactory": "richardson", "ExpFactory": "exp"}
NEAREST_FACTORY = {"AdaExpFactory": "exp", "PolyExpFactory": "exp"}

# A reduced configuration so tests stay fast: 2 problems (3-qubit GHZ, 2-qubit mirror circuit) ×
# 2 strategies (one per folding scheme): 2 × (3 + 3 + 1) = 14 executions.
SMALL_BENCHMARKS: list[dict[str, Any]] = [
    {"circuit_type": "ghz", "num_qubits": 3},
    {"circuit_type": "mirror", "num_qubits": 2, "circuit_depth": 4, "circuit_seed": 1},
]


def _small_strategies() -> list[dict[str, Any]]:
    return [
        {"technique": "zne", "scale_noise": fold_global, "factory": RichardsonFactory([1.0, 2.0, 3.0])},
        {"technique": "zne", "scale_noise": fold_gates_at_random, "factory": LinearFactory([1.0, 2.0, 3.0])},
    ]


@dataclass(frozen=True)
class CalibratorChoice:
    backend_id: str
    calibration_snapshot_id: str
    method: str  # a harness method name (zne-<factory>-<folding> or unmitigated)
    strategy: dict[str, Any]  # Mitiq's description of its best strategy (JSON-serialisable)
    circuits_executed: int
    shots_spent: int  # circuits_executed × shots: what the Calibrator spent to choose
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Mapping Mitiq strategies to harness method names (pure)


def _number(value: Any) -> Any:
    """A JSON-friendly copy of a factory option (numpy scalars become floats)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float) or hasattr(value, "__float__"):
        return float(value)
    return str(value)


def describe_strategy(strategy: Strategy) -> dict[str, Any]:
    """Mitiq's own summary of ``strategy`` (``Strategy.to_dict``: technique, factory, scale
    factors, scale method) plus the factory's options (``order`` of a ``PolyFactory``, the
    ``asymptote`` of an ``ExpFactory``), with plain JSON types."""
    summary = cast(dict[str, Any], strategy.to_dict())
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key == "scale_factors":
            out[key] = [float(s) for s in value]
        elif key == "representation_function":
            out[key] = str(value)
        else:
            out[key] = _number(value)
    if strategy.technique is MitigationTechnique.ZNE:
        options = getattr(strategy.technique_params["factory"], "_options", {}) or {}
        for key, value in sorted(options.items()):
            out[str(key)] = _number(value)
    return out


def _format_factors(factors: Sequence[float]) -> str:
    return ",".join(f"{f:g}" for f in factors)


def map_strategy(description: Mapping[str, Any]) -> tuple[str, str]:
    """The harness method nearest to a Mitiq strategy (as ``describe_strategy`` describes it), and
    a note saying what the name does not capture ("" when it is exact)."""
    technique = str(description.get("technique", "")).upper()
    if technique == "RAW":
        return "unmitigated", ""
    if technique != "ZNE":
        return "unmitigated", f"{technique} has no harness method; mapped to unmitigated"
    notes: list[str] = []

    factory_name = str(description.get("factory", ""))
    if factory_name in EXACT_FACTORY:
        factory = EXACT_FACTORY[factory_name]
    elif factory_name == "PolyFactory":
        order = int(description.get("order", 2))
        if order == 2:
            factory = "poly2"
        elif order == 1:
            factory = "linear"
            notes.append("PolyFactory(order=1) is the least-squares line: mapped to linear")
        else:
            factory = "poly2"
            notes.append(f"PolyFactory(order={order}) has no harness factory: mapped to the nearest, poly2")
    elif factory_name in NEAREST_FACTORY:
        factory = NEAREST_FACTORY[factory_name]
        notes.append(f"{factory_name} has no harness factory: mapped to the nearest, {factory}")
    else:
        raise QaiError("em_policy.calibrator_failed", f"no harness factory for Mitiq's {factory_name or '(none)'}",
                       status=500, details={"strategy": dict(description)})

    scale_method = str(description.get("scale_method", ""))
    if scale_method in EXACT_FOLDING:
        folding = EXACT_FOLDING[scale_method]
    elif scale_method in NEAREST_FOLDING:
        folding = NEAREST_FOLDING[scale_method]
        notes.append(f"{scale_method} has no harness folding: mapped to the nearest, {folding} folding")
    else:
        raise QaiError("em_policy.calibrator_failed", f"no harness folding for Mitiq's {scale_method or '(none)'}",
                       status=500, details={"strategy": dict(description)})

    method = f"zne-{factory}-{folding}"
    factors = [float(s) for s in description.get("scale_factors", [])]
    default = list(DEFAULT_SCALE_FACTORS[factory])
    if factors and factors != default:
        exact = f"{method}@{_format_factors(factors)}"
        try:
            parse_method(exact)
        except QaiError:
            notes.append(f"scale factors {_format_factors(factors)} differ from {method}'s default "
                         f"{_format_factors(default)} and no harness method takes them")
        else:
            notes.append(f"scale factors {_format_factors(factors)} differ from {method}'s default "
                         f"{_format_factors(default)}; exact harness equivalent: {exact}")
    if factory == "exp" and factory_name == "ExpFactory":
        asymptote = description.get("asymptote")
        notes.append("the harness fixes the exponential asymptote at Tr(O)/2^n; Mitiq's strategy "
                     + ("fits it" if asymptote is None else f"fixes it at {asymptote:g}"))
    return method, "; ".join(notes)


def choose_method(description: Mapping[str, Any], *, mitigated_error: float,
                  unmitigated_error: float) -> tuple[str, str]:
    """The Calibrator's answer as a harness method: its best strategy mapped by ``map_strategy``,
    or ``unmitigated`` when that strategy's total squared error over the benchmark problems is not
    below the unmitigated one (the Calibrator found no improvement)."""
    method, note = map_strategy(description)
    if not (math.isfinite(mitigated_error) and mitigated_error < unmitigated_error):
        why = (f"no improvement: the best strategy ({method}) has total squared error {mitigated_error:.6g}, "
               f"unmitigated {unmitigated_error:.6g}")
        return "unmitigated", why if not note else f"{why}; {note}"
    return method, note


# ---------------------------------------------------------------------------------------------
# Settings (seeded) and the executor


class _SeededSettings(Settings):  # type: ignore[misc]  # mitiq is untyped
    """Mitiq's ``Settings`` with its randomized-benchmarking circuits seeded (Mitiq draws them
    from fresh OS entropy on every ``make_problems``) and, with ``fix_w_state``, its W-state circuit
    given the X on qubit 0 it lacks."""

    def __init__(self, benchmarks: list[dict[str, Any]], strategies: list[dict[str, Any]], seed: int, *,
                 fix_w_state: bool = False) -> None:
        super().__init__(benchmarks=benchmarks, strategies=strategies)
        self._seed = seed
        self._fix_w_state = fix_w_state

    def make_problems(self) -> list[BenchmarkProblem]:
        problems = cast(list[BenchmarkProblem], super().make_problems())
        for problem, bench in zip(problems, self.benchmarks, strict=True):
            if problem.type == "rb":
                problem.circuit = generate_rb_circuits(
                    bench["num_qubits"], bench["circuit_depth"],
                    seed=derive_seed(self._seed, "calibrator", "rb", problem.id))[0]
            elif problem.type == "w" and self._fix_w_state:
                problem.circuit = cirq.Circuit(cirq.X(min(problem.circuit.all_qubits())), problem.circuit)
        return problems


def _seeded_fold_gates_at_random(seed: int) -> Callable[..., Any]:
    """``fold_gates_at_random`` with a seed per call (Mitiq's ZNE calls it unseeded); keeps its
    name, which is what ``Strategy.to_dict`` reports as the scale method."""
    calls = itertools.count()

    def seeded(circuit: Any, scale_factor: float, **kwargs: Any) -> Any:
        kwargs.setdefault("seed", derive_seed(seed, "calibrator", "fold", next(calls)))
        return fold_gates_at_random(circuit, scale_factor, **kwargs)

    seeded.__name__ = seeded.__qualname__ = "fold_gates_at_random"
    return seeded


def build_settings(name: str = "default", *, seed: int = 0) -> Settings:
    """Fresh Calibrator settings: ``default`` is Mitiq's ``ZNE_SETTINGS`` (4 two-qubit problems ×
    8 strategies: Richardson and linear, scale factors 1,2,3 and 1,3,5, global and random gate
    folding), ``corrected`` the same with the W-state benchmark fixed (module docstring),
    ``small`` the reduced test configuration. Factories are copies (they hold data after a run)
    and every random choice is seeded from ``seed``."""
    if name in ("default", "corrected"):
        benchmarks = copy.deepcopy(ZNE_SETTINGS.benchmarks)
        strategies = [dict(s, factory=copy.deepcopy(s["factory"])) for s in ZNE_SETTINGS.technique_params]
    elif name == "small":
        benchmarks = copy.deepcopy(SMALL_BENCHMARKS)
        strategies = _small_strategies()
    else:
        raise QaiError("em_policy.bad_calibrator_settings",
                       f"unknown Calibrator settings {name!r}; one of {', '.join(SETTINGS_NAMES)}", status=422)
    fold_random = _seeded_fold_gates_at_random(seed)
    for strategy in strategies:
        if strategy.get("scale_noise") is fold_gates_at_random:
            strategy["scale_noise"] = fold_random
    return _SeededSettings(benchmarks, strategies, seed, fix_w_state=name == "corrected")


def _barriered(circuit: QuantumCircuit) -> QuantumCircuit:
    """``circuit`` with a barrier after every gate, so that transpiling cannot cancel folds."""
    out = circuit.copy_empty_like()
    for inst in circuit.data:
        out.append(inst)
        if inst.operation.name not in ("measure", "barrier") and inst.qubits:
            out.barrier(*inst.qubits)
    return out


class SnapshotExecutor:
    """Runs the Calibrator's circuits on a snapshot's noisy simulator; counts executions and shots."""

    def __init__(self, snapshot: CalibrationSnapshot, *, shots: int, seed: int) -> None:
        snapshot = pinned(snapshot)
        self.snapshot = snapshot
        self.shots = shots
        self.seed = seed
        self.executions = 0
        self._transpile_seed = derive_seed(seed, "calibrator", "transpile", snapshot.id)

    @property
    def shots_spent(self) -> int:
        return self.executions * self.shots

    def execute(self, circuit: QuantumCircuit) -> MeasurementResult:
        """One measured circuit (any gates, on logical qubits) -> bitstrings in logical-qubit order."""
        measured = sorted((circuit.find_bit(inst.qubits[0]).index, circuit.find_bit(inst.clbits[0]).index)
                          for inst in circuit.data if inst.operation.name == "measure")
        if not measured:
            raise ValueError("the Calibrator handed over a circuit without measurements")
        snap = self.snapshot
        transpiled = transpile(_barriered(circuit), target=device_target(snap),
                               optimization_level=TRANSPILE_OPTIMIZATION_LEVEL, seed_transpiler=self._transpile_seed)
        physical = tuple(active_qubits(transpiled))
        compact = compact_circuit(transpiled, physical)
        call = self.executions
        self.executions += 1
        result = run_local(snap, ExecutionRequest(snap.backend_id, snap.id, physical, compact, self.shots,
                                                  derive_seed(self.seed, "calibrator", "run", snap.id, call)))
        counts: dict[str, int] = {}
        for key, n in result.counts.items():
            bits = key.replace(" ", "")[::-1]  # clbit 0 first
            row = "".join(bits[c] for _, c in measured)
            counts[row] = counts.get(row, 0) + n
        return MeasurementResult.from_counts(counts, tuple(q for q, _ in measured))


# ---------------------------------------------------------------------------------------------


def planned_executions(settings: str = "default") -> int:
    """Circuits a Calibrator run with ``settings`` executes (Mitiq's ``get_cost``), without running any."""
    def never(circuit: QuantumCircuit) -> MeasurementResult:
        raise AssertionError("not run")

    cal = Calibrator(never, frontend="qiskit", settings=build_settings(settings))
    return int(cal.get_cost()["noisy_executions"])


def run_calibrator(snapshot: CalibrationSnapshot, *, shots: int = 4000, seed: int = 0,
                   settings: str = "default") -> CalibratorChoice:
    """Run ``mitiq.Calibrator`` on ``snapshot``'s noisy simulator and return its choice as a harness
    method. Deterministic in (snapshot, shots, seed, settings)."""
    if not 1 <= shots <= MAX_SHOTS:
        raise QaiError("em_policy.bad_calibrator_settings", f"shots must be in 1..{MAX_SHOTS}, got {shots}", status=422)
    mitiq_settings = build_settings(settings, seed=seed)
    executor = SnapshotExecutor(snapshot, shots=shots, seed=seed)
    try:
        cal = Calibrator(executor.execute, frontend="qiskit", settings=mitiq_settings)
        cal.run()
        best = cal.best_strategy()
        results = cal.results
        errors = results.squared_errors()
        mitigated_error = float(errors[best.id].sum())
        unmitigated_error = float(((results.ideal[best.id] - results.noisy[best.id]) ** 2).sum())
        description = describe_strategy(best)
    except QaiError:
        raise
    except Exception as exc:  # mitiq, cirq/qiskit conversion or the simulator
        raise QaiError("em_policy.calibrator_failed",
                       f"mitiq Calibrator failed on {snapshot.backend_id} (settings {settings!r}, "
                       f"{executor.executions} circuits run): {type(exc).__name__}: {exc}",
                       status=500, details={"backend_id": snapshot.backend_id, "snapshot_id": snapshot.id,
                                            "settings": settings, "error": type(exc).__name__}) from exc
    method, note = choose_method(description, mitigated_error=mitigated_error, unmitigated_error=unmitigated_error)
    return CalibratorChoice(backend_id=snapshot.backend_id, calibration_snapshot_id=snapshot.id, method=method,
                            strategy=description, circuits_executed=executor.executions,
                            shots_spent=executor.shots_spent, note=note)
