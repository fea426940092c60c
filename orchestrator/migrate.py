"""Run the Alembic migrations programmatically (``qai db upgrade`` and service start-up)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

import migrations
from orchestrator.db import Database

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
MIGRATION_LOCK = "qai.migrate.upgrade"


def alembic_config() -> Config:
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def migration_lock_key(schema: str | None) -> int:
    """The advisory-lock key of the migrations of one schema: a signed 64-bit slice of a sha256, so
    processes migrating different schemas of one database (tests, or tenants of a shared server)
    do not wait for each other, while every process migrating the same schema does."""
    digest = hashlib.sha256(f"{MIGRATION_LOCK}|{schema or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_migrations(conn: Connection) -> None:
    """Serialise ``upgrade`` per schema on PostgreSQL. Every pod migrates at start-up; two starting
    at once on a fresh database would both create the same tables, and the loser's transaction
    fails (duplicate relation) and its pod crash-loops. The lock is transaction-scoped and taken
    first, so the waiter's next statements (READ COMMITTED: a new snapshot each) see the winner's
    committed schema, and alembic finds it at head and does nothing. SQLite serialises writers
    itself and has no advisory locks. The schema is ``current_schema()``, where alembic writes: it
    also covers a search_path set in the URL rather than through ``Database(schema=...)``."""
    if conn.dialect.name != "postgresql":
        return
    schema = conn.execute(text("SELECT current_schema()")).scalar()
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": migration_lock_key(schema)})


def upgrade(db: Database, revision: str = "head") -> None:
    cfg = alembic_config()
    with db.engine.begin() as conn:
        _lock_migrations(conn)  # released when this transaction, alembic's DDL included, ends
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
