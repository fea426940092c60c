"""TLS handshakes of the dual-stack TLS demo server (``kms/tls``): one row per connection, with the
negotiated group, its classification (hybrid, pqc, classical) and the server's verdict.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tls_handshakes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),  # dual | pqc-required | classical-only
        sa.Column("negotiated_group", sa.String(64), nullable=True),  # null when the handshake failed
        sa.Column("classification", sa.String(16), nullable=False),  # hybrid | pqc | classical | none
        sa.Column("outcome", sa.String(16), nullable=False),  # accepted | fallback | refused | failed
        sa.Column("cipher", sa.String(64), nullable=True),
        sa.Column("protocol", sa.String(16), nullable=True),
        sa.Column("client_identity", sa.String(512), nullable=True),  # client certificate subject (mTLS)
        sa.Column("peer", sa.String(64), nullable=False),
        sa.Column("server_cert_sha256", sa.String(64), nullable=True),
        sa.Column("hello_sha256", sa.String(64), nullable=True),  # the signed hello sent, when one was
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.String(512), nullable=True),
    )
    # the fallback rate and recent-connection listings read by time
    op.create_index("ix_tls_handshakes_at", "tls_handshakes", ["at"])


def downgrade() -> None:
    op.drop_table("tls_handshakes")
