"""Predictions: the model version behind the registry alias, features computed server-side, one
decision per request.

The model is loaded once per version (verified against its signed, ledgered digest by the
registry) and re-resolved at most every ``ALIAS_TTL_SECONDS``, so a promotion reaches a running
service without a restart and a request never waits on MLflow.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from em_policy.features import (
    CIRCUIT_FEATURES,
    DEVICE_FEATURES,
    OBSERVABLE_FEATURES,
    circuit_row,
    parse_observable,
    parse_qasm,
)
from em_policy.policy import UNLIMITED_RATIO, PolicyModel
from orchestrator import metrics
from sdk.errors import QaiError

if TYPE_CHECKING:
    from harness.calibration import CalibrationSnapshot
    from orchestrator.services import Services

ALIAS_TTL_SECONDS = 5.0
FEATURE_CACHE_SIZE = 4096
MAX_SHOTS = 10**9  # per circuit; larger budgets than MAX_SHOTS x UNLIMITED_RATIO are refused, not overflowed
REP_DELAY_SECONDS = 250e-6  # the wait between shots on IBM-style devices (their default rep_delay)
FEATURE_INPUT = CIRCUIT_FEATURES + DEVICE_FEATURES + OBSERVABLE_FEATURES


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    qasm: str | None = Field(default=None, description="The circuit, OpenQASM 2 or 3.")
    features: dict[str, float] | None = Field(
        default=None, description="Precomputed features instead of qasm: every feat_*, dev_* and obs_* input.")
    observable: dict[str, float] | None = Field(
        default=None, description="Pauli labels (qubit 0 rightmost) to coefficients; default Z on every qubit.")
    backend_id: str | None = Field(default=None, description="Predict for this backend's latest calibration.")
    calibration_snapshot_id: str | None = Field(default=None, description="Or for this calibration snapshot.")
    shots: int = Field(default=4000, description="Shots per circuit of the job.")
    shot_budget: int = Field(description="Total shots the job may spend; at least `shots`.")
    latency_budget_seconds: float | None = Field(default=None, description="Wall-clock limit for the executions.")


class Alternative(BaseModel):
    method: str
    params: dict[str, Any]
    probability: float
    expected_fidelity: float
    fidelity_std: float
    shot_multiplier: float
    within_budget: bool
    estimated_seconds: float | None


class Prediction(BaseModel):
    method: str
    params: dict[str, Any]
    shot_multiplier: float
    expected_fidelity: float
    confidence: float
    model_version: str
    calibration_snapshot_id: str
    estimated_shots: int
    estimated_seconds: float | None
    alternatives: list[Alternative]
    warnings: list[str]
    features: dict[str, float]


@dataclass(frozen=True)
class _OnSnapshot:
    """What a circuit gives on a calibration snapshot under one model, whatever the shots: its
    features, the model's row (features and history), range warnings, seconds per shot."""

    features: dict[str, float]
    row: dict[str, float]
    warnings: tuple[str, ...]
    seconds_per_shot: float


@dataclass
class _Loaded:
    version: str  # "name/number"
    model: PolicyModel
    resolved_at: float

    @property
    def number(self) -> int:
        return int(self.version.rsplit("/", 1)[1])


class PolicyService:
    def __init__(self, svc: Services, *, alias: str = "champion") -> None:
        self.svc = svc
        self.alias = alias
        self._loaded: _Loaded | None = None
        self._model_lock = threading.Lock()
        self._refreshing = threading.Lock()  # held while a background refresh runs
        self._lock = threading.Lock()  # the caches
        self._snapshots: dict[str, CalibrationSnapshot] = {}
        self._latest: dict[str, tuple[str, float]] = {}  # backend -> (latest snapshot id, when read)
        # Compiling a circuit for a device (the layout search) costs tens of ms; jobs resubmit the
        # same circuits, so features are remembered per (circuit, observable, snapshot).
        self._features: OrderedDict[tuple[str, str, str], dict[str, float]] = OrderedDict()
        # and what the model makes of them, the range check's refusal included: the scheduler asks
        # about one circuit on every backend for every job, and these checks were a fifth of it
        self._on_snapshot: OrderedDict[tuple[str, str, str, str], _OnSnapshot | QaiError] = OrderedDict()

    # --------------------------------------------------------------------------------------------- model

    def model(self) -> tuple[str, PolicyModel]:
        loaded = self._loaded
        if loaded is not None and time.monotonic() - loaded.resolved_at < ALIAS_TTL_SECONDS:
            return loaded.version, loaded.model
        if loaded is not None:
            # a model is loaded: ask the registry in the background (about 10 ms of MLflow, more to
            # load a new version) and answer with the loaded one meanwhile
            if self._refreshing.acquire(blocking=False):
                threading.Thread(target=self._refresh, daemon=True, name="em-policy-refresh").start()
            return loaded.version, loaded.model
        return self._resolve()

    def _refresh(self) -> None:
        try:
            self._resolve()
        except QaiError:
            pass  # the next request after the TTL tries again; until then the loaded model serves
        finally:
            self._refreshing.release()

    def _resolve(self) -> tuple[str, PolicyModel]:
        with self._model_lock:
            loaded = self._loaded  # another thread may have refreshed it while this one waited
            if loaded is not None and time.monotonic() - loaded.resolved_at < ALIAS_TTL_SECONDS:
                return loaded.version, loaded.model
            from em_policy import registry
            from em_policy.bundle import loads

            try:
                if loaded is not None and registry.points_at(self.svc, loaded.number, self.alias):
                    self._loaded = _Loaded(loaded.version, loaded.model, time.monotonic())
                    return loaded.version, loaded.model
                mv = registry.resolve(self.svc, self.alias)
            except QaiError as err:
                if loaded is not None and err.code == "em_policy.registry_error":
                    # the registry is down: keep serving the verified model, ask again after the TTL
                    self._loaded = _Loaded(loaded.version, loaded.model, time.monotonic())
                    return loaded.version, loaded.model
                raise
            version = f"{mv.name}/{mv.version}"
            if loaded is not None and loaded.version == version:
                self._loaded = _Loaded(version, loaded.model, time.monotonic())
            else:
                self._loaded = _Loaded(version, loads(registry.load_bundle(self.svc, mv)), time.monotonic())
            return self._loaded.version, self._loaded.model

    def ready(self, req: PredictRequest) -> bool:
        """Whether ``req`` can be answered from memory alone (no DB, MLflow or compilation): a model is
        loaded (refreshes run in the background), the snapshot is known and so is the circuit."""
        if self._loaded is None:
            return False
        if req.backend_id is not None:
            latest = self._latest.get(req.backend_id)
            snapshot_id = latest[0] if latest and time.monotonic() - latest[1] < ALIAS_TTL_SECONDS else None
        else:
            snapshot_id = req.calibration_snapshot_id
        if snapshot_id is None or snapshot_id not in self._snapshots:
            return False
        return req.qasm is None or self._feature_key(req, snapshot_id) in self._features

    # ------------------------------------------------------------------------------------------ snapshot

    def snapshot(self, backend_id: str | None, snapshot_id: str | None) -> CalibrationSnapshot:
        from harness.backends import get_snapshot, latest_snapshot_id
        from harness.calibration import pinned

        if bool(backend_id) == bool(snapshot_id):
            raise QaiError("em_policy.bad_request", "give exactly one of backend_id and calibration_snapshot_id",
                           status=422)
        if backend_id:
            latest = self._latest.get(backend_id)
            if latest is not None and time.monotonic() - latest[1] < ALIAS_TTL_SECONDS:
                snapshot_id = latest[0]
            else:
                snapshot_id = latest_snapshot_id(self.svc.db, backend_id)  # backends.unknown_backend (404)
                if not snapshot_id:
                    raise QaiError("em_policy.no_calibration", f"{backend_id} has no calibration snapshot",
                                   status=409)
                self._latest[backend_id] = (snapshot_id, time.monotonic())
        assert snapshot_id is not None
        snap = self._snapshots.get(snapshot_id)
        if snap is None:
            snap = pinned(get_snapshot(self.svc.db, snapshot_id))  # calibration.not_found (404)
            self._snapshots[snapshot_id] = snap
        return snap

    @staticmethod
    def _feature_key(req: PredictRequest, snapshot_id: str) -> tuple[str, str, str]:
        observable = "null" if req.observable is None else json.dumps(req.observable, sort_keys=True)
        return hashlib.sha256((req.qasm or "").encode()).hexdigest(), observable, snapshot_id

    def features(self, req: PredictRequest, snap: CalibrationSnapshot) -> dict[str, float]:
        if req.qasm is None or req.features is not None:
            return request_features(req, snap)  # checks that exactly one is given
        key = self._feature_key(req, snap.id)
        with self._lock:
            hit = self._features.get(key)
            if hit is not None:
                self._features.move_to_end(key)
                return dict(hit)
        features = request_features(req, snap)
        with self._lock:
            self._features[key] = dict(features)
            while len(self._features) > FEATURE_CACHE_SIZE:
                self._features.popitem(last=False)
        return features

    # ---------------------------------------------------------------------------------------- predicting

    def predict(self, request: PredictRequest) -> Prediction:
        return self.predict_many([request])[0]

    def predict_many(self, requests: Sequence[PredictRequest]) -> list[Prediction]:
        """One prediction per request; the first request that cannot be answered raises its error."""
        out = []
        for p in self.predict_each(requests):
            if isinstance(p, QaiError):
                raise p
            out.append(p)
        return out

    def predict_each(self, requests: Sequence[PredictRequest], *, server_errors_each: bool = False
                     ) -> list[Prediction | QaiError]:
        """One prediction, or the error that refuses it, per request: the model runs once over the
        requests it can answer (the scheduler asks about one circuit on many backends at once, and
        some of them may not fit). An error that is not the request's (no model) still raises; so
        does a server-side one met on a request (a snapshot that cannot be read, say), unless
        ``server_errors_each``, which answers it in that request's place (the REST batch)."""
        return [p if isinstance(p, QaiError) else Prediction.model_validate(p)
                for p in self.predict_each_plain(requests, server_errors_each=server_errors_each)]

    def predict_each_plain(self, requests: Sequence[PredictRequest], *, server_errors_each: bool = False,
                           alternatives: bool = True, features: bool = True) -> list[dict[str, Any] | QaiError]:
        """:meth:`predict_each` with each prediction as the plain dict :class:`Prediction` validates,
        for a caller in this process that reads it as a dict anyway: the scheduler, whose 34-50
        predictions per decision cost 0.5 ms of validation (a test holds that validating one
        changes nothing in it). Each prediction's ``params`` is its own dict; the values inside
        (lists of scale factors) are shared between predictions: nothing mutates them.

        Without ``alternatives`` or ``features`` a prediction lacks that key (so it is no longer
        a whole :class:`Prediction`) and everything else in it is the same: the scheduler reads
        neither (the alternatives only when it may co-select methods). Leaving both out took a
        decision's 50 requests from 4.8-6.5 to 4.0-5.6 ms (alternated call by call, a slow phase)."""
        version, model = self.model()
        rows: list[dict[str, float]] = []
        ratios: list[float] = []
        notes: list[list[str]] = []
        outside: list[bool] = []
        contexts = []
        results: list[dict[str, Any] | QaiError | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                row, ratio, warnings, out_of_range, context = self._prepare(req, version, model)
            except QaiError as err:
                # a server-side error is not the request's, except a snapshot that no longer matches
                # its id: that one backend's calibration is unusable, the others are not
                metrics.POLICY_REFUSED.labels(err.code).inc()
                if err.status >= 500 and err.code != "calibration.id_mismatch" and not server_errors_each:
                    raise
                # Without its traceback: the traceback holds this frame, whose locals hold the
                # results, so every request, prediction and alternative of the call would be left
                # to the cycle collector (1,400 objects a decision, 2 ms of gen-1 collection every
                # third) instead of being freed on return.
                results[i] = err.with_traceback(None)
                continue
            rows.append(row)
            ratios.append(ratio)
            notes.append(warnings)
            outside.append(out_of_range)
            contexts.append((i, *context))
        decisions = model.decide(rows, ratios, notes, outside, alternatives=alternatives) if rows else []
        params: dict[str, dict[str, Any]] = {}

        def params_of(method: str) -> dict[str, Any]:  # one parse per method, not per backend
            if method not in params:
                params[method] = method_params(method, model, version)
            return dict(params[method])
        chosen: Counter[str] = Counter()
        for d, (i, req, snap, on_features, sps) in zip(decisions, contexts, strict=True):
            chosen[d.method] += 1
            shots = math.ceil(req.shots * d.shot_multiplier)
            # every value already of its field's type (floats from tolist, the shots an int), so
            # that Prediction's validation has nothing to convert
            result: dict[str, Any] = {
                "method": d.method, "params": params_of(d.method), "shot_multiplier": d.shot_multiplier,
                "expected_fidelity": d.expected_fidelity, "confidence": d.confidence, "model_version": version,
                "calibration_snapshot_id": snap.id, "estimated_shots": shots, "estimated_seconds": shots * sps,
                "warnings": d.warnings}
            if alternatives:
                result["alternatives"] = [{**a, "params": params_of(a["method"]),
                                           "estimated_seconds": math.ceil(req.shots * a["shot_multiplier"]) * sps}
                                          for a in d.alternatives]
            if features:
                result["features"] = dict(on_features)
            results[i] = result
        for method, count in chosen.items():
            metrics.POLICY_PREDICTIONS.labels(method).inc(count)
        metrics.observe_many(metrics.POLICY_SHOT_MULTIPLIER, [d.shot_multiplier for d in decisions])
        metrics.observe_many(metrics.POLICY_EXPECTED_FIDELITY, [d.expected_fidelity for d in decisions])
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _prepare(self, req: PredictRequest, version: str, model: PolicyModel
                 ) -> tuple[dict[str, float], float, list[str], bool,
                            tuple[PredictRequest, CalibrationSnapshot, dict[str, float], float]]:
        """A request's model row, budget ratio, warnings and whether its features lie outside the
        training range (the latency warning below is not that), or the error that refuses it."""
        snap = self.snapshot(req.backend_id, req.calibration_snapshot_id)
        check_snapshot(model, snap)
        ratio = budget_ratio(req.shots, req.shot_budget)
        on = self._circuit_on(req, snap, version, model)
        warnings = list(on.warnings)
        out_of_range = bool(warnings)
        if req.latency_budget_seconds is not None:
            if not (math.isfinite(req.latency_budget_seconds) and 0 < req.latency_budget_seconds <= 1e9):
                raise QaiError("em_policy.invalid_budget", "latency_budget_seconds must be positive", status=422)
            cap = req.latency_budget_seconds / (req.shots * on.seconds_per_shot)
            if cap < 1:
                warnings.append(f"even the unmitigated run (about {req.shots * on.seconds_per_shot:.3g} s) exceeds "
                                "the latency budget")
            ratio = max(1.0, min(ratio, cap))
        # the remembered row and features, read only (a prediction that carries the features gets its own copy)
        return on.row, ratio, warnings, out_of_range, (req, snap, on.features, on.seconds_per_shot)

    def _circuit_on(self, req: PredictRequest, snap: CalibrationSnapshot, version: str,
                    model: PolicyModel) -> _OnSnapshot:
        """:class:`_OnSnapshot` for ``req``'s circuit, remembered per (model version, circuit,
        observable, snapshot) when the circuit came as QASM, a refusal too (raised afresh each time:
        one exception object raised again would pile up tracebacks). Pure functions of that key, so
        a remembered answer is the computed one, bit for bit."""
        key = (version, *self._feature_key(req, snap.id)) if req.qasm is not None and req.features is None else None
        if key is not None:
            with self._lock:
                hit = self._on_snapshot.get(key)
                if hit is not None:
                    self._on_snapshot.move_to_end(key)
            if isinstance(hit, QaiError):
                raise QaiError(hit.code, hit.message, status=hit.status, details=hit.details)
            if hit is not None:
                return hit
        try:
            features = self.features(req, snap)
            if features["feat_num_qubits"] > snap.num_qubits:
                raise QaiError("em_policy.circuit_too_large", f"{features['feat_num_qubits']:g} qubits do not fit "
                               f"{snap.backend_id} ({snap.num_qubits})", status=422)
            warnings = model.range_check(features)
            found: _OnSnapshot | QaiError = _OnSnapshot(features, model.with_history(features, snap.id),
                                                        tuple(warnings), shot_seconds(snap, features))
        except QaiError as err:
            if err.status >= 500:
                raise  # the server's trouble, not the request's: ask again next time
            found = err.with_traceback(None)  # remembered without the frames it was raised in
        if key is not None:
            with self._lock:
                self._on_snapshot[key] = found
                while len(self._on_snapshot) > FEATURE_CACHE_SIZE:
                    self._on_snapshot.popitem(last=False)
        if isinstance(found, QaiError):
            raise QaiError(found.code, found.message, status=found.status, details=found.details)
        return found


def budget_ratio(shots: int, shot_budget: int) -> float:
    if not 0 < shots <= MAX_SHOTS:
        raise QaiError("em_policy.invalid_budget", f"shots must be within 1..{MAX_SHOTS}, got {shots}", status=422)
    if shot_budget > MAX_SHOTS * UNLIMITED_RATIO:
        raise QaiError("em_policy.invalid_budget", f"shot_budget must be at most {MAX_SHOTS * UNLIMITED_RATIO:.0f}",
                       status=422)
    if shot_budget < 0:
        raise QaiError("em_policy.invalid_budget", f"shot_budget must not be negative, got {shot_budget}", status=422)
    if shot_budget < shots:
        raise QaiError("em_policy.invalid_budget", f"shot_budget {shot_budget} is below the job's own {shots} shots",
                       status=422)
    return min(shot_budget / shots, UNLIMITED_RATIO)


def check_snapshot(model: PolicyModel, snap: CalibrationSnapshot) -> None:
    since = datetime.fromisoformat(model.metadata["supports_snapshots_since"])
    created = snap.created_at if snap.created_at.tzinfo else snap.created_at.replace(tzinfo=UTC)
    if created < since:
        raise QaiError("em_policy.snapshot_unsupported",
                       f"calibration snapshot {snap.id} ({created.date()}) is older than this model supports "
                       f"(from {since.date()})", status=422,
                       details={"calibration_snapshot_id": snap.id, "supports_snapshots_since": since.isoformat()})


def request_features(req: PredictRequest, snap: CalibrationSnapshot) -> dict[str, float]:
    if (req.qasm is None) == (req.features is None):
        raise QaiError("em_policy.bad_request", "give exactly one of qasm and features", status=422)
    if req.qasm is not None:
        circuit = parse_qasm(req.qasm)
        op = parse_observable(req.observable, circuit.num_qubits)
        return circuit_row(circuit, op, snap)
    assert req.features is not None
    missing = [k for k in FEATURE_INPUT if k not in req.features]
    unknown = sorted(set(req.features) - set(FEATURE_INPUT) - {"obs_min", "obs_max", "obs_norm", "obs_identity"})
    if missing or unknown:
        raise QaiError("em_policy.bad_features", "features must hold exactly the model's inputs", status=422,
                       details={"missing": missing, "unknown": unknown, "expected": list(FEATURE_INPUT)})
    bad = [k for k, v in req.features.items() if not math.isfinite(float(v))]
    if bad:
        raise QaiError("em_policy.bad_features", f"features {bad} are not finite", status=422)
    return {k: float(v) for k, v in req.features.items()}


def shot_seconds(snap: CalibrationSnapshot, features: Mapping[str, float]) -> float:
    """Wall-clock per shot: the circuit's compiled depth at the device's median 2-qubit gate time,
    one readout and the repetition delay (an estimate; queue wait is the scheduler's business)."""
    gate, readout_s = _shot_times(snap)
    return float(features["feat_transpiled_depth"]) * gate + readout_s + REP_DELAY_SECONDS


_SHOT_TIMES: dict[str, tuple[float, float]] = {}  # snapshot id -> (median 2q gate s, median readout s)


def _shot_times(snap: CalibrationSnapshot) -> tuple[float, float]:
    """The snapshot's median 2-qubit gate time and readout length, once per snapshot: a scheduling
    decision asks for every backend's, and the medians over a 127-qubit device's gates are not free.
    Keyed by id, which is derived from the snapshot's content."""
    import statistics

    from harness.calibration import PinnedSnapshot

    # only a pinned snapshot's id is cheap (an unpinned one hashes the whole calibration per access)
    key = snap.id if isinstance(snap, PinnedSnapshot) else None
    hit = _SHOT_TIMES.get(key) if key is not None else None
    if hit is None:
        durations = [v.get("duration", 0.0) for v in snap.gates.get(snap.two_qubit_gate, {}).values()]
        gate = statistics.median(durations) if durations else 500e-9
        readout = snap.raw_metrics.get("readout_length")
        readout_s = statistics.median(readout) if isinstance(readout, list) and readout else 1e-6
        hit = (float(gate), float(readout_s))
        if key is not None:
            if len(_SHOT_TIMES) >= 4096:  # a bound, not an LRU: snapshots arrive a few per backend per day
                _SHOT_TIMES.clear()
            _SHOT_TIMES[key] = hit
    return hit


def method_params(method: str, model: PolicyModel, version: str) -> dict[str, Any]:
    if method == "ml-qem":
        meta = model.metadata
        return {"model_version": version, "kind": meta["mlqem"]["kind"],
                "amortized_training_shots": meta["amortized_training_shots"],
                "training_shots": meta["training_shots"]}
    from harness.methods import parse_method

    return parse_method(method).parameters()
