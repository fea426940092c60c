"""Run ledger: entries, stored Merkle nodes and signed checkpoints, all append-only.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import UTCDateTime, append_only_ddl

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = ("ledger_entries", "ledger_nodes", "ledger_checkpoints")


def upgrade() -> None:
    op.create_table(
        "ledger_entries",
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("entry_type", sa.String(40), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("leaf_hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_ledger_entries_sha256", "ledger_entries", ["sha256"])
    op.create_index("ix_ledger_entries_tenant", "ledger_entries", ["tenant"])
    op.create_index("ix_ledger_entries_leaf_hash", "ledger_entries", ["leaf_hash"])
    op.create_table(
        "ledger_nodes",
        sa.Column("node_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("key_name", sa.String(128), nullable=False),
        sa.Column("key_version", sa.BigInteger, nullable=False),
    )
    dialect = op.get_bind().dialect.name
    for table in TABLES:
        for stmt in append_only_ddl(table, dialect):
            op.execute(stmt)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
