"""Scheduler decisions (SPEC `scheduler_decisions`) and a backend's operational status.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import JSONType, UTCDateTime, append_only_ddl

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # online | offline | maintenance | calibrating | error: the status filter reads it
    with op.batch_alter_table("backends") as batch:
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="online"))
    op.create_table(
        "scheduler_decisions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("manifests.job_id"), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        # null when no backend fitted: that outcome is recorded (and ledgered) too
        sa.Column("chosen_backend", sa.String(128), nullable=True),
        sa.Column("calibration_snapshot_id", sa.String(192), nullable=True),
        sa.Column("em_method", sa.String(64), nullable=True),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("confidence", sa.Float, nullable=False),
        # expected run time on the chosen backend: the backlog later decisions see
        sa.Column("run_seconds", sa.Float, nullable=True),
        sa.Column("reasons", JSONType, nullable=False),
        sa.Column("decision_manifest_path", sa.String(512), nullable=False),
        sa.Column("decision_sha256", sa.String(64), nullable=False),
        sa.Column("ledger_index", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_scheduler_decisions_job", "scheduler_decisions", ["job_id", "created_at"])
    op.create_index("ix_scheduler_decisions_backend", "scheduler_decisions", ["chosen_backend"])
    # At most one decision per job chooses a backend (those that found none may repeat).
    op.create_index("ux_scheduler_decisions_chosen", "scheduler_decisions", ["job_id"], unique=True,
                    postgresql_where=sa.text("chosen_backend IS NOT NULL"),
                    sqlite_where=sa.text("chosen_backend IS NOT NULL"))
    # A decision is signed and ledgered: its index row is never rewritten either.
    for stmt in append_only_ddl("scheduler_decisions", op.get_bind().dialect.name):
        op.execute(stmt)


def downgrade() -> None:
    op.drop_table("scheduler_decisions")
    with op.batch_alter_table("backends") as batch:
        batch.drop_column("status")
