"""Trace-driven evaluation of the scheduler: a seeded discrete-event simulation over the catalog.

``simulate(config)`` replays one synthetic job trace against every policy in ``config.policies``
on the real-snapshot catalog (``harness.catalog``) and returns per-policy metrics. The world
(arrivals, the job mix, outages, other tenants' load, calibration drift, shot noise) is drawn
from seeded streams that no policy's choices touch, so every policy faces exactly the same trace:
differences in the results come from routing alone.

The model, and why each part is as it is (docs/scheduler.md, "Trace-driven evaluation"):

- **Jobs** arrive as a Poisson stream (with CONTEXT.md's peak: 5x the rate for 10 minutes). A job
  is a harness circuit family and variant at 2..``max_qubits`` qubits, its gate counts taken from
  the real ``harness.circuits`` circuit compiled to {cx, rz, sx, x}; a crypto mode, a tenant (whose
  policy may raise the crypto minimum), a priority class, shots, a shot budget and maybe a deadline.
- **Backends** are the catalog's. Each runs one job at a time from a provider queue shared with
  other tenants (``foreign`` jobs, Poisson, sized so that the queue alone waits about the
  catalog's ``queue.mean_wait_seconds``), goes offline for exponential outages so that it is up
  its catalog ``availability`` of the time, and drifts: its 2-qubit, 1-qubit and readout error
  rates follow seeded mean-reverting random walks (in log space) around the snapshot's figures.
- **Predictions** are an analytic model of the EM policy, not the trained model: a layout-aware
  estimated success probability from the *published* calibration (refreshed every
  ``calibration_interval_seconds``), with unmitigated or linear ZNE (scale factors 1, 2, 3) chosen
  as the EM policy labels its data: the best predicted fidelity within the shot budget, near ties
  to the cheaper method. **Realised** fidelity is the same formula on the drifted calibration when
  the job starts, plus shot noise.
- **Policies**: ``v1`` calls the real ``scheduler.engine.decide`` with ``scheduler.plugins.BUILTIN``
  and the default profile; the baselines pick among the online backends that fit the job.
- **Oracle bound** (``oracle_bound``): an upper bound on the fidelity per USD of any routing that
  meets the fidelity target, from the exact LP relaxation of choosing one option per job.

Pure and deterministic: the same config gives the same result, number for number; no wall clock.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from functools import cache, partial
from typing import Any

from scheduler.engine import CRYPTO_RANK, PRIORITY_CLASSES, Plugin, decide, profile
from scheduler.plugins import BUILTIN, OPTIONAL
from sdk.errors import QaiError

POLICIES = ("v1", "random", "round-robin", "least-busy", "max-fidelity", "cheapest")
# The baselines that apply the crypto-mode filter (v1 applies it through its crypto-mode plugin).
# random and round-robin are the crypto-blind load balancers: they show what the filter prevents.
CRYPTO_FILTERING = frozenset({"v1", "least-busy", "max-fidelity", "cheapest"})
MODEL_VERSION = "sim-analytic/1"


def _value_plugins() -> tuple[Plugin, ...]:
    value = next(p for p in OPTIONAL if p.name == "value-score")
    return (*(p for p in BUILTIN if p.kind == "filter"), value,
            *(p for p in BUILTIN if p.name == "qkd-preference"))


# The tenant profiles v1 can run under (scheduler.service.tenant_profile): the default, SPEC-001's
# ratio with the policy's EM method; and "value", the USD utility that co-selects the EM method.
V1_PROFILES: dict[str, tuple[tuple[Plugin, ...], dict[str, Any]]] = {
    "default": (BUILTIN, {}),
    "value": (_value_plugins(), {"em_coselect": 1}),
}
QUEUE_VIEWS = ("provider", "catalog")
# em_policy.service.REP_DELAY_SECONDS: the wait between shots on IBM-style devices. Restated, not
# imported, so the simulator does not load the EM policy's model stack.
REP_DELAY_SECONDS = 250e-6
ZNE_METHOD = "zne-linear-global"
ZNE_SCALES = (1.0, 2.0, 3.0)
# Linear least squares through (1, y1), (2, y2), (3, y3) evaluated at 0: y0 = (4 y1 + y2 - 2 y3) / 3.
ZNE_COEFFS = (4.0 / 3.0, 1.0 / 3.0, -2.0 / 3.0)
# The EM policy's tie tolerance (em_policy.policy.TrainConfig.tie_tolerance): a method must beat
# a cheaper one by more than this to be chosen.
TIE_TOLERANCE = 0.005
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)  # simulated time 0, for the engine's recorded "now"
# Other tenants: the first asks nothing, the second a hybrid link at least, the third PQC and
# prefers QKD. The job's own crypto mode can only raise its tenant's minimum.
TENANTS: dict[str, dict[str, Any]] = {
    "org-a": {}, "org-b": {"min_crypto_mode": "hybrid"},
    "org-c": {"min_crypto_mode": "pqc-required", "qkd": "preferred"},
}
TENANT_WEIGHTS = (0.5, 0.3, 0.2)
CRYPTO_WEIGHTS = (0.5, 0.3, 0.2)  # classical, hybrid, pqc-required
CLASS_WEIGHTS = (0.05, 0.15, 0.6, 0.2)  # critical, essential, standard, background
# (probability that a job of the class has a deadline, the deadline in seconds)
DEADLINES: dict[str, tuple[float, float]] = {
    "critical": (1.0, 900.0), "essential": (0.5, 1800.0), "standard": (0.3, 3600.0), "background": (0.0, 0.0)}
SHOTS = (1000, 2000, 4000, 8000, 20000, 100000)
SHOT_WEIGHTS = (0.15, 0.2, 0.3, 0.15, 0.15, 0.05)
BUDGET_RATIOS = (1, 3, 8)  # shot budget / shots: 1 allows no ZNE, 3 and 8 do
BUDGET_WEIGHTS = (0.3, 0.3, 0.4)


@dataclass(frozen=True)
class SimConfig:
    jobs: int = 1000
    seed: int = 7
    arrival_rate: float = 0.03  # jobs per second in normal load (108 an hour)
    peak: bool = True  # CONTEXT.md's load profile: peak_factor x the rate for peak_seconds
    peak_factor: float = 5.0
    peak_seconds: float = 600.0
    max_qubits: int = 32
    foreign_load: bool = True  # other tenants' jobs share each backend's queue
    foreign_job_seconds: float = 300.0  # their mean size
    calibration_interval_seconds: float = 3600.0  # how often a backend publishes a calibration
    drift_step_seconds: float = 300.0
    drift_sigma: float = 0.2  # stationary std of the log error-rate factor (~±20%)
    drift_tau_seconds: float = 6 * 3600.0  # mean-reversion time of the drift
    mean_outage_seconds: float = 1800.0
    job_overhead_seconds: float = 2.0  # per executed circuit: load, compile, result retrieval
    # What a policy sees as a backend's queue wait: "provider", the provider queue's whole backlog
    # (other tenants' jobs included); or "catalog", what scheduler.service.gather records: the
    # catalog's mean wait plus qai's own queued and running work.
    queue_view: str = "provider"
    policies: tuple[str, ...] = POLICIES
    v1_config: Mapping[str, Any] = field(default_factory=dict)  # overrides of the engine's DEFAULT_CONFIG
    v1_profile: str = "default"  # a key of V1_PROFILES: v1's plugins and their config before v1_config

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise QaiError("scheduler.bad_simulation", f"unknown policies {unknown}; known: {list(POLICIES)}",
                           status=422)
        if self.v1_profile not in V1_PROFILES:
            raise QaiError("scheduler.bad_simulation", f"v1_profile must be one of {list(V1_PROFILES)}", status=422)
        if self.queue_view not in QUEUE_VIEWS:
            raise QaiError("scheduler.bad_simulation", f"queue_view must be one of {list(QUEUE_VIEWS)}", status=422)
        if self.jobs < 1 or self.arrival_rate <= 0 or self.max_qubits < 2:
            raise QaiError("scheduler.bad_simulation", "jobs ≥ 1, arrival_rate > 0 and max_qubits ≥ 2 are required",
                           status=422)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["policies"] = list(self.policies)
        d["v1_config"] = dict(self.v1_config)
        return d


# ----------------------------------------------------------------------------------------------- circuits


@dataclass(frozen=True)
class CircuitShape:
    """Error-bearing gate counts and depth of a circuit compiled to {cx, rz, sx, x} (rz is virtual)."""

    two_qubit: int
    one_qubit: int
    depth: int


@cache
def _compiled_shape(family: str, variant: str, num_qubits: int) -> CircuitShape:
    from qiskit import transpile

    from harness.circuits import generate, variants_for

    index = variants_for(family, num_qubits).index(variant)
    spec = generate(family, num_qubits, index + 1, seed=0)[index]
    # No coupling map: the families are line circuits (every device embeds a line) except QAOA,
    # whose routing SWAPs this leaves out for every device alike.
    compiled = transpile(spec.circuit, basis_gates=["cx", "rz", "sx", "x"], optimization_level=1, seed_transpiler=0)
    ops = compiled.count_ops()
    return CircuitShape(two_qubit=int(ops.get("cx", 0)), one_qubit=int(ops.get("sx", 0) + ops.get("x", 0)),
                        depth=int(compiled.depth()))


def circuit_shape(family: str, variant: str, num_qubits: int) -> CircuitShape:
    """The harness families go to 8 qubits; a larger job scales the 8-qubit circuit: 2-qubit gates
    with the bonds of a line (n - 1), 1-qubit gates with n, the depth of a line circuit unchanged."""
    from harness.circuits import MAX_QUBITS

    if num_qubits <= MAX_QUBITS:
        return _compiled_shape(family, variant, num_qubits)
    base = _compiled_shape(family, variant, MAX_QUBITS)
    return CircuitShape(two_qubit=round(base.two_qubit * (num_qubits - 1) / (MAX_QUBITS - 1)),
                        one_qubit=round(base.one_qubit * num_qubits / MAX_QUBITS), depth=base.depth)


# ------------------------------------------------------------------------------------------------ backends


@dataclass(frozen=True)
class SimBackend:
    """A catalog backend reduced to what the model needs: its commerce and its calibration's
    error rates sorted best first (a noise-aware layout takes the best couplers and qubits)."""

    backend_id: str
    cost_per_shot: float
    availability: float
    mean_wait_seconds: float
    capabilities: dict[str, Any]
    snapshot_id: str
    two_qubit_errors: tuple[float, ...]  # per coupler (the better direction), ascending
    one_qubit_errors: tuple[float, ...]  # sx per qubit, ascending
    readout_losses: tuple[float, ...]  # p01 + p10 per qubit: the Z contrast lost, ascending
    gate_seconds: float  # median 2-qubit gate duration
    readout_seconds: float  # median readout length

    @property
    def num_qubits(self) -> int:
        return int(self.capabilities["num_qubits"])


def load_backends() -> list[SimBackend]:
    from harness.calibration import pinned
    from harness.catalog import catalog, catalog_snapshot

    out = []
    for info in catalog():
        snap = pinned(catalog_snapshot(info.backend_id))
        couplers: dict[tuple[int, ...], float] = {}
        for key, v in snap.gates[snap.two_qubit_gate].items():
            pair = tuple(sorted(int(q) for q in key.split(",")))
            couplers[pair] = min(couplers.get(pair, 1.0), v["error"])
        durations = [v["duration"] for v in snap.gates[snap.two_qubit_gate].values()]
        out.append(SimBackend(
            backend_id=info.backend_id, cost_per_shot=info.cost_per_shot, availability=info.availability,
            mean_wait_seconds=float(info.queue["mean_wait_seconds"]), capabilities=dict(info.capabilities),
            snapshot_id=snap.id, two_qubit_errors=tuple(sorted(couplers.values())),
            one_qubit_errors=tuple(sorted(v["error"] for v in snap.gates["sx"].values())),
            readout_losses=tuple(sorted(v["p01"] + v["p10"] for v in snap.readout_errors.values())),
            gate_seconds=statistics.median(durations),
            readout_seconds=statistics.median(snap.raw_metrics["readout_length"])))
    return out


@dataclass(frozen=True)
class Drift:
    """Multiplicative factors on a backend's 2-qubit, 1-qubit and readout error rates."""

    two_qubit: float = 1.0
    one_qubit: float = 1.0
    readout: float = 1.0


# -------------------------------------------------------------------------------------- fidelity model


def _mean_log_fidelity(errors: Sequence[float], k: int, factor: float) -> float:
    best = errors[:k]
    # an error rate drifted past 0.75 is a broken coupler; capping keeps the log finite
    return sum(math.log1p(-min(0.75, e * factor)) for e in best) / len(best)


def _signals(backend: SimBackend, shape: CircuitShape, n: int, drift: Drift) -> tuple[float, float]:
    """(gate survival p_g, readout contrast p_ro) of the circuit on the backend's best region."""
    log_g = (shape.two_qubit * _mean_log_fidelity(backend.two_qubit_errors, max(1, n - 1), drift.two_qubit)
             + shape.one_qubit * _mean_log_fidelity(backend.one_qubit_errors, n, drift.one_qubit))
    log_ro = n * _mean_log_fidelity(backend.readout_losses, n, drift.readout)
    return math.exp(log_g), math.exp(log_ro)


def estimate(method: str, p_gate: float, p_readout: float) -> float:
    """The normalised expectation value a method reports (ideal 1, fully mixed 0). Global
    depolarising noise: the signal at noise scale λ is p_g^λ · p_ro (folding scales gate noise,
    not readout); linear ZNE extrapolates 1, 2, 3 to 0."""
    if method == ZNE_METHOD:
        return float(sum(c * p_gate**s for c, s in zip(ZNE_COEFFS, ZNE_SCALES, strict=True)) * p_readout)
    return float(p_gate * p_readout)


def expectation_fidelity(value: float) -> float:
    """docs/em-metrics.md's fidelity 1 − |estimate − ideal| / (2‖O‖) for an observable whose ideal
    value sits at the edge of its range (Z parity of a basis state: ideal 1, ‖O‖ 1). That is the
    most noise-sensitive observable, so fidelity differences between backends are the largest."""
    return 1.0 - min(2.0, abs(1.0 - value)) / 2.0


def noise_gain(method: str) -> float:
    """Std of the method's estimate per unit shot-noise std at equal shots per circuit: linear ZNE
    sums three estimates with coefficients 4/3, 1/3, -2/3 (em-metrics.md, "Shots and cost")."""
    return math.sqrt(sum(c * c for c in ZNE_COEFFS)) if method == ZNE_METHOD else 1.0


def shot_multiplier(method: str) -> float:
    return float(len(ZNE_SCALES)) if method == ZNE_METHOD else 1.0


def run_seconds(backend: SimBackend, shape: CircuitShape, shots: int, method: str, overhead: float) -> float:
    """em_policy.service.shot_seconds per shot (depth x median 2-qubit gate time + readout + the
    repetition delay) at each executed noise scale, plus a fixed overhead per executed circuit."""
    scales = ZNE_SCALES if method == ZNE_METHOD else (1.0,)
    per_shot = sum(s * shape.depth * backend.gate_seconds + backend.readout_seconds + REP_DELAY_SECONDS
                   for s in scales)
    return overhead * len(scales) + shots * per_shot


# --------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class SimJob:
    index: int
    job_id: str
    arrival: float
    tenant: str
    family: str
    variant: str
    num_qubits: int
    shape: CircuitShape
    crypto_mode: str
    priority_class: str
    shots: int
    shot_budget: int
    deadline_seconds: float | None
    seed: int  # the engine's tie-break seed for this job

    @property
    def needed_crypto_rank(self) -> int:
        minimum = TENANTS[self.tenant].get("min_crypto_mode") or "classical"
        return max(CRYPTO_RANK[self.crypto_mode], CRYPTO_RANK[minimum])


def _rate_at(t: float, config: SimConfig, peak_start: float) -> float:
    peak = config.peak and peak_start <= t < peak_start + config.peak_seconds
    return config.arrival_rate * (config.peak_factor if peak else 1.0)


def arrival_times(config: SimConfig) -> list[float]:
    """A Poisson stream with a piecewise-constant rate: unit-exponential draws spent against the
    integrated rate, so the peak window is exact. The peak starts a third of the way through the
    nominal span."""
    rng = random.Random(f"{config.seed}|arrivals")
    peak_start = config.jobs / config.arrival_rate / 3.0
    t, out = 0.0, []
    for _ in range(config.jobs):
        need = rng.expovariate(1.0)
        while True:
            rate = _rate_at(t, config, peak_start)
            edge = peak_start if t < peak_start else peak_start + config.peak_seconds
            span = edge - t if config.peak and t < edge else math.inf
            if need <= rate * span:
                t += need / rate
                break
            need -= rate * span
            t = edge
        out.append(t)
    return out


def make_jobs(config: SimConfig) -> list[SimJob]:
    from harness.circuits import FAMILIES, MAX_QUBITS, variants_for

    rng = random.Random(f"{config.seed}|jobs")
    sizes = list(range(2, config.max_qubits + 1))
    size_weights = [1.0 / n for n in sizes]  # small circuits are the common case
    jobs = []
    for i, arrival in enumerate(arrival_times(config)):
        n = rng.choices(sizes, size_weights)[0]
        family = rng.choice(FAMILIES)
        variant = rng.choice(variants_for(family, min(n, MAX_QUBITS)))
        cls = rng.choices(PRIORITY_CLASSES, CLASS_WEIGHTS)[0]
        shots = rng.choices(SHOTS, SHOT_WEIGHTS)[0]
        chance, limit = DEADLINES[cls]
        jobs.append(SimJob(
            index=i, job_id=f"sim-{config.seed}-{i:06d}", arrival=arrival,
            tenant=rng.choices(list(TENANTS), TENANT_WEIGHTS)[0], family=family, variant=variant, num_qubits=n,
            shape=circuit_shape(family, variant, n),
            crypto_mode=rng.choices(list(CRYPTO_RANK), CRYPTO_WEIGHTS)[0], priority_class=cls, shots=shots,
            shot_budget=shots * rng.choices(BUDGET_RATIOS, BUDGET_WEIGHTS)[0],
            deadline_seconds=limit if rng.random() < chance else None, seed=rng.randrange(2**31)))
    return jobs


# -------------------------------------------------------------------------------------------------- world


class World:
    """What every policy's run shares: the backends, the jobs and the calibration drift. Drift is a
    per-backend grid extended on demand from the backend's own seeded stream, so a value depends
    on its time only, never on who asked first."""

    def __init__(self, config: SimConfig, backends: Sequence[SimBackend] | None = None) -> None:
        self.config = config
        self.backends = list(backends) if backends is not None else load_backends()
        self.jobs = make_jobs(config)
        self._drift: dict[str, list[Drift]] = {b.backend_id: [] for b in self.backends}
        self._drift_state: dict[str, tuple[random.Random, list[float]]] = {}
        self._predictions: dict[tuple[int, str, int], dict[str, Any]] = {}

    def drift(self, backend_id: str, t: float) -> Drift:
        """The true error-rate factors at time t (piecewise constant on the drift grid)."""
        return self._grid(backend_id, int(t // self.config.drift_step_seconds))

    def calibration_epoch(self, t: float) -> int:
        return int(t // self.config.calibration_interval_seconds)

    def published(self, backend_id: str, t: float) -> Drift:
        """The factors of the calibration the backend last published: what a scheduler sees."""
        start = self.calibration_epoch(t) * self.config.calibration_interval_seconds
        return self.drift(backend_id, start)

    def _grid(self, backend_id: str, index: int) -> Drift:
        grid = self._drift[backend_id]
        if backend_id not in self._drift_state:
            self._drift_state[backend_id] = (random.Random(f"{self.config.seed}|drift|{backend_id}"), [0.0, 0.0, 0.0])
        rng, state = self._drift_state[backend_id]
        # Exact Ornstein-Uhlenbeck steps in log space: mean-reverting, so errors wander and return
        # rather than running away; the walk starts at the snapshot's own figures.
        keep = math.exp(-self.config.drift_step_seconds / self.config.drift_tau_seconds)
        kick = self.config.drift_sigma * math.sqrt(1.0 - keep * keep)
        while len(grid) <= index:
            if grid:
                state[:] = [x * keep + kick * rng.gauss(0.0, 1.0) for x in state]
            grid.append(Drift(*(math.exp(x) for x in state)))
        return grid[index]

    def prediction(self, job: SimJob, backend: SimBackend, t: float) -> dict[str, Any]:
        """The EM policy record for the job on the backend, from its published calibration."""
        epoch = self.calibration_epoch(t)
        key = (job.index, backend.backend_id, epoch)
        hit = self._predictions.get(key)
        if hit is None:
            hit = predict(job, backend, self.published(backend.backend_id, t), self.config.job_overhead_seconds)
            self._predictions[key] = hit
        return hit

    def snapshot_id(self, backend: SimBackend, t: float) -> str:
        return f"{backend.snapshot_id}+sim{self.calibration_epoch(t):04d}"


def predict(job: SimJob, backend: SimBackend, drift: Drift, overhead: float) -> dict[str, Any]:
    """The analytic EM policy: the best predicted fidelity within the shot budget, near ties to
    the cheaper method (as em_policy labels its training data); confidence grows with the margin."""
    from harness.methods import parse_method

    p_gate, p_readout = _signals(backend, job.shape, job.num_qubits, drift)
    options = {"unmitigated": expectation_fidelity(estimate("unmitigated", p_gate, p_readout))}
    if job.shot_budget >= job.shots * shot_multiplier(ZNE_METHOD):
        options[ZNE_METHOD] = expectation_fidelity(estimate(ZNE_METHOD, p_gate, p_readout))
    method = "unmitigated"
    if ZNE_METHOD in options and options[ZNE_METHOD] > options["unmitigated"] + TIE_TOLERANCE:
        method = ZNE_METHOD
    margin = abs(options.get(ZNE_METHOD, options["unmitigated"]) - options["unmitigated"])

    def option(m: str) -> dict[str, Any]:
        return {"method": m, "params": parse_method(m).parameters() if m == ZNE_METHOD else {},
                "shot_multiplier": shot_multiplier(m), "expected_fidelity": round(options[m], 12),
                "estimated_seconds": round(run_seconds(backend, job.shape, job.shots, m, overhead), 9)}

    # shaped as scheduler.service records them under em_coselect (the policy's method first, then the
    # others by name); a profile without em_coselect never reads them
    return {**option(method),
            "confidence": round(0.9 if len(options) == 1 else 0.5 + 0.4 * min(1.0, margin / 0.02), 12),
            "model_version": MODEL_VERSION,
            "options": [option(m) for m in (method, *sorted(m for m in options if m != method))]}


def realised_fidelity(job: SimJob, backend: SimBackend, method: str, drift: Drift) -> float:
    """The fidelity the job achieves: the model on the true (drifted) calibration at its start,
    plus shot noise from the job's own stream (the same draw whichever backend it lands on)."""
    p_gate, p_readout = _signals(backend, job.shape, job.num_qubits, drift)
    noise = random.Random(f"{job.seed}|{job.index}|shot-noise").gauss(0.0, 1.0)
    value = estimate(method, p_gate, p_readout) + noise * noise_gain(method) / math.sqrt(job.shots)
    return expectation_fidelity(value)


def crypto_ok(job: SimJob, backend: SimBackend) -> bool:
    return any(CRYPTO_RANK[m] >= job.needed_crypto_rank for m in backend.capabilities["crypto_modes"])


def fits(job: SimJob, backend: SimBackend) -> bool:
    """Hard feasibility every policy respects: enough qubits, shots within the backend's limit."""
    return job.num_qubits <= backend.num_qubits and job.shots <= backend.capabilities["max_shots"]


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    job: SimJob
    backend_id: str | None = None
    method: str | None = None
    predicted_fidelity: float | None = None
    fidelity: float | None = None
    cost: float = 0.0
    queued_at: float | None = None  # when it joined its backend's queue
    start: float | None = None
    end: float | None = None
    dropped: str | None = None  # why no backend took the job
    crypto_violation: bool = False
    parked: int = 0  # how often the job waited for a backend to come back online


@dataclass
class _Backend:
    spec: SimBackend
    # Outages and other tenants' jobs draw from streams of their own, seeded by the backend: every
    # policy's run sees the same outages and the same foreign jobs.
    outages: random.Random
    load: random.Random
    up: bool = True
    busy_until: float | None = None
    running_foreign: bool = False
    provider: deque[float | None] = field(default_factory=deque)  # foreign job seconds, or None: a slot of ours
    ours: list[tuple[int, int, float, int]] = field(default_factory=list)  # (class rank, seq, seconds, job index)
    foreign_backlog: float = 0.0
    ours_backlog: float = 0.0

    def backlog(self, now: float) -> float:
        """Seconds of work ahead of a new job: what the provider's queue estimate tells a scheduler."""
        return self._running(now, foreign=True) + self.foreign_backlog + self.ours_backlog

    def visible_wait(self, now: float, view: str) -> float:
        if view == "provider":
            return self.backlog(now)
        return self.spec.mean_wait_seconds + self._running(now, foreign=False) + self.ours_backlog

    def _running(self, now: float, *, foreign: bool) -> float:
        if self.busy_until is None or (self.running_foreign and not foreign):
            return 0.0
        return max(0.0, self.busy_until - now)


@dataclass(frozen=True)
class View:
    """One backend as a policy sees it when it decides."""

    backend: SimBackend
    online: bool
    queue_wait_seconds: float
    prediction: dict[str, Any] | None  # None: the circuit does not fit


# Event kinds, in the order they are handled at equal times: a finishing job frees its backend
# before anything else looks at it.
_FINISH, _DOWN, _UP, _FOREIGN, _ARRIVAL = range(5)


class _Run:
    def __init__(self, world: World, policy: str) -> None:
        self.world, self.policy, self.config = world, policy, world.config
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.outcomes = [Outcome(job) for job in world.jobs]
        self.parked: list[int] = []
        self.pending = len(world.jobs)
        seed = self.config.seed
        self.backends = {b.backend_id: _Backend(b, random.Random(f"{seed}|outages|{b.backend_id}"),
                                                random.Random(f"{seed}|load|{b.backend_id}"))
                         for b in world.backends}
        self.choice_rng = random.Random(f"{self.config.seed}|policy|{policy}")
        self.rr_next = 0
        self.plugins, base = V1_PROFILES[self.config.v1_profile]
        self.profile = profile(self.plugins, {**base, **self.config.v1_config}, self.config.v1_profile)

    def push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.events, (t, kind, self.seq, payload))
        self.seq += 1

    # ---- world processes

    def _foreign_rate(self, b: SimBackend) -> float:
        """M/M/1 with mean wait W and mean size s has utilisation ρ = W / (W + s). The rate is ρ of
        the backend's *available* time, so that outages alone never make the queue unstable."""
        s = self.config.foreign_job_seconds
        return b.availability * b.mean_wait_seconds / (b.mean_wait_seconds + s) / s

    def start_world(self) -> None:
        for bid, st in self.backends.items():
            b = st.spec
            if self.config.foreign_load and b.mean_wait_seconds > 0:
                rho = b.mean_wait_seconds / (b.mean_wait_seconds + self.config.foreign_job_seconds)
                # start in the stationary state: a geometric number of jobs already queued
                while st.load.random() < rho:
                    size = st.load.expovariate(1.0 / self.config.foreign_job_seconds)
                    st.provider.append(size)
                    st.foreign_backlog += size
                self.push(st.load.expovariate(self._foreign_rate(b)), _FOREIGN, bid)
            if b.availability < 1.0:
                self.push(self._uptime(st), _DOWN, bid)
        for job in self.world.jobs:
            self.push(job.arrival, _ARRIVAL, job.index)

    def _uptime(self, st: _Backend) -> float:
        a = st.spec.availability
        return st.outages.expovariate((1.0 - a) / (a * self.config.mean_outage_seconds))

    # ---- the loop

    def run(self, tick: Callable[[], None] | None) -> list[Outcome]:
        self.start_world()
        while self.pending and self.events:
            t, kind, _, payload = heapq.heappop(self.events)
            if kind == _ARRIVAL:
                self.dispatch(payload, t)
                if tick is not None:
                    tick()
            elif kind == _FINISH:
                self.finish(payload, t)
            elif kind == _DOWN:
                self.backends[payload].up = False
                self.push(t + self.backends[payload].outages.expovariate(1.0 / self.config.mean_outage_seconds),
                          _UP, payload)
            elif kind == _UP:
                self.come_up(payload, t)
            else:
                self.foreign_arrival(payload, t)
        if self.pending:
            raise QaiError("scheduler.simulation_stuck", f"{self.pending} jobs never finished", status=500)
        return self.outcomes

    def foreign_arrival(self, bid: str, t: float) -> None:
        st = self.backends[bid]
        size = st.load.expovariate(1.0 / self.config.foreign_job_seconds)
        st.provider.append(size)
        st.foreign_backlog += size
        self.push(t + st.load.expovariate(self._foreign_rate(st.spec)), _FOREIGN, bid)
        self.start_next(st, t)

    def come_up(self, bid: str, t: float) -> None:
        st = self.backends[bid]
        st.up = True
        self.push(t + self._uptime(st), _DOWN, bid)
        self.start_next(st, t)
        parked, self.parked = self.parked, []
        for index in parked:
            self.dispatch(index, t)

    def finish(self, bid: str, t: float) -> None:
        st = self.backends[bid]
        st.busy_until = None
        if not st.running_foreign:
            self.pending -= 1
        self.start_next(st, t)

    def start_next(self, st: _Backend, t: float) -> None:
        """An idle, online backend runs the head of its provider queue. A slot of ours runs our
        most urgent waiting job there: qai orders its own jobs by class, not the provider's queue."""
        if st.busy_until is not None or not st.up or not st.provider:
            return
        head = st.provider.popleft()
        if head is not None:
            st.foreign_backlog -= head
            st.running_foreign, st.busy_until = True, t + head
        else:
            _, _, seconds, index = heapq.heappop(st.ours)
            st.ours_backlog -= seconds
            out = self.outcomes[index]
            assert out.method is not None
            out.fidelity = realised_fidelity(out.job, st.spec, out.method, self.world.drift(st.spec.backend_id, t))
            out.start, out.end = t, t + seconds
            st.running_foreign, st.busy_until = False, t + seconds
        self.push(st.busy_until, _FINISH, st.spec.backend_id)

    # ---- deciding

    def views(self, job: SimJob, t: float) -> list[View]:
        return [View(st.spec, st.up, st.visible_wait(t, self.config.queue_view),
                     self.world.prediction(job, st.spec, t) if job.num_qubits <= st.spec.num_qubits else None)
                for st in self.backends.values()]

    def dispatch(self, index: int, t: float) -> None:
        out = self.outcomes[index]
        job = out.job
        views = self.views(job, t)
        chosen, park, why = choose(self.policy, job, views, t, self)
        if chosen is None:
            if park:
                out.parked += 1
                self.parked.append(index)
            else:
                out.dropped = why + (", after waiting for an offline backend" if out.parked else "")
                self.pending -= 1
            return
        prediction = chosen.prediction
        assert prediction is not None
        st = self.backends[chosen.backend.backend_id]
        seconds = float(prediction["estimated_seconds"])
        out.backend_id, out.method = st.spec.backend_id, str(prediction["method"])
        out.predicted_fidelity = float(prediction["expected_fidelity"])
        out.cost = st.spec.cost_per_shot * job.shots * float(prediction["shot_multiplier"])
        out.crypto_violation = not crypto_ok(job, st.spec)
        out.queued_at = t
        heapq.heappush(st.ours, (PRIORITY_CLASSES.index(job.priority_class), index, seconds, index))
        st.ours_backlog += seconds
        st.provider.append(None)
        self.start_next(st, t)


def _engine_inputs(job: SimJob, views: Sequence[View], t: float, run: _Run) -> dict[str, Any]:
    """The engine's recorded inputs, in the shape scheduler.service gathers them."""
    remaining = None if job.deadline_seconds is None else job.deadline_seconds - (t - job.arrival)
    backends = []
    for v in views:
        b = v.backend
        backends.append({
            "backend_id": b.backend_id, "cost_per_shot": b.cost_per_shot, "availability": b.availability,
            "status": "online" if v.online else "offline", "queue_wait_seconds": round(v.queue_wait_seconds, 6),
            "calibration_snapshot_id": run.world.snapshot_id(b, t), "capabilities": b.capabilities,
            "prediction": v.prediction,
            "prediction_error": None if v.prediction is not None else {
                "code": "em_policy.circuit_too_large",
                "message": f"{job.num_qubits} qubits do not fit {b.backend_id} ({b.num_qubits})"},
        })
    return {
        "job": {"job_id": job.job_id, "tenant": job.tenant,
                "manifest_sha256": hashlib.sha256(job.job_id.encode()).hexdigest(), "crypto_mode": job.crypto_mode,
                "shots": job.shots, "shot_budget": job.shot_budget, "priority_class": job.priority_class,
                "num_qubits": job.num_qubits, "deadline_seconds": remaining, "backend_id": None},
        "tenant_policy": TENANTS[job.tenant], "backends": backends, "profile": run.profile, "seed": job.seed,
        "now": (EPOCH + timedelta(seconds=t)).isoformat(),
    }


Choice = tuple[View | None, bool, str]  # (the backend, or None and whether to wait for one to return, and why)


def choose(policy: str, job: SimJob, views: Sequence[View], t: float, run: _Run) -> Choice:
    """Where ``policy`` sends ``job``; with no backend, whether to wait for an offline one to come back."""
    if policy == "v1":
        return _choose_v1(job, views, t, run)
    candidates = [v for v in views if v.prediction is not None and fits(job, v.backend)
                  and (policy not in CRYPTO_FILTERING or crypto_ok(job, v.backend))]
    online = [v for v in candidates if v.online]
    if not online:
        return None, bool(candidates), "no backend fits the job"
    return _baseline(policy, job, online, views, run), False, ""


def _baseline(policy: str, job: SimJob, online: Sequence[View], views: Sequence[View], run: _Run) -> View:
    if policy == "random":
        return run.choice_rng.choice(online)
    if policy == "round-robin":
        order = [v.backend.backend_id for v in views]
        for step in range(len(order)):
            bid = order[(run.rr_next + step) % len(order)]
            hit = next((v for v in online if v.backend.backend_id == bid), None)
            if hit is not None:
                run.rr_next = (order.index(bid) + 1) % len(order)
                return hit
    if policy == "least-busy":
        return min(online, key=lambda v: v.queue_wait_seconds)
    if policy == "max-fidelity":
        return max(online, key=lambda v: _pred(v, "expected_fidelity"))
    # cheapest: the lowest cost for this job, the better fidelity among equals
    return min(online, key=lambda v: (v.backend.cost_per_shot * _pred(v, "shot_multiplier"),
                                      -_pred(v, "expected_fidelity")))


def _pred(view: View, key: str) -> float:
    assert view.prediction is not None
    return float(view.prediction[key])


def _choose_v1(job: SimJob, views: Sequence[View], t: float, run: _Run) -> Choice:
    body = decide(_engine_inputs(job, views, t, run), run.plugins)
    chosen = body["chosen"]
    if chosen is not None:
        view = next(v for v in views if v.backend.backend_id == chosen["backend_id"])
        assert view.prediction is not None
        if chosen["em_method"] == view.prediction["method"]:
            return view, False, ""
        # co-selected: the job runs with the method the engine chose, at its price and run time
        option = next(o for o in view.prediction["options"] if o["method"] == chosen["em_method"])
        return replace(view, prediction={**view.prediction, **option}), False, ""
    rejected_by = [{f["plugin"] for f in r["filters"] if f["verdict"] == "reject"}
                   for r in body["backends"] if not r["eligible"]]
    # Wait only if some backend was turned down for being offline and nothing else.
    park = any(plugins == {"status"} for plugins in rejected_by)
    counts = _tally([plugin for plugins in rejected_by for plugin in plugins])
    return None, park, "no backend passes v1's filters (rejections: " + ", ".join(
        f"{plugin} {n}" for plugin, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) + ")"


# ------------------------------------------------------------------------------------------------ metrics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarise(policy: str, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    done = [o for o in outcomes if o.end is not None]
    dropped = [o for o in outcomes if o.dropped is not None]
    jct = [o.end - o.job.arrival for o in done if o.end is not None]
    fidelity = [o.fidelity for o in done if o.fidelity is not None]
    predicted = [o.predicted_fidelity for o in done if o.predicted_fidelity is not None]
    cost = sum(o.cost for o in done)

    def late(o: Outcome) -> bool:
        limit = o.job.deadline_seconds
        return limit is not None and (o.end is None or o.end - o.job.arrival > limit)

    routed: dict[str, int] = {}
    for o in done:
        assert o.backend_id is not None
        routed[o.backend_id] = routed.get(o.backend_id, 0) + 1
    zne = sum(1 for o in done if o.method == ZNE_METHOD)
    return {
        "policy": policy, "crypto_filter": policy in CRYPTO_FILTERING,
        "submitted": len(outcomes), "completed": len(done), "dropped": len(dropped),
        "mean_fidelity": _mean(fidelity), "mean_predicted_fidelity": _mean(predicted),
        "mean_abs_prediction_error": _mean([abs(o.fidelity - o.predicted_fidelity) for o in done
                                            if o.fidelity is not None and o.predicted_fidelity is not None]),
        "total_cost_usd": round(cost, 6), "fidelity_per_usd": round(sum(fidelity) / cost, 6) if cost > 0 else None,
        "mean_jct_seconds": _mean(jct), "p95_jct_seconds": round(percentile(jct, 0.95), 6) if jct else None,
        "deadline_jobs": sum(1 for o in outcomes if o.job.deadline_seconds is not None),
        "sla_violations": sum(1 for o in outcomes if late(o)),
        "critical_sla_violations": sum(1 for o in outcomes if o.job.priority_class == "critical" and late(o)),
        "crypto_violations": sum(1 for o in done if o.crypto_violation),
        "zne_share": round(zne / len(done), 6) if done else 0.0,
        "drop_reasons": _tally([o.dropped for o in dropped if o.dropped is not None]),
        "parked": sum(1 for o in outcomes if o.parked),
        "routed": dict(sorted(routed.items())),
    }


def _tally(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 6) if values else None


def compare(by_policy: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """v1 against max-fidelity FCFS, and the issue's targets, each with whether it is met."""
    out: dict[str, Any] = {"targets": {}}
    v1, mf = by_policy.get("v1"), by_policy.get("max-fidelity")
    if v1 is not None and mf is not None and mf["mean_jct_seconds"] and mf["mean_fidelity"]:
        jct = 100.0 * (v1["mean_jct_seconds"] - mf["mean_jct_seconds"]) / mf["mean_jct_seconds"]
        loss = 100.0 * (mf["mean_fidelity"] - v1["mean_fidelity"]) / mf["mean_fidelity"]
        p95 = 100.0 * (v1["p95_jct_seconds"] - mf["p95_jct_seconds"]) / mf["p95_jct_seconds"]
        out.update(v1_vs_max_fidelity={"mean_jct_change_pct": round(jct, 4), "p95_jct_change_pct": round(p95, 4),
                                       "fidelity_loss_pct": round(loss, 4)})
        out["targets"]["v1 mean JCT ≥ 50% below max-fidelity FCFS"] = {"value": round(jct, 4), "met": jct <= -50.0}
        out["targets"]["v1 mean fidelity loss vs max-fidelity ≤ 3%"] = {"value": round(loss, 4), "met": loss <= 3.0}
    if v1 is not None:
        ratios = {p: m["fidelity_per_usd"] for p, m in by_policy.items() if m["fidelity_per_usd"] is not None}
        best = max(ratios, key=lambda p: ratios[p]) if ratios else None
        out["targets"]["v1 has the best fidelity per USD"] = {
            "value": v1["fidelity_per_usd"], "best": best, "met": best == "v1"}
    out["targets"]["0 crypto-policy violations for every crypto-filtering policy"] = {
        "value": {p: m["crypto_violations"] for p, m in by_policy.items() if m["crypto_filter"]},
        "met": all(m["crypto_violations"] == 0 for m in by_policy.values() if m["crypto_filter"])}
    return out


# ------------------------------------------------------------------------------------------- oracle bound
#
# Can any routing meet both "fidelity loss ≤ 3 %" and "best fidelity per USD"? An upper bound on the
# fidelity per USD of every assignment of the trace's jobs whose summed fidelity reaches F* answers it:
# if the bound is below another policy's figure, no routing meets both.

FIDELITY_LOSS_TARGET = 0.03  # the target: at most 3 % below max-fidelity's mean fidelity
JobOption = tuple[float, float]  # (fidelity, cost in USD) of one job on one backend with one EM method
Point = tuple[Fraction, Fraction]  # (fidelity, cost), exact: the bound must not drift by rounding


def job_options(world: World, job: SimJob, *, any_method: bool = False) -> list[JobOption]:
    """Every (fidelity, cost) the job can get: each backend a crypto-filtering policy may send it to,
    with the EM method the EM policy picks for it there at the job's arrival (every policy takes
    the prediction's method), or with ``any_method`` each method the shot budget allows. Fidelity is
    realised on the true calibration at the job's arrival; cost is priced as ``_Run.dispatch`` does."""
    out = []
    for b in world.backends:
        if not (fits(job, b) and crypto_ok(job, b)):
            continue
        if any_method:
            zne = job.shot_budget >= job.shots * shot_multiplier(ZNE_METHOD)
            methods = ["unmitigated", ZNE_METHOD] if zne else ["unmitigated"]
        else:
            methods = [str(world.prediction(job, b, job.arrival)["method"])]
        drift = world.drift(b.backend_id, job.arrival)
        out += [(realised_fidelity(job, b, m, drift), b.cost_per_shot * job.shots * shot_multiplier(m))
                for m in methods]
    return out


def _cross(a: Point, b: Point, p: Point) -> Fraction:
    return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])


def _frontier(options: Sequence[JobOption]) -> list[Point]:
    """One job's LP frontier: the lower convex hull of its (f, c) points, from its cheapest option
    (the best fidelity among equals) to its best-fidelity one. Nothing off it is worth using:
    a point above it costs more than a mix of two frontier points with the same fidelity, and a
    point left of the cheapest one is dominated by it."""
    cheapest: dict[Fraction, Fraction] = {}
    for f, c in options:
        cheapest[Fraction(f)] = min(cheapest.get(Fraction(f), Fraction(c)), Fraction(c))
    start = min(cheapest.items(), key=lambda p: (p[1], -p[0]))
    hull = [start]
    for p in sorted(q for q in cheapest.items() if q[0] > start[0]):
        while len(hull) > 1 and _cross(hull[-2], hull[-1], p) <= 0:  # hull[-1] on or above the chord
            hull.pop()
        hull.append(p)
    return hull


def cost_curve(jobs: Sequence[Sequence[JobOption]]) -> list[Point]:
    """The breakpoints (F, C(F)) of C(F) = min Σ_j c_j s.t. Σ_j f_j ≥ F, each job a convex mix of its
    options: the LP relaxation of the multiple-choice knapsack, so C(F) is at most the cost of any
    one-option-per-job assignment reaching F. C is convex, piecewise linear and increasing; constant
    below the first breakpoint, infeasible above the last (F_max).

    Computed exactly, in rationals: every job starts at its frontier's cheapest point, then the
    segments of all frontiers are taken in order of cost per unit fidelity (each job's own come in
    its order, its frontier being convex). That greedy solves the LP: at F on a segment of slope λ,
    every job sits where its frontier's slopes straddle λ, i.e. at argmin_o (c_o − λ f_o), so the
    Lagrangian dual λF + Σ_j min_o (c_o − λ f_o) equals the greedy's cost: primal = dual."""
    frontiers = [_frontier(options) for options in jobs]
    f = sum((h[0][0] for h in frontiers), Fraction(0))
    c = sum((h[0][1] for h in frontiers), Fraction(0))
    steps = sorted(((b[1] - a[1]) / (b[0] - a[0]), b[0] - a[0], b[1] - a[1])
                   for h in frontiers for a, b in itertools.pairwise(h))
    curve = [(f, c)]
    for _, df, dc in steps:
        f, c = f + df, c + dc
        curve.append((f, c))
    return curve


def min_cost(curve: Sequence[Point], fidelity: Fraction) -> Fraction | None:
    """C(F) from the breakpoints, exactly; None when no assignment reaches F (F > F_max)."""
    if fidelity > curve[-1][0]:
        return None
    k = bisect.bisect_left(curve, fidelity, key=lambda p: p[0])  # the first breakpoint at or past F
    if k == 0:
        return curve[0][1]
    (f0, c0), (f1, c1) = curve[k - 1], curve[k]
    return c0 + (c1 - c0) * (fidelity - f0) / (f1 - f0)


def _to_float(x: Fraction, *, up: bool) -> float:
    """x as a float rounded towards the safe side: up for an upper bound, down for a lower one."""
    y = float(x)
    if up and Fraction(y) < x:
        return math.nextafter(y, math.inf)
    if not up and Fraction(y) > x:
        return math.nextafter(y, -math.inf)
    return y


@dataclass(frozen=True)
class RatioBound:
    """What any one-option-per-job assignment with summed fidelity ≥ ``fidelity_target`` can reach."""

    jobs: int
    fidelity_target: float  # F*
    max_fidelity: float  # F_max: every job on its best option
    min_cost_usd: float  # C(F*) rounded down; inf when F* > F_max
    fidelity_per_usd: float | None  # rounded up; inf when C(F*) = 0; None when F* > F_max: nothing qualifies
    # Not a bound: every job on its cheapest option (the curve's first point), to set the bound
    # against a cheapest routing in the same model; inf when that costs nothing.
    cheapest_fidelity_per_usd: float

    def to_json(self) -> dict[str, Any]:
        """JSON has no infinity: ``outcome`` says "bounded", "unbounded" (C(F*) = 0) or "unreachable"."""
        outcome = ("unreachable" if self.fidelity_per_usd is None
                   else "unbounded" if math.isinf(self.fidelity_per_usd) else "bounded")
        finite = {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in asdict(self).items()}
        return {**finite, "outcome": outcome}


def ratio_bound(jobs: Sequence[Sequence[JobOption]], fidelity_target: float) -> RatioBound:
    """max over F in [F*, F_max] of F / C(F): an upper bound on Σf / Σc of any assignment with Σf ≥ F*,
    since such an assignment has Σf = F for some F in that range and Σc ≥ C(F). On each linear piece
    C = a + sF of the curve, F / C is monotone (its derivative a / C² has one sign), so the maximum is
    at F* or at a breakpoint past it. Exact in rationals, then rounded up."""
    curve = cost_curve(jobs)
    target = Fraction(fidelity_target)
    (f0, c0), (f_max, _) = curve[0], curve[-1]
    unreachable = RatioBound(len(jobs), fidelity_target, _to_float(f_max, up=True), min_cost_usd=math.inf,
                             fidelity_per_usd=None, cheapest_fidelity_per_usd=float(f0 / c0) if c0 else math.inf)
    cost = min_cost(curve, target)
    if cost is None:
        return unreachable
    if cost == 0:  # free backends reach F*: no finite bound, and no division by zero
        return replace(unreachable, min_cost_usd=0.0, fidelity_per_usd=math.inf)
    best = max([target / cost, *(f / c for f, c in curve if f > target)])
    return replace(unreachable, min_cost_usd=_to_float(cost, up=False), fidelity_per_usd=_to_float(best, up=True))


def oracle_bound(world: World, max_fidelity_mean: float, *, any_method: bool = False,
                 loss: float = FIDELITY_LOSS_TARGET) -> RatioBound:
    """The bound for routings of the world's trace that meet the fidelity target. The jobs counted
    are those some backend can take, all of them run: exactly what max-fidelity completes (it drops
    only the others), and the target compares means over completed jobs, so F* = (1 − loss) ×
    max-fidelity's mean × their number. Less 5e-7 per job: ``compare`` tests means rounded to 6
    decimals, so a routing passes with a true mean that much below."""
    options = [o for o in (job_options(world, job, any_method=any_method) for job in world.jobs) if o]
    return ratio_bound(options, ((1.0 - loss) * max_fidelity_mean - 5e-7) * len(options))


def run_policies(world: World, policies: Sequence[str],
                 progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Each policy on the world's trace, with the checks every run must pass: every job is
    accounted for, and a policy that applies the crypto filter never breaks it."""
    by_policy: dict[str, dict[str, Any]] = {}
    for policy in policies:
        tick = None if progress is None else partial(progress, policy)
        metrics = summarise(policy, _Run(world, policy).run(tick))
        if metrics["completed"] + metrics["dropped"] != metrics["submitted"]:
            raise QaiError("scheduler.simulation_lost_jobs", f"{policy} lost jobs: {metrics}", status=500)
        if metrics["crypto_filter"] and metrics["crypto_violations"]:
            raise QaiError("scheduler.crypto_violation",
                           f"{policy} applies the crypto filter yet ran {metrics['crypto_violations']} jobs on "
                           "backends that do not carry their crypto mode", status=500)
        by_policy[policy] = metrics
    return by_policy


# v1 with its queue and availability terms switched off: the SPEC-001 ratio alone (a what-if of
# the default profile's knobs, for the report's sensitivity table).
PURE_RATIO_CONFIG: dict[str, Any] = {
    "wait_weight": dict.fromkeys(PRIORITY_CLASSES, 0.0), "availability_penalty": 1.0}


# v1 weighing fidelity more than SPEC-001's ratio does (the profile's fidelity_exponent): where the
# fidelity-against-cost trade lies on the catalog.
FIDELITY_EXPONENTS = (4.0, 16.0)


def scenarios(config: SimConfig) -> list[tuple[str, SimConfig]]:
    """Variations of the headline run: other seeds, no other tenants, lighter and heavier load, and
    v1 on the bare fidelity-per-cost ratio. Each changes one thing."""
    return [
        (f"seed {config.seed + 1}", replace(config, seed=config.seed + 1)),
        (f"seed {config.seed + 2}", replace(config, seed=config.seed + 2)),
        ("no other tenants' load", replace(config, foreign_load=False)),
        ("arrival rate ÷ 4", replace(config, arrival_rate=config.arrival_rate / 4)),
        ("arrival rate × 4", replace(config, arrival_rate=config.arrival_rate * 4)),
        ("queue wait as scheduler.service records it (catalog mean + qai's backlog)",
         replace(config, queue_view="catalog" if config.queue_view == "provider" else "provider")),
        *(_ratio_scenarios(config) if config.v1_profile == "default" else _value_scenarios(config)),
        *((f"v1 under the {name} profile", replace(config, v1_profile=name, v1_config={}))
          for name in V1_PROFILES if name != config.v1_profile),
    ]


def _ratio_scenarios(config: SimConfig) -> list[tuple[str, SimConfig]]:
    return [("v1 on the bare ratio (wait weights 0, availability penalty 1)",
             replace(config, v1_config={**config.v1_config, **PURE_RATIO_CONFIG})),
            *((f"v1 with fidelity_exponent {k}",
               replace(config, v1_config={**config.v1_config, "fidelity_exponent": k})) for k in FIDELITY_EXPONENTS)]


# The value profile's own knob: what a unit of fidelity is worth against the USD it costs.
FIDELITY_VALUES_USD = (50.0, 200.0)


def _value_scenarios(config: SimConfig) -> list[tuple[str, SimConfig]]:
    return [(f"v1 with fidelity_value_usd {v:g}", replace(config, v1_config={**config.v1_config,
                                                                              "fidelity_value_usd": v}))
            for v in FIDELITY_VALUES_USD]


def planned_ticks(config: SimConfig, sensitivity: bool) -> int:
    """How often ``simulate`` calls ``progress``: once per job a policy decides on arrival."""
    runs = len(config.policies)
    if sensitivity:
        for _, variant in scenarios(config):
            runs += ("v1" in config.policies) if _only_v1_differs(variant, config) else len(config.policies)
    return runs * config.jobs


def _only_v1_differs(variant: SimConfig, config: SimConfig) -> bool:
    """Only v1's profile or knobs differ: the same trace, so the other policies' figures stand."""
    return replace(variant, v1_config=config.v1_config, v1_profile=config.v1_profile) == config


def simulate(config: SimConfig, *, backends: Sequence[SimBackend] | None = None, sensitivity: bool = False,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every policy on the same trace: per-policy metrics, v1 against max-fidelity FCFS and the
    issue's targets; with ``sensitivity``, the same comparison under each of ``scenarios``.
    ``progress`` is called once per job decided, with the policy's name."""
    backends = list(backends) if backends is not None else load_backends()
    world = World(config, backends)
    by_policy = run_policies(world, config.policies, progress)
    result: dict[str, Any] = {
        "config": config.to_json(), "model_version": MODEL_VERSION,
        "backends": [{"backend_id": b.backend_id, "calibration_snapshot_id": b.snapshot_id,
                      "cost_per_shot": b.cost_per_shot, "availability": b.availability,
                      "mean_wait_seconds": b.mean_wait_seconds, "crypto_modes": b.capabilities["crypto_modes"],
                      "num_qubits": b.num_qubits} for b in backends],
        "trace": {**trace_summary(world.jobs), **choice_spread(world)}, "policies": by_policy,
        **compare(by_policy)}
    mf = by_policy.get("max-fidelity")
    if mf is not None and mf["mean_fidelity"] is not None:
        # routing alone (the EM policy keeps choosing the method), and routing with the method free too
        result["oracle_bound"] = {kind: oracle_bound(world, mf["mean_fidelity"], any_method=free).to_json()
                                  for kind, free in (("routing", False), ("routing_and_em_method", True))}
    if sensitivity:
        rows = []
        for name, variant in scenarios(config):
            if _only_v1_differs(variant, config):
                changed = run_policies(World(variant, backends), [p for p in config.policies if p == "v1"], progress)
                metrics = {**by_policy, **changed}
            else:
                metrics = run_policies(World(variant, backends), config.policies, progress)
            rows.append(_scenario_row(name, variant, metrics))
        result["sensitivity"] = rows
    return result


def _scenario_row(name: str, config: SimConfig, by_policy: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    cmp = compare(by_policy)
    v1, mf = by_policy.get("v1", {}), by_policy.get("max-fidelity", {})
    return {"scenario": name, "config": config.to_json(),
            "v1_mean_jct_seconds": v1.get("mean_jct_seconds"),
            "max_fidelity_mean_jct_seconds": mf.get("mean_jct_seconds"),
            **cmp.get("v1_vs_max_fidelity", {}),
            "best_fidelity_per_usd": cmp["targets"].get("v1 has the best fidelity per USD", {}).get("best"),
            "fidelity_per_usd": {p: m["fidelity_per_usd"] for p, m in by_policy.items()},
            "v1_sla_violations": v1.get("sla_violations"), "deadline_jobs": v1.get("deadline_jobs"),
            "targets_met": {k: t["met"] for k, t in cmp["targets"].items()}}


def choice_spread(world: World) -> dict[str, float]:
    """How much the choice of backend can matter for a job, at its arrival, over the backends that
    fit it and carry its crypto mode: the best predicted fidelity over the worst, and the dearest
    cost over the cheapest paid one (means over the jobs with two or more such backends)."""
    fidelity, price = [], []
    for job in world.jobs:
        ok = [b for b in world.backends if fits(job, b) and crypto_ok(job, b)]
        predicted = [float(world.prediction(job, b, job.arrival)["expected_fidelity"]) for b in ok]
        costs = [b.cost_per_shot for b in ok if b.cost_per_shot > 0]
        if len(predicted) > 1 and min(predicted) > 0:
            fidelity.append(max(predicted) / min(predicted))
        if len(costs) > 1:
            price.append(max(costs) / min(costs))
    return {"mean_best_over_worst_fidelity": round(statistics.fmean(fidelity), 6) if fidelity else 1.0,
            "mean_dearest_over_cheapest_price": round(statistics.fmean(price), 6) if price else 1.0}


def trace_summary(jobs: Sequence[SimJob]) -> dict[str, Any]:
    return {"jobs": len(jobs), "span_seconds": round(jobs[-1].arrival, 3) if jobs else 0.0,
            "families": _tally([j.family for j in jobs]), "crypto_modes": _tally([j.crypto_mode for j in jobs]),
            "priority_classes": _tally([j.priority_class for j in jobs]), "tenants": _tally([j.tenant for j in jobs]),
            "with_deadline": sum(1 for j in jobs if j.deadline_seconds is not None),
            "mean_qubits": round(statistics.fmean(j.num_qubits for j in jobs), 4) if jobs else 0.0}


# ------------------------------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in r) + " |" for r in rows]
    return lines


POLICY_COLUMNS = ("policy", "crypto filter", "completed", "dropped", "mean fidelity", "fidelity / USD",
                  "total cost (USD)", "mean JCT (s)", "p95 JCT (s)", "SLA violations", "critical SLA violations",
                  "crypto violations", "ZNE share")


def policy_rows(by_policy: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    return [[p, fmt(m["crypto_filter"]), fmt(m["completed"]), fmt(m["dropped"]), fmt(m["mean_fidelity"]),
             fmt(m["fidelity_per_usd"]), fmt(m["total_cost_usd"], 2), fmt(m["mean_jct_seconds"], 1),
             fmt(m["p95_jct_seconds"], 1), f"{m['sla_violations']} / {m['deadline_jobs']}",
             fmt(m["critical_sla_violations"]), fmt(m["crypto_violations"]), fmt(m["zne_share"], 3)]
            for p, m in by_policy.items()]


def report_markdown(result: Mapping[str, Any], command: str) -> str:
    """The evaluation as markdown: the exact command, the config, the tables and each target, met or not."""
    config, by_policy, targets = result["config"], result["policies"], result["targets"]
    lines = [
        "# Scheduler: trace-driven evaluation",
        "",
        "Written by the command below; rerun it rather than editing this page. The model behind the figures is",
        "described in [scheduler.md](scheduler.md#trace-driven-evaluation). Same command, same figures: the",
        "simulation is seeded and reads no clock.",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Predictions come from `{result['model_version']}`, an analytic model of the EM policy on the backends'",
        "calibrations (not the trained EM policy model). Every policy sees the same jobs, outages, other tenants'",
        "load and calibration drift; only the routing differs.",
        "",
        *_profile_note(config),
        "## Targets",
        "",
        *_md_table(["target", "value", "met"],
                   [[k, _target_value(t), "yes" if t["met"] else "**no**"] for k, t in targets.items()]),
        "",
        *_verdict(result),
        *_flips(result),
        *_bound_section(result),
        "## Per policy",
        "",
        *_md_table(POLICY_COLUMNS, policy_rows(by_policy)),
        "",
        "- *mean fidelity*: realised post-EM expectation fidelity (docs/em-metrics.md) of the completed jobs.",
        "- *fidelity / USD*: the completed jobs' summed fidelity over their summed cost (cost per shot × shots ×",
        "  the EM method's shot multiplier): what the workload gets per dollar. A per-job mean of ratios is",
        "  undefined here, because the local simulator backend costs nothing.",
        "- *JCT*: job completion time, completion − arrival, of completed jobs; p95 by nearest rank.",
        "- *SLA violations*: jobs with a deadline that finished after it or never ran, of all jobs with one.",
        "- *crypto violations*: jobs run on a backend none of whose crypto modes is at least the job's mode and",
        "  its tenant's minimum. `random` and `round-robin` do not apply the crypto filter; the others do.",
        "",
        *_drops(by_policy),
        "## Where each policy sent the jobs",
        "",
    ]
    backends = [b["backend_id"] for b in result["backends"]]
    lines += _md_table(["policy", *backends], [[p, *(m["routed"].get(b, 0) for b in backends)]
                                               for p, m in by_policy.items()])
    lines += ["", "## Backends", ""]
    lines += _md_table(["backend", "qubits", "cost per shot (USD)", "availability", "mean wait (s)", "crypto modes",
                        "calibration snapshot"],
                       [[b["backend_id"], b["num_qubits"], f"{b['cost_per_shot']:g}", b["availability"],
                         f"{b['mean_wait_seconds']:g}", ", ".join(b["crypto_modes"]),
                         f"`{b['calibration_snapshot_id']}`"] for b in result["backends"]])
    trace = result["trace"]
    lines += ["", "## Trace and config", "",
              f"{trace['jobs']} jobs over {trace['span_seconds']:.0f} s, mean {trace['mean_qubits']} qubits, "
              f"{trace['with_deadline']} with a deadline.", "",
              f"- families: {_counts(trace['families'])}", f"- crypto modes: {_counts(trace['crypto_modes'])}",
              f"- priority classes: {_counts(trace['priority_classes'])}", f"- tenants: {_counts(trace['tenants'])}",
              "", *_md_table(["setting", "value"], [[k, f"`{v}`"] for k, v in config.items()]), ""]
    if result.get("sensitivity"):
        lines += ["## Sensitivity", "",
                  "The headline run with one thing changed. JCT change and fidelity loss are v1 against max-fidelity",
                  "FCFS.", ""]
        lines += _md_table(
            ["scenario", "v1 mean JCT (s)", "max-fidelity mean JCT (s)", "JCT change %", "fidelity loss %",
             "best fidelity / USD", "v1 fidelity / USD", "v1 SLA violations"],
            [[r["scenario"], fmt(r["v1_mean_jct_seconds"], 1), fmt(r["max_fidelity_mean_jct_seconds"], 1),
              fmt(r.get("mean_jct_change_pct"), 1), fmt(r.get("fidelity_loss_pct"), 2),
              str(r["best_fidelity_per_usd"]), r["fidelity_per_usd"].get("v1"),
              f"{r['v1_sla_violations']} / {r['deadline_jobs']}"]
             for r in result["sensitivity"]])
        lines.append("")
    return "\n".join(lines)


def _profile_note(config: Mapping[str, Any]) -> list[str]:
    name = config.get("v1_profile", "default")
    if name == "default":
        return ["v1 runs the default profile: SPEC-001's score, fidelity / cost × availability × crypto, times the",
                "`wait` and `qkd-preference` terms, with the EM method the policy chose for each backend.", ""]
    return [f"v1 runs the `{name}` profile (docs/scheduler.md#the-value-profile): the `value-score` plugin in place",
            "of `v1-score` and `wait`, and `em_coselect`: the engine scores every EM method the policy predicts within",
            "the job's shot budget on every backend and takes the best (backend, method) pair. The baselines keep",
            "the policy's method.", ""]


def _drops(by_policy: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [f"- `{p}` dropped {n} job(s): {reason}." for p, m in by_policy.items()
             for reason, n in m["drop_reasons"].items()]
    return ["Dropped jobs (counted as SLA violations when they had a deadline):", "", *lines, ""] if lines else []


def _counts(d: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _target_value(t: Mapping[str, Any]) -> str:
    v = t["value"]
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in v.items())
    text = fmt(v, 2) + (" %" if isinstance(v, float) and "best" not in t else "")
    return text + (f" (best: {t['best']})" if "best" in t else "")


def _verdict(result: Mapping[str, Any]) -> list[str]:
    """Plain sentences on each missed target, with the run's own figures."""
    by_policy, targets = result["policies"], result["targets"]
    v1, mf = by_policy.get("v1"), by_policy.get("max-fidelity")
    missed = [k for k, t in targets.items() if not t["met"]]
    if not missed:
        return ["Every target is met in this run.", ""]
    out = [f"{len(missed)} of {len(targets)} targets are missed in this run:", ""]
    if v1 is None:
        return out
    backends = {b["backend_id"]: b for b in result["backends"]}
    free = sorted(b for b, info in backends.items() if info["cost_per_shot"] == 0)
    on_free = sum(v1["routed"].get(b, 0) for b in free)
    trace = result["trace"]
    for key in missed:
        if "fidelity loss" in key and mf is not None:
            out.append(
                f"- **Fidelity.** v1 maximises SPEC-001's *fidelity per cost*, not fidelity. Over the backends a job "
                f"may use, the dearest paid price is on average {trace['mean_dearest_over_cheapest_price']:.2f}× the "
                f"cheapest, while the best predicted post-EM fidelity is only "
                f"{trace['mean_best_over_worst_fidelity']:.2f}× the worst, so price decides most choices: v1 spends "
                f"{v1['total_cost_usd'] / mf['total_cost_usd']:.2f}× what max-fidelity spends, and {on_free} of its "
                f"{v1['completed']} jobs ran on the free local simulator ({', '.join(free) or 'none'}), whose "
                f"fidelity-per-cost term is unbounded. Max-fidelity sends everything to the newest, "
                "lowest-error devices. The −3 % of Qonductor trades fidelity against JCT only, with no price.")
            out.extend(_exponent_trade(result))
        elif "fidelity per USD" in key:
            best = targets[key]["best"]
            out.append(
                f"- **Fidelity per USD.** `{best}` reaches {by_policy[best]['fidelity_per_usd']:.4f} against v1's "
                f"{v1['fidelity_per_usd']:.4f}. v1 maximises each job's own fidelity/cost *times* its wait and "
                "availability factors, so it pays for shorter queues and steadier backends (mean JCT "
                f"{v1['mean_jct_seconds']:.0f} s against `{best}`'s {by_policy[best]['mean_jct_seconds']:.0f} s); "
                "and a ratio maximised "
                "per job is not the workload's summed fidelity over summed cost, which the cheapest backend for "
                "each job nearly maximises when fidelities differ little. The sensitivity table shows v1 on the "
                "bare ratio.")
        elif "JCT" in key:
            out.append(
                "- **JCT.** v1 weighs queue wait only through its `wait` term; where the best-fidelity backends are "
                "not congested, max-fidelity's queues are short too and there is little JCT to win.")
        elif "crypto" in key:
            out.append("- **Crypto.** A crypto-filtering policy ran a job on a backend without its crypto mode: a bug.")
    out.append("")
    return out


def _exponent_trade(result: Mapping[str, Any]) -> list[str]:
    """What the profile's fidelity_exponent buys, from the sensitivity rows that set it."""
    rows = [r for r in result.get("sensitivity", []) if "fidelity_exponent" in r["scenario"]]
    if not rows:
        return []
    cheapest = result["policies"].get("cheapest", {}).get("fidelity_per_usd")
    parts = [f"{r['scenario'].rsplit(' ', 1)[-1]}: loss {r['fidelity_loss_pct']:.2f} %, fidelity / USD "
             f"{r['fidelity_per_usd']['v1']:.4f}" for r in rows]
    out = [f"  The profile's `fidelity_exponent` (default 1, SPEC-001's ratio) buys fidelity with money; at "
           f"exponent {'; '.join(parts)}"
           + (f" (cheapest: {cheapest:.4f})." if cheapest is not None else ".")]
    both = [r for r in rows if r["fidelity_loss_pct"] <= 3.0 and r["best_fidelity_per_usd"] == "v1"]
    if not both:
        out[0] += (" On this catalog the two targets pull against each other: the loss shrinks only as v1 leaves "
                   "the cheap backends, and with them its fidelity per USD. Jobs that fit the free backend stay on "
                   "it at any exponent, since its cost term is zero.")
        if _bound_rules_out(result):
            out[0] += (" No exponent could do better: no routing at all meets both (see *Can any routing meet both "
                       "targets?*).")
    return out


def _best_other(result: Mapping[str, Any]) -> tuple[str, float] | None:
    """The best fidelity per USD among the policies other than v1: what v1 must beat."""
    others = [(m["fidelity_per_usd"], p) for p, m in result["policies"].items()
              if p != "v1" and m["fidelity_per_usd"] is not None]
    return (max(others)[1], max(others)[0]) if others else None


def _bound_rules_out(result: Mapping[str, Any]) -> bool:
    """Whether the routing bound lies below another policy's fidelity per USD: then no routing meets both
    the fidelity target and the fidelity-per-USD one."""
    bound, best = result.get("oracle_bound", {}).get("routing", {}), _best_other(result)
    if best is None or bound.get("outcome") not in ("bounded", "unreachable"):
        return False
    return bound["outcome"] == "unreachable" or bool(bound["fidelity_per_usd"] < best[1])


def _bound_figure(bound: Mapping[str, Any]) -> str:
    if bound["outcome"] == "unbounded":
        return "unbounded (free backends reach F*)"
    if bound["outcome"] == "unreachable":
        return "— (no routing reaches F*)"
    return f"{math.ceil(bound['fidelity_per_usd'] * 10_000) / 10_000:.4f}"  # rounded up: it is an upper bound


def _bound_section(result: Mapping[str, Any]) -> list[str]:
    """The oracle bound set against the policies' fidelity per USD: can any routing meet both targets?"""
    bounds, by_policy, best = result.get("oracle_bound"), result["policies"], _best_other(result)
    if not bounds or "v1" not in by_policy or best is None:
        return []
    routing, free = bounds["routing"], bounds["routing_and_em_method"]
    name, figure = best
    rows = [["upper bound: any routing, each job with the EM policy's method", f"**{_bound_figure(routing)}**"],
            ["upper bound: any routing and any EM method the shot budget allows", _bound_figure(free)],
            ["every job on its cheapest option, in the bound's model", fmt(routing["cheapest_fidelity_per_usd"])],
            [f"`{name}` (simulated)", fmt(figure)], ["`v1` (simulated)", fmt(by_policy["v1"]["fidelity_per_usd"])]]
    if routing["outcome"] == "unreachable":
        meaning = "Not even every job on its best option reaches F*: no routing meets the fidelity target at all."
    elif _bound_rules_out(result):
        meaning = (f"The bound is below `{name}`'s {figure:.4f}: no routing that runs each job with the EM policy's "
                   "method and keeps the mean fidelity within 3 % of max-fidelity's has the best fidelity per USD, so "
                   "on this trace no such routing meets both targets.")
        if free["outcome"] == "unbounded" or (free["outcome"] == "bounded" and free["fidelity_per_usd"] >= figure):
            meaning += (" Choosing the EM method for cost as well (unmitigated where ZNE triples the shots) is not "
                        "ruled out by the second bound; the EM policy chooses it for fidelity.")
            if result["config"].get("v1_profile", "default") != "default":
                meaning += (" v1 does choose it here (its profile co-selects the method), so the first bound does "
                            "not apply to v1; the second does.")
    else:
        meaning = (f"The bound is not below `{name}`'s {figure:.4f}: it does not rule out a routing that meets both "
                   "targets on this trace.")
    same_model = ""
    cheap_in_model = routing["cheapest_fidelity_per_usd"]  # None: free
    if _bound_rules_out(result) and routing["outcome"] == "bounded" and (
            cheap_in_model is None or cheap_in_model > routing["fidelity_per_usd"]):
        same_model = (" In the bound's own model every job on its cheapest option also beats the bound, so the "
                      "verdict holds there too, without setting arrival-time against run-time fidelity.")
    return [
        "## Can any routing meet both targets?", "",
        f"Over the {routing['jobs']} jobs some backend can take, all of them run (as max-fidelity runs them), a "
        "routing within 3 % of max-fidelity's mean fidelity "
        f"({by_policy['max-fidelity']['mean_fidelity']:.4f}) has summed fidelity at least "
        f"F* = {routing['fidelity_target']:.2f}. The bound on its fidelity per USD, against the policies':", "",
        *_md_table(["routing of this trace", "fidelity / USD"], rows), "",
        meaning, "",
        "C(F), the least cost at summed fidelity F with each job a mix of its (backend, EM method) options, is the "
        "LP relaxation of choosing one per job, so no real choice costs less. It is computed exactly, in rationals: "
        "each job's lower convex hull of (fidelity, cost), the segments of all jobs taken cheapest per unit "
        "fidelity first; that equals the Lagrangian dual max over λ ≥ 0 of λF + Σ_j min_o (c_o − λ f_o). The bound "
        f"is the largest F / C(F) for F from F* to F_max = {routing['max_fidelity']:.2f} (every job on its best "
        "option), rounded up.", "",
        "It takes each job's fidelity on the true calibration at its arrival, while the simulation realises it at "
        "the job's start, after drift, and it ignores queues, outages and deadlines: optimistic for any real "
        f"policy, an upper bound rather than a policy.{same_model}", ""]


def _flips(result: Mapping[str, Any]) -> list[str]:
    """Each target whose verdict the sensitivity runs overturn, and where."""
    rows = result.get("sensitivity") or []
    out = []
    for key, t in result["targets"].items():
        flipped = [r["scenario"] for r in rows if r["targets_met"].get(key) is not None
                   and r["targets_met"][key] != t["met"]]
        if flipped:
            now = "met" if t["met"] else "missed"
            out.append(f"- *{key}*: {now} here, but {'missed' if t['met'] else 'met'} with "
                       + "; ".join(f"*{f}*" for f in flipped) + " (see Sensitivity).")
    if not rows:
        return []
    if not out:
        return ["No sensitivity run below overturns any of these verdicts.", ""]
    return ["Verdicts the sensitivity runs overturn:", "", *out, ""]
