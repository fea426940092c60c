"""The worker: run a dispatched job as its decision chose, store and sign its result.

One job, one attempt at a time (see ``scheduler.dispatch`` for the queue, leases and recovery):

1. **claim**: a guarded ``queued → running`` with a fresh lease (fencing token, attempt number,
   expiry) in ``job_runs``; a delivery that loses it (cancelled, finished, taken) is dropped;
2. **load**: the signed decision (``scheduler.service.load_decision``: ledger entry, object and
   signatures checked) must be about this job and this manifest; the manifest is read back from
   its stored envelope and checked against its digest;
3. **execute** (:func:`execute`): the circuit's unitary part, compiled for the chosen calibration
   snapshot exactly as the harness and the EM policy compile it, measured on the observable Z⊗…⊗Z
   (the policy's default) with the chosen EM method and parameters, through the chosen backend's
   adapter (its vendor API from ``worker_vendor_urls``, else the local Aer simulator of the
   snapshot: the reference every adapter matches). The seed comes from the manifest, so a retry
   measures the same counts;
4. **finish** (:func:`finish`): the histograms and a Parquet file of the rows go to the object
   store (content-addressed, write-once); a result record referencing the job, the manifest
   digest, the decision, the snapshot, the EM method and every file's digest is signed by the
   system key ``qai.worker`` as a DSSE envelope (``application/vnd.qai.job-result.v1+json``) and
   stored write-once; then, in **one transaction** (a ``LedgerWrite``), the ledger entry
   (``em-result``), the ``job_results`` and ``em_results`` rows, the attempt's outcome and the
   final status. That transaction is fenced by the lease: a worker that lost its lease commits
   nothing.

While it works, a :class:`LeaseKeeper` renews the lease every third of ``worker_lease_seconds``;
a failed renewal (the reaper took the job) stops the attempt at its next execution. A job that
fails on its own content (a bad circuit, a calibration mismatch, an adapter giving up) is
``failed`` with that error's code and a signed record; an infrastructure fault (database, object
store, KMS) puts it back on the queue while attempts remain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import BigInteger, Integer, String, Table, Text, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, Session, mapped_column

from orchestrator.db import Base, UTCDateTime, insert_rows, utcnow
from scheduler.dispatch import (
    JOB_ATTEMPTS,
    JOB_RUNS,
    JobAttemptRow,
    JobQueue,
    JobRunRow,
    affected,
    deliver,
    job_queue,
)
from sdk.canonical import canonical_json
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, LedgerEntry, sha256_hex

if TYPE_CHECKING:
    from harness.calibration import CalibrationSnapshot
    from harness.execution import ExecutionRequest, ExecutionResult
    from harness.methods import Method
    from harness.tasks import Task
    from orchestrator.services import Services
    from sdk.manifest import RunManifest

log = logging.getLogger(__name__)

RESULT_PAYLOAD_TYPE = "application/vnd.qai.job-result.v1+json"
RESULT_STATEMENT = "qai.job-result.v1"
RESULT_ENTRY_TYPE: Literal["em-result"] = "em-result"
WORKER_KEY = "qai.worker"
MAINTENANCE_LOCK = "dispatch-maintenance"
MAINTENANCE_BATCH = 200
VENDOR_ADAPTERS = ("ibm-like", "braket-like")
ADAPTER_JOB_TIMEOUT = 300.0  # one vendor submission's limit, within the job's own
JOB_RESULT_NAMESPACE = uuid.UUID("8c4f0c43-2f0e-4d59-9f57-3f5d0f6c1a27")
RESULT_FIELDS = ("observable", "method", "shots", "noisy", "mitigated", "mitigated_raw", "ideal", "abs_error",
                 "unmitigated_fidelity", "mitigated_fidelity", "shot_multiplier", "simulation_method", "status",
                 "error_code")
Status = Literal["completed", "failed"]


class JobResultRow(Base):
    """A finished job's signed result record (append-only, like the ledger it points into)."""

    __tablename__ = "job_results"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(36))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    backend_id: Mapped[str] = mapped_column(String(128))
    calibration_snapshot_id: Mapped[str | None] = mapped_column(String(192), nullable=True)
    em_method: Mapped[str] = mapped_column(String(64))
    adapter: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    histogram_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    parquet_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    record_path: Mapped[str] = mapped_column(String(512))
    record_sha256: Mapped[str] = mapped_column(String(64))
    ledger_index: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


JOB_RESULTS = cast(Table, JobResultRow.__table__)


# ------------------------------------------------------------------------------------------ leases


@dataclass(frozen=True)
class Claim:
    """One attempt's lease on a job: every write of the attempt is fenced by ``token``."""

    job_id: str
    decision_id: str
    priority_class: str
    attempt: int
    max_attempts: int
    token: str
    worker_id: str
    backend_id: str
    em_method: str


class LeaseLost(QaiError):
    def __init__(self, claim: Claim) -> None:
        super().__init__("worker.lease_lost", f"attempt {claim.attempt} of job {claim.job_id} no longer holds "
                         "its lease", status=409, details={"job_id": claim.job_id, "attempt": claim.attempt})


def _manifests() -> Table:
    from orchestrator.jobs import MANIFESTS

    return MANIFESTS


def claim_job(svc: Services, job_id: str, worker_id: str) -> Claim | None:
    """Take a queued job: ``queued → running`` and a new lease, or None if the job is not queued
    (cancelled, finished, or claimed by another worker)."""
    manifests = _manifests()
    token, now = secrets.token_hex(16), utcnow()
    with svc.db.write() as s:
        moved = affected(s, update(manifests).where(manifests.c.job_id == job_id, manifests.c.status == "queued")
                         .values(status="running"))
        if moved != 1:
            return None
        run = s.get(JobRunRow, job_id)
        if run is None:  # dispatch writes both in one transaction: this is a database edited by hand
            raise QaiError("worker.no_run", f"queued job {job_id} has no dispatch record", status=500)
        run.attempt += 1
        run.lease_token, run.worker_id, run.started_at = token, worker_id, now
        run.lease_expires_at = now + timedelta(seconds=svc.settings.worker_lease_seconds)
        s.add(JobAttemptRow(job_id=job_id, attempt=run.attempt, worker_id=worker_id, started_at=now))
        return Claim(job_id=job_id, decision_id=run.decision_id, priority_class=run.priority_class,
                     attempt=run.attempt, max_attempts=run.max_attempts, token=token, worker_id=worker_id,
                     backend_id=run.backend_id, em_method=run.em_method)


def renew(svc: Services, claim: Claim) -> bool:
    """Extend the lease; False if it is no longer this attempt's."""
    expires = utcnow() + timedelta(seconds=svc.settings.worker_lease_seconds)
    with svc.db.write() as s:
        return affected(s, update(JOB_RUNS).where(*_lease(claim)).values(lease_expires_at=expires)) == 1


def _lease(claim: Claim) -> tuple[Any, ...]:
    c = JOB_RUNS.c
    return c.job_id == claim.job_id, c.attempt == claim.attempt, c.lease_token == claim.token


def _fence(session: Session | Connection, claim: Claim, *, expired: bool, now: datetime,
           values: Mapping[str, Any]) -> None:
    """Update the job's run row if ``claim`` still holds the lease (and, for the reaper, only if it
    expired); else raise :class:`LeaseLost` and let the transaction roll back."""
    q = update(JOB_RUNS).where(*_lease(claim))
    if expired:
        q = q.where(JOB_RUNS.c.lease_expires_at < now)
    if affected(session, q.values(**values)) != 1:
        raise LeaseLost(claim)


def _move(session: Session | Connection, job_id: str, to: str) -> None:
    manifests = _manifests()
    moved = affected(session, update(manifests).where(manifests.c.job_id == job_id,
                                                      manifests.c.status == "running").values(status=to))
    if moved != 1:  # the lease says it runs: a status changed behind the lease's back
        raise QaiError("worker.bad_status", f"job {job_id} is not running", status=409, details={"job_id": job_id})


def _end_attempt(session: Session | Connection, claim: Claim, now: datetime, outcome: str, code: str | None) -> None:
    session.execute(update(JOB_ATTEMPTS).where(JOB_ATTEMPTS.c.job_id == claim.job_id,
                                               JOB_ATTEMPTS.c.attempt == claim.attempt)
                    .values(ended_at=now, outcome=outcome, error_code=code))


def requeue(svc: Services, claim: Claim, *, expired: bool, outcome: str, code: str, message: str) -> bool:
    """Put the job back: ``running → queued``, the lease dropped, then onto the queue. False if the
    lease was no longer the claim's (someone else moved the job on)."""
    now = utcnow()
    try:
        with svc.db.write() as s:
            _fence(s, claim, expired=expired, now=now,
                   values={"lease_token": None, "lease_expires_at": None, "worker_id": None, "enqueued_at": now,
                           "error_code": code, "error_message": message[:2000]})
            _move(s, claim.job_id, "queued")
            _end_attempt(s, claim, now, outcome, code)
    except LeaseLost:
        return False
    deliver(svc, claim.job_id, claim.priority_class)
    return True


class Guard:
    """Stops an attempt that lost its lease or ran out of time: checked before every execution and
    in every wait of an adapter."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.reason: Literal["lease_lost", "timeout"] | None = None
        self._stopped = threading.Event()

    def abort(self, reason: Literal["lease_lost", "timeout"]) -> None:
        if self.reason is None:
            self.reason = reason
        self._stopped.set()

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        if self.reason is None and time.monotonic() >= self.deadline:
            self.abort("timeout")
        if self.reason is not None:
            raise QaiError(f"worker.{self.reason}", f"the attempt was stopped: {self.reason.replace('_', ' ')}",
                           status=409)

    def sleep(self, seconds: float) -> None:
        self._stopped.wait(min(max(0.0, seconds), self.remaining()))
        self.check()


class LeaseKeeper:
    """Renews a claim's lease on a thread until stopped; aborts the attempt if the lease is gone."""

    def __init__(self, svc: Services, claim: Claim, guard: Guard) -> None:
        self.svc, self.claim, self.guard = svc, claim, guard
        self.interval = svc.settings.worker_lease_seconds / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.job_id[:8]}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not renew(self.svc, self.claim):
                    log.warning("job %s attempt %d lost its lease", self.claim.job_id, self.claim.attempt)
                    self.guard.abort("lease_lost")
                    return
            except Exception as exc:  # the database blinked: try again; the lease outlasts a few misses
                log.warning("renewing the lease of job %s failed: %s", self.claim.job_id, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


# ----------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class JobContext:
    """What a result record references, read from the index."""

    job_id: str
    tenant: str
    manifest_sha256: str
    manifest_path: str
    decision_id: str
    decision_sha256: str
    decision_ledger_index: int


def job_context(svc: Services, job_id: str, decision_id: str) -> JobContext:
    from orchestrator.jobs import ManifestRow
    from scheduler.service import DecisionRow

    with svc.db.read() as s:
        row = s.get(ManifestRow, job_id)
        decision = s.get(DecisionRow, decision_id)
        if row is None or decision is None or decision.job_id != job_id:
            raise QaiError("worker.decision_mismatch", f"decision {decision_id} is not about job {job_id}", status=409,
                           details={"job_id": job_id, "decision_id": decision_id})
        return JobContext(job_id, row.tenant, row.envelope_sha256, row.s3_path, decision_id, decision.decision_sha256,
                          decision.ledger_index)


def load_manifest(svc: Services, job_id: str) -> RunManifest:
    """The job's manifest from its stored envelope (outbox or object store), checked against its digest.
    Its signatures were verified at ingest; the digest ties these bytes to that verification."""
    from orchestrator.jobs import ManifestRow
    from sdk.dsse import parse_envelope
    from sdk.manifest import RunManifest

    with svc.db.read() as s:
        row = s.get(ManifestRow, job_id)
        if row is None:
            raise QaiError("job.not_found", f"no job {job_id}", status=404, details={"job_id": job_id})
        data, digest, path = row.envelope, row.envelope_sha256, row.s3_path
    if data is None:
        data = svc.objects.get(path)
    if sha256_hex(data) != digest:
        raise QaiError("job.corrupt", f"the stored envelope of job {job_id} does not match its index", status=500,
                       details={"job_id": job_id})
    return RunManifest.model_validate_json(parse_envelope(data).payload_bytes())


def load_chosen(svc: Services, job_id: str, decision_id: str) -> dict[str, Any]:
    """The decision's ``chosen`` object from the **signed** decision: the queue and the dispatch row
    are not trusted for what to run. The decision must be about this job and its stored manifest."""
    from scheduler.service import load_decision

    document = load_decision(svc, decision_id)
    ctx = job_context(svc, job_id, decision_id)
    recorded = (document.get("inputs") or {}).get("job") or {}
    chosen = (document.get("decision") or {}).get("chosen")
    if document.get("job_id") != job_id or recorded.get("manifest_sha256", ctx.manifest_sha256) != ctx.manifest_sha256:
        raise QaiError("worker.decision_mismatch", f"decision {decision_id} was not taken for this manifest of job "
                       f"{job_id}", status=409, details={"job_id": job_id, "decision_id": decision_id})
    if not isinstance(chosen, dict):
        raise QaiError("worker.decision_mismatch", f"decision {decision_id} chose no backend", status=409,
                       details={"decision_id": decision_id})
    return chosen


# ---------------------------------------------------------------------------------------- executing


@dataclass(frozen=True)
class Outcome:
    """What an attempt produced: the job's final status, its rows and histogram, or why it failed."""

    status: Status
    execution: dict[str, Any] | None = None  # what ran, as the record states it
    rows: list[dict[str, Any]] = field(default_factory=list)
    histogram: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempt_outcome: str | None = None  # the attempt's own outcome when it is not the status (lost, timeout)

    @classmethod
    def failed(cls, code: str, message: str, **kw: Any) -> Outcome:
        return cls("failed", error_code=code, error_message=message[:2000], **kw)


@dataclass(frozen=True)
class Plan:
    task: Task
    snapshot: CalibrationSnapshot
    backend_adapter: str  # the backend's adapter kind (catalog capability)
    observable: str


def method_for(svc: Services, chosen: Mapping[str, Any]) -> Method:
    """The chosen EM method with its parameters (ZNE scale factors; ml-qem's model version)."""
    from harness.methods import parse_method

    name = str(chosen.get("em_method") or "")
    params = chosen.get("em_params") or {}
    if name == "ml-qem":
        return _mlqem(svc, str(params.get("model_version") or ""))
    method = parse_method(name)
    factors = params.get("scale_factors")
    if method.kind == "zne" and factors and tuple(float(f) for f in factors) != method.scale_factors:
        method = parse_method(f"{name}@{','.join(repr(float(f)) for f in factors)}")
    return method


def _mlqem(svc: Services, version: str) -> Method:
    """ml-qem bound to the model version the decision recorded, its bundle checked against its
    signed statement and cached on local disk (``bind_model`` reads a file)."""
    from em_policy.registry import load_bundle, resolve
    from harness.methods import Method, bind_model
    from harness.service import write_atomically

    name, _, number = version.rpartition("/")
    if not name or not number:
        raise QaiError("worker.method_unavailable", f"ml-qem needs a model version name/number, got {version!r}",
                       status=422)
    mv = resolve(svc, number, name)
    path = svc.settings.home / "worker" / "ml-qem" / f"{mv.sha256}.zip"
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != mv.sha256:
        data = load_bundle(svc, mv)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(str(path), data)
    return bind_model(Method("ml-qem"), str(path), version)


def plan_job(svc: Services, job_id: str, manifest: RunManifest, chosen: Mapping[str, Any]) -> Plan:
    """The harness task for the job: its circuit on the chosen snapshot with the chosen method."""
    from em_policy.features import parse_observable, parse_qasm, unitary_part
    from harness.backends import get_snapshot
    from harness.circuits import CircuitSpec
    from harness.models import BackendRow
    from harness.tasks import Task
    from scheduler.service import circuit_qasm

    backend_id = str(chosen.get("backend_id") or "")
    snap = get_snapshot(svc.db, str(chosen.get("calibration_snapshot_id") or ""))
    if snap.backend_id != backend_id:
        raise QaiError("worker.decision_mismatch", f"snapshot {snap.id} is not of backend {backend_id}", status=409)
    with svc.db.read() as s:
        backend = s.get(BackendRow, backend_id)
        if backend is None:
            raise QaiError("backends.unknown_backend", f"backend {backend_id!r} is not registered", status=404)
        kind = str(backend.capabilities.get("adapter", "local-aer"))
        capabilities = dict(backend.capabilities)
    _check_crypto(svc, job_id, manifest, backend_id, capabilities)
    circuit = unitary_part(parse_qasm(circuit_qasm(svc, manifest)))
    if circuit.num_qubits > snap.num_qubits:
        raise QaiError("worker.circuit_too_large", f"{circuit.num_qubits} qubits do not fit {backend_id} "
                       f"({snap.num_qubits})", status=422)
    label = "Z" * circuit.num_qubits  # the EM policy's default observable: what the decision predicted for
    spec = CircuitSpec(circuit_id=f"job-{job_id}", family="user", variant="qasm", num_qubits=circuit.num_qubits,
                       depth=0, seed=manifest.seed, circuit=circuit,
                       observables={label: parse_observable(None, circuit.num_qubits)}, params={})
    task = Task(spec, snap, (method_for(svc, chosen),), manifest.shots, manifest.seed)
    return Plan(task=task, snapshot=snap, backend_adapter=kind, observable=label)


def _check_crypto(svc: Services, job_id: str, manifest: RunManifest, backend_id: str,
                  capabilities: Mapping[str, Any]) -> None:
    """The chosen backend as registered now against the job's crypto mode and its tenant's crypto
    policy: a backend whose link lost a mode since the decision counts as a crypto-policy violation
    (``qai_scheduler_crypto_violations_total{stage="dispatch"}``, expected 0). Counted and logged."""
    from orchestrator import metrics
    from orchestrator.auth import get_tenant
    from scheduler.plugins import crypto_violations

    policy = get_tenant(svc.db, manifest.tenant).crypto_policy or {}
    job = {"crypto_mode": manifest.crypto_mode, "backend_id": manifest.backend_id}
    found = crypto_violations(job, {"backend_id": backend_id, "capabilities": capabilities}, policy)
    if found:
        metrics.SCHEDULER_CRYPTO_VIOLATIONS.labels("dispatch").inc()
        log.error("job %s runs on %s, which fails the crypto requirements: %s", job_id, backend_id, "; ".join(found))


def make_runner(svc: Services, plan: Plan, guard: Guard
                ) -> tuple[str, Callable[[ExecutionRequest], ExecutionResult], Callable[[], None]]:
    """(adapter name, a runner of one execution through it, closing it). The backend's vendor API when
    ``worker_vendor_urls`` names one for its adapter kind; else the local Aer adapter on the snapshot."""
    from harness.adapters import RetryPolicy, make_adapter
    from harness.adapters import execute as run_on_adapter

    kind, urls = plan.backend_adapter, svc.settings.worker_vendor_urls
    if kind in VENDOR_ADAPTERS and urls.get(kind):
        token = svc.settings.worker_vendor_tokens.get(kind)
        adapter = make_adapter(kind, url=urls[kind], token=token.get_secret_value() if token else None)
    else:
        adapter = make_adapter("local-aer", snapshots={plan.snapshot.id: plan.snapshot})

    def run(request: ExecutionRequest) -> ExecutionResult:
        guard.check()
        policy = RetryPolicy(job_timeout=max(1e-3, min(ADAPTER_JOB_TIMEOUT, guard.remaining())))
        return run_on_adapter(adapter, request, policy, sleep=guard.sleep)

    return adapter.name, run, adapter.close


def execute(svc: Services, job_id: str, decision_id: str, chosen: Mapping[str, Any], *,
            guard: Guard | None = None) -> Outcome:
    """Run ``job_id`` as ``chosen`` says and return its outcome; writes nothing.

    Errors of the job's own making (status < 500) become a failed outcome; infrastructure errors
    raise, so the caller can retry the attempt. Raises ``worker.lease_lost`` when ``guard`` says so.
    """
    from harness.tasks import run_task

    guard = guard or Guard(svc.settings.worker_job_timeout_seconds)
    try:
        manifest = load_manifest(svc, job_id)
        plan = plan_job(svc, job_id, manifest, chosen)
    except QaiError as exc:
        if exc.status >= 500:
            raise
        return Outcome.failed(exc.code, exc.message)
    method = plan.task.methods[0]
    adapter, runner, close = make_runner(svc, plan, guard)
    execution = {"backend_id": plan.snapshot.backend_id, "calibration_snapshot_id": plan.snapshot.id,
                 "em_method": method.name, "em_params": method.parameters(), "adapter": adapter,
                 "backend_adapter": plan.backend_adapter, "shots": manifest.shots, "seed": manifest.seed,
                 "observable": plan.observable}
    try:
        output = run_task(plan.task, runner)
    except QaiError as exc:  # compilation or the ideal values: the circuit's doing
        return Outcome.failed(exc.code, exc.message, execution=execution)
    except Exception as exc:  # e.g. a transpiler error on this circuit: retrying would repeat it
        return Outcome.failed("worker.execution_failed", f"{type(exc).__name__}: {str(exc)[:500]}",
                              execution=execution)
    finally:
        close()
    if guard.reason == "lease_lost":
        raise QaiError("worker.lease_lost", f"job {job_id} was taken from this worker", status=409)
    execution["vendor_submissions"] = output.attempts
    rows = [dict(r, job_id=job_id) for r in output.rows]
    histogram = _job_histogram(output.histogram, job_id, decision_id)
    if guard.reason == "timeout":
        count_backend_run(plan.snapshot.backend_id, ok=False)
        return Outcome.failed("worker.timeout", f"job {job_id} ran past {svc.settings.worker_job_timeout_seconds:g}s",
                              execution=execution, rows=rows, histogram=histogram, attempt_outcome="timeout")
    failed = [r for r in rows if r["status"] != "ok"]
    count_backend_run(plan.snapshot.backend_id, ok=not failed)
    if failed:
        message = output.failures[0]["message"] if output.failures else "an execution failed"
        return Outcome.failed(str(failed[0]["error_code"]), message, execution=execution, rows=rows,
                              histogram=histogram)
    return Outcome("completed", execution=execution, rows=rows, histogram=histogram)


def count_backend_run(backend_id: str, *, ok: bool) -> None:
    """``qai_backend_runs_total``: one per attempt whose executions went through the backend's
    adapter. ``error`` covers what the backend's side caused: an execution the adapter gave up on,
    or the attempt running out of time there. Not counted: a job refused before any execution (bad
    method, mismatched decision), a circuit that fails to compile (the job's doing, not the
    backend's) and an attempt whose lease was lost (it was stopped by us). ``backend_id`` is the
    registered backend's catalog id: a bounded label."""
    from orchestrator import metrics

    for outcome in ("ok", "error"):  # both series from a backend's first run: rate() then sees its first error
        metrics.BACKEND_RUNS.labels(backend_id, outcome)
    metrics.BACKEND_RUNS.labels(backend_id, "ok" if ok else "error").inc()


def _job_histogram(data: bytes, job_id: str, decision_id: str) -> bytes:
    """The harness's histogram document, keyed by the job and its decision rather than the
    harness's task id."""
    return canonical_json({**json.loads(data), "job_id": job_id, "decision_id": decision_id})


# ---------------------------------------------------------------------------------------- finishing


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: Status
    attempt: int
    record_path: str
    record_sha256: str
    ledger_index: int
    error_code: str | None


def worker_key(svc: Services) -> str:
    """The system tenant's key that signs result records, created on first use."""
    from orchestrator.ledger import system_signing_key

    return system_signing_key(svc.db, svc.kms, WORKER_KEY, suite=svc.settings.ledger_suite, subject="worker",
                              error_code="worker.bad_key")


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float) or hasattr(value, "__float__"):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


def _result_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _plain(row.get(k)) for k in RESULT_FIELDS}
    out["parameters"] = json.loads(row["parameters"]) if isinstance(row.get("parameters"), str) else {}
    return out


def _objects(job_id: str, outcome: Outcome) -> list[tuple[str, str, bytes]]:
    """(kind, path, bytes) of the files a result references; paths are content-addressed."""
    from harness.run import to_parquet

    files = []
    if outcome.histogram is not None:
        files.append(("histogram", f"jobs/{job_id}/histograms/{sha256_hex(outcome.histogram)}.json",
                      outcome.histogram))
    if outcome.rows:
        parquet = to_parquet(outcome.rows, {"qai.job_id": job_id})
        files.append(("parquet", f"jobs/{job_id}/results/{sha256_hex(parquet)}.parquet", parquet))
    return files


def _em_rows(job_id: str, rows: Sequence[Mapping[str, Any]], parquet_path: str, now: datetime) -> list[dict[str, Any]]:
    return [{
        "result_id": str(uuid.uuid5(JOB_RESULT_NAMESPACE, f"{job_id}|{r['observable']}|{r['method']}")),
        "job_id": job_id, "run_id": f"job:{job_id}", "circuit_family": r["family"], "circuit_id": r["circuit_id"],
        "backend_id": r["backend_id"], "calibration_snapshot_id": r["calibration_snapshot_id"],
        "observable": r["observable"], "shots": r["shots"],
        "unmitigated_fidelity": _plain(r.get("unmitigated_fidelity")),
        "mitigated_fidelity": _plain(r.get("mitigated_fidelity")), "em_method": r["method"],
        "parameters": json.loads(r["parameters"]), "abs_error": _plain(r.get("abs_error")),
        "shot_multiplier": _plain(r.get("shot_multiplier")), "cost_seconds": float(r["runtime_seconds"]),
        "status": r["status"], "error_code": r.get("error_code"), "created_at": now, "parquet_path": parquet_path,
    } for r in rows]


def finish(svc: Services, claim: Claim, outcome: Outcome, *, expired: bool = False) -> JobResult:
    """Store, sign and ledger the outcome, and end the job with it, fenced by ``claim``'s lease
    (``expired``: the reaper's fence, which holds only while the lease stays expired).

    Objects first (write-once, content-addressed: a crash leaves at most unreferenced objects), then
    the record, then one transaction for the ledger entry, the rows and the status.
    """
    from orchestrator.auth import Principal
    from orchestrator.ledger import LedgerWrite
    from sdk.dsse import envelope_bytes, envelope_from_bundle, pae

    key = worker_key(svc)  # before the record's time: it is verified as of its ledger entry
    ctx = job_context(svc, claim.job_id, claim.decision_id)
    files = _objects(claim.job_id, outcome)
    for err in svc.objects.put_many([(p, b) for _, p, b in files]):
        if err is not None and err.code != "object.exists":  # an earlier attempt stored the same bytes
            raise err
    now = utcnow()
    execution = outcome.execution or {"backend_id": claim.backend_id, "em_method": claim.em_method}
    record = {
        "type": RESULT_STATEMENT, "job_id": claim.job_id, "tenant": ctx.tenant, "status": outcome.status,
        "attempt": claim.attempt, "max_attempts": claim.max_attempts, "worker": claim.worker_id,
        "manifest": {"sha256": ctx.manifest_sha256, "path": ctx.manifest_path},
        "decision": {"id": ctx.decision_id, "sha256": ctx.decision_sha256, "ledger_index": ctx.decision_ledger_index},
        "execution": execution, "results": [_result_entry(r) for r in outcome.rows],
        "files": [{"kind": k, "path": p, "sha256": sha256_hex(b), "bytes": len(b)} for k, p, b in files],
        "error": None if outcome.error_code is None else {"code": outcome.error_code,
                                                           "message": outcome.error_message or ""},
        "finished_at": now.isoformat(),
    }
    payload = canonical_json(record)
    bundle = svc.kms.sign(key, principal=Principal.system("worker"), message=pae(RESULT_PAYLOAD_TYPE, payload))
    envelope = envelope_bytes(envelope_from_bundle(RESULT_PAYLOAD_TYPE, payload, bundle))
    digest = sha256_hex(envelope)
    record_path = f"jobs/{claim.job_id}/records/{digest}.dsse.json"
    svc.objects.put(record_path, envelope)
    histogram = next((p for k, p, _ in files if k == "histogram"), None)
    parquet = next((p for k, p, _ in files if k == "parquet"), None)
    entry = LedgerEntry(type=RESULT_ENTRY_TYPE, sha256=digest, path=record_path, tenant=SYSTEM_TENANT, time=now)

    def before(conn: Connection, first: int) -> None:
        """The fence, the final status and the result rows, in the ledger entry's transaction."""
        _fence(conn, claim, expired=expired, now=now,
               values={"lease_token": None, "lease_expires_at": None, "worker_id": None, "finished_at": now,
                       "error_code": outcome.error_code, "error_message": outcome.error_message})
        _move(conn, claim.job_id, outcome.status)
        _end_attempt(conn, claim, now, outcome.attempt_outcome or outcome.status, outcome.error_code)
        insert_rows(conn, JOB_RESULTS, [{
            "job_id": claim.job_id, "decision_id": claim.decision_id, "attempt": claim.attempt,
            "status": outcome.status, "backend_id": str(execution.get("backend_id") or claim.backend_id),
            "calibration_snapshot_id": execution.get("calibration_snapshot_id"),
            "em_method": str(execution.get("em_method") or claim.em_method), "adapter": execution.get("adapter"),
            "error_code": outcome.error_code, "error_message": outcome.error_message, "histogram_path": histogram,
            "parquet_path": parquet, "record_path": record_path, "record_sha256": digest, "ledger_index": first,
            "created_at": now}])
        if outcome.rows and parquet is not None:
            from harness.models import EM_RESULTS

            insert_rows(conn, EM_RESULTS, _em_rows(claim.job_id, outcome.rows, parquet, now))

    indexed = svc.ledger.append([LedgerWrite([entry], before=before)])[0]
    log.info("job %s %s (attempt %d), ledger entry %d", claim.job_id, outcome.status, claim.attempt, indexed.index)
    return JobResult(claim.job_id, outcome.status, claim.attempt, record_path, digest, indexed.index,
                     outcome.error_code)


def run_claim(svc: Services, claim: Claim) -> JobResult | None:
    """Run a claimed attempt to its end: the result, or back on the queue after an infrastructure
    fault, or nothing when the lease was lost (another attempt owns the job)."""
    guard = Guard(svc.settings.worker_job_timeout_seconds)
    keeper = LeaseKeeper(svc, claim, guard).start()
    try:
        try:
            chosen = load_chosen(svc, claim.job_id, claim.decision_id)
            outcome = execute(svc, claim.job_id, claim.decision_id, chosen, guard=guard)
        except QaiError as exc:
            if exc.status >= 500 or exc.code == "worker.lease_lost":
                raise
            outcome = Outcome.failed(exc.code, exc.message)
        return finish(svc, claim, outcome)
    except QaiError as exc:
        if exc.code == "worker.lease_lost":
            log.warning("job %s attempt %d: lease lost, the result is dropped", claim.job_id, claim.attempt)
            return None
        _after_fault(svc, claim, exc)
        return None
    except Exception as exc:  # a bug or an unexpected library error: treated as a fault of the attempt
        _after_fault(svc, claim, exc)
        return None
    finally:
        keeper.stop()


def _after_fault(svc: Services, claim: Claim, exc: BaseException) -> None:
    """An infrastructure fault: requeue while attempts remain, else fail the job with the fault's code.
    If even that fails, the lease expires and the reaper does it."""
    code = exc.code if isinstance(exc, QaiError) else "worker.error"
    message = exc.message if isinstance(exc, QaiError) else f"{type(exc).__name__}: {str(exc)[:500]}"
    log.error("job %s attempt %d failed on %s: %s", claim.job_id, claim.attempt, code, message, exc_info=exc)
    try:
        if claim.attempt < claim.max_attempts:
            requeue(svc, claim, expired=False, outcome="error", code=code, message=message)
        else:
            finish(svc, claim, Outcome.failed(code, message, attempt_outcome="error"))
    except Exception:
        log.exception("job %s: recovering from the fault failed; the reaper will take it over", claim.job_id)


# -------------------------------------------------------------------------------------- maintenance


def reap(svc: Services) -> int:
    """Jobs whose lease expired (their worker died or hung): back to the queue while attempts remain,
    else failed with ``worker.lost``. Returns how many were handled."""
    manifests = _manifests()
    now = utcnow()
    with svc.db.read() as s:
        runs = list(s.scalars(select(JobRunRow).join(manifests, manifests.c.job_id == JobRunRow.job_id)
                              .where(manifests.c.status == "running", JobRunRow.lease_expires_at < now)
                              .order_by(JobRunRow.lease_expires_at).limit(MAINTENANCE_BATCH)))
    handled = 0
    for run in runs:
        if run.lease_token is None:
            continue
        claim = Claim(job_id=run.job_id, decision_id=run.decision_id, priority_class=run.priority_class,
                      attempt=run.attempt, max_attempts=run.max_attempts, token=run.lease_token,
                      worker_id=run.worker_id or "", backend_id=run.backend_id, em_method=run.em_method)
        message = (f"worker {claim.worker_id} stopped renewing its lease on attempt {claim.attempt} of "
                   f"{claim.max_attempts}")
        try:
            if claim.attempt < claim.max_attempts:
                done = requeue(svc, claim, expired=True, outcome="lost", code="worker.lost", message=message)
            else:
                finish(svc, claim, Outcome.failed("worker.lost", message, attempt_outcome="lost"), expired=True)
                done = True
        except LeaseLost:
            done = False  # renewed after all, or reaped by another process meanwhile
        except QaiError as exc:
            # One job's persistent error must not stall the reaping of the others (it sorts first
            # every tick): log it and go on; the next tick tries it again.
            if exc.code != "worker.lease_lost":
                log.error("reaping job %s failed (%s: %s)", claim.job_id, exc.code, exc.message)
            done = False
        if done:
            log.warning("job %s: %s; %s", claim.job_id, message,
                        "requeued" if claim.attempt < claim.max_attempts else "failed")
            handled += 1
    return handled


def redeliver(svc: Services, queue: JobQueue | None = None) -> int:
    """Queued jobs that are not on the queue (a lost enqueue or delivery, Redis data loss, another
    process's in-process queue) go on it again. Returns how many were enqueued."""
    manifests = _manifests()
    queue = queue or job_queue(svc)
    now = utcnow()
    cutoff = now - timedelta(seconds=svc.settings.worker_redeliver_after_seconds)
    with svc.db.read() as s:
        rows = s.execute(select(JobRunRow.job_id, JobRunRow.priority_class)
                         .join(manifests, manifests.c.job_id == JobRunRow.job_id)
                         .where(manifests.c.status == "queued", JobRunRow.enqueued_at <= cutoff)
                         .order_by(JobRunRow.enqueued_at).limit(MAINTENANCE_BATCH)).all()
    if not rows:
        return 0
    waiting = queue.waiting([r[0] for r in rows])
    enqueued = sum(queue.enqueue(job_id, cls) for job_id, cls in rows if job_id not in waiting)
    # Every checked job waits a full period before it is checked again, so a long backlog is walked
    # through rather than its oldest page checked over and over.
    with svc.db.write() as s:
        s.execute(update(JOB_RUNS).where(JOB_RUNS.c.job_id.in_([r[0] for r in rows]),
                                         JOB_RUNS.c.lease_token.is_(None)).values(enqueued_at=now))
    if enqueued:
        log.warning("redelivered %d queued job(s) missing from the queue", enqueued)
    return int(enqueued)


def maintain(svc: Services, queue: JobQueue | None = None) -> tuple[int, int]:
    """The reaper and the redelivery sweep, by one process at a time: (reaped, redelivered)."""
    with svc.db.try_lock(MAINTENANCE_LOCK) as mine:
        if not mine:
            return 0, 0
        return reap(svc), redeliver(svc, queue)


# ------------------------------------------------------------------------------------------- worker


def default_worker_id(name: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{name}:{secrets.token_hex(3)}"


class Worker:
    """Takes jobs off the queue one at a time and runs them; runs the maintenance every half lease."""

    def __init__(self, svc: Services, queue: JobQueue | None = None, *, worker_id: str | None = None,
                 name: str = "worker", clock: Callable[[], float] = time.monotonic) -> None:
        self.svc = svc
        self.queue = queue or job_queue(svc)
        self.worker_id = worker_id or default_worker_id(name)
        self.processed = 0  # attempts this worker claimed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_maintenance = 0.0
        # Liveness (scheduler.worker_http): the loop records when it last went round and since when
        # it holds a job. Written by the loop's thread and read by the probe's: single attribute
        # stores, so no lock. ``clock`` is injectable so a test can age the heartbeat without sleeping.
        self.clock = clock
        self.heartbeat = clock()
        self.job_since: float | None = None
        self.looping = False  # inside run()

    def maintain_if_due(self, *, force: bool = False) -> None:
        if not force and time.monotonic() < self._next_maintenance:
            return
        self._next_maintenance = time.monotonic() + self.svc.settings.worker_lease_seconds / 2
        try:
            maintain(self.svc, self.queue)
        except Exception:
            log.exception("dispatch maintenance failed; retrying later")

    def step(self, timeout: float) -> bool:
        """Take one delivery (waiting up to ``timeout``) and run it; True if something was taken."""
        try:
            delivery = self.queue.pop(timeout)
        except QaiError as exc:
            log.warning("the job queue is unavailable (%s); retrying", exc.code)
            self._stop.wait(self.svc.settings.worker_poll_seconds)
            return False
        if delivery is None:
            return False
        try:
            claim = claim_job(self.svc, delivery.job_id, self.worker_id)
        except Exception:  # the job stays queued in the database: the sweep delivers it again
            log.exception("claiming job %s failed", delivery.job_id)
            return True
        if claim is None:
            log.info("job %s is no longer queued; delivery dropped", delivery.job_id)
            return True
        self.processed += 1
        self.job_since = self.heartbeat = self.clock()
        try:
            run_claim(self.svc, claim)
        finally:
            self.job_since = None
            self.beat()
        return True

    def beat(self) -> None:
        """Record that the loop is going round (its liveness heartbeat)."""
        self.heartbeat = self.clock()

    def run(self, *, burst: bool = False, max_jobs: int | None = None) -> int:
        """Work until stopped; ``burst``: until the queue is empty; ``max_jobs``: after that many
        attempts. Returns the attempts claimed."""
        start = self.processed
        self.looping = True
        self.beat()
        try:
            self.maintain_if_due(force=True)
            while not self._stop.is_set():
                self.beat()
                if max_jobs is not None and self.processed - start >= max_jobs:
                    break
                self.maintain_if_due()
                took = self.step(0.0 if burst else self.svc.settings.worker_poll_seconds)
                if not took and burst:
                    break
        finally:
            self.looping = False
        return self.processed - start

    def start(self) -> None:
        """Work on a daemon thread (the embedded worker)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"qai-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the worker to stop after its current job."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=120)
            self._thread = None


# ------------------------------------------------------------------------------------------ reading


def job_execution(svc: Services, job_id: str) -> dict[str, Any]:
    """A job's execution as the API can show it: dispatch state, attempts and the result's index row."""
    with svc.db.read() as s:
        run = s.get(JobRunRow, job_id)
        attempts = list(s.scalars(select(JobAttemptRow).where(JobAttemptRow.job_id == job_id)
                                  .order_by(JobAttemptRow.attempt)))
        result = s.get(JobResultRow, job_id)
    if run is None:
        return {"dispatched": False}
    return {
        "dispatched": True, "decision_id": run.decision_id, "priority_class": run.priority_class,
        "backend_id": run.backend_id, "em_method": run.em_method, "attempt": run.attempt,
        "max_attempts": run.max_attempts, "worker_id": run.worker_id, "lease_expires_at": run.lease_expires_at,
        "error": None if run.error_code is None else {"code": run.error_code, "message": run.error_message},
        "attempts": [{"attempt": a.attempt, "worker_id": a.worker_id, "started_at": a.started_at,
                      "ended_at": a.ended_at, "outcome": a.outcome, "error_code": a.error_code} for a in attempts],
        "result": None if result is None else {
            "status": result.status, "record_path": result.record_path, "record_sha256": result.record_sha256,
            "ledger_index": result.ledger_index, "histogram_path": result.histogram_path,
            "parquet_path": result.parquet_path, "error_code": result.error_code},
    }


def verify_result(svc: Services, job_id: str) -> dict[str, Any]:
    """The job's result record, re-checked: its ledger entry, its signatures (``qai.worker`` at the
    entry's time) and every file it names against its sha256. Returns the record."""
    from sdk.dsse import parse_envelope, verify_envelope

    with svc.db.read() as s:
        row = s.get(JobResultRow, job_id)
    if row is None:
        raise QaiError("worker.result_not_found", f"job {job_id} has no result", status=404)
    entry = svc.ledger.entry(row.ledger_index)
    data = svc.objects.get(row.record_path)
    if (entry.type, entry.sha256, entry.path) != (RESULT_ENTRY_TYPE, row.record_sha256, row.record_path) \
            or sha256_hex(data) != row.record_sha256:
        raise QaiError("worker.result_tampered", f"the result of job {job_id} does not match its ledger entry",
                       status=409, details={"job_id": job_id})
    envelope = parse_envelope(data)
    if envelope.payload_type != RESULT_PAYLOAD_TYPE:
        raise QaiError("worker.result_tampered", f"payload type {envelope.payload_type}", status=409)
    verify_envelope(envelope, svc.kms.public_key(WORKER_KEY), at=entry.time)
    record: dict[str, Any] = json.loads(envelope.payload_bytes())
    bad = [f["path"] for f in record["files"] if sha256_hex(svc.objects.get(f["path"])) != f["sha256"]]
    if bad or record.get("job_id") != job_id:
        raise QaiError("worker.result_tampered", f"{len(bad)} file(s) of job {job_id} do not match the record",
                       status=409, details={"files": bad})
    return record


__all__ = ["JOB_RESULTS", "RESULT_ENTRY_TYPE", "RESULT_PAYLOAD_TYPE", "WORKER_KEY", "Claim", "Guard", "JobResult",
           "JobResultRow", "LeaseKeeper", "LeaseLost", "Outcome", "Worker", "claim_job", "execute", "finish",
           "job_execution", "load_chosen", "maintain", "reap", "redeliver", "renew", "requeue", "run_claim",
           "verify_result", "worker_key"]
