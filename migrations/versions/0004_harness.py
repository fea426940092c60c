"""Harness: backend catalog, calibration snapshots (append-only), EM results and harness runs.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import JSONType, UTCDateTime, append_only_ddl

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backends",
        sa.Column("backend_id", sa.String(128), primary_key=True),
        sa.Column("vendor", sa.String(128), nullable=False),
        sa.Column("region", sa.String(128), nullable=False),
        sa.Column("cost_per_shot", sa.Numeric(14, 8, asdecimal=False), nullable=False),
        sa.Column("availability", sa.Float, nullable=False),
        sa.Column("capabilities", JSONType, nullable=False),
        sa.Column("queue", JSONType, nullable=False),
        sa.Column("num_qubits", sa.Integer, nullable=False),
        # no foreign key to calibration_snapshots: the two tables would reference each other
        sa.Column("last_calibration_id", sa.String(192), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "calibration_snapshots",
        sa.Column("id", sa.String(192), primary_key=True),
        sa.Column("backend_id", sa.String(128), sa.ForeignKey("backends.backend_id"), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("num_qubits", sa.Integer, nullable=False),
        sa.Column("basis_gates", JSONType, nullable=False),
        sa.Column("gates", JSONType, nullable=False),
        sa.Column("readout_errors", JSONType, nullable=False),
        sa.Column("raw_metrics", JSONType, nullable=False),
        sa.Column("imported_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_calibration_snapshots_backend_created", "calibration_snapshots", ["backend_id", "created_at"])
    # A snapshot is content-addressed: changing a stored one would silently change what a signed
    # manifest's calibration_snapshot_id means.
    for stmt in append_only_ddl("calibration_snapshots", op.get_bind().dialect.name):
        op.execute(stmt)
    op.create_table(
        "em_results",
        sa.Column("result_id", sa.String(36), primary_key=True),
        # not manifests.job_id: harness jobs are not user-submitted manifests; their provenance is the
        # run's signed dataset manifest
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("circuit_family", sa.String(64), nullable=False),
        sa.Column("circuit_id", sa.String(128), nullable=False),
        sa.Column("backend_id", sa.String(128), sa.ForeignKey("backends.backend_id"), nullable=False),
        sa.Column("calibration_snapshot_id", sa.String(192), sa.ForeignKey("calibration_snapshots.id"),
                  nullable=True),
        sa.Column("observable", sa.String(256), nullable=False),
        sa.Column("shots", sa.Integer, nullable=False),
        sa.Column("unmitigated_fidelity", sa.Float, nullable=True),
        sa.Column("mitigated_fidelity", sa.Float, nullable=True),
        sa.Column("em_method", sa.String(64), nullable=False),
        sa.Column("parameters", JSONType, nullable=False),
        sa.Column("abs_error", sa.Float, nullable=True),
        sa.Column("shot_multiplier", sa.Float, nullable=True),
        sa.Column("cost_seconds", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(128), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("parquet_path", sa.String(512), nullable=False),
    )
    op.create_index("ix_em_results_run_id", "em_results", ["run_id"])
    op.create_index("ix_em_results_backend_id", "em_results", ["backend_id"])
    op.create_table(
        "harness_runs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("harness_version", sa.String(64), nullable=False),
        sa.Column("config", JSONType, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("parquet_path", sa.String(512), nullable=False),
        sa.Column("dataset_manifest_path", sa.String(512), nullable=False),
        sa.Column("ledger_index", sa.BigInteger, nullable=True),
    )


def downgrade() -> None:
    for table in ("harness_runs", "em_results", "calibration_snapshots", "backends"):
        op.drop_table(table)
