"""KMS tables. Private PQC keys appear here only in sealed form; classical keys never leave the HSM."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, ForeignKeyConstraint, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.db import Base, JSONType, UTCDateTime, utcnow


class KmsKey(Base):
    __tablename__ = "kms_keys"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"))
    purpose: Mapped[str] = mapped_column(String(16))
    suite: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class KmsKeyVersion(Base):
    __tablename__ = "kms_key_versions"

    key_name: Mapped[str] = mapped_column(ForeignKey("kms_keys.name"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # enabled | disabled | revoked
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(256), nullable=True)


class KmsKeyComponent(Base):
    """One algorithm of one key version: its public key and where its private half lives."""

    __tablename__ = "kms_key_components"
    __table_args__ = (
        ForeignKeyConstraint(
            ["key_name", "version"], ["kms_key_versions.key_name", "kms_key_versions.version"]
        ),
    )

    key_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    alg: Mapped[str] = mapped_column(String(32), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))  # hsm | openssl | pqclean | liboqs
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    sealed_private: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kek_label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hsm_label: Mapped[str | None] = mapped_column(String(200), nullable=True)


class KmsAuditRecord(Base):
    """Append-only, hash-chained record of every key operation (triggers refuse UPDATE/DELETE)."""

    __tablename__ = "kms_audit_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    operation: Mapped[str] = mapped_column(String(32))
    key_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    key_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result: Mapped[str] = mapped_column(String(16))  # ok | error
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    record_hash: Mapped[str] = mapped_column(String(64), unique=True)
