"""The KMS audit log: append-only and hash-chained.

Each record's hash is ``SHA-256(prev_hash ‖ JCS(record))`` where the record is its sequence
number, time, actor, operation, key, version, result and details. The first record chains from 64
zeros. The table refuses UPDATE and DELETE through triggers; the chain makes any edit that slips
past them (a superuser, a restored backup) visible to :func:`verify_chain`, which names the first
record that breaks. The chain head is what a ledger checkpoint of the KMS commits to.

Records never carry key bytes, seeds or PINs: only names, versions, algorithms and the SHA-256 of
what was signed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from kms.models import KmsAuditRecord
from orchestrator import metrics
from orchestrator.db import Database, GroupCommit, insert_rows, utcnow
from sdk.canonical import canonical_json

GENESIS_HASH = "0" * 64
KMS_AUDIT_TABLE: Table = KmsAuditRecord.__table__  # type: ignore[assignment]  # Core insert: no ORM overhead
AUDIT_LOCK = "kms_audit_log"


@dataclass(frozen=True)
class AuditEvent:
    actor: str
    operation: str  # create | rotate | disable | revoke | sign | verify | unseal | decapsulate
    result: str  # ok | error
    key_name: str | None = None
    key_version: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def _record_fields(seq: int, at: datetime, e: AuditEvent | KmsAuditRecord) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at.isoformat(),
        "actor": e.actor,
        "operation": e.operation,
        "key_name": e.key_name,
        "key_version": e.key_version,
        "result": e.result,
        "detail": e.detail,
    }


def chain_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical_json(fields)).hexdigest()


# the chain head; built once (see orchestrator.db.insert_statement)
_HEAD = select(KmsAuditRecord.seq, KmsAuditRecord.record_hash).order_by(KmsAuditRecord.seq.desc()).limit(1)


def append(session: Session | Connection, events: Iterable[AuditEvent], *, at: datetime | None = None) -> str:
    """Append ``events`` inside the caller's write transaction; return the new chain head.

    The caller must hold the writer lock (``Database.write(lock=AUDIT_LOCK)`` or
    ``Database.write_connection(lock=AUDIT_LOCK)``) so that no other writer reads the same head.
    """
    last = session.execute(_HEAD).first()
    seq, head = (last[0], last[1]) if last else (0, GENESIS_HASH)
    when = at or utcnow()
    rows = []
    for event in events:
        seq += 1
        new_head = chain_hash(head, _record_fields(seq, when, event))
        rows.append({"seq": seq, "at": when, "actor": event.actor, "operation": event.operation,
                     "key_name": event.key_name, "key_version": event.key_version,
                     "result": event.result, "detail": event.detail, "prev_hash": head,
                     "record_hash": new_head})
        head = new_head
    insert_rows(session, KMS_AUDIT_TABLE, rows)
    return head


class AuditWriter:
    """Group commit for audit records (:class:`orchestrator.db.GroupCommit`).

    ``submit`` returns a future that resolves to the chain head once the events are committed, so
    a signer can compute its signature while its record is being written (the KMS writes sign
    records ahead of the signature and returns nothing before the commit).
    """

    def __init__(self, db: Database, *, max_batch: int = 1000) -> None:
        self._writer: GroupCommit[AuditEvent, str] = GroupCommit(
            db, AUDIT_LOCK, self._apply, name="kms-audit-writer", max_batch=max_batch, core=True)

    @staticmethod
    def _apply(conn: Connection, events: list[AuditEvent]) -> list[str]:
        head = append(conn, events)
        return [head] * len(events)

    def submit(self, events: Iterable[AuditEvent]) -> Future[str]:
        events = list(events)
        inner = self._writer.submit(events)
        outer: Future[str] = Future()

        def done(f: Future[list[str]]) -> None:
            exc = f.exception()
            if exc is not None:
                outer.set_exception(exc)
            else:
                for e in events:
                    metrics.KMS_AUDIT_RECORDS.labels(e.operation, e.result).inc()
                heads = f.result()
                outer.set_result(heads[-1] if heads else "")

        inner.add_done_callback(done)
        return outer

    def write(self, *events: AuditEvent) -> str:
        """Append and wait for the commit."""
        return self.submit(events).result()

    def close(self) -> None:
        self._writer.close()


@dataclass
class ChainReport:
    ok: bool
    records: int
    head: str
    first_break: dict[str, Any] | None = None


def verify_chain(db: Database, *, progress: Callable[[int], None] | None = None) -> ChainReport:
    """Walk the chain in sequence order; stop at the first record that breaks it."""
    expected_seq, head, count = 1, GENESIS_HASH, 0
    with db.read() as session:
        rows = session.execute(
            select(KmsAuditRecord).order_by(KmsAuditRecord.seq).execution_options(yield_per=2000)
        ).scalars()
        for row in rows:
            reason = None
            if row.seq != expected_seq:
                reason = f"sequence gap: expected {expected_seq}, found {row.seq}"
            elif row.prev_hash != head:
                reason = "prev_hash does not match the previous record's hash"
            elif chain_hash(head, _record_fields(row.seq, row.at, row)) != row.record_hash:
                reason = "record content does not match its hash (edited)"
            if reason is not None:
                return ChainReport(False, count, head, {"seq": row.seq, "reason": reason})
            head, expected_seq, count = row.record_hash, expected_seq + 1, count + 1
            if progress is not None and count % 1000 == 0:
                progress(count)
    return ChainReport(True, count, head)
