"""The transactional outbox: signed objects committed with their index rows, moved to the object store later.

Job envelopes stay in their ``manifests`` row (``envelope``, until ``uploaded_at`` is set); other
objects, a scheduler decision's envelope say, wait in ``object_outbox``. Either way the bytes are
written in the transaction that ledgers them, so a request never waits for an object-store round
trip (against S3, tens of milliseconds: longer than the rest of a decision). The :class:`Uploader`
writes them to their content-addressed, write-once paths, re-reads them, checks their sha256, and
only then drops the database copy. Until then :func:`outbox_bytes` serves them, so readers (the
ledger API, auditors, replay) never see the difference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from sqlalchemy import LargeBinary, String, Table, TableClause, bindparam, column, delete, func, select, table, update
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.expression import ColumnClause

from orchestrator.db import BackgroundLoop, Base, Database, UTCDateTime, utcnow
from orchestrator.objects import ObjectStore
from sdk.errors import QaiError
from sdk.ledger import sha256_hex

log = logging.getLogger(__name__)
REFUSED_RETRY_SECONDS = 600.0


class OutboxObjectRow(Base):
    """An object waiting for the uploader; the row is deleted once the store has it."""

    __tablename__ = "object_outbox"

    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


OBJECT_OUTBOX: Table = OutboxObjectRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class OutboxTable:
    """A table that holds objects until they are uploaded, by column names (so the uploader needs
    no component's code). Paths are content-addressed: each ends in its object's sha256. With
    ``uploaded_at`` the row stays and its copy is cleared; without, the row is deleted. ``prefix``:
    the object paths it can hold (None: any)."""

    name: str
    key: str
    path: str
    sha256: str
    data: str
    uploaded_at: str | None = None
    prefix: str | None = None

    @cached_property
    def clause(self) -> TableClause:  # one instance: statements built from it name one FROM
        columns: list[ColumnClause[Any]] = [column(self.key), column(self.path), column(self.sha256),
                                            column(self.data, LargeBinary)]
        if self.uploaded_at is not None:
            columns.append(column(self.uploaded_at, UTCDateTime()))
        return table(self.name, *{c.name: c for c in columns}.values())

    def pending(self) -> Any:
        """The WHERE clause of the rows still to upload."""
        t = self.clause
        waiting = t.c[self.data].is_not(None)
        return waiting if self.uploaded_at is None else waiting & t.c[self.uploaded_at].is_(None)


OUTBOXES = (
    OutboxTable("manifests", key="job_id", path="s3_path", sha256="envelope_sha256", data="envelope",
                uploaded_at="uploaded_at", prefix="manifests/"),
    OutboxTable("object_outbox", key="path", path="path", sha256="sha256", data="data"),
)


def outbox_bytes(db: Database, path: str) -> bytes | None:
    """The bytes of an object still in the outbox, or None (uploaded, or never there)."""
    with db.read() as s:
        for box in OUTBOXES:
            if box.prefix is None or path.startswith(box.prefix):
                t = box.clause
                data = s.scalar(select(t.c[box.data]).where(t.c[box.path] == path).limit(1))
                if data is not None:
                    return bytes(data)
    return None


def waiting(db: Database, path: str) -> bool:
    """Whether ``object_outbox`` still holds ``path`` (the store does not have it yet)."""
    with db.read() as s:
        return s.scalar(select(OBJECT_OUTBOX.c.path).where(OBJECT_OUTBOX.c.path == path).limit(1)) is not None


class Uploader:
    """Moves envelope bytes from the database outbox to the object store, verified by hash, with retries."""

    def __init__(self, db: Database, objects: ObjectStore, *, interval: float = 0.5, batch: int = 200) -> None:
        self.db, self.objects, self.batch = db, objects, batch
        self._loop = BackgroundLoop("outbox-uploader", self._step, interval)
        # Paths whose database copy is not their content (-> when refused): left in the outbox and on
        # the gauge, skipped by later batches so that they cannot hold the rest back, looked at again
        # after REFUSED_RETRY_SECONDS in case someone has mended the row.
        self.refused: dict[str, float] = {}

    def run_once(self) -> int:
        """Upload one batch from each outbox; returns how many objects were moved."""
        return sum(moved for _, moved in self._batches())

    def _batches(self) -> list[tuple[int, int]]:
        # One uploader at a time uploads (a database lock): the others would only repeat its writes.
        with self.db.try_lock("outbox-uploader") as mine:
            return [self._upload_batch(box) for box in OUTBOXES] if mine else []

    def _step(self) -> bool:
        """The loop's step: again at once only if a batch came back full (more is waiting) and
        moved something (a store that refuses everything is retried after the interval), else
        after the interval. Why not again whenever something moved: the uploader then followed
        every commit with a write of its own, and on SQLite each write holds the database's write
        lock, which the next request's commit waited for (2-3 % of scheduler decisions, up to 8 ms
        more; docs/benchmarks.md). Per interval, the rows that accumulated go in one write."""
        return any(found >= self.batch and moved for found, moved in self._batches())

    def _upload_batch(self, box: OutboxTable) -> tuple[int, int]:
        """(rows read from ``box``, objects moved)."""
        t = box.clause
        key, path, digest, data = t.c[box.key], t.c[box.path], t.c[box.sha256], t.c[box.data]
        query = select(key, path, digest, data).where(box.pending())
        now = time.monotonic()
        self.refused = {p: at for p, at in self.refused.items() if now - at < REFUSED_RETRY_SECONDS}
        if self.refused:
            query = query.where(path.not_in(sorted(self.refused)))
        with self.db.read() as s:
            rows = s.execute(query.limit(self.batch)).all()
        pending = []
        for p in rows:
            # A copy edited in the database is never written: its write-once path would then refuse
            # the true bytes for good. The check is against the path, which names the content's
            # sha256, and not only against the row's digest column, which is as easy to edit.
            found = sha256_hex(bytes(p[3]))
            if found == p[2] and p[1].rsplit("/", 1)[-1] == found:
                pending.append(p)
            else:
                self.refused[p[1]] = now
                log.error("the outbox copy of %s is not the object its path names; not uploaded", p[1])
        stored = self.objects.put_many([(p[1], bytes(p[3])) for p in pending])  # write-once: retries are safe
        put = []
        for p, error in zip(pending, stored, strict=True):
            if error is None:
                put.append(p)
            else:
                log.warning("outbox upload of %s failed (%s); will retry", p[1], error.code)
        moved: list[dict[str, Any]] = []
        for p, back in zip(put, self.objects.get_many([p[1] for p in put]), strict=True):  # read back: verified
            if isinstance(back, QaiError) or sha256_hex(back) != p[2]:
                log.warning("outbox upload of %s failed (%s); will retry", p[1],
                            back.code if isinstance(back, QaiError) else "object.corrupt")
                continue
            moved.append({"k": p[0]})
        if moved:  # one statement for the batch: the uploader must stay cheap next to ingest
            done = (delete(t) if box.uploaded_at is None else
                    update(t).values({box.uploaded_at: utcnow(), box.data: None}))
            with self.db.write() as s:
                s.connection().execute(done.where(key == bindparam("k"), box.pending()), moved)
        return len(rows), len(moved)

    def pending(self) -> int:
        """Objects in the outbox, in every table."""
        total = 0
        with self.db.read() as s:
            for box in OUTBOXES:
                total += int(s.scalar(select(func.count()).select_from(box.clause).where(box.pending())) or 0)
        return total

    def drain(self, timeout: float = 120.0) -> None:
        """Upload until the outbox is empty, waiting for another uploader that holds the lock.
        Raises ``outbox.stuck`` at the timeout, or as soon as only refused copies are left."""
        deadline = time.monotonic() + timeout
        while pending := self.pending():
            if self.run_once():
                continue
            if self.refused and pending <= len(self.refused):
                raise QaiError("outbox.stuck", f"{pending} outbox copies are not the objects their paths name",
                               status=503, details={"refused": sorted(self.refused)[:20]})
            if time.monotonic() > deadline:
                raise QaiError("outbox.stuck", f"{pending} envelopes could not be uploaded", status=503)
            time.sleep(0.05)

    def start(self) -> None:
        self._loop.start()

    def close(self) -> None:
        self._loop.close()
