"""``ix_manifests_status`` covers the scheduler's backlog query: (status, priority_class, job_id).

The scheduler re-reads qai's backlog every two seconds: the expected run seconds of the queued and
running jobs, per backend and priority class (``Scheduler.backlog``). With an index on ``status``
alone, SQLite found the jobs by status and then read each one's table row for its job id and
priority class, a page or more apiece: a job's row holds its signed envelope (about 5 kB) until the
uploader moves it. This index holds everything the query reads from ``manifests``, so only the
decisions' rows are read. With 400 queued jobs: 1.42 against 0.36 ms for the query (one SQLite
connection, the index created between the two), 1.23 against 0.27 ms for ``Scheduler.backlog``
(the code before and after, run one after the other). The read runs on a thread beside the
decisions, and under the GIL its length was theirs too (docs/benchmarks.md). On PostgreSQL the
envelope is stored out of line, and the index allows an index-only scan.

Every other query that selects by status (the dispatcher's reaper and redelivery sweep, the job
listing) uses the index's leading column, as before.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_manifests_status", table_name="manifests")
    op.create_index("ix_manifests_status", "manifests", ["status", "priority_class", "job_id"])


def downgrade() -> None:
    op.drop_index("ix_manifests_status", table_name="manifests")
    op.create_index("ix_manifests_status", "manifests", ["status"])
