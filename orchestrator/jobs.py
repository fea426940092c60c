"""Job ingest: signed run-manifests verified, indexed, ledgered and stored (SPEC-001 Must 3, Must 9).

``submit`` checks, in order: the document and envelope; every signature against the KMS public
keys at the manifest's ``created_at``; ``crypto_mode`` against what verified; the caller's tenant
and role; the tenant's crypto policy. It then writes the index row, the envelope bytes (the
outbox) and the ledger entry in **one transaction**, so a rejected or failed submission leaves
nothing behind. Resubmitting the same envelope returns the stored record; the same ``job_id`` with
other content is ``job.conflict``.

The object store is off the hot path: the outbox uploader (:mod:`orchestrator.outbox`) moves
envelope bytes to the store (content-addressed, write-once), verifies them by hash, and only then
drops the DB copy. Until then readers are served from the outbox.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, String, Table, Text, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import BigInteger, Integer

from orchestrator import metrics
from orchestrator.auth import Principal, Role, get_tenant
from orchestrator.db import Base, Database, UTCDateTime, insert_rows, utcnow
from orchestrator.ledger import Ledger, LedgerWrite
from orchestrator.objects import ObjectStore
from sdk.dsse import Envelope, envelope_bytes
from sdk.errors import QaiError, VerificationError
from sdk.ledger import LedgerEntry, Receipt, sha256_hex
from sdk.manifest import RunManifest, check_crypto_mode, load_document, verify_manifest
from sdk.signing import KeyDocument, parse_keyid

log = logging.getLogger(__name__)
MAX_BATCH = 1000  # envelopes per POST /v1/jobs/batch (the request size limit usually binds first)
JOB_STATUSES = ("pending", "queued", "running", "completed", "failed", "cancelled")


class ManifestRow(Base):
    __tablename__ = "manifests"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    backend_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    pqc_suite: Mapped[str] = mapped_column(String(128))
    crypto_mode: Mapped[str] = mapped_column(String(16))
    calibration_snapshot_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    em_method: Mapped[str] = mapped_column(String(64))
    priority_class: Mapped[str] = mapped_column(String(16))
    signature: Mapped[str] = mapped_column(Text)
    key_name: Mapped[str] = mapped_column(String(128))
    key_version: Mapped[int] = mapped_column(Integer)
    envelope_sha256: Mapped[str] = mapped_column(String(64))
    s3_path: Mapped[str] = mapped_column(String(512))
    envelope: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    uploaded_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    ledger_index: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    submitted_by: Mapped[str] = mapped_column(String(128))


MANIFESTS: Table = ManifestRow.__table__  # type: ignore[assignment]


def object_key(envelope_sha256: str) -> str:
    return f"manifests/{envelope_sha256}"


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool  # False when the same envelope had been submitted before
    receipt: Receipt


def _envelope(document: Any) -> Envelope:
    try:
        return Envelope.model_validate(document)
    except ValueError as exc:
        raise QaiError("dsse.malformed", f"not a DSSE envelope: {str(exc).splitlines()[0]}", status=422) from exc


def check_policy(policy: dict[str, Any], manifest: RunManifest, suite: str) -> None:
    """The tenant's crypto policy: a minimum crypto mode, allowed suites and allowed backends."""
    minimum = policy.get("min_crypto_mode")
    if minimum:
        try:
            check_crypto_mode(str(minimum), suite.split("+"))
        except VerificationError as exc:
            raise QaiError("policy.crypto_mode", f"tenant policy requires {minimum}", status=403,
                           details={"suite": suite}) from exc
    allowed = policy.get("allowed_suites")
    if allowed and suite not in allowed:
        raise QaiError("policy.suite_forbidden", f"tenant policy does not allow {suite}", status=403,
                       details={"allowed": list(allowed)})
    backends = policy.get("allowed_backends")
    if backends and manifest.backend_id is not None and manifest.backend_id not in backends:
        raise QaiError("policy.backend_forbidden", f"tenant policy does not allow backend {manifest.backend_id}",
                       status=403, details={"allowed": list(backends)})


def _conflict(job_id: str) -> QaiError:
    return QaiError("job.conflict", f"job {job_id} exists with different content", status=409,
                    details={"job_id": job_id})


@dataclass
class _Accepted:
    """A submission that passed every check, on its way to the index and the ledger."""

    row: dict[str, Any]  # the manifests row
    entry: LedgerEntry
    positions: list[int] = field(default_factory=list)  # where the batch carries it
    outcome: Submitted | QaiError | None = None

    @property
    def job_id(self) -> str:
        return str(self.row["job_id"])

    @property
    def digest(self) -> str:
        return str(self.row["envelope_sha256"])



@dataclass
class Checked:
    """A batch between :meth:`Jobs.check_many` and :meth:`Jobs.store`."""

    results: list[Submitted | QaiError | None]  # per document: its error or earlier record, else None yet
    repeats: list[tuple[int, _Accepted]] = field(default_factory=list)  # (position, its first submission)
    todo: list[_Accepted] = field(default_factory=list)  # to index and ledger


def _store_rows(accepted: Sequence[_Accepted]) -> LedgerWrite:
    """The ledger write of a batch: the index rows of the jobs not stored yet, in bulk, each with
    the index its ledger entry will get."""

    def claim(s: Connection, first: int) -> list[BaseException | None]:
        # Runs under the ledger lock, and only ledger writes insert manifests rows: what this query
        # finds is all a concurrent submission of the same job can have stored.
        taken = set(s.scalars(select(ManifestRow.job_id).where(ManifestRow.job_id.in_([a.job_id for a in accepted]))))
        rows = [a for a in accepted if a.job_id not in taken]
        insert_rows(s, MANIFESTS, [a.row | {"ledger_index": first + k} for k, a in enumerate(rows)])
        return [QaiError("job.exists", f"job {a.job_id} was stored concurrently", status=409)
                if a.job_id in taken else None for a in accepted]

    return LedgerWrite([a.entry for a in accepted], before=claim)


class Jobs:

    def __init__(self, db: Database, ledger: Ledger, objects: ObjectStore, kms_public_key: Any) -> None:
        self.db = db
        self.ledger = ledger
        self.objects = objects
        self.public_key = kms_public_key  # name -> KeyDocument (the KMS, in-process)

    def submit(self, body: bytes, principal: Principal) -> Submitted:
        """Submit one envelope (JSON or YAML bytes); raises the :class:`QaiError` that rejects it."""
        try:
            document = load_document(body)
        except QaiError as exc:
            metrics.JOBS_REJECTED.labels(exc.code).inc()
            raise
        result = self.submit_many([document], principal)[0]
        if isinstance(result, QaiError):
            raise result
        return result

    def submit_batch(self, body: bytes, principal: Principal) -> list[Submitted | QaiError]:
        """``{"envelopes": [...]}`` (JSON or YAML bytes) → one result per envelope, in order."""
        return self.store(self.check_batch(body, principal))

    def check_batch(self, body: bytes, principal: Principal) -> Checked:
        """The first, CPU-bound half of :meth:`submit_batch`: parse and check every envelope."""
        try:
            document = load_document(body, max_bytes=len(body))  # the HTTP layer bounds the size
            envelopes = document.get("envelopes") if isinstance(document, dict) else None
            if not isinstance(envelopes, list) or set(document) != {"envelopes"}:
                raise QaiError("job.bad_batch", 'a batch is {"envelopes": [envelope, ...]}', status=422)
            if not 1 <= len(envelopes) <= MAX_BATCH:
                raise QaiError("job.bad_batch", f"a batch holds 1 to {MAX_BATCH} envelopes, not {len(envelopes)}",
                               status=422, details={"max": MAX_BATCH})
        except QaiError as exc:
            metrics.JOBS_REJECTED.labels(exc.code).inc()
            raise
        return self.check_many(envelopes, principal)

    def submit_many(self, documents: Sequence[Any], principal: Principal) -> list[Submitted | QaiError]:
        """Submit parsed envelopes; one result per document, in order.

        Each document stands alone: a rejected one gets its error and leaves nothing behind, the
        others are stored. Key documents and tenant policies are read once per batch, existing
        jobs in one query, and every new job is ledgered in one shared transaction.
        """
        return self.store(self.check_many(documents, principal))

    def check_many(self, documents: Sequence[Any], principal: Principal) -> Checked:
        """Everything before the write: each document checked (see :meth:`_check`), repeats within
        the batch paired with their first, and jobs stored before answered from the index."""
        checked = Checked([None] * len(documents))
        keys: dict[str, KeyDocument | QaiError] = {}
        policies: dict[str, dict[str, Any] | QaiError] = {}
        accepted: dict[str, _Accepted] = {}  # job_id -> the first valid submission in this batch
        for pos, document in enumerate(documents):
            try:
                a = self._check(document, principal, keys, policies)
            except QaiError as exc:
                checked.results[pos] = exc
                continue
            first = accepted.get(a.job_id)
            if first is None:
                accepted[a.job_id] = a
                a.positions.append(pos)
            elif first.digest == a.digest:
                checked.repeats.append((pos, first))
            else:
                checked.results[pos] = _conflict(a.job_id)
        for a in self._known(accepted):  # submitted before this batch: answered from the index
            del accepted[a.job_id]
            checked.results[a.positions[0]] = a.outcome
        checked.todo = list(accepted.values())
        return checked

    def store(self, checked: Checked) -> list[Submitted | QaiError]:
        """Index and ledger the checked jobs not stored yet, in one shared transaction; one result
        per document, in order."""
        results, todo = checked.results, checked.todo
        outcomes = self.ledger.submit([_store_rows(todo)]).result() if todo else []
        appended = [o for o in outcomes if not isinstance(o, BaseException)]
        receipts = iter(self.ledger.receipts(appended, appended=True))
        for a, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                a.outcome = self._after_failure(a, outcome)
            else:
                a.outcome = Submitted(a.job_id, True, next(receipts))
            results[a.positions[0]] = a.outcome
        for pos, first in checked.repeats:
            out = first.outcome
            results[pos] = Submitted(out.job_id, False, out.receipt) if isinstance(out, Submitted) else out
        assert all(r is not None for r in results)
        for r in results:
            if isinstance(r, QaiError):
                metrics.JOBS_REJECTED.labels(r.code).inc()
            elif r is not None and r.created:
                metrics.JOBS_INGESTED.inc()
        return results  # type: ignore[return-value]

    def _check(self, document: Any, principal: Principal, keys: dict[str, KeyDocument | QaiError],
               policies: dict[str, dict[str, Any] | QaiError]) -> _Accepted:
        """Everything that needs no write: envelope, signatures, crypto mode, role, tenant policy."""
        env = _envelope(document)
        name = parse_keyid(env.signatures[0].keyid)[0]
        if name not in keys:
            try:
                keys[name] = self.public_key(name)
            except QaiError as exc:
                keys[name] = exc if exc.code != "kms.key_not_found" else VerificationError(
                    "signature.unknown_key", f"no key named {name!r}", details={"key": name})
        key = keys[name]
        if isinstance(key, QaiError):
            raise key
        try:
            verified = verify_manifest(env, key)
        except QaiError:
            metrics.SIGNATURES.labels("verify", key.suite, "error").inc()
            raise
        metrics.SIGNATURES.labels("verify", key.suite, "ok").inc()
        m = verified.manifest
        principal.require(m.tenant, Role.SUBMITTER, Role.SIGNER, Role.OPERATOR, action="submitting a job")
        if m.tenant not in policies:
            try:
                policies[m.tenant] = get_tenant(self.db, m.tenant).crypto_policy or {}
            except QaiError as exc:
                policies[m.tenant] = exc
        policy = policies[m.tenant]
        if isinstance(policy, QaiError):
            raise policy
        check_policy(policy, m, key.suite)
        data = envelope_bytes(env)
        digest = sha256_hex(data)
        now = utcnow()
        row = dict(
            job_id=str(m.job_id), tenant=m.tenant, backend_id=m.backend_id, pqc_suite=m.pqc_suite,
            crypto_mode=m.crypto_mode, calibration_snapshot_id=m.calibration_snapshot_id, em_method=m.em_method,
            priority_class=m.priority_class, signature=json.dumps([s.model_dump() for s in env.signatures]),
            key_name=key.name, key_version=verified.version.version, envelope_sha256=digest,
            s3_path=object_key(digest), envelope=data, uploaded_at=None, ledger_index=None, status="pending",
            created_at=m.created_at, submitted_at=now, submitted_by=principal.subject)
        entry = LedgerEntry(type="run-manifest", sha256=digest, path=object_key(digest), tenant=m.tenant, time=now)
        return _Accepted(row, entry)

    def _known(self, accepted: dict[str, _Accepted]) -> list[_Accepted]:
        """The accepted jobs that are already stored, with their outcome set (or job.conflict)."""
        if not accepted:
            return []
        with self.db.read() as s:
            rows = s.execute(select(ManifestRow.job_id, ManifestRow.envelope_sha256, ManifestRow.ledger_index)
                             .where(ManifestRow.job_id.in_(list(accepted)))).all()
        known = []
        for job_id, digest, index in rows:
            a = accepted[job_id]
            a.outcome = self._stored(job_id, a.digest, digest, index)
            known.append(a)
        return known

    def _stored(self, job_id: str, digest: str, stored_digest: str, index: int | None) -> Submitted | QaiError:
        if stored_digest != digest:
            return _conflict(job_id)
        if index is None:
            return QaiError("job.corrupt", f"job {job_id} has no ledger entry", status=500)
        return Submitted(job_id, False, self.ledger.receipt(index))

    def _after_failure(self, a: _Accepted, exc: BaseException) -> Submitted | QaiError:
        # Most often a concurrent submission of the same job won the insert: answer as for a resubmission.
        with self.db.read() as s:
            row = s.execute(select(ManifestRow.envelope_sha256, ManifestRow.ledger_index)
                            .where(ManifestRow.job_id == a.job_id)).first()
        if row is not None:
            return self._stored(a.job_id, a.digest, row[0], row[1])
        if isinstance(exc, QaiError):
            return exc
        log.error("storing job %s failed", a.job_id, exc_info=exc)
        return QaiError("job.store_failed", f"job {a.job_id} could not be stored", status=500,
                        details={"job_id": a.job_id})

    def get(self, job_id: str, principal: Principal) -> dict[str, Any]:
        with self.db.read() as s:
            row = s.get(ManifestRow, job_id)
        if row is None or not principal.can_read(row.tenant):
            raise QaiError("job.not_found", f"no job {job_id}", status=404, details={"job_id": job_id})
        data = row.envelope if row.envelope is not None else self.objects.get(row.s3_path)
        stored = {"location": f"{self.objects.location.rstrip('/')}/{row.s3_path}",
                  **(self.objects.retention(row.s3_path) if row.uploaded_at is not None else {"mode": "outbox"})}
        return {**self._summary(row), "storage": stored, "envelope": json.loads(data)}

    def list(self, principal: Principal, *, tenant: str | None = None, status: str | None = None,
             since: datetime | None = None, limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        q = select(ManifestRow).order_by(ManifestRow.submitted_at, ManifestRow.job_id).limit(limit + 1)
        if tenant is not None:
            q = q.where(ManifestRow.tenant == tenant)
        if status is not None:
            q = q.where(ManifestRow.status == status)
        if since is not None:
            q = q.where(ManifestRow.submitted_at >= since)
        if principal.role not in (Role.ADMIN, Role.AUDITOR):
            q = q.where(ManifestRow.tenant == (principal.tenant or ""))
        if cursor:
            try:
                at, after_id = json.loads(base64.urlsafe_b64decode(cursor))
                at = datetime.fromisoformat(at)
            except (ValueError, TypeError) as exc:
                raise QaiError("job.bad_cursor", "malformed cursor", status=400) from exc
            q = q.where((ManifestRow.submitted_at > at) |
                        ((ManifestRow.submitted_at == at) & (ManifestRow.job_id > after_id)))
        with self.db.read() as s:
            rows = list(s.scalars(q))
        nxt = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            nxt = base64.urlsafe_b64encode(json.dumps([last.submitted_at.isoformat(), last.job_id]).encode()).decode()
        return {"jobs": [self._summary(r) for r in rows], "next_cursor": nxt}

    @staticmethod
    def _summary(row: ManifestRow) -> dict[str, Any]:
        return {"job_id": row.job_id, "tenant": row.tenant, "status": row.status, "backend_id": row.backend_id,
                "crypto_mode": row.crypto_mode, "pqc_suite": row.pqc_suite, "priority_class": row.priority_class,
                "key": f"{row.key_name}@{row.key_version}", "envelope_sha256": row.envelope_sha256,
                "s3_path": row.s3_path, "uploaded": row.uploaded_at is not None, "ledger_index": row.ledger_index,
                "created_at": row.created_at, "submitted_at": row.submitted_at}

