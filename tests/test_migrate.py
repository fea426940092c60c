"""``migrate.upgrade`` run by several processes at once on a fresh PostgreSQL schema, as pods
starting together do: the per-schema advisory lock lets one migrate and the others find it done.

The racers are threads (the brief of the change) and, separately, processes: pods are processes,
and alembic keeps its ``context`` and ``op`` proxies in module globals, so unserialised upgrades on
threads of one process also trip over each other inside alembic (a thread running DDL on another's
connection; seen as ``KeyError: 'script'`` or a hang that PostgreSQL cannot detect as a deadlock).
Processes show the database race alone (``DuplicateTable`` / ``UniqueViolation``). A racer still
running after ``WAIT`` seconds is ended (its PostgreSQL backend terminated, its process killed),
so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from orchestrator import migrate
from orchestrator.db import Database
from tests.conftest import pg_schema

RACERS = 4
WAIT = 120.0  # generous: the upgrades are waited for, never timed


@pytest.fixture
def empty_schema(pg_server: str) -> Iterator[str]:
    """A fresh, empty schema (conftest's ``_pg_database`` without the upgrade); dropped afterwards."""
    with pg_schema(pg_server) as schema:
        try:
            yield schema
        finally:
            terminate(pg_server, schema)  # a racer stuck in a transaction would block the DROP


def racer_url(pg_server: str, schema: str) -> str:
    """The racers' URL: tagged with an application_name, so their backends can be found and ended."""
    return f"{pg_server}?application_name=migrate-{schema}"


def terminate(pg_server: str, schema: str) -> None:
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a"),
                         {"a": f"migrate-{schema}"})
    finally:
        admin.dispose()


def head() -> str:
    revision = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert revision is not None
    return revision


def upgrade_after(url: str, schema: str, barrier: Any, errors: Any) -> None:
    """One racer (a thread, or a spawned process' entry point): its own ``Database`` and engine, as
    a pod has; released with the others by ``barrier``; a failure is put on ``errors``."""
    db = Database(url, schema=schema)
    try:
        barrier.wait()
        migrate.upgrade(db)
    except BaseException as exc:  # reported to the test: a thread's or a child's error is otherwise lost
        errors.put(f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        db.dispose()


def join_all(racers: list[Any]) -> bool:
    """Start the racers and wait for them, ``WAIT`` seconds in all; True if one is still running."""
    for r in racers:
        r.start()
    deadline = time.monotonic() + WAIT
    for r in racers:
        r.join(timeout=max(0.0, deadline - time.monotonic()))
    return any(r.is_alive() for r in racers)


def race_threads(url: str, schema: str) -> tuple[list[str], bool]:
    import queue

    barrier, errors = threading.Barrier(RACERS), queue.SimpleQueue[str]()
    threads = [threading.Thread(target=upgrade_after, args=(url, schema, barrier, errors), daemon=True)
               for _ in range(RACERS)]
    hung = join_all(threads)
    return [errors.get() for _ in range(errors.qsize())], hung


def race_processes(url: str, schema: str) -> tuple[list[str], bool]:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding pooled connections
    barrier, errors = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=upgrade_after, args=(url, schema, barrier, errors)) for _ in range(RACERS)]
    hung = join_all(procs)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    found = []
    while not errors.empty():
        found.append(errors.get())
    errors.close()
    found += [f"racer exited with {p.exitcode}" for p in procs if p.exitcode not in (0, None) and not hung]
    return found, hung


@pytest.mark.parametrize("race", [race_threads, race_processes], ids=["threads", "processes"])
def test_concurrent_upgrades_of_a_fresh_schema_all_succeed(
        pg_server: str, empty_schema: str, race: Callable[[str, str], tuple[list[str], bool]]) -> None:
    """Four upgrades released together, each on its own ``Database`` (a pod of its own): none fails,
    the schema ends at head, and alembic_version holds one row."""
    errors, hung = race(racer_url(pg_server, empty_schema), empty_schema)
    if hung:
        terminate(pg_server, empty_schema)
    assert not hung, f"an upgrade did not finish within {WAIT:g}s; errors: {errors}"
    assert errors == []
    db = Database(pg_server, schema=empty_schema)
    try:
        assert migrate.current(db) == head()
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head()]
    finally:
        db.dispose()


def test_the_lock_key_depends_on_the_schema() -> None:
    """Schemas migrate independently (parallel tests, one schema each); a schema always maps to the
    same signed 64-bit key, which pg_advisory_xact_lock takes."""
    a, b = migrate.migration_lock_key("t_a"), migrate.migration_lock_key("t_b")
    assert a != b and a == migrate.migration_lock_key("t_a")
    assert all(-(2**63) <= k < 2**63 for k in (a, b, migrate.migration_lock_key(None)))


def test_an_upgrade_at_head_is_a_no_op(pg_db: Database) -> None:
    """The loser's path, taken alone: a schema already at head is left as it is."""
    migrate.upgrade(pg_db)
    assert migrate.current(pg_db) == head()
    with pg_db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
