"""Scheduling a stored job: gather the decision's inputs, decide, sign, store, ledger, dispatch.

``schedule`` reads everything a decision depends on **once** and records it as the decision's
``inputs`` (see :mod:`scheduler.engine`): the job's fields from its verified manifest, the tenant's
policy, and per backend its catalog entry, status, queue wait, latest calibration snapshot id and
the EM policy's prediction for the job on that snapshot. The signed decision document holds those
inputs next to the decision body, so ``scheduler.replay`` recomputes the body from the document
alone, and re-derives the inputs from the manifest, the content-addressed snapshots and the
recorded model version.

A decision is written like a job: the envelope goes to the object store (write-once), then the
ledger entry and the ``scheduler_decisions`` row commit in one transaction. A job whose decision
chose a backend is then handed to :mod:`scheduler.dispatch`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
from sqlalchemy import Float, ForeignKey, Select, String, bindparam, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import BigInteger

from orchestrator import metrics
from orchestrator.auth import Principal, Role, check_crypto_policy
from orchestrator.db import Base, JSONType, UTCDateTime, insert_rows, utcnow
from orchestrator.outbox import OBJECT_OUTBOX, waiting
from scheduler.engine import (
    DEFAULT_CONFIG,
    PRIORITY_CLASSES,
    Plugin,
    coselects,
    decide,
    inputs_backend,
    prefilter,
    profile,
    rejections,
)
from scheduler.plugins import BUILTIN, crypto_violations, resolve
from sdk.canonical import canonical_json
from sdk.dsse import envelope_bytes, envelope_from_bundle, pae, parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, LedgerEntry, Receipt, sha256_hex
from sdk.manifest import RunManifest

if TYPE_CHECKING:
    from em_policy.service import PolicyService, PredictRequest
    from orchestrator.jobs import ManifestRow
    from orchestrator.services import Services

log = logging.getLogger(__name__)

DECISION_PAYLOAD_TYPE = "application/vnd.qai.scheduler-decision.v1+json"
DECISION_STATEMENT = "qai.scheduler.decision.v1"
DECISION_ENTRY_TYPE: Literal["scheduler-decision"] = "scheduler-decision"
SCHEDULER_KEY = "qai.scheduler"
PREDICTION_FIELDS = ("method", "params", "shot_multiplier", "expected_fidelity", "confidence", "model_version",
                     "estimated_seconds")
BACKENDS_TTL_SECONDS = 2.0  # the catalog and backlog are re-read, in the background, once this old
# A catalog this old is re-read in the request that finds it (after an idle spell or a failed
# background read); younger, a request uses it while a thread re-reads it.
BACKENDS_MAX_AGE_SECONDS = 2 * BACKENDS_TTL_SECONDS
QUBITS_CACHE_SIZE = 4096


class DecisionRow(Base):
    __tablename__ = "scheduler_decisions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("manifests.job_id"))
    tenant: Mapped[str] = mapped_column(String(64))
    chosen_backend: Mapped[str | None] = mapped_column(String(128), nullable=True)
    calibration_snapshot_id: Mapped[str | None] = mapped_column(String(192), nullable=True)
    em_method: Mapped[str | None] = mapped_column(String(64), nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    confidence: Mapped[float] = mapped_column(Float)
    run_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    reasons: Mapped[Any] = mapped_column(JSONType)
    decision_manifest_path: Mapped[str] = mapped_column(String(512))
    decision_sha256: Mapped[str] = mapped_column(String(64))
    ledger_index: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


# Statements of every decision, built once: SQLAlchemy keys each statement object for its compiled
# cache, and a statement built per call is keyed again per call (orchestrator.db.insert_statement).
_CHOSEN_BEFORE = (select(DecisionRow.id)
                  .where(DecisionRow.job_id == bindparam("wanted"), DecisionRow.chosen_backend.is_not(None)).limit(1))


@functools.cache
def _job_statement() -> Select[Any]:
    """A job's row with its tenant's name (None if the tenant is gone), its crypto policy and the id
    of a decision that already chose a backend for the job (None if there is none)."""
    from orchestrator.jobs import MANIFESTS
    from orchestrator.models import Tenant

    tenants = Tenant.__table__
    return (select(MANIFESTS, tenants.c.name.label("tenant_found"), tenants.c.crypto_policy.label("tenant_policy"),
                   _CHOSEN_BEFORE.scalar_subquery().label("chosen_before"))
            .outerjoin(tenants, tenants.c.name == MANIFESTS.c.tenant).where(MANIFESTS.c.job_id == bindparam("wanted")))


@functools.cache
def backlog_statement() -> Select[str | None, str, float | None]:
    """Run seconds queued or running per (backend, priority class). What it reads of ``manifests``
    is all in ``ix_manifests_status`` (migration 0011 says why that matters)."""
    from orchestrator.jobs import ManifestRow

    return (select(DecisionRow.chosen_backend, ManifestRow.priority_class, func.sum(DecisionRow.run_seconds))
            .join(ManifestRow, ManifestRow.job_id == DecisionRow.job_id)
            .where(ManifestRow.status.in_(("queued", "running")), DecisionRow.chosen_backend.is_not(None))
            .group_by(DecisionRow.chosen_backend, ManifestRow.priority_class))


@dataclass(frozen=True)
class Decision:
    decision_id: str
    job_id: str
    created: bool  # False when the job already had a decision that chose a backend
    document: dict[str, Any]  # {"type", "decision_id", "job_id", "created_at", "inputs", "decision"}
    path: str
    receipt: Receipt
    body_canonical: bytes | None = None  # the body's RFC 8785 bytes, when this process just signed them

    @property
    def body(self) -> dict[str, Any]:
        return dict(self.document["decision"])

    def to_json(self) -> dict[str, Any]:
        return {"decision_id": self.decision_id, "job_id": self.job_id, "created": self.created,
                "decision": self.body, "path": self.path, "receipt": self.receipt.model_dump(mode="json")}

    def to_json_bytes(self) -> bytes:
        """:meth:`to_json` as JSON bytes. A fresh decision's body, tens of kB, was just serialised
        for its signature: those bytes are spliced in rather than serialised a second time."""
        if self.body_canonical is None:
            return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
        rest = self.to_json()
        del rest["decision"]
        head = json.dumps(rest, ensure_ascii=False, separators=(",", ":")).encode()
        return b'{"decision":' + self.body_canonical + b"," + head[1:]


def decision_path(digest: str) -> str:
    return f"scheduler/decisions/{digest}"


# ------------------------------------------------------------------------------------------- inputs


def circuit_qasm(svc: Services, manifest: RunManifest) -> str:
    """The job's OpenQASM: inline, or from the object store checked against its signed sha256."""
    circuit = manifest.circuit
    if circuit.qasm is not None:
        return circuit.qasm
    assert circuit.path is not None and circuit.sha256 is not None  # the model guarantees one form
    # Only the tenant's own circuits: a path elsewhere would let a manifest probe other objects.
    if not circuit.path.startswith(f"circuits/{manifest.tenant}/"):
        raise QaiError("scheduler.bad_circuit", f"a stored circuit must be under circuits/{manifest.tenant}/",
                       status=422, details={"path": circuit.path})
    try:
        data = svc.objects.get(circuit.path)
    except QaiError as exc:
        if exc.code != "object.not_found":
            raise
        raise QaiError("scheduler.bad_circuit", f"no stored circuit {circuit.path}", status=422,
                       details={"path": circuit.path}) from exc
    if "sha256:" + hashlib.sha256(data).hexdigest() != circuit.sha256:
        raise QaiError("scheduler.bad_circuit", f"stored circuit {circuit.path} does not match the manifest",
                       status=422, details={"path": circuit.path})
    return data.decode()


def deadline_seconds(manifest: RunManifest, submitted_at: datetime, now: datetime) -> float | None:
    """What is left of the job's SLA at ``now``: the earlier of its deadline and its latency limit."""
    if manifest.sla is None:
        return None
    left = []
    if manifest.sla.deadline is not None:
        deadline = manifest.sla.deadline
        if deadline.tzinfo is None:  # the manifest model accepts it; RFC 3339 without an offset is UTC here
            deadline = deadline.replace(tzinfo=UTC)
        left.append((deadline - now).total_seconds())
    if manifest.sla.max_latency_seconds is not None:
        left.append(manifest.sla.max_latency_seconds - (now - submitted_at).total_seconds())
    return round(min(left), 6) + 0.0  # + 0.0: never -0.0


def job_fields(manifest: RunManifest, envelope_sha256: str, num_qubits: int, submitted_at: datetime,
               now: datetime) -> dict[str, Any]:
    from em_policy.policy import UNLIMITED_RATIO

    return {"job_id": str(manifest.job_id), "tenant": manifest.tenant, "manifest_sha256": envelope_sha256,
            "crypto_mode": manifest.crypto_mode, "shots": manifest.shots,
            # no budget in the manifest: the job accepts any overhead the policy finds worth it
            "shot_budget": manifest.shot_budget or int(manifest.shots * UNLIMITED_RATIO),
            "priority_class": manifest.priority_class, "num_qubits": num_qubits,
            "deadline_seconds": deadline_seconds(manifest, submitted_at, now), "backend_id": manifest.backend_id}


def tenant_profile(policy: Mapping[str, Any]) -> tuple[list[Plugin], dict[str, Any]]:
    """The tenant's scheduler profile (``crypto_policy.scheduler``: plugin names and config), or the
    default. A profile may add plugins and tune the config; it may not drop a built-in filter (the
    crypto-mode filter above all: crypto-policy violations must stay at zero)."""
    configured = policy.get("scheduler") or {}
    if not isinstance(configured, dict):
        raise QaiError("scheduler.bad_profile", "the tenant's scheduler profile must be an object", status=422)
    plugins = resolve(configured.get("plugins"))
    names = {p.name for p in plugins}
    missing = [p.name for p in BUILTIN if p.kind == "filter" and p.name not in names]
    if missing:
        raise QaiError("scheduler.bad_profile", f"a profile must keep the built-in filters; it drops {missing}",
                       status=422, details={"missing": missing})
    if "value-score" in names and names & {"v1-score", "wait"}:
        raise QaiError("scheduler.bad_profile", "value-score replaces v1-score and wait (it prices waiting itself); "
                       "a profile names one or the other", status=422,
                       details={"plugins": sorted(names & {"value-score", "v1-score", "wait"})})
    config = configured.get("config") or {}
    if not isinstance(config, dict):
        raise QaiError("scheduler.bad_profile", "the profile's config must be an object", status=422)
    for key, value in config.items():
        check_config(key, value)
    return plugins, profile(plugins, config, str(configured.get("name", "default")))


def check_config(key: str, value: Any) -> None:
    """A config value has the type and shape of its default (numbers finite and not negative)."""
    if key not in DEFAULT_CONFIG:
        raise QaiError("scheduler.bad_profile", f"unknown scheduler config {key!r}", status=422,
                       details={"known": sorted(DEFAULT_CONFIG)})
    default = DEFAULT_CONFIG[key]
    if isinstance(default, dict):
        ok = isinstance(value, dict) and set(value) == set(default) and all(_number(v) for v in value.values())
    else:
        ok = _number(value)
    if not ok:
        raise QaiError("scheduler.bad_profile", f"scheduler config {key!r} must be shaped like {default!r}",
                       status=422, details={"key": key})
    if key == "em_coselect" and value not in (0, 1):
        raise QaiError("scheduler.bad_profile", "scheduler config 'em_coselect' is 0 or 1", status=422,
                       details={"key": key})
    if key == "fidelity_value_usd" and value <= 0:
        raise QaiError("scheduler.bad_profile", "scheduler config 'fidelity_value_usd' must be above 0",
                       status=422, details={"key": key})


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def check_job(job: Mapping[str, Any]) -> None:
    """Fields a signed manifest can carry but no decision can record (JSON numbers are doubles)."""
    from em_policy.policy import UNLIMITED_RATIO
    from em_policy.service import MAX_SHOTS

    deadline = job["deadline_seconds"]
    if deadline is not None and not math.isfinite(deadline):
        raise QaiError("scheduler.bad_manifest", "the manifest's SLA is not a finite time", status=422,
                       details={"job_id": job["job_id"]})
    if job["shot_budget"] > MAX_SHOTS * UNLIMITED_RATIO:
        raise QaiError("scheduler.bad_manifest", f"shot_budget is above {MAX_SHOTS * UNLIMITED_RATIO:.0f}",
                       status=422, details={"job_id": job["job_id"]})


@dataclass
class _Catalog:
    backends: list[dict[str, Any]]
    backlog: dict[tuple[str, str], float]  # (backend, priority class) -> expected run seconds queued
    read_at: float

    def ahead_of(self, backend_id: str, priority_class: str) -> float:
        """Seconds of qai's queued work a job of ``priority_class`` waits behind on the backend:
        workers take the classes strictly in order, so only its own class and the ones above count."""
        rank = PRIORITY_CLASSES.index(priority_class)
        return sum(self.backlog.get((backend_id, c), 0.0) for c in PRIORITY_CLASSES[:rank + 1])


class Scheduler:
    """The per-process scheduler: caches the catalog briefly and the signing key's check."""

    def __init__(self, svc: Services, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.svc = svc
        self.clock = clock
        self._catalog: _Catalog | None = None
        self._lock = threading.Lock()  # the caches
        self._reading = threading.Lock()  # held while the catalog is read
        self._reader: threading.Thread | None = None  # the background read, if one runs
        self._queued_meanwhile: list[tuple[tuple[str, str], float]] | None = None
        # the backends as stored and as listed: a read that finds them unchanged keeps the listing
        # (decoding it was most of the read's time under the GIL, while decisions wait for it)
        self._listed: tuple[list[tuple[Any, ...]], list[dict[str, Any]]] | None = None
        self._key: str | None = None
        self._qubits: OrderedDict[str, int] = OrderedDict()

    # ---------------------------------------------------------------------------------------- inputs

    def catalog(self) -> _Catalog:
        """The backends and qai's backlog on them, as read at most ``BACKENDS_TTL_SECONDS`` ago
        plus the time of a read. The read (the catalog and a join over every queued job, 3-4 ms
        with a few hundred queued) would otherwise land on one decision in every TTL: it runs on
        a thread while decisions use the catalog they have, stale-while-revalidate. Only a
        catalog older than ``BACKENDS_MAX_AGE_SECONDS`` (none yet, an idle spell, a failed
        background read) is read in the request, which then raises what the read raises."""
        cached = self._catalog
        if cached is not None:
            age = self.clock() - cached.read_at
            if age < BACKENDS_TTL_SECONDS:
                return cached
            if age < BACKENDS_MAX_AGE_SECONDS:
                if self._reading.acquire(blocking=False):
                    self._reader = threading.Thread(target=self._read_in_background, daemon=True,
                                                    name="scheduler-catalog")
                    self._reader.start()
                return cached
        with self._reading:
            cached = self._catalog  # a read may have finished while this one waited
            if cached is not None and self.clock() - cached.read_at < BACKENDS_TTL_SECONDS:
                return cached
            return self._read()

    def _read_in_background(self) -> None:
        try:
            self._read()
        except Exception:  # the next request past the maximum age reads it again and raises
            log.exception("reading the backend catalog failed; decisions use the one read before")
        finally:
            self._reading.release()

    def _read(self) -> _Catalog:
        """Read the catalog and backlog (the caller holds ``_reading``). Jobs this process queues
        during the read are added to it, as they are to the catalog in use."""
        from harness.backends import listed_backends, stored_backends

        with self._lock:
            self._queued_meanwhile = []
        try:
            stored, backlog = stored_backends(self.svc.db), self.backlog()
            if self._listed is None or self._listed[0] != stored:  # decoded only when something changed
                self._listed = (stored, listed_backends(stored))
            backends = self._listed[1]
            with self._lock:
                for key, seconds in self._queued_meanwhile:
                    backlog[key] = backlog.get(key, 0.0) + seconds
                self._catalog = _Catalog(backends, backlog, self.clock())
                return self._catalog
        finally:
            with self._lock:
                self._queued_meanwhile = None

    def _queued(self, backend_id: str, priority_class: str, seconds: float) -> None:
        """Count a job this process just queued in the cached backlog: the next decision sees it
        at once; other processes' decisions and finished jobs show at the next read. A read in
        progress may or may not see the job's row: it counts the job too (an estimate a job too
        high for a TTL rather than one too low)."""
        key = (backend_id, priority_class)
        with self._lock:
            cached = self._catalog
            if cached is not None:
                cached.backlog[key] = cached.backlog.get(key, 0.0) + seconds
            if self._queued_meanwhile is not None:
                self._queued_meanwhile.append((key, seconds))

    def num_qubits(self, manifest: RunManifest, qasm: str) -> int:
        """Qubits of the job's circuit, parsed once per circuit digest (jobs resubmit circuits)."""
        from em_policy.features import parse_qasm

        digest = manifest.circuit.digest
        n = self._qubits.get(digest)
        if n is None:
            n = parse_qasm(qasm).num_qubits
            with self._lock:
                self._qubits[digest] = n
                while len(self._qubits) > QUBITS_CACHE_SIZE:
                    self._qubits.popitem(last=False)
        return n

    def backlog(self) -> dict[tuple[str, str], float]:
        """Expected run seconds of the jobs qai has queued or running, per backend and priority class."""
        with self.svc.db.engine.connect() as c:
            rows = c.execute(backlog_statement()).all()
        return {(str(b), str(c)): float(sec or 0.0) for b, c, sec in rows}

    def gather(self, manifest: RunManifest, row: ManifestRow, plugins: Sequence[Plugin],
               prof: Mapping[str, Any], policy: Mapping[str, Any], now: datetime) -> dict[str, Any]:
        """The recorded inputs of a decision about ``manifest`` at ``now``."""
        qasm = circuit_qasm(self.svc, manifest)
        num_qubits = self.num_qubits(manifest, qasm)
        job = job_fields(manifest, row.envelope_sha256, num_qubits, row.submitted_at, now)
        check_job(job)
        cat = self.catalog()
        records = []
        for b in cat.backends:
            queue = b["queue"] or {}
            records.append({
                "backend_id": b["backend_id"], "cost_per_shot": float(b["cost_per_shot"]),
                "availability": float(b["availability"]), "status": b["status"],
                "queue_wait_seconds": round(float(queue.get("mean_wait_seconds", 0.0))
                                            + cat.ahead_of(b["backend_id"], job["priority_class"]), 6),
                "calibration_snapshot_id": b["last_calibration_id"], "capabilities": b["capabilities"],
                "prediction": None, "prediction_error": None})
        config = prof["config"]
        worth = [r for r in records if prefilter(job, r, policy, plugins, config)]
        if worth:
            self.predict(self.policy(), qasm, job, worth, options=coselects(config))
        return {"job": job, "tenant_policy": _policy_record(policy), "backends": records, "profile": dict(prof),
                "seed": manifest.seed, "now": now.isoformat()}

    def policy(self, model_version: str | None = None) -> PolicyService:
        """The serving policy (the champion), or one pinned to ``model_version`` for replay."""
        from em_policy.api import policy_service

        return policy_service(self.svc) if model_version is None else pinned_policy(self.svc, model_version)

    @staticmethod
    def predict(service: PolicyService, qasm: str, job: Mapping[str, Any], records: Sequence[dict[str, Any]],
                *, options: bool = False) -> None:
        """Fill each record's ``prediction`` (or ``prediction_error``) from ``service``; with
        ``options`` (a profile with ``em_coselect``), every method within the budget too."""
        requests = [_request(qasm, job, r["calibration_snapshot_id"]) for r in records]
        # server-side errors (no model) raise; a record keeps neither the features nor (unless it
        # lists options) the alternatives, so the policy does not build them
        predictions = service.predict_each_plain(requests, alternatives=options, features=False)
        for r, p in zip(records, predictions, strict=True):
            if isinstance(p, QaiError):
                r["prediction_error"] = {"code": p.code, "message": p.message}
            else:
                r["prediction"] = prediction_record(p, options=options)

    # -------------------------------------------------------------------------------------- deciding

    def schedule(self, job_id: str, principal: Principal) -> Decision:
        """Decide where ``job_id`` runs (or that nothing fits), sign, store and ledger the decision.

        A job that already has a decision choosing a backend gets that decision back (``created``
        False): scheduling is idempotent. A decision that found no backend is recorded too and
        raised as ``scheduler.no_backend`` (422) listing every backend with its reasons.
        """
        row, tenant_found, policy, earlier = self._job(job_id)
        if row is None or not principal.can_read(row.tenant):
            raise QaiError("job.not_found", f"no job {job_id}", status=404, details={"job_id": job_id})
        principal.require(row.tenant, Role.SUBMITTER, Role.SIGNER, Role.OPERATOR, action="scheduling a job")
        if earlier is not None:
            return self._again(row, self.row(earlier))
        if row.status != "pending":
            raise QaiError("scheduler.bad_status", f"job {job_id} is {row.status}; only pending jobs are scheduled",
                           status=409, details={"job_id": job_id, "status": row.status})
        manifest = self.manifest(row)
        if not tenant_found:
            raise QaiError("tenant.not_found", f"no tenant named {row.tenant!r}", status=404)
        policy = policy or {}
        check_crypto_policy(policy)  # one stored before policies were validated must not fail open here
        plugins, prof = tenant_profile(policy)
        self.signing_key()  # before `now`: the decision is verified as of its ledger time
        now = utcnow()
        # Decide on exactly what is recorded: the inputs as their canonical JSON reads back (an
        # integral float becomes an int, -0.0 becomes 0), so the signed body and a replay's agree.
        inputs_canonical = canonical_json(self.gather(manifest, row, plugins, prof, policy, now))
        # orjson reads a number as the double RFC 8785 wrote (json reads 18446744073709552000, the
        # ES6 form of 2**64, as an int no double equals), at a third of json's time; replay and
        # verified_document read decisions the same way
        inputs = orjson.loads(inputs_canonical)
        body = decide(inputs, plugins, inputs_canonical=inputs_canonical)
        if body["chosen"] is not None:
            chosen_record = inputs_backend(inputs, body["chosen"]["backend_id"])
            found = crypto_violations(inputs["job"], chosen_record, policy)
            if found:  # the decision stands as recorded (it replays); the counter and the log raise the alarm
                metrics.SCHEDULER_CRYPTO_VIOLATIONS.labels("schedule").inc()
                log.error("decision for job %s chose %s, which fails the crypto requirements: %s", job_id,
                          body["chosen"]["backend_id"], "; ".join(found))
        try:
            decision = self._record(row, inputs, body, now, inputs_canonical=inputs_canonical)
        except QaiError as err:
            if err.code != "scheduler.already_scheduled":
                raise
            return self._again(row, self.row(str(err.details["decision_id"])))  # a concurrent call won
        if body["chosen"] is None:
            raise QaiError("scheduler.no_backend", body["rationale"], status=422,
                           details={"decision_id": decision.decision_id, "job_id": job_id,
                                    "backends": rejections(body)})
        from scheduler.dispatch import deliver

        deliver(self.svc, row.job_id, inputs["job"]["priority_class"])  # queued with the decision; now enqueue
        return decision

    def _job(self, job_id: str) -> tuple[ManifestRow | None, bool, dict[str, Any] | None, str | None]:
        """The job's row (detached), whether its tenant exists, the tenant's crypto policy and the
        id of a decision that already chose a backend for it: one Core statement (the ORM sessions
        it replaces, three of them, cost 0.6-0.9 ms of a decision in process; two statements, 0.65 ms)."""
        from orchestrator.jobs import MANIFESTS, ManifestRow

        with self.svc.db.engine.connect() as c:
            found = c.execute(_job_statement(), {"wanted": job_id}).mappings().first()
        if found is None:
            return None, False, None, None
        row = ManifestRow(**{col.key: found[col.key] for col in MANIFESTS.columns})
        return row, found["tenant_found"] is not None, found["tenant_policy"], found["chosen_before"]

    def _again(self, row: ManifestRow, earlier: DecisionRow) -> Decision:
        """The job's decision, asked for again: scheduling is idempotent."""
        decision = self._stored(earlier, created=False)
        if row.status == "pending":  # only a decision recorded before dispatch wrote both at once
            from scheduler.dispatch import dispatch

            dispatch(self.svc, row.job_id, decision.decision_id, decision.body["chosen"],
                     decision.document["inputs"]["job"]["priority_class"])
        return decision

    def manifest(self, row: ManifestRow) -> RunManifest:
        data = row.envelope if row.envelope is not None else self.svc.objects.get(row.s3_path)
        if sha256_hex(data) != row.envelope_sha256:
            raise QaiError("job.corrupt", f"the stored envelope of job {row.job_id} does not match its index",
                           status=500, details={"job_id": row.job_id})
        # Verified at ingest and content-checked here: parsing the payload is enough.
        return RunManifest.model_validate_json(parse_envelope(data).payload_bytes())

    def signing_key(self) -> str:
        if self._key is None:
            from orchestrator.ledger import system_signing_key

            self._key = system_signing_key(self.svc.db, self.svc.kms, SCHEDULER_KEY,
                                           suite=self.svc.settings.ledger_suite, subject="scheduler",
                                           error_code="scheduler.bad_key")
        return self._key

    def _record(self, row: ManifestRow, inputs: dict[str, Any], body: dict[str, Any], now: datetime, *,
                inputs_canonical: bytes | None = None) -> Decision:
        from orchestrator.ledger import LedgerWrite

        key = self.signing_key()
        decision_id = str(uuid.uuid4())
        document = {"type": DECISION_STATEMENT, "decision_id": decision_id, "job_id": row.job_id,
                    "created_at": now.isoformat(), "inputs": inputs, "decision": body}
        body_canonical = canonical_json(body)
        payload = document_payload(document, inputs_canonical, body_canonical)
        bundle = self.svc.kms.sign(key, principal=Principal.system("scheduler"),
                                   message=pae(DECISION_PAYLOAD_TYPE, payload))
        data = envelope_bytes(envelope_from_bundle(DECISION_PAYLOAD_TYPE, payload, bundle))
        digest = sha256_hex(data)
        path = decision_path(digest)
        chosen = body["chosen"]
        run_seconds = chosen_run_seconds(inputs, body)
        # ledgered under the signer's tenant (the auditor checks the two agree); the row keeps the job's
        entry = LedgerEntry(type=DECISION_ENTRY_TYPE, sha256=digest, path=path, tenant=SYSTEM_TENANT, time=now)

        def before(conn: Connection, first: int) -> None:
            # Under the ledger lock, like every decision's insert: a concurrent call for the same job
            # that got here first makes this one write nothing.
            if chosen is not None:
                taken = conn.scalar(_CHOSEN_BEFORE, {"wanted": row.job_id})
                if taken is not None:
                    raise QaiError("scheduler.already_scheduled", f"job {row.job_id} has decision {taken}",
                                   status=409, details={"decision_id": taken, "job_id": row.job_id})
            insert_rows(conn, DecisionRow.__table__, [{  # type: ignore[arg-type]
                "id": decision_id, "job_id": row.job_id, "tenant": row.tenant,
                "chosen_backend": chosen and chosen["backend_id"],
                "calibration_snapshot_id": chosen and chosen["calibration_snapshot_id"],
                "em_method": chosen and chosen["em_method"], "score": chosen and chosen["score"],
                "confidence": body["confidence"], "run_seconds": run_seconds, "reasons": rejections(body),
                "decision_manifest_path": path, "decision_sha256": digest, "ledger_index": first, "created_at": now}])
            # the envelope goes to the object store from the outbox, after this commit: an S3
            # round trip here would be most of a decision's latency
            insert_rows(conn, OBJECT_OUTBOX, [{"path": path, "sha256": digest, "data": data, "created_at": now}])
            if chosen is not None:  # pending → queued with its job_runs row, in this transaction
                from scheduler.dispatch import queue_rows

                queue_rows(conn, self.svc.settings, row.job_id, decision_id, chosen,
                           inputs["job"]["priority_class"])

        indexed = self.svc.ledger.append([LedgerWrite([entry], before=before)])[0]
        metrics.observe_decision(body)
        if chosen is not None:
            self._queued(chosen["backend_id"], inputs["job"]["priority_class"], float(run_seconds or 0.0))
        receipt = self.svc.ledger.receipts([indexed], appended=True)[0]
        return Decision(decision_id, row.job_id, True, document, path, receipt, body_canonical)

    # --------------------------------------------------------------------------------------- reading

    def _stored(self, row: DecisionRow, *, created: bool) -> Decision:
        document = self.load(row)
        return Decision(row.id, row.job_id, created, document, row.decision_manifest_path,
                        self.svc.ledger.receipt(row.ledger_index))

    def load(self, row: DecisionRow) -> dict[str, Any]:
        """The decision document of ``row``: its ledger entry, object and signatures checked."""
        entry = self.svc.ledger.entry(row.ledger_index)
        if (entry.type, entry.sha256, entry.path) != (DECISION_ENTRY_TYPE, row.decision_sha256,
                                                      row.decision_manifest_path):
            raise QaiError("scheduler.decision_tampered", f"decision {row.id} does not match ledger entry "
                           f"{row.ledger_index}", status=409, details={"decision_id": row.id})
        data = self.svc.ledger.object_bytes(row.decision_manifest_path)
        if sha256_hex(data) != row.decision_sha256:
            raise QaiError("scheduler.decision_tampered", f"stored decision {row.id} does not hash to its ledger "
                           "entry", status=409, details={"decision_id": row.id})
        key = self.svc.kms.public_key(SCHEDULER_KEY)
        if key.tenant != SYSTEM_TENANT:
            raise QaiError("scheduler.bad_key", f"{SCHEDULER_KEY} belongs to tenant {key.tenant}", status=500)
        document = verified_document(data, key, entry.time)
        check_row(row, document)
        return document

    def row(self, decision_id: str, principal: Principal | None = None) -> DecisionRow:
        with self.svc.db.read() as s:
            row = s.get(DecisionRow, decision_id)
            if row is None or (principal is not None and not principal.can_read(row.tenant)):
                raise QaiError("scheduler.decision_not_found", f"no decision {decision_id}", status=404,
                               details={"decision_id": decision_id})
            s.expunge(row)
        return row

    def get(self, decision_id: str, principal: Principal) -> dict[str, Any]:
        row = self.row(decision_id, principal)
        path = row.decision_manifest_path
        document = self.load(row)
        # as a job reports its envelope's: in the outbox still, or the store's own protection of it
        storage = {"location": f"{self.svc.objects.location.rstrip('/')}/{path}",
                   **({"mode": "outbox"} if waiting(self.svc.db, path) else self.svc.objects.retention(path))}
        return {"decision_id": row.id, "job_id": row.job_id, "tenant": row.tenant, "created_at": row.created_at,
                "chosen_backend": row.chosen_backend, "em_method": row.em_method, "score": row.score,
                "confidence": row.confidence, "path": path, "ledger_index": row.ledger_index, "storage": storage,
                "document": document}

    def for_job(self, job_id: str) -> list[str]:
        with self.svc.db.read() as s:
            return list(s.scalars(select(DecisionRow.id).where(DecisionRow.job_id == job_id)
                                  .order_by(DecisionRow.created_at)))


def verified_document(data: bytes, key: Any, at: datetime) -> dict[str, Any]:
    """A decision envelope's document, its signatures checked under ``key`` at ``at``."""
    envelope = parse_envelope(data)
    if envelope.payload_type != DECISION_PAYLOAD_TYPE:
        raise QaiError("scheduler.decision_tampered", f"payload type {envelope.payload_type} is not a decision",
                       status=409)
    verify_envelope(envelope, key, at=at)
    document: dict[str, Any] = orjson.loads(envelope.payload_bytes())  # as its inputs were read back
    if document.get("type") != DECISION_STATEMENT:
        raise QaiError("scheduler.decision_tampered", "the payload is not a scheduler decision", status=409)
    return document


def document_payload(document: Mapping[str, Any], inputs_canonical: bytes | None,
                     body_canonical: bytes | None = None) -> bytes:
    """The RFC 8785 bytes of a decision document. With the canonical bytes of its inputs (and of
    its body) at hand, the object is written around them rather than serialising its largest
    members again: JCS writes an object's members sorted by key (section 3.2.3), each value in its
    own canonical form."""
    if inputs_canonical is None:
        return canonical_json(dict(document))
    done = {"inputs": inputs_canonical} | ({"decision": body_canonical} if body_canonical is not None else {})
    keys = sorted(document, key=lambda k: k.encode("utf-16-be"))
    parts = [canonical_json(k) + b":" + (done[k] if k in done else canonical_json(document[k])) for k in keys]
    return b"{" + b",".join(parts) + b"}"


def check_row(row: DecisionRow, document: Mapping[str, Any]) -> None:
    """The index row must say what the signed document says: a row pointed at another decision's
    document, or with edited summary columns (which steer the backlog and dispatch), is refused."""
    body = document["decision"]
    chosen = body.get("chosen") or {}
    run_seconds = chosen_run_seconds(document["inputs"], body)
    signed = {"id": document["decision_id"], "job_id": document["job_id"],
              "tenant": document["inputs"]["job"]["tenant"], "chosen_backend": chosen.get("backend_id"),
              "calibration_snapshot_id": chosen.get("calibration_snapshot_id"), "em_method": chosen.get("em_method"),
              "score": chosen.get("score"), "confidence": body["confidence"], "run_seconds": run_seconds}
    wrong = sorted(k for k, v in signed.items() if not _same(getattr(row, k), v))
    if wrong:
        raise QaiError("scheduler.decision_tampered", f"decision {row.id}: the index disagrees with the signed "
                       f"document on {', '.join(wrong)}", status=409, details={"decision_id": row.id, "fields": wrong})


def chosen_run_seconds(inputs: Mapping[str, Any], body: Mapping[str, Any]) -> float | None:
    """The chosen method's expected run time: recorded in the chosen block when the method was
    co-selected, else the policy's prediction for the chosen backend; None when nothing was chosen.
    The index row stores it and ``check_row`` compares it, so both derive it here."""
    chosen = body.get("chosen")
    if chosen is None:
        return None
    if "estimated_seconds" in chosen:
        return float(chosen["estimated_seconds"])
    backend = next((b for b in inputs["backends"] if b["backend_id"] == chosen.get("backend_id")), None)
    if backend is None:  # a document whose choice is not among its inputs: the row check reports it
        return None
    seconds = backend["prediction"]["estimated_seconds"]
    return None if seconds is None else float(seconds)


def _same(stored: Any, signed: Any) -> bool:
    if isinstance(stored, float) or isinstance(signed, float):
        return stored is not None and signed is not None and float(stored) == float(signed)
    return bool(stored == signed)


OPTION_FIELDS = ("method", "params", "shot_multiplier", "expected_fidelity", "estimated_seconds")


def prediction_record(p: Mapping[str, Any], *, options: bool = False) -> dict[str, Any]:
    """The part of an EM policy prediction a decision depends on (features are derived data:
    replay recomputes them from the manifest and the snapshot). With ``options``, the methods the
    engine may co-select: the policy's own first, then every alternative within the shot budget by
    name (not by the policy's float ranking, which a different BLAS could reorder)."""
    record = {f: p[f] for f in PREDICTION_FIELDS}
    if options:
        others = sorted((a for a in p["alternatives"] if a["within_budget"]), key=lambda a: a["method"])
        record["options"] = [{f: o[f] for f in OPTION_FIELDS} for o in (p, *others)]
    return record


def _request(qasm: str, job: Mapping[str, Any], snapshot_id: str) -> PredictRequest:
    from em_policy.service import PredictRequest

    return PredictRequest(qasm=qasm, calibration_snapshot_id=snapshot_id, shots=job["shots"],
                          shot_budget=job["shot_budget"])


def _policy_record(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The tenant policy fields the plugins read (a policy's other fields do not change a decision)."""
    return {k: policy[k] for k in ("min_crypto_mode", "allowed_backends", "qkd") if policy.get(k) is not None}


_services_lock = threading.Lock()


def pinned_policy(svc: Services, model_version: str) -> PolicyService:
    """A policy service answering with one model version (``name/number``), for replay."""
    from em_policy.service import PolicyService

    key = f"em_policy@{model_version}"
    with _services_lock:
        service = svc.extras.get(key)
        if not isinstance(service, PolicyService):
            service = PolicyService(svc, alias=model_version.rsplit("/", 1)[-1])
            svc.extras[key] = service
    return service


def scheduler(svc: Services) -> Scheduler:
    with _services_lock:
        found = svc.extras.get("scheduler")
        if not isinstance(found, Scheduler):
            found = Scheduler(svc)
            svc.extras["scheduler"] = found
    return found


def load_decision(svc: Services, decision_id: str) -> dict[str, Any]:
    """The verified decision document (``inputs`` and ``decision``) of ``decision_id``."""
    s = scheduler(svc)
    return s.load(s.row(decision_id))
