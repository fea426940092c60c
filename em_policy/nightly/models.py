"""Nightly pipeline tables (migration 0008): one row per nightly run, with its steps.

A run holds a lease (``heartbeat_at`` refreshed while it works): a ``running`` row whose heartbeat
is older than the lease belongs to a process that died, and the next run marks it failed before it
starts. That, and the check-and-insert under one write lock, is what keeps runs one at a time
across processes on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.db import Base, JSONType, UTCDateTime

RUN_STATUSES = ("running", "ok", "partial", "failed")


class NightlyRunRow(Base):
    __tablename__ = "nightly_runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # the cron fire (or run-once's own time) this run serves: one finished run per fire
    scheduled_for: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    holder: Mapped[str] = mapped_column(String(128))  # host:pid of the process running it
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    # what the run produced, for the next run and the report: dataset run id, per-backend figures,
    # drift, the champion before and after, alerts, missing backends, report paths
    summary: Mapped[dict[str, Any]] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
