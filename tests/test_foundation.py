"""Settings, migrations, the sdk's import boundary and the error body."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from orchestrator import migrate
from orchestrator.db import Database
from orchestrator.settings import Settings
from sdk.errors import QaiError

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_lives_under_home(tmp_path: Path, monkeypatch: object) -> None:
    s = Settings(home=tmp_path / ".qai")
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / '.qai' / 'qai.db').resolve()}"
    assert s.objects_dir == tmp_path / ".qai" / "objects"
    assert s.softhsm_dir == tmp_path / ".qai" / "softhsm"
    assert s.is_softhsm


def test_settings_come_from_qai_env(tmp_path: Path) -> None:
    env = {**os.environ, "QAI_DATABASE_URL": "postgresql+psycopg://u@h/db", "QAI_S3_BUCKET": "b",
           "QAI_PKCS11_TOKEN_LABEL": "prod", "QAI_PKCS11_POOL_SIZE": "8"}
    code = ("from orchestrator.settings import Settings; s = Settings(); "
            "print(s.resolved_database_url, s.s3_bucket, s.pkcs11_token_label, s.pkcs11_pool_size)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["postgresql+psycopg://u@h/db", "b", "prod", "8"]


def test_dev_pin_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / ".qai")
    first = s.hsm_pins()
    assert first == Settings(home=tmp_path / ".qai").hsm_pins()
    pin_file = tmp_path / ".qai" / "hsm-pin.json"
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    assert len(first[0]) >= 16 and first[0] != first[1]
    configured = Settings(home=tmp_path / ".qai", pkcs11_user_pin="from-env")  # type: ignore[arg-type]
    assert configured.hsm_pins()[0] == "from-env"


def test_migrations_create_every_table_on_both_engines(db: Database) -> None:
    tables = set(inspect(db.engine).get_table_names())
    assert {"tenants", "api_tokens", "kms_keys", "kms_key_versions", "kms_key_components",
            "kms_audit_log", "alembic_version"} <= tables
    assert migrate.current(db) is not None
    migrate.upgrade(db)  # idempotent


def test_sdk_imports_no_server_code() -> None:
    """An auditor installs the sdk alone: importing it must not load any server package."""
    code = (
        "import sys, sdk, sdk.signing, sdk.crypto, sdk.algorithms, sdk.canonical, sdk.errors\n"
        "server = [m for m in sys.modules if m.split('.')[0] in "
        "('orchestrator','kms','em_policy','harness','scheduler','fastapi','sqlalchemy','pkcs11')]\n"
        "print(server)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert out == "[]"


def test_sdk_modules_have_no_server_imports_in_source() -> None:
    forbidden = ("orchestrator", "kms", "em_policy", "harness", "scheduler")
    for path in (ROOT / "sdk").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                module = stripped.split()[1].split(".")[0]
                # sdk/cli.py discovers server commands through importlib, never a static import
                assert module not in forbidden, f"{path.name}: {stripped}"


def test_error_body_round_trip() -> None:
    err = QaiError("kms.key_revoked", "revoked", status=422, details={"key": "k"})
    body = err.to_body()
    assert body == {"error": {"code": "kms.key_revoked", "message": "revoked", "details": {"key": "k"}}}
    back = QaiError.from_body(json.loads(json.dumps(body)), 422)
    assert (back.code, back.message, back.status, back.details) == ("kms.key_revoked", "revoked", 422,
                                                                     {"key": "k"})
    other = QaiError.from_body("<html>bad gateway</html>", 502)
    assert other.code == "http.error" and other.status == 502


@pytest.mark.parametrize("idle_seconds, replaced", [(0.0, True), (3600.0, False)])
def test_a_connection_broken_while_idle_is_replaced_before_use(pg_server: str, idle_seconds: float,
                                                               replaced: bool) -> None:
    """Connections idle past ``ping_idle_seconds`` are pinged at checkout and replaced if gone;
    busier ones are not pinged (the contrast shows the ping is what saves the first case)."""
    from sqlalchemy import create_engine, exc, text

    from orchestrator.db import make_engine

    engine = make_engine(pg_server, ping_idle_seconds=idle_seconds)
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
        with admin.connect() as a:
            a.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            while a.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar():
                pass  # until the backend is gone
        if replaced:
            with engine.connect() as c:
                assert c.execute(text("SELECT pg_backend_pid()")).scalar() != pid
        else:
            with pytest.raises(exc.OperationalError), engine.connect() as c:
                c.execute(text("SELECT 1"))
    finally:
        engine.dispose()
        admin.dispose()


def test_try_lock_admits_one_holder_across_processes_and_threads(pg_db: Database, sqlite_db: Database) -> None:
    for db in (pg_db, sqlite_db):
        other = Database(db.url, schema=db.schema)  # another pool: what another process would have
        try:
            with (db.try_lock("uploader") as first, other.try_lock("uploader") as second,
                  db.try_lock("another job") as third):
                assert (first, second, third) == (True, False, True)
            with other.try_lock("uploader") as again:
                assert again  # released on exit
        finally:
            other.dispose()


def test_a_served_app_freezes_its_start_up_heap(settings: Settings) -> None:
    """After start-up the long-lived heap is frozen, so no full collection walks it mid-request."""
    import gc

    import httpx

    from orchestrator.app import FULL_COLLECTION_EVERY, create_app
    from orchestrator.services import build_services
    from tests.conftest import LiveServer

    svc = build_services(settings.model_copy(update={"gc_freeze": True}))
    gc.unfreeze()
    thresholds = gc.get_threshold()
    try:
        assert gc.get_freeze_count() == 0
        with LiveServer(create_app(svc, components=("ledger",))) as srv:
            assert httpx.get(f"{srv.url}/healthz").status_code == 200
            frozen = gc.get_freeze_count()
            # what the process had imported and built is out of the collector's generations
            assert frozen > 100_000 and frozen > len(gc.get_objects()), frozen
            assert gc.get_threshold()[2] == FULL_COLLECTION_EVERY
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        svc.close()


def _write_pages(db: Database, pages: int) -> None:
    """Commit about ``pages`` 4 KiB pages of new rows, 100 at a time."""
    from sqlalchemy import text

    with db.write() as s:
        s.execute(text("CREATE TABLE IF NOT EXISTS wal_probe (id INTEGER PRIMARY KEY, data BLOB)"))
    for _ in range(pages // 100):
        with db.write() as s:
            s.execute(text("INSERT INTO wal_probe (data) VALUES (:d)"), {"d": os.urandom(100 * 4096)})


def _autocheckpoint(db: Database) -> int:
    from sqlalchemy import text

    with db.read() as s:
        return int(s.execute(text("PRAGMA wal_autocheckpoint")).scalar_one())


def test_sqlite_log_checkpoints_run_on_a_thread_not_in_commits(tmp_path: Path, pg_db: Database) -> None:
    """SQLite copies its write-ahead log back into the database file inside the commit that grows
    the log past 1000 pages; a served process moves that work onto a thread of its own, and
    commits keep only a far backstop."""
    import time

    from orchestrator.db import SQLITE_AUTOCHECKPOINT_PAGES, SQLITE_BACKSTOP_PAGES

    page = 4096
    inline = Database(f"sqlite:///{tmp_path / 'inline.db'}")  # SQLite's default: commits checkpoint
    moved = Database(f"sqlite:///{tmp_path / 'moved.db'}")
    try:
        assert _autocheckpoint(moved) == SQLITE_AUTOCHECKPOINT_PAGES
        # a long interval: the thread checkpoints only when woken below
        moved.checkpoint_in_background(interval=3600)
        loop = moved._wal_checkpointer
        assert loop is not None and loop.running
        assert _autocheckpoint(moved) == SQLITE_BACKSTOP_PAGES  # pooled connections follow too
        _write_pages(inline, 3000)
        _write_pages(moved, 3000)
        # inline: the log was checkpointed and restarted as it passed 1000 pages, so it never grew
        # far past that, and the rows are in the database file
        assert os.path.getsize(tmp_path / "inline.db-wal") < 1500 * page
        assert os.path.getsize(tmp_path / "inline.db") > 2000 * page
        # moved: no commit checkpointed; all 3000 pages are still in the log only
        assert os.path.getsize(tmp_path / "moved.db-wal") > 3000 * page
        assert os.path.getsize(tmp_path / "moved.db") < 1000 * page
        loop.wake()
        deadline = time.monotonic() + 60
        while os.path.getsize(tmp_path / "moved.db") < 3000 * page and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.getsize(tmp_path / "moved.db") > 3000 * page  # the thread copied the log in
        log_pages, done = moved.checkpoint_wal() or (0, -1)
        assert log_pages == done  # nothing left behind
        moved.dispose()
        assert not loop.running and moved._wal_checkpointer is None
        assert _autocheckpoint(moved) == SQLITE_AUTOCHECKPOINT_PAGES  # back to SQLite's own after disposal
    finally:
        inline.dispose()
        moved.dispose()
    # PostgreSQL checkpoints its own WAL: nothing to start
    pg_db.checkpoint_in_background()
    assert pg_db.checkpoint_wal() is None and pg_db._wal_checkpointer is None


def test_a_served_app_checkpoints_sqlite_in_the_background(settings: Settings) -> None:
    import httpx

    from orchestrator.app import create_app
    from orchestrator.db import SQLITE_BACKSTOP_PAGES
    from orchestrator.services import build_services
    from tests.conftest import LiveServer

    svc = build_services(settings)
    try:
        with LiveServer(create_app(svc, components=("ledger",))) as srv:
            assert httpx.get(f"{srv.url}/healthz").status_code == 200
            assert _autocheckpoint(svc.db) == SQLITE_BACKSTOP_PAGES
    finally:
        svc.close()


class _Busy:
    """A stand-in for a sqlite3 connection whose write lock another connection holds for the first
    ``busy`` tries of BEGIN IMMEDIATE."""

    def __init__(self, busy: int, error: int | None = None) -> None:
        import sqlite3

        self.busy = busy
        self.statements: list[str] = []
        self.error = sqlite3.SQLITE_BUSY if error is None else error

    def execute(self, sql: str) -> None:
        import sqlite3

        self.statements.append(sql)
        if sql == "BEGIN IMMEDIATE" and self.busy:
            self.busy -= 1
            exc = sqlite3.OperationalError("database is locked")
            exc.sqlite_errorcode = self.error  # type: ignore[attr-defined]
            raise exc


def test_a_write_transaction_polls_for_sqlites_write_lock() -> None:
    """BEGIN IMMEDIATE retried after 0.1, 0.2, 0.4, 0.8, then every 1 ms, rather than after SQLite's
    busy handler's 1, 2, 5, 10 ms; SQLite's own wait (and its error) once the poll window is over,
    or at once for another error. The connection's busy timeout is restored either way."""
    import sqlite3

    from orchestrator.db import _poll_write_lock

    pauses: list[float] = []
    raw = _Busy(busy=6)
    assert _poll_write_lock(raw, sleep=pauses.append, clock=lambda: 0.0) is True
    assert pauses == pytest.approx([0.0001, 0.0002, 0.0004, 0.0008, 0.001, 0.001])
    assert raw.statements == ["PRAGMA busy_timeout=0", *["BEGIN IMMEDIATE"] * 7, "PRAGMA busy_timeout=30000"]

    seconds = iter(range(10_000))  # the window is over after the first try
    held = _Busy(busy=100)
    assert _poll_write_lock(held, sleep=pauses.append, clock=lambda: float(next(seconds))) is False
    assert held.statements[-1] == "PRAGMA busy_timeout=30000"  # the caller falls back to SQLite's wait

    other = _Busy(busy=1, error=sqlite3.SQLITE_READONLY)
    assert _poll_write_lock(other, sleep=pauses.append, clock=lambda: 0.0) is False  # the plain BEGIN raises it
    assert other.statements == ["PRAGMA busy_timeout=0", "BEGIN IMMEDIATE", "PRAGMA busy_timeout=30000"]


def test_a_writer_waiting_for_the_lock_past_the_poll_window_still_gets_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real SQLite: the lock held by another connection through the poll window and beyond; the
    second writer commits once it is released, its busy timeout back to 30 s."""
    import threading

    from sqlalchemy import text

    from orchestrator import db as dbmod

    monkeypatch.setattr(dbmod, "SQLITE_LOCK_POLL_SECONDS", 0.01)
    db = Database(f"sqlite:///{tmp_path / 'lock.db'}")
    try:
        with db.write() as s:
            s.execute(text("CREATE TABLE t (v INTEGER)"))
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with db.write() as s:
                s.execute(text("INSERT INTO t VALUES (1)"))
                holding.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(30)
        done: list[int] = []

        def write() -> None:
            with db.write() as s:
                s.execute(text("INSERT INTO t VALUES (2)"))
                done.append(int(s.execute(text("PRAGMA busy_timeout")).scalar_one()))

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(0.3)  # well past the poll window: now in SQLite's busy handler
        assert writer.is_alive() and not done
        release.set()
        holder.join(30)
        writer.join(30)
        assert done == [30_000]
        with db.read() as s:
            assert sorted(s.execute(text("SELECT v FROM t")).scalars()) == [1, 2]
            assert s.execute(text("PRAGMA secure_delete")).scalar_one() == 2  # FAST (see _configure_sqlite)
    finally:
        db.dispose()


def test_a_lone_group_commit_is_written_on_the_callers_thread(db: Database) -> None:
    """``submit(here=True)``: with nothing queued or being written, the caller writes its own batch
    (the future is done on return, nothing crossed to the writer thread); a failed one commits
    nothing; while a batch is being written, later callers queue for the writer thread as before,
    and so does every caller without ``here``."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import select

    from orchestrator.db import GroupCommit, insert_rows, utcnow
    from orchestrator.models import Tenant

    seen: list[tuple[str, list[str]]] = []
    entered, gate = threading.Event(), threading.Event()

    def apply(session: Any, items: list[str]) -> list[str]:
        seen.append((threading.current_thread().name, list(items)))
        insert_rows(session, Tenant.__table__, [{"name": f"t-{i}", "created_at": utcnow(), "crypto_policy": {}}
                                                for i in items])
        if "slow" in items:
            entered.set()
            assert gate.wait(30)
        if "bad" in items:
            raise QaiError("test.refused", "this batch is refused")
        return [i.upper() for i in items]

    writer: GroupCommit[str, str] = GroupCommit(db, "test-writer", apply, name="test-writer")
    try:
        here = threading.current_thread().name
        first = writer.submit(["a"], here=True)
        assert first.done() and first.result() == ["A"] and seen == [(here, ["a"])]
        bad = writer.submit(["bad"], here=True)
        assert bad.done() and isinstance(bad.exception(), QaiError) and seen[-1] == (here, ["bad"])
        with ThreadPoolExecutor(1, thread_name_prefix="slow-caller") as pool:
            slow = pool.submit(lambda: writer.submit(["slow"], here=True).result())
            assert entered.wait(30)
            queued = [writer.submit([x], here=True) for x in ("b", "c")]
            assert not any(f.done() for f in queued)  # waiting behind the batch being written
            gate.set()
            assert slow.result(timeout=30) == ["SLOW"]
            assert [f.result(timeout=30) for f in queued] == [["B"], ["C"]]
        assert seen[2][0].startswith("slow-caller")
        assert sorted(x for name, items in seen[3:] if name == "test-writer" for x in items) == ["b", "c"]
        assert len(seen) <= 5
        queued = [writer.submit([x]) for x in ("d",)]  # without here: the writer thread, as ever
        assert queued[0].result(timeout=30) == ["D"] and seen[-1] == ("test-writer", ["d"])
    finally:
        writer.close()
    with db.read() as s:
        names = set(s.scalars(select(Tenant.name).where(Tenant.name.like("t-%"))))
    assert names == {"t-a", "t-slow", "t-b", "t-c", "t-d"}  # the refused batch left nothing


def test_a_core_write_transaction_commits_or_rolls_back_as_a_whole(db: Database) -> None:
    """``Database.write_connection``: a write transaction on a Core connection (the KMS audit
    writer's), with the same write lock as ``write``, released on either outcome."""
    from sqlalchemy import select

    from orchestrator.db import insert_rows, utcnow
    from orchestrator.models import Tenant

    def row(name: str) -> dict[str, Any]:
        return {"name": name, "created_at": utcnow(), "crypto_policy": {}}

    with db.write_connection(lock="test-core") as conn:
        insert_rows(conn, Tenant.__table__, [row("core-1"), row("core-2")])
    with pytest.raises(RuntimeError), db.write_connection(lock="test-core") as conn:
        insert_rows(conn, Tenant.__table__, [row("core-3")])
        raise RuntimeError("fails after its insert")
    with db.write(lock="test-core") as s:  # the lock was released: the next writer gets it
        insert_rows(s, Tenant.__table__, [row("core-4")])
    with db.read() as s:
        names = set(s.scalars(select(Tenant.name).where(Tenant.name.like("core-%"))))
    assert names == {"core-1", "core-2", "core-4"}
