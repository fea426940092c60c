"""Job ingest: signed run-manifests verified, indexed, ledgered and stored (SPEC-001 Must 3, Must 9).

``submit`` checks, in order: the document and envelope; every signature against the KMS public
keys at the manifest's ``created_at``; ``crypto_mode`` against what verified; the caller's tenant
and role; the tenant's crypto policy. It then writes the index row, the envelope bytes (the
outbox) and the ledger entry in **one transaction**, so a rejected or failed submission leaves
nothing behind. Resubmitting the same envelope returns the stored record; the same ``job_id`` with
other content is ``job.conflict``.

The object store is off the hot path: the :class:`Uploader` moves envelope bytes from the outbox
to the store (content-addressed, write-once), verifies them by hash, and only then drops the DB
copy. Until then readers are served from the outbox.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.types import BigInteger, Integer

from orchestrator.auth import Principal, Role, get_tenant
from orchestrator.db import Base, Database, UTCDateTime, utcnow
from orchestrator.ledger import Ledger, LedgerWrite
from orchestrator.objects import ObjectStore
from sdk.dsse import Envelope, envelope_bytes
from sdk.errors import QaiError, VerificationError
from sdk.ledger import IndexedEntry, LedgerEntry, Receipt, sha256_hex
from sdk.manifest import RunManifest, check_crypto_mode, load_document, verify_manifest
from sdk.signing import parse_keyid

log = logging.getLogger(__name__)
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


class Jobs:
    def __init__(self, db: Database, ledger: Ledger, objects: ObjectStore, kms_public_key: Any) -> None:
        self.db = db
        self.ledger = ledger
        self.objects = objects
        self.public_key = kms_public_key  # name -> KeyDocument (the KMS, in-process)
        ledger.object_fallbacks.append(self._outbox_bytes)

    def submit(self, body: bytes, principal: Principal) -> Submitted:
        env = _envelope(load_document(body))
        try:
            name = parse_keyid(env.signatures[0].keyid)[0]
            key = self.public_key(name)
        except QaiError as exc:
            if exc.code != "kms.key_not_found":
                raise
            raise VerificationError("signature.unknown_key", f"no key named {name!r}", details={"key": name}) from exc
        verified = verify_manifest(env, key)
        m = verified.manifest
        principal.require(m.tenant, Role.SUBMITTER, Role.SIGNER, Role.OPERATOR, action="submitting a job")
        check_policy(get_tenant(self.db, m.tenant).crypto_policy or {}, m, key.suite)
        data = envelope_bytes(env)
        digest = sha256_hex(data)
        job_id = str(m.job_id)
        existing = self._existing(job_id, digest)
        if existing is not None:
            return existing
        now = utcnow()
        row = ManifestRow(
            job_id=job_id, tenant=m.tenant, backend_id=m.backend_id, pqc_suite=m.pqc_suite,
            crypto_mode=m.crypto_mode, calibration_snapshot_id=m.calibration_snapshot_id, em_method=m.em_method,
            priority_class=m.priority_class, signature=json.dumps([s.model_dump() for s in env.signatures]),
            key_name=key.name, key_version=verified.version.version, envelope_sha256=digest,
            s3_path=object_key(digest), envelope=data, uploaded_at=None, ledger_index=None, status="pending",
            created_at=m.created_at, submitted_at=now, submitted_by=principal.subject)

        def before(s: Session) -> None:
            s.add(row)
            s.flush()

        def after(s: Session, e: IndexedEntry) -> None:
            s.execute(update(ManifestRow).where(ManifestRow.job_id == job_id).values(ledger_index=e.index))

        entry = LedgerEntry(type="run-manifest", sha256=digest, path=object_key(digest), tenant=m.tenant, time=now)
        result = self.ledger.submit([LedgerWrite(entry, before=before, after=after)]).result()[0]
        if isinstance(result, BaseException):
            again = self._existing(job_id, digest)  # a concurrent submission of the same job won
            if again is not None:
                return again
            raise result
        return Submitted(job_id, True, self.ledger.receipt(result.index))

    def _existing(self, job_id: str, digest: str) -> Submitted | None:
        with self.db.read() as s:
            row = s.get(ManifestRow, job_id)
        if row is None:
            return None
        if row.envelope_sha256 != digest:
            raise QaiError("job.conflict", f"job {job_id} exists with different content", status=409,
                           details={"job_id": job_id})
        if row.ledger_index is None:
            raise QaiError("job.corrupt", f"job {job_id} has no ledger entry", status=500)
        return Submitted(job_id, False, self.ledger.receipt(row.ledger_index))

    def get(self, job_id: str, principal: Principal) -> dict[str, Any]:
        with self.db.read() as s:
            row = s.get(ManifestRow, job_id)
        if row is None or not principal.can_read(row.tenant):
            raise QaiError("job.not_found", f"no job {job_id}", status=404, details={"job_id": job_id})
        data = row.envelope if row.envelope is not None else self.objects.get(row.s3_path)
        return {**self._summary(row), "envelope": json.loads(data)}

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

    def _outbox_bytes(self, path: str) -> bytes | None:
        if not path.startswith("manifests/"):
            return None
        with self.db.read() as s:
            return s.scalar(select(ManifestRow.envelope).where(ManifestRow.s3_path == path).limit(1))


class Uploader:
    """Moves envelope bytes from the DB outbox to the object store, verified by hash, with retries."""

    def __init__(self, db: Database, objects: ObjectStore, *, interval: float = 0.5, batch: int = 200) -> None:
        self.db, self.objects, self.interval, self.batch = db, objects, interval, batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Upload one batch; returns how many objects were moved."""
        with self.db.read() as s:
            pending = s.execute(select(ManifestRow.job_id, ManifestRow.s3_path, ManifestRow.envelope_sha256,
                                       ManifestRow.envelope)
                                .where(ManifestRow.uploaded_at.is_(None)).limit(self.batch)).all()
        moved = 0
        for job_id, path, digest, data in pending:
            if data is None:
                continue
            try:
                self.objects.put(path, data)  # write-once and idempotent: a retry after a crash is safe
                if sha256_hex(self.objects.get(path)) != digest:
                    raise QaiError("object.corrupt", f"stored {path} does not hash to {digest}", status=500)
            except QaiError as exc:
                log.warning("outbox upload of %s failed (%s); will retry", path, exc.code)
                continue
            with self.db.write() as s:
                s.execute(update(ManifestRow).where(ManifestRow.job_id == job_id, ManifestRow.uploaded_at.is_(None))
                          .values(uploaded_at=utcnow(), envelope=None))
            moved += 1
        return moved

    def drain(self) -> None:
        while self.run_once():
            pass

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    if not self.run_once():
                        self._stop.wait(self.interval)
                except Exception:
                    log.exception("outbox uploader failed; retrying")
                    self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="outbox-uploader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
