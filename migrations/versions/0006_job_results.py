"""Dispatch and execution: a job's dispatch state and lease, its attempts, and its signed result.

``job_runs`` is the source of truth for a dispatched job's lease (who runs it, until when, which
attempt); the queue only delivers job ids. ``job_attempts`` keeps every attempt and how it ended.
``job_results`` indexes the signed, ledgered result record and is append-only like the ledger it
points into.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import UTCDateTime, append_only_ddl

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_runs",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("manifests.job_id"), primary_key=True),
        sa.Column("decision_id", sa.String(36), sa.ForeignKey("scheduler_decisions.id"), nullable=False),
        sa.Column("priority_class", sa.String(16), nullable=False),
        sa.Column("backend_id", sa.String(128), nullable=False),
        sa.Column("em_method", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),  # attempts started so far
        sa.Column("max_attempts", sa.Integer, nullable=False),
        # the current attempt's lease: a fencing token, its holder and its expiry (null when none runs)
        sa.Column("lease_token", sa.String(32), nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("enqueued_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("error_code", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
    )
    # the reaper looks for expired leases, the redelivery sweep for stale enqueues
    op.create_index("ix_job_runs_lease_expires_at", "job_runs", ["lease_expires_at"])
    op.create_index("ix_job_runs_enqueued_at", "job_runs", ["enqueued_at"])
    op.create_table(
        "job_attempts",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("manifests.job_id"), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("worker_id", sa.String(128), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        # completed | failed | lost (lease expired) | error (infrastructure fault, requeued) | timeout
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error_code", sa.String(128), nullable=True),
    )
    op.create_table(
        "job_results",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("manifests.job_id"), primary_key=True),
        sa.Column("decision_id", sa.String(36), sa.ForeignKey("scheduler_decisions.id"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),  # completed | failed
        sa.Column("backend_id", sa.String(128), nullable=False),
        sa.Column("calibration_snapshot_id", sa.String(192), nullable=True),
        sa.Column("em_method", sa.String(64), nullable=False),
        sa.Column("adapter", sa.String(32), nullable=True),
        sa.Column("error_code", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("histogram_path", sa.String(512), nullable=True),
        sa.Column("parquet_path", sa.String(512), nullable=True),
        sa.Column("record_path", sa.String(512), nullable=False),
        sa.Column("record_sha256", sa.String(64), nullable=False),
        sa.Column("ledger_index", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    # A result is signed and ledgered: its index row is never rewritten.
    for stmt in append_only_ddl("job_results", op.get_bind().dialect.name):
        op.execute(stmt)


def downgrade() -> None:
    op.drop_table("job_results")
    op.drop_table("job_attempts")
    op.drop_table("job_runs")
