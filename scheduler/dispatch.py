"""Dispatch: a scheduled job goes onto the job queue, and a worker (``scheduler.worker``) runs it.

**The database is the source of truth; the queue only delivers.** ``dispatch`` moves the job
``pending → queued`` and writes its ``job_runs`` row in one transaction, then puts the job id on the
queue. A worker that takes it must win a guarded ``UPDATE manifests SET status='running' WHERE
status='queued'`` before it runs anything, and takes a *lease* in ``job_runs`` at the same time: a
fencing token, the attempt number and an expiry that it renews while it works. Every later write of
that attempt (lease renewals, the result, the final status) is fenced by the token, so a worker
whose lease was taken from it can never commit.

Nothing is lost and nothing runs forever, whatever dies when:

* the dispatcher dies after its commit but before the enqueue, a worker dies after taking the id
  but before its claim, or Redis loses its data: the job is ``queued`` in the database and not on
  the queue; the **redelivery sweep** enqueues it again once ``worker_redeliver_after_seconds``
  passed since it was enqueued (enqueueing is idempotent, and a duplicate delivery loses the
  guarded claim and is dropped);
* a worker dies mid-job (``kill -9``, a lost host): its lease expires after
  ``worker_lease_seconds`` and the **reaper** moves the job back to ``queued`` and enqueues it, or,
  when it had ``max_attempts`` attempts, fails it with ``worker.lost`` and a signed failure record;
* a worker runs past ``worker_job_timeout_seconds``: it fails the job with ``worker.timeout``.

Every worker runs the reaper and the sweep (``scheduler.worker.maintain``), one process at a time
under a database lock, so they need no process of their own; ``qai serve`` can run them too.

**Why not RQ.** RQ 2.x (2.12) keeps its own job state in Redis next to ours: two state machines to
keep in step. Its abandoned-job handling moves a job whose worker stopped heartbeating to the
failed registry (or retries it, with ``Retry``) only when a worker runs its maintenance (every
10 minutes by default) or something lists the started registry, and an execution's heartbeat TTL
is never below 60 s; our status would follow only through a failure callback run wherever that
cleanup happens to run. Its default worker forks a work horse per job in its own process group, so
``kill -9`` of the worker leaves the horse running, orphaned, with DB pools and HSM sessions copied
across the fork; only ``SimpleWorker`` avoids that. Its jobs are pickled callables, so anyone who
can write to Redis chooses code to run. The database would still need its own status guard and
fencing against a horse that outlives its lease. The queue here is ~100 lines on the ``redis``
client: Lua scripts for an idempotent enqueue and an atomic priority pop, a set of waiting ids, and
a wake-up list. Messages are bare job ids; everything a worker needs it reads from the database
and the signed decision.

Priority: a worker takes ``critical`` before ``essential`` before ``standard`` before
``background`` (strictly; within a class, first in first out).

Without ``QAI_REDIS_URL`` (the embedded default) the queue is a :class:`LocalQueue` in this
process behind the same interface, and a worker thread of the serving process runs the jobs
(``start_dispatch``, ``worker_embedded``). The database still arbitrates, so ``qai worker``
processes next to it are safe; they pick up queued jobs through the redelivery sweep.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import Integer, String, Table, Text, Update, bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.expression import Executable

from orchestrator.db import Base, UTCDateTime, insert_statement, utcnow
from scheduler.engine import PRIORITY_CLASSES
from sdk.errors import QaiError

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

    from orchestrator.services import Services
    from orchestrator.settings import Settings

log = logging.getLogger(__name__)

QUEUE_KEY = "dispatch.queue"  # Services.extras: this process's queue client
BACKGROUND_KEY = "dispatch.background"  # the embedded worker, or the maintenance loop
_extras_lock = threading.RLock()  # re-entrant: the embedded worker asks for the queue while it is made


# ------------------------------------------------------------------------------------------ tables
# The foreign keys (to manifests and scheduler_decisions) are the migration's: declaring them here
# would make every flush resolve those tables, which a worker process may not have imported.


class JobRunRow(Base):
    """A dispatched job's current state of execution: its lease while an attempt runs."""

    __tablename__ = "job_runs"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(36))
    priority_class: Mapped[str] = mapped_column(String(16))
    backend_id: Mapped[str] = mapped_column(String(128))
    em_method: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobAttemptRow(Base):
    """One attempt at a job, and how it ended (``None`` while it runs)."""

    __tablename__ = "job_attempts"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    worker_id: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(128), nullable=True)


JOB_RUNS = cast(Table, JobRunRow.__table__)
JOB_ATTEMPTS = cast(Table, JobAttemptRow.__table__)


def _manifests() -> Table:
    from orchestrator.jobs import MANIFESTS

    return MANIFESTS


def affected(session: Session | Connection, statement: Executable, params: Mapping[str, Any] | None = None) -> int:
    """Rows an UPDATE changed: how every guarded transition here learns whether it won."""
    return int(cast("CursorResult[Any]", session.execute(statement, params)).rowcount)


@functools.cache
def _queued_statement() -> Update:
    """pending → queued for the job ``pending_job``; built once (see orchestrator.db.insert_statement)."""
    manifests = _manifests()
    return (update(manifests).where(manifests.c.job_id == bindparam("pending_job"), manifests.c.status == "pending")
            .values(status="queued"))


# ------------------------------------------------------------------------------------------ queues


@dataclass(frozen=True)
class Delivery:
    """A job id taken from the queue. It carries no authority: the worker's claim decides."""

    job_id: str
    priority_class: str


class JobQueue(Protocol):
    """Delivers job ids to workers, highest priority class first."""

    def enqueue(self, job_id: str, priority_class: str) -> bool:
        """Put ``job_id`` on the queue; False (and nothing changes) if it is waiting already."""
        ...

    def pop(self, timeout: float) -> Delivery | None:
        """Take the next job id, waiting up to ``timeout`` seconds for one."""
        ...

    def waiting(self, job_ids: Iterable[str]) -> set[str]:
        """Which of ``job_ids`` are on the queue, not yet taken."""
        ...

    def remove(self, job_id: str) -> bool:
        """Take ``job_id`` off the queue (a cancelled job); False if it was not waiting."""
        ...

    def backlog(self) -> dict[str, int]:
        """Waiting jobs per priority class."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def _check_class(priority_class: str) -> None:
    if priority_class not in PRIORITY_CLASSES:
        raise QaiError("dispatch.bad_priority", f"unknown priority class {priority_class!r}", status=422,
                       details={"classes": list(PRIORITY_CLASSES)})


class LocalQueue:
    """The in-process queue of the embedded default: one deque per priority class."""

    def __init__(self) -> None:
        self._lists: dict[str, collections.deque[str]] = {c: collections.deque() for c in PRIORITY_CLASSES}
        self._waiting: set[str] = set()
        self._ready = threading.Condition()

    def enqueue(self, job_id: str, priority_class: str) -> bool:
        _check_class(priority_class)
        with self._ready:
            if job_id in self._waiting:
                return False
            self._waiting.add(job_id)
            self._lists[priority_class].append(job_id)
            self._ready.notify()
            return True

    def _take(self) -> Delivery | None:
        for cls in PRIORITY_CLASSES:
            if self._lists[cls]:
                job_id = self._lists[cls].popleft()
                self._waiting.discard(job_id)
                return Delivery(job_id, cls)
        return None

    def pop(self, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._ready:
            while True:
                found = self._take()
                remaining = deadline - time.monotonic()
                if found is not None or remaining <= 0:
                    return found
                self._ready.wait(remaining)

    def waiting(self, job_ids: Iterable[str]) -> set[str]:
        with self._ready:
            return {j for j in job_ids if j in self._waiting}

    def remove(self, job_id: str) -> bool:
        with self._ready:
            if job_id not in self._waiting:
                return False
            self._waiting.discard(job_id)
            for items in self._lists.values():
                if job_id in items:
                    items.remove(job_id)
            return True

    def backlog(self) -> dict[str, int]:
        with self._ready:
            return {c: len(items) for c, items in self._lists.items()}

    def ping(self) -> None:
        pass

    def close(self) -> None:
        with self._ready:
            self._ready.notify_all()


# KEYS: the waiting set, the class's list, the wake-up list; ARGV: the job id.
_ENQUEUE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  redis.call('LPUSH', KEYS[3], '1')
  redis.call('LTRIM', KEYS[3], 0, 63)
  return 1
end
return 0
"""
# KEYS: the waiting set, then the class lists from the highest priority down. Returns {id, class index}.
_POP = """
for i = 2, #KEYS do
  local id = redis.call('RPOP', KEYS[i])
  if id then
    redis.call('SREM', KEYS[1], id)
    return {id, i - 1}
  end
end
return false
"""
# KEYS: the waiting set, then every class list; ARGV: the job id.
_REMOVE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
for i = 2, #KEYS do
  redis.call('LREM', KEYS[i], 0, ARGV[1])
end
return 1
"""


class RedisQueue:
    """The queue on Redis: a list per priority class, a set of the waiting ids (so enqueueing is
    idempotent and the sweep can ask what is waiting), and a short list that wakes a blocked worker.

    Keys share the hash tag ``{prefix}``, so the scripts stay valid on a Redis Cluster."""

    def __init__(self, url: str, prefix: str = "qai", *, socket_timeout: float = 10.0) -> None:
        import redis

        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout,
                                           socket_connect_timeout=socket_timeout, health_check_interval=30)
        self._waiting_key = f"{{{prefix}}}:waiting"
        self._wake_key = f"{{{prefix}}}:wake"
        self._lists = [f"{{{prefix}}}:queue:{c}" for c in PRIORITY_CLASSES]
        self._enqueue = self._redis.register_script(_ENQUEUE)
        self._pop = self._redis.register_script(_POP)
        self._remove = self._redis.register_script(_REMOVE)

    def keys(self) -> list[str]:
        """Every key this queue may write (tests clean them up)."""
        return [self._waiting_key, self._wake_key, *self._lists]

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        import redis

        try:
            return fn(*args, **kw)
        except redis.RedisError as exc:
            raise QaiError("dispatch.queue_unavailable", f"Redis {what} failed: {type(exc).__name__}: {exc}",
                           status=503) from exc

    def enqueue(self, job_id: str, priority_class: str) -> bool:
        _check_class(priority_class)
        key = self._lists[PRIORITY_CLASSES.index(priority_class)]
        return bool(self._call("enqueue", self._enqueue, keys=[self._waiting_key, key, self._wake_key],
                               args=[job_id]))

    def _take(self) -> Delivery | None:
        found = self._call("pop", self._pop, keys=[self._waiting_key, *self._lists])
        if not found:
            return None
        return Delivery(str(found[0]), PRIORITY_CLASSES[int(found[1]) - 1])

    def pop(self, timeout: float) -> Delivery | None:
        found = self._take()
        if found is not None or timeout <= 0:
            return found
        # Block on the wake-up list rather than polling the class lists; a stale token only costs a retry.
        self._call("wait", self._redis.blpop, [self._wake_key], timeout=timeout)
        return self._take()

    def waiting(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        flags = self._call("smismember", self._redis.smismember, self._waiting_key, ids)
        return {j for j, f in zip(ids, flags, strict=True) if f}

    def remove(self, job_id: str) -> bool:
        return bool(self._call("remove", self._remove, keys=[self._waiting_key, *self._lists], args=[job_id]))

    def backlog(self) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        for key in self._lists:
            pipe.llen(key)
        counts = self._call("backlog", pipe.execute)
        return {c: int(n) for c, n in zip(PRIORITY_CLASSES, counts, strict=True)}

    def ping(self) -> None:
        self._call("ping", self._redis.ping)

    def close(self) -> None:
        self._redis.close()


def make_queue(settings: Settings) -> JobQueue:
    """Redis when ``QAI_REDIS_URL`` is set, else the in-process queue."""
    if settings.redis_url:
        return RedisQueue(settings.redis_url, settings.redis_prefix)
    return LocalQueue()


def job_queue(svc: Services) -> JobQueue:
    """This process's queue client, made once."""
    with _extras_lock:
        found = svc.extras.get(QUEUE_KEY)
        if found is None:
            found = svc.extras[QUEUE_KEY] = make_queue(svc.settings)
    return cast(JobQueue, found)


# ---------------------------------------------------------------------------------------- dispatch


def _chosen_field(chosen: Mapping[str, Any], name: str) -> str:
    value = chosen.get(name)
    if not isinstance(value, str) or not value:
        raise QaiError("dispatch.bad_decision", f"the decision's chosen {name} is missing", status=422,
                       details={"field": name})
    return value


def dispatch(svc: Services, job_id: str, decision_id: str, chosen: Mapping[str, Any], priority_class: str, *,
             max_attempts: int | None = None) -> None:
    """Queue ``job_id`` to run as ``decision_id`` chose: ``pending → queued``, then onto the queue.

    Idempotent for the same decision (a job already queued is enqueued again, which is a no-op if
    it is waiting). A job in another status, or dispatched under another decision, is
    ``dispatch.bad_status`` (409). If the queue is down the job stays ``queued`` in the database
    and the redelivery sweep enqueues it later: the call still succeeds.
    """
    with svc.db.write() as s:
        status = queue_rows(s, svc.settings, job_id, decision_id, chosen, priority_class, max_attempts=max_attempts)
    if status == "queued":
        deliver(svc, job_id, priority_class)


def queue_rows(s: Session | Connection, settings: Settings, job_id: str, decision_id: str, chosen: Mapping[str, Any],
               priority_class: str, *, max_attempts: int | None = None) -> str:
    """The database half of :func:`dispatch`, in the caller's transaction (the scheduler writes it
    with the decision, so a decision that chose a backend and a queued job commit together).
    Returns the job's status; :func:`deliver` puts a ``queued`` job on the queue after the commit."""
    _check_class(priority_class)
    backend_id, em_method = _chosen_field(chosen, "backend_id"), _chosen_field(chosen, "em_method")
    attempts = max_attempts or settings.worker_max_attempts
    manifests = _manifests()
    moved = affected(s, _queued_statement(), {"pending_job": job_id})
    if moved == 1:
        # a Core insert: the ORM's flush was a sixth of the decision's ledger transaction under cProfile
        s.execute(insert_statement(JOB_RUNS), {"job_id": job_id, "decision_id": decision_id,
                                               "priority_class": priority_class, "backend_id": backend_id,
                                               "em_method": em_method, "attempt": 0, "max_attempts": attempts,
                                               "enqueued_at": utcnow()})
        return "queued"
    status = s.scalar(select(manifests.c.status).where(manifests.c.job_id == job_id))
    if status is None:
        raise QaiError("job.not_found", f"no job {job_id}", status=404, details={"job_id": job_id})
    run_decision = s.scalar(select(JOB_RUNS.c.decision_id).where(JOB_RUNS.c.job_id == job_id))
    if run_decision != decision_id:
        raise QaiError("dispatch.bad_status", f"job {job_id} is {status}; only pending jobs are dispatched",
                       status=409, details={"job_id": job_id, "status": status})
    return str(status)


def deliver(svc: Services, job_id: str, priority_class: str) -> bool:
    """Put a queued job on the queue; False if the queue is down (the sweep will try again)."""
    try:
        job_queue(svc).enqueue(job_id, priority_class)
        return True
    except QaiError as exc:
        log.warning("job %s is queued but could not be enqueued (%s); it will be redelivered", job_id, exc.code)
        return False


def cancel(svc: Services, job_id: str) -> bool:
    """Cancel a pending or queued job; True if this call cancelled it, False if it already was.

    A worker that takes a cancelled job off the queue loses the guarded claim and drops it. A
    running or finished job is ``dispatch.not_cancellable`` (409). Roles are the caller's to check.
    """
    manifests = _manifests()
    with svc.db.write() as s:
        moved = affected(s, update(manifests).where(manifests.c.job_id == job_id,
                                                    manifests.c.status.in_(("pending", "queued")))
                         .values(status="cancelled"))
        if moved != 1:
            status = s.scalar(select(manifests.c.status).where(manifests.c.job_id == job_id))
            if status is None:
                raise QaiError("job.not_found", f"no job {job_id}", status=404, details={"job_id": job_id})
            if status == "cancelled":
                return False
            raise QaiError("dispatch.not_cancellable", f"job {job_id} is {status}", status=409,
                           details={"job_id": job_id, "status": status})
        s.execute(update(JOB_RUNS).where(JOB_RUNS.c.job_id == job_id).values(finished_at=utcnow()))
    with contextlib.suppress(QaiError):  # a delivery of a cancelled job is dropped by the worker's claim anyway
        job_queue(svc).remove(job_id)
    return True


# --------------------------------------------------------------------------------- process wiring


def start_dispatch(svc: Services) -> None:
    """At service start (``qai serve``'s lifespan): the process's dispatch background work, once.

    Without Redis and with ``worker_embedded`` (the embedded default): a worker thread that runs
    the in-process queue's jobs and the maintenance. Otherwise: the maintenance alone (reaper and
    redelivery sweep), so a job whose worker died is requeued or failed even while no ``qai
    worker`` is alive. ``dispatch`` itself starts nothing: a process that only schedules (a test,
    a script) gets no threads it did not ask for.
    """
    from orchestrator.db import BackgroundLoop
    from scheduler.worker import Worker, maintain

    with _extras_lock:
        if svc.extras.get(BACKGROUND_KEY) is not None:
            return
        if not svc.settings.redis_url and svc.settings.worker_embedded:
            worker = Worker(svc, name="embedded")
            svc.extras[BACKGROUND_KEY] = worker
            worker.start()
            return
        def tick() -> bool:
            maintain(svc)
            return False  # then a full interval: the maintenance only looks for what is overdue

        loop = BackgroundLoop("dispatch-maintenance", tick, svc.settings.worker_lease_seconds / 2)
        svc.extras[BACKGROUND_KEY] = loop
        loop.start()


def close_dispatch(svc: Services) -> None:
    """Stop the background work and close the queue client (before ``Services.close``)."""
    with _extras_lock:
        background = svc.extras.pop(BACKGROUND_KEY, None)
        queue = svc.extras.pop(QUEUE_KEY, None)
    if background is not None:
        background.close()  # type: ignore[attr-defined]  # a Worker or a BackgroundLoop
    if queue is not None:
        cast(JobQueue, queue).close()


__all__ = ["JOB_ATTEMPTS", "JOB_RUNS", "Delivery", "JobAttemptRow", "JobQueue", "JobRunRow", "LocalQueue",
           "RedisQueue", "affected", "cancel", "close_dispatch", "deliver", "dispatch", "job_queue",
           "make_queue", "start_dispatch"]
