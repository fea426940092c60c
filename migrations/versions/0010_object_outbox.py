"""``object_outbox``: signed objects (scheduler decisions) committed with their ledger entries and
uploaded to the object store afterwards, as job envelopes are from ``manifests`` (orchestrator/outbox.py).

Not append-only: the uploader deletes a row once the store holds its object, verified by hash. Its
bytes are random-looking signatures and base64, stored uncompressed on PostgreSQL for the reason
given in 0009.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orchestrator.db import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "object_outbox",
        sa.Column("path", sa.String(512), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE object_outbox ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    # Its rows are signed decisions that exist nowhere else yet, and the code before 0010 cannot
    # read them: upload them first.
    waiting = op.get_bind().execute(sa.text("SELECT count(*) FROM object_outbox")).scalar()
    if waiting:
        raise RuntimeError(f"object_outbox holds {waiting} objects not yet uploaded: run `qai uploader --drain` "
                           "before downgrading below 0010")
    op.drop_table("object_outbox")
