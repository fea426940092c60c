"""Job index rows keep their envelope and signatures uncompressed (PostgreSQL ``STORAGE EXTERNAL``).

ML-DSA signatures are random bytes (base64 in ``signature``, inside the envelope in ``envelope``):
about 10 KB per row that PostgreSQL's default TOAST strategy tries to compress and cannot. Those
attempts ran while the ledger lock was held, since job rows are inserted with their ledger entries:
``STORAGE EXTERNAL`` (out of line, never compressed) cut the COPY of a 100-job batch from 19.5 to
11.3 ms (docs/benchmarks.md). It costs the few percent pglz saved on base64. SQLite has no TOAST.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = ("envelope", "signature")


def _storage(strategy: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column in COLUMNS:
        op.execute(f"ALTER TABLE manifests ALTER COLUMN {column} SET STORAGE {strategy}")


def upgrade() -> None:
    _storage("EXTERNAL")


def downgrade() -> None:
    _storage("EXTENDED")
