"""Run-manifest index (SPEC `manifests`) with its transactional outbox for the object store.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "manifests",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("backend_id", sa.String(128), nullable=True),
        sa.Column("pqc_suite", sa.String(128), nullable=False),
        sa.Column("crypto_mode", sa.String(16), nullable=False),
        sa.Column("calibration_snapshot_id", sa.String(128), nullable=True),
        sa.Column("em_method", sa.String(64), nullable=False),
        sa.Column("priority_class", sa.String(16), nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("key_name", sa.String(128), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("envelope_sha256", sa.String(64), nullable=False),
        sa.Column("s3_path", sa.String(512), nullable=False),
        sa.Column("envelope", sa.LargeBinary, nullable=True),
        sa.Column("uploaded_at", UTCDateTime(), nullable=True),
        sa.Column("ledger_index", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("submitted_at", UTCDateTime(), nullable=False),
        sa.Column("submitted_by", sa.String(128), nullable=False),
    )
    op.create_index("ix_manifests_tenant_submitted", "manifests", ["tenant", "submitted_at", "job_id"])
    op.create_index("ix_manifests_status", "manifests", ["status"])
    op.create_index("ix_manifests_outbox", "manifests", ["uploaded_at"])


def downgrade() -> None:
    op.drop_table("manifests")
