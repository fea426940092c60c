"""Harness tables (migration 0004): the backend catalog, calibration snapshots, EM results, harness runs.

SPEC-001's ``backends``, ``calibration_snapshots`` and ``em_results`` with a few added columns;
``harness_runs`` indexes one harness run's Parquet file and signed dataset manifest.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, Numeric, String, Table
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.db import Base, JSONType, UTCDateTime, utcnow

# A snapshot id is "<backend_id>@<YYYYmmddTHHMMSSZ>-<12 hex>", so it needs room for a whole backend id.
BACKEND_ID_LENGTH = 128
SNAPSHOT_ID_LENGTH = 192


class BackendRow(Base):
    __tablename__ = "backends"

    backend_id: Mapped[str] = mapped_column(String(BACKEND_ID_LENGTH), primary_key=True)
    vendor: Mapped[str] = mapped_column(String(128))
    region: Mapped[str] = mapped_column(String(128))
    # NUMERIC as in the SPEC (a price), read back as float because the scheduler does arithmetic on it.
    cost_per_shot: Mapped[float] = mapped_column(Numeric(14, 8, asdecimal=False))
    availability: Mapped[float] = mapped_column(Float)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSONType)
    queue: Mapped[dict[str, Any]] = mapped_column(JSONType)
    num_qubits: Mapped[int] = mapped_column(Integer)
    # Not a foreign key: the two tables would reference each other. harness.backends sets it only to a
    # snapshot of this backend that it has just stored or found.
    last_calibration_id: Mapped[str | None] = mapped_column(String(SNAPSHOT_ID_LENGTH), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # operational, not catalog, state: online | offline | maintenance | calibrating | error
    status: Mapped[str] = mapped_column(String(16), default="online", server_default="online")


class CalibrationSnapshotRow(Base):
    """A ``harness.calibration.CalibrationSnapshot``, one JSON column per part. The id is derived from
    the content, which ``harness.backends.get_snapshot`` recomputes to detect a changed row; the
    table is also append-only (triggers refuse UPDATE and DELETE)."""

    __tablename__ = "calibration_snapshots"
    __table_args__ = (Index("ix_calibration_snapshots_backend_created", "backend_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(SNAPSHOT_ID_LENGTH), primary_key=True)
    backend_id: Mapped[str] = mapped_column(ForeignKey("backends.backend_id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())  # when the vendor calibrated
    num_qubits: Mapped[int] = mapped_column(Integer)
    basis_gates: Mapped[list[str]] = mapped_column(JSONType)
    gates: Mapped[dict[str, Any]] = mapped_column(JSONType)
    readout_errors: Mapped[dict[str, Any]] = mapped_column(JSONType)
    raw_metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)  # when qai stored it


class EmResultRow(Base):
    """One (circuit, backend, observable, EM method) measurement of a harness run."""

    __tablename__ = "em_results"

    result_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Not a reference to manifests.job_id (SPEC): harness jobs are not user-submitted run-manifests.
    # Their provenance is the signed dataset manifest of their run (harness_runs.dataset_manifest_path).
    job_id: Mapped[str] = mapped_column(String(36))
    # Not a foreign key either: a run's results are written before its harness_runs row, which
    # records the finished run (row count, Parquet file, manifest).
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    circuit_family: Mapped[str] = mapped_column(String(64))
    circuit_id: Mapped[str] = mapped_column(String(128))
    backend_id: Mapped[str] = mapped_column(ForeignKey("backends.backend_id"), index=True)
    # Null for a noiseless simulation, which has no calibration.
    calibration_snapshot_id: Mapped[str | None] = mapped_column(ForeignKey("calibration_snapshots.id"),
                                                                nullable=True)
    observable: Mapped[str] = mapped_column(String(256))
    shots: Mapped[int] = mapped_column(Integer)
    # Null on a failed row: the executions it needed did not complete (error_code says why).
    unmitigated_fidelity: Mapped[float | None] = mapped_column(Float, nullable=True)
    mitigated_fidelity: Mapped[float | None] = mapped_column(Float, nullable=True)
    em_method: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONType)
    abs_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    shot_multiplier: Mapped[float | None] = mapped_column(Float, nullable=True)
    cost_seconds: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # "ok" or "failed"
    error_code: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    parquet_path: Mapped[str] = mapped_column(String(512))


class HarnessRunRow(Base):
    __tablename__ = "harness_runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    seed: Mapped[int] = mapped_column(BigInteger)
    harness_version: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    rows: Mapped[int] = mapped_column(Integer)
    parquet_path: Mapped[str] = mapped_column(String(512))
    dataset_manifest_path: Mapped[str] = mapped_column(String(512))
    ledger_index: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


# Typed handles for Core statements such as orchestrator.db.insert_rows, which takes a Table: a mapped
# class's __table__ is typed as the more general FromClause.
BACKENDS = cast(Table, BackendRow.__table__)
CALIBRATION_SNAPSHOTS = cast(Table, CalibrationSnapshotRow.__table__)
EM_RESULTS = cast(Table, EmResultRow.__table__)
HARNESS_RUNS = cast(Table, HarnessRunRow.__table__)
