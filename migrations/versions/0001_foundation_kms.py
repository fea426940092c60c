"""Foundation and KMS: tenants, API tokens, keys, key versions, components and the audit log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import JSONType, UTCDateTime, append_only_ddl

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("crypto_policy", JSONType, nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    op.create_table(
        "kms_keys",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("suite", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
    )
    op.create_index("ix_kms_keys_tenant", "kms_keys", ["tenant"])
    op.create_table(
        "kms_key_versions",
        sa.Column("key_name", sa.String(128), sa.ForeignKey("kms_keys.name"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("disabled_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("revocation_reason", sa.String(256), nullable=True),
    )
    op.create_table(
        "kms_key_components",
        sa.Column("key_name", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("alg", sa.String(32), primary_key=True),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("sealed_private", sa.LargeBinary, nullable=True),
        sa.Column("kek_label", sa.String(64), nullable=True),
        sa.Column("hsm_label", sa.String(200), nullable=True),
        sa.ForeignKeyConstraint(
            ["key_name", "version"], ["kms_key_versions.key_name", "kms_key_versions.version"]
        ),
    )
    op.create_table(
        "kms_audit_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("key_name", sa.String(128), nullable=True),
        sa.Column("key_version", sa.Integer, nullable=True),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("detail", JSONType, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False, unique=True),
    )
    for stmt in append_only_ddl("kms_audit_log", op.get_bind().dialect.name):
        op.execute(stmt)


def downgrade() -> None:
    for table in ("kms_audit_log", "kms_key_components", "kms_key_versions", "kms_keys",
                  "api_tokens", "tenants"):
        op.drop_table(table)
