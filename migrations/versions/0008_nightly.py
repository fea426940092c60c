"""Nightly EM pipeline: ``nightly_runs`` (one row per run, its steps, lease and summary).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import JSONType, UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nightly_runs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("scheduled_for", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("steps", JSONType, nullable=False),
        sa.Column("summary", JSONType, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('running', 'ok', 'partial', 'failed')", name="ck_nightly_runs_status"),
    )
    op.create_index("ix_nightly_runs_scheduled_for", "nightly_runs", ["scheduled_for"])
    # at most one run at a time, whatever the processes believe
    op.create_index("uq_nightly_runs_running", "nightly_runs", ["status"], unique=True,
                    sqlite_where=sa.text("status = 'running'"), postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_table("nightly_runs")
