"""The run ledger: an append-only Merkle log (RFC 9162 §2.1) with signed C2SP checkpoints.

* **Sequencing.** Appends go through a :class:`~orchestrator.db.GroupCommit` writer: everything
  queued in this process is appended in one transaction under the ``ledger`` writer lock (a
  PostgreSQL advisory lock; SQLite's write lock), so indices are gapless and unique across threads,
  workers and processes, and concurrent callers share commits. ``append`` (a caller that waits)
  writes on the caller's thread when nothing is queued or being written.
* **Storage.** Entries, every perfect subtree hash (``ledger_nodes``) and checkpoints live in three
  append-only tables (UPDATE/DELETE refused by triggers on both engines). A proof reads O(log n)
  stored nodes in one query; nothing ever recomputes the tree.
* **Checkpoints.** Every ``checkpoint_every`` entries, or every ``checkpoint_interval`` seconds
  when the log grew, the size and root are signed through the KMS with a hybrid suite and stored,
  and published to the object store as ``ledger/checkpoint`` (latest) and
  ``ledger/checkpoints/<size>`` (history). Once :meth:`Ledger.start` runs the checkpointer thread
  (``qai serve``), it signs them, woken by the writer when ``checkpoint_every`` is reached, so
  appends never wait for a checkpoint; without it the writer signs them inline, after the commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, LargeBinary, String, Table, Text, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, Session, mapped_column

from kms.remote import KeyService
from orchestrator import metrics
from orchestrator.auth import Principal, ensure_tenant
from orchestrator.db import BackgroundLoop, Base, Database, GroupCommit, UTCDateTime, insert_rows, utcnow
from orchestrator.objects import ObjectStore
from orchestrator.outbox import outbox_bytes
from sdk import merkle
from sdk.checkpoint import Checkpoint, SignedCheckpoint, format_note, sign_lines
from sdk.errors import QaiError
from sdk.ledger import ENTRY_TYPES, SYSTEM_TENANT, IndexedEntry, LedgerEntry, Receipt, sha256_hex
from sdk.signing import KeyDocument

log = logging.getLogger(__name__)
LEDGER_LOCK = "ledger"
CHECKPOINT_LOCK = "ledger_checkpoint"
LATEST_KEY = "ledger/checkpoint"
HISTORY_PREFIX = "ledger/checkpoints/"
_LEVEL_SHIFT = 48  # node id = level << 48 | index: 2^48 leaves is far beyond any log here


class LedgerEntryRow(Base):
    __tablename__ = "ledger_entries"

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    entry_type: Mapped[str] = mapped_column(String(40))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(512))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    leaf_hash: Mapped[str] = mapped_column(String(64), index=True)


class LedgerNodeRow(Base):
    __tablename__ = "ledger_nodes"

    node_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class LedgerCheckpointRow(Base):
    __tablename__ = "ledger_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    note: Mapped[str] = mapped_column(Text)
    key_name: Mapped[str] = mapped_column(String(128))
    key_version: Mapped[int] = mapped_column(BigInteger)


ENTRIES: Table = LedgerEntryRow.__table__  # type: ignore[assignment]
NODES: Table = LedgerNodeRow.__table__  # type: ignore[assignment]


def node_id(node: merkle.Node) -> int:
    level, index = node
    return level << _LEVEL_SHIFT | index


def _node(nid: int) -> merkle.Node:
    return nid >> _LEVEL_SHIFT, nid & ((1 << _LEVEL_SHIFT) - 1)


def _indexed(row: LedgerEntryRow) -> IndexedEntry:
    return IndexedEntry(index=row.idx, type=row.entry_type, sha256=row.sha256,  # type: ignore[arg-type]
                        path=row.path, tenant=row.tenant, time=row.at, leaf=row.leaf_hash)


@dataclass(frozen=True)
class LedgerWrite:
    """Entries plus the caller's own rows for them, written in the entries' transaction.

    ``before(connection, first)`` runs first, in a savepoint, and writes the caller's rows in bulk
    with Core statements (the ledger's transaction is a Core connection: the ORM session's
    machinery was a third of a scheduler decision's append; docs/benchmarks.md).
    It returns, per entry, ``None`` to append it or the exception that rejects it (a duplicate key,
    say), having written nothing for a rejected entry; returning ``None`` instead of a list accepts
    them all. The accepted entries get the indices ``first``, ``first + 1``, … in order, so the
    rows can carry them without a later UPDATE. If ``before`` raises, this write alone fails and
    none of its entries is appended, so the ledger has no orphan entries and the caller's index has
    no unledgered rows. ``after`` receives the appended entries, in order, with their indices.
    """

    entries: Sequence[LedgerEntry]
    before: Callable[[Connection, int], Sequence[BaseException | None] | None] | None = None
    after: Callable[[Connection, Sequence[IndexedEntry]], None] | None = None


def system_key(db: Database, kms: KeyService, name: str, *, suite: str, subject: str) -> KeyDocument:
    """The system tenant's signing key ``name``, created on first use (by whichever process gets
    there first). The caller checks the key it gets: names are global, so another tenant may hold it."""
    try:
        return kms.public_key(name)
    except QaiError as exc:
        if exc.code != "kms.key_not_found":
            raise
    ensure_tenant(db, SYSTEM_TENANT)
    try:
        return kms.create_key(name, tenant=SYSTEM_TENANT, suite=suite, principal=Principal.system(subject))
    except QaiError as err:  # another process created it first
        if err.code != "kms.key_exists":
            raise
        return kms.public_key(name)


def system_signing_key(db: Database, kms: KeyService, name: str, *, suite: str, subject: str, error_code: str) -> str:
    """``system_key`` for the platform's own statements (dataset manifests, model versions): the key
    named ``name`` must be a signing key of the system tenant, or ``error_code`` (500)."""
    key = system_key(db, kms, name, suite=suite, subject=subject)
    if key.tenant != SYSTEM_TENANT or key.purpose != "signing":
        raise QaiError(error_code, f"key {name} belongs to tenant {key.tenant}; it must be a signing key of tenant "
                       f"{SYSTEM_TENANT}", status=500)
    return name


@dataclass(frozen=True)
class LedgerConfig:
    origin: str = "qai.local/ledger"
    checkpoint_every: int = 1000
    checkpoint_interval: float = 10.0
    key_name: str = "qai.ledger-checkpoint"
    suite: str = "ML-DSA-65+ECDSA-P256"
    max_batch: int = 2000


_LAST_INDEX = select(func.max(LedgerEntryRow.idx))  # built once: see orchestrator.db.insert_statement


def tree_size(session: Session | Connection) -> int:
    last = session.scalar(_LAST_INDEX)
    return 0 if last is None else int(last) + 1


def read_nodes(session: Session | Connection, nodes: Iterable[merkle.Node]) -> dict[merkle.Node, bytes]:
    ids = [node_id(n) for n in nodes]
    if not ids:
        return {}
    rows = session.execute(select(LedgerNodeRow.node_id, LedgerNodeRow.hash)
                           .where(LedgerNodeRow.node_id.in_(ids))).all()
    found = {_node(i): bytes(h) for i, h in rows}
    if len(found) != len(ids):
        raise QaiError("ledger.corrupt", "stored tree nodes are missing", status=500,
                       details={"missing": len(ids) - len(found)})
    return found


def append_entries(session: Session | Connection, entries: Sequence[LedgerEntry]) -> list[IndexedEntry]:
    """Append ``entries`` in the caller's write transaction, which holds :data:`LEDGER_LOCK`."""
    return _append(session, entries, None)[0]


def _append(session: Session | Connection, entries: Sequence[LedgerEntry], frontier: merkle.CompactRange | None,
            size: int | None = None) -> tuple[list[IndexedEntry], merkle.CompactRange]:
    """Append and return the new compact range. ``frontier``, this process's compact range after
    its previous batch, is used only when no other writer appended since (same size): that saves
    reading it back from the node table."""
    size = tree_size(session) if size is None else size
    if frontier is not None and frontier.size == size:
        compact = merkle.CompactRange(size, list(frontier.hashes))
    else:
        nodes = merkle.CompactRange.nodes_for(size)
        stored = read_nodes(session, nodes)
        compact = merkle.CompactRange(size, [stored[n] for n in nodes])
    rows: list[dict[str, Any]] = []
    node_rows: list[dict[str, Any]] = []
    out: list[IndexedEntry] = []
    for e in entries:
        leaf = e.leaf_hash()
        index = compact.size
        node_rows.extend({"node_id": node_id(n), "hash": h} for n, h in compact.append(leaf))
        rows.append({"idx": index, "entry_type": e.type, "sha256": e.sha256, "path": e.path,
                     "tenant": e.tenant, "at": e.time, "leaf_hash": leaf.hex()})
        out.append(IndexedEntry.model_construct(index=index, leaf=leaf.hex(), **dict(e)))  # e is validated
    insert_rows(session, ENTRIES, rows)
    insert_rows(session, NODES, node_rows)
    return out, compact


class Ledger:
    def __init__(self, db: Database, kms: KeyService, objects: ObjectStore, config: LedgerConfig | None = None) -> None:
        self.db = db
        self.kms = kms
        self.objects = objects
        self.config = config or LedgerConfig()
        self._writer: GroupCommit[LedgerEntry | LedgerWrite, list[IndexedEntry | BaseException]] = GroupCommit(
            db, LEDGER_LOCK, self._apply, name="ledger-sequencer", max_batch=self.config.max_batch, core=True)
        self._frontier: merkle.CompactRange | None = None  # after the last committed batch
        self._pending: merkle.CompactRange | None = None
        self._writer.after_commit = self._after_commit
        self._checkpointed = -1  # size of the last checkpoint this process knows of
        self._checkpoint_lock = threading.Lock()
        self._size_due = False  # the writer saw checkpoint_every reached and woke the checkpointer
        self._timer = BackgroundLoop("ledger-checkpointer", self._checkpoint_tick, self.config.checkpoint_interval,
                                     wait_first=True)
        self._key: KeyDocument | None = None

    # --- appending ------------------------------------------------------------------------------

    def submit(self, entries: Iterable[LedgerEntry | LedgerWrite], *, here: bool = False
               ) -> Future[list[IndexedEntry | BaseException]]:
        """Queue entries and writes; the future has one result per entry, writes' entries inline.
        ``here``: when nothing is queued or being written, write them on this thread (the future
        is done on return; see :class:`~orchestrator.db.GroupCommit`)."""
        flat: Future[list[IndexedEntry | BaseException]] = Future()
        start = time.perf_counter()

        def done(f: Future[list[list[IndexedEntry | BaseException]]]) -> None:
            metrics.LEDGER_APPEND_SECONDS.observe(time.perf_counter() - start)
            try:
                flat.set_result([r for per_item in f.result() for r in per_item])
            except BaseException as exc:
                flat.set_exception(exc)

        self._writer.submit(entries, here=here).add_done_callback(done)
        return flat

    def append(self, entries: Iterable[LedgerEntry | LedgerWrite]) -> list[IndexedEntry]:
        """Append and wait for the commit; raises the first write's error, if any failed."""
        out = []
        for r in self.submit(entries, here=True).result():
            if isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    def append_object(self, entry_type: str, tenant: str, data: bytes, *, path: str | None = None,
                      at: datetime | None = None) -> IndexedEntry:
        """Store ``data`` write-once in the object store, then ledger it. Returns the entry."""
        if entry_type not in ENTRY_TYPES:
            raise QaiError("ledger.bad_entry_type", f"unknown entry type {entry_type!r}",
                           status=422, details={"types": list(ENTRY_TYPES)})
        digest = sha256_hex(data)
        key = path or f"ledger/{entry_type}/{digest}"
        self.objects.put(key, data)
        entry = LedgerEntry(type=entry_type, sha256=digest, path=key, tenant=tenant,  # type: ignore[arg-type]
                            time=at or utcnow())
        return self.append([entry])[0]

    def _apply(self, conn: Connection, items: list[LedgerEntry | LedgerWrite]
               ) -> list[list[IndexedEntry | BaseException]]:
        """One result list per item: an entry's index, or the exception that rejected it."""
        writes = [i if isinstance(i, LedgerWrite) else LedgerWrite([i]) for i in items]
        results: list[list[IndexedEntry | BaseException | None]] = [[None] * len(w.entries) for w in writes]
        accepted: list[tuple[int, int]] = []  # (write, entry) in append order
        size = tree_size(conn)  # we hold the ledger lock: indices from here on are ours
        for pos, w in enumerate(writes):
            verdicts: Sequence[BaseException | None] | None = None
            if w.before is not None:
                try:
                    with conn.begin_nested():
                        verdicts = w.before(conn, size + len(accepted))
                    if verdicts is not None and len(verdicts) != len(w.entries):
                        raise ValueError(f"before() gave {len(verdicts)} verdicts for {len(w.entries)} entries")
                except Exception as exc:  # this write alone fails; the batch goes on
                    results[pos] = [exc] * len(w.entries)
                    continue
            for k in range(len(w.entries)):
                verdict = None if verdicts is None else verdicts[k]
                if verdict is None:
                    accepted.append((pos, k))
                else:
                    results[pos][k] = verdict
        out, self._pending = _append(conn, [writes[p].entries[k] for p, k in accepted], self._frontier, size)
        appended: dict[int, list[IndexedEntry]] = {}
        for (pos, k), indexed in zip(accepted, out, strict=True):
            results[pos][k] = indexed
            appended.setdefault(pos, []).append(indexed)
        for pos, entries in appended.items():
            after = writes[pos].after
            if after is not None:
                after(conn, entries)
        return [[r for r in per_item if r is not None] for per_item in results]

    def _after_commit(self, results: list[list[IndexedEntry | BaseException]]) -> None:
        # Adopted only after the commit: a rolled-back batch must not leave a frontier ahead of the DB.
        self._frontier = self._pending
        appended = [r for per_item in results for r in per_item if isinstance(r, IndexedEntry)]
        if not appended:
            return
        size = appended[-1].index + 1
        metrics.LEDGER_SIZE.set(size)
        metrics.LEDGER_APPENDED.inc(len(appended))
        if size - self._checkpointed >= self.config.checkpoint_every:
            if self._timer.running:
                # Off the append path, as transparency logs sequence and sign apart: inline, every
                # caller of this commit and every write queued behind it waited for the signature,
                # the checkpoint row and its publication (the p99 of single-job ingest under load).
                self._size_due = True
                self._timer.wake()
                return
            self._checkpoint_if_due(size)

    def _checkpoint_if_due(self, size: int) -> None:
        # Re-read before signing: another process may have checkpointed since we last looked (its
        # checkpoints do not move this process's count, so without this every commit would sign).
        latest = self.latest_checkpoint_row()
        # never lowered: receipts(appended=True) trusts it, and another thread may have raised it meanwhile
        self._checkpointed = max(self._checkpointed, latest.size if latest else 0)
        if size - self._checkpointed >= self.config.checkpoint_every:
            self.checkpoint()

    # --- reading --------------------------------------------------------------------------------

    def object_bytes(self, path: str) -> bytes:
        """An entry's object: from the store, or from the outbox that has not uploaded it yet."""
        try:
            return self.objects.get(path)
        except QaiError as exc:
            if exc.code != "object.not_found":
                raise
        data = outbox_bytes(self.db, path)
        # None: not in the outbox either, or uploaded since the miss above (the uploader clears its
        # copy only once the store has the object): a second look settles which.
        return self.objects.get(path) if data is None else data

    def size(self) -> int:
        with self.db.read() as s:
            return tree_size(s)

    def entries(self, start: int, end: int) -> list[IndexedEntry]:
        with self.db.read() as s:
            rows = s.scalars(select(LedgerEntryRow).where(LedgerEntryRow.idx >= start, LedgerEntryRow.idx < end)
                             .order_by(LedgerEntryRow.idx))
            return [_indexed(r) for r in rows]

    def entry(self, index: int) -> IndexedEntry:
        with self.db.read() as s:
            row = s.get(LedgerEntryRow, index)
        if row is None:
            raise QaiError("ledger.entry_not_found", f"no entry {index}", status=404, details={"index": index})
        return _indexed(row)

    def index_of(self, leaf_hash_hex: str) -> int:
        with self.db.read() as s:
            idx = s.scalar(select(func.min(LedgerEntryRow.idx)).where(LedgerEntryRow.leaf_hash == leaf_hash_hex))
        if idx is None:
            raise QaiError("ledger.entry_not_found", "no entry with that leaf hash", status=404,
                           details={"hash": leaf_hash_hex})
        return int(idx)

    def _check_size(self, s: Session, size: int) -> None:
        current = tree_size(s)
        if not 0 <= size <= current:
            raise QaiError("ledger.bad_tree_size", f"tree size {size} is not in 0..{current}", status=400,
                           details={"tree_size": size, "current": current})

    def root(self, size: int) -> bytes:
        with self.db.read() as s:
            self._check_size(s, size)
            return merkle.root_hash(size, read_nodes(s, merkle.range_nodes(0, size)))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        if not 0 <= index < size:
            raise QaiError("ledger.bad_index", f"entry {index} is not in a tree of size {size}", status=400,
                           details={"index": index, "tree_size": size})
        with self.db.read() as s:
            try:  # one query on the hot path; the size is only checked when nodes are missing
                nodes = read_nodes(s, merkle.inclusion_nodes(index, size))
            except QaiError:
                self._check_size(s, size)
                raise
            return merkle.inclusion_proof(index, size, nodes)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        with self.db.read() as s:
            self._check_size(s, second)
            if not 0 <= first <= second:
                raise QaiError("ledger.bad_tree_size", f"first ({first}) must be in 0..second ({second})",
                               status=400, details={"first": first, "second": second})
            return merkle.consistency_proof(first, second, read_nodes(s, merkle.consistency_nodes(first, second)))

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint_key(self, *, refresh: bool = False) -> KeyDocument:
        """The KMS key that signs checkpoints; created on first use in the system tenant.

        A key of that name in another tenant, or with another suite, is refused: key names are
        global, and a tenant that pre-empted the name must not become the log's signer.
        """
        if self._key is not None and not refresh:
            return self._key
        key = system_key(self.db, self.kms, self.config.key_name, suite=self.config.suite, subject="ledger")
        if key.tenant != SYSTEM_TENANT or key.suite != self.config.suite or key.purpose != "signing":
            raise QaiError("ledger.bad_checkpoint_key",
                           f"key {key.name} belongs to tenant {key.tenant} with suite {key.suite}; the checkpoint "
                           f"key must be a {self.config.suite} signing key of tenant {SYSTEM_TENANT}", status=500)
        self._key = key
        return key

    def latest_checkpoint_row(self) -> LedgerCheckpointRow | None:
        with self.db.read() as s:
            return s.scalars(select(LedgerCheckpointRow).order_by(LedgerCheckpointRow.size.desc()).limit(1)).first()

    def latest_checkpoint(self) -> str | None:
        row = self.latest_checkpoint_row()
        return row.note if row else None

    def checkpoints(self, since: int = 0, limit: int = 1000) -> list[LedgerCheckpointRow]:
        with self.db.read() as s:
            return list(s.scalars(select(LedgerCheckpointRow).where(LedgerCheckpointRow.size >= since)
                                  .order_by(LedgerCheckpointRow.size).limit(limit)))

    def _checkpoint_tick(self) -> bool:
        if self._size_due:  # woken by the writer: the count, as an inline checkpoint would check it
            self._size_due = False
            with self.db.read() as s:
                size = tree_size(s)
            self._checkpoint_if_due(size)
        else:  # the interval: whenever the log grew
            self.checkpoint()
        return False  # then wait a full interval, whether or not it signed one

    def checkpoint(self) -> SignedCheckpoint | None:
        """Sign and store a checkpoint of the current tree if it grew since the last one."""
        with self._checkpoint_lock:
            with self.db.read() as s:
                size = tree_size(s)
                last = s.scalars(select(LedgerCheckpointRow).order_by(LedgerCheckpointRow.size.desc())
                                 .limit(1)).first()
                if size == 0 or (last is not None and last.size >= size):
                    self._checkpointed = max(self._checkpointed, last.size if last is not None else 0)
                    return None
                root = merkle.root_hash(size, read_nodes(s, merkle.range_nodes(0, size)))
            key = self.checkpoint_key()
            # Sign outside any write transaction: the KMS commits its own audit record, and on SQLite
            # a write transaction held here would block it.
            cp = Checkpoint(origin=self.config.origin, size=size, root=root, timestamp=utcnow())
            body = cp.body()
            bundle = self.kms.sign(key.name, principal=Principal.system("ledger"), message=body)
            if bundle.parts[0].version not in {v.version for v in key.versions}:
                key = self.checkpoint_key(refresh=True)  # rotated since we cached it
            note = format_note(body, sign_lines(bundle, key))
            with self.db.write(lock=CHECKPOINT_LOCK) as s:
                newest = s.scalars(select(LedgerCheckpointRow).order_by(LedgerCheckpointRow.size.desc())
                                   .limit(1)).first()
                if newest is not None and (newest.size >= size or newest.at > cp.timestamp):
                    # another process checkpointed meanwhile; sizes and times stay monotonic
                    self._checkpointed = max(self._checkpointed, newest.size)
                    return None
                s.add(LedgerCheckpointRow(size=size, root=root.hex(), at=cp.timestamp, note=note,
                                          key_name=key.name, key_version=bundle.parts[0].version))
            self._checkpointed = max(self._checkpointed, size)
            metrics.LEDGER_CHECKPOINTS.inc()
            self.publish()
            return SignedCheckpoint(cp, note)

    def publish(self) -> None:
        """Copy checkpoints to the object store: every one into the history, then the latest."""
        published = self._published_size()
        since = max(0, published + 1)
        while True:
            page = self.checkpoints(since=since)
            for row in page:
                self._publish_one(row)
            if len(page) < 1000:
                break
            since = page[-1].size + 1
        latest = self.latest_checkpoint_row()
        # Never move "latest" backwards: another process may have published a newer one meanwhile.
        if latest is not None and latest.size > self._published_size():
            self.objects.put(LATEST_KEY, latest.note.encode(), overwrite=True)

    def _publish_one(self, row: LedgerCheckpointRow) -> None:
        try:
            self.objects.put(f"{HISTORY_PREFIX}{row.size:020d}", row.note.encode())
        except QaiError as exc:
            if exc.code != "object.exists":
                raise
            # The write-once history already holds another checkpoint of this size: the DB was
            # rolled back or forked behind the ledger's back. Never paper over it.
            log.critical("ledger fork: published checkpoint %d differs from the database's", row.size)
            raise QaiError("ledger.fork_detected", f"published checkpoint {row.size} differs from the "
                           "database's: the log was rolled back or forked", status=500,
                           details={"tree_size": row.size}) from exc

    def _published_size(self) -> int:
        """Size of the published "latest" (-1 if none). Only steers publishing; auditors verify."""
        try:
            return int(self.objects.get(LATEST_KEY).decode().split("\n")[1])
        except (QaiError, IndexError, ValueError):
            return -1

    def receipt(self, index: int) -> Receipt:
        return self.receipts([self.entry(index)])[0]

    def receipts(self, entries: Sequence[IndexedEntry], *, appended: bool = False) -> list[Receipt]:
        """Receipts for entries in hand: one checkpoint read for all of them, and an inclusion proof
        for each that the checkpoint covers.

        ``appended``: entries this process has just committed. The checkpoint is then read only if
        one this process knows of covers an entry (one it signed inline after the commit, say); a
        checkpoint another process signed in the moments since is left out, and the receipt, like
        any made before a checkpoint, carries none. Why: with the checkpointer on its thread, the
        read almost never found a covering checkpoint, and it was a database round trip per
        single-job submission and per scheduler decision."""
        covers = not appended or any(e.index < self._checkpointed for e in entries)
        row = self.latest_checkpoint_row() if entries and covers else None
        covered = [e.index for e in entries if row is not None and e.index < row.size]
        nodes: dict[merkle.Node, bytes] = {}
        if row is not None and covered:
            with self.db.read() as s:  # every proof's nodes in one query
                nodes = read_nodes(s, {n for i in covered for n in merkle.inclusion_nodes(i, row.size)})
        out = []
        for e in entries:
            if row is None or row.size <= e.index:
                out.append(Receipt(index=e.index, leaf_hash=e.leaf, entry=e.entry()))
                continue
            proof = merkle.inclusion_proof(e.index, row.size, nodes)
            out.append(Receipt(index=e.index, leaf_hash=e.leaf, entry=e.entry(), checkpoint=row.note,
                               tree_size=row.size, inclusion_proof=[p.hex() for p in proof]))
        return out

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the timer that checkpoints every ``checkpoint_interval`` seconds when the log grew."""
        if self.config.checkpoint_interval > 0:
            self._timer.start()

    def close(self) -> None:
        self._timer.close()
        self._writer.close()
