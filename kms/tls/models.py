"""Per-connection records of the TLS demo server (table ``tls_handshakes``, migration 0007) and the
Prometheus counter ``qai_tls_handshakes_total{group,mode,outcome}``.

``outcome`` is the server's policy verdict on the handshake:

* ``accepted``: a hybrid or PQC group (any mode), or a classical group on a ``classical-only`` server;
* ``fallback``: a classical group on a ``dual`` server, which offered ML-KEM: the client could not;
* ``refused``: a classical group on a ``pqc-required`` server (refused after the handshake);
* ``failed``: no handshake (no common group, a certificate the peer rejected, a timeout).

The fallback rate of a dual deployment is therefore
``rate(qai_tls_handshakes_total{mode="dual",outcome="fallback"}[5m])`` over the sum of the
``accepted`` and ``fallback`` rates. What happened after the handshake (a missing nonce, a client
that hung up) is ``error_code``, not a separate outcome, so the counter counts handshakes only.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from prometheus_client import Counter
from sqlalchemy import String, func, select
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator.db import Base, Database, UTCDateTime, utcnow

Outcome = Literal["accepted", "fallback", "refused", "failed"]

HANDSHAKES = Counter("qai_tls_handshakes", "TLS handshakes of the qai TLS server by negotiated group, server mode "
                     "and policy outcome (accepted, fallback, refused, failed)", ["group", "mode", "outcome"])


class TlsHandshakeRow(Base):
    __tablename__ = "tls_handshakes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    mode: Mapped[str] = mapped_column(String(16))
    negotiated_group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    classification: Mapped[str] = mapped_column(String(16))  # hybrid | pqc | classical | none
    outcome: Mapped[str] = mapped_column(String(16))
    cipher: Mapped[str | None] = mapped_column(String(64), nullable=True)
    protocol: Mapped[str | None] = mapped_column(String(16), nullable=True)
    client_identity: Mapped[str | None] = mapped_column(String(512), nullable=True)
    peer: Mapped[str] = mapped_column(String(64))
    server_cert_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hello_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(String(512), nullable=True)


@dataclass
class HandshakeRecord:
    """One connection as the server saw it; ``record`` writes it and counts it."""

    mode: str
    peer: str
    group: str | None = None
    classification: str = "none"
    outcome: Outcome = "failed"
    cipher: str | None = None
    protocol: str | None = None
    client_identity: str | None = None
    server_cert_sha256: str | None = None
    hello_sha256: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    at: datetime = field(default_factory=utcnow)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = self.at.isoformat()
        return out


def count(rec: HandshakeRecord) -> None:
    HANDSHAKES.labels(group=rec.group or "none", mode=rec.mode, outcome=rec.outcome).inc()


def _clip(value: str | None, size: int) -> str | None:
    # a client chooses its certificate subject: it must not make the insert fail on PostgreSQL
    return None if value is None else value[:size]


def record(db: Database, rec: HandshakeRecord) -> None:
    with db.write() as s:
        s.add(TlsHandshakeRow(
            id=rec.id, at=rec.at, mode=rec.mode, negotiated_group=_clip(rec.group, 64),
            classification=rec.classification, outcome=rec.outcome, cipher=_clip(rec.cipher, 64),
            protocol=_clip(rec.protocol, 16), client_identity=_clip(rec.client_identity, 512), peer=rec.peer[:64],
            server_cert_sha256=rec.server_cert_sha256, hello_sha256=rec.hello_sha256,
            error_code=_clip(rec.error_code, 64), error_message=_clip(rec.error_message, 512)))


def get_handshake(db: Database, handshake_id: str) -> TlsHandshakeRow | None:
    with db.read() as s:
        return s.get(TlsHandshakeRow, handshake_id)


def recent_handshakes(db: Database, limit: int = 50) -> Sequence[TlsHandshakeRow]:
    with db.read() as s:
        return s.scalars(select(TlsHandshakeRow).order_by(TlsHandshakeRow.at.desc()).limit(limit)).all()


def outcome_counts(db: Database) -> dict[tuple[str, str, str], int]:
    """``(mode, classification, outcome) -> count`` over every recorded handshake."""
    with db.read() as s:
        rows = s.execute(select(TlsHandshakeRow.mode, TlsHandshakeRow.classification, TlsHandshakeRow.outcome,
                                func.count()).group_by(TlsHandshakeRow.mode, TlsHandshakeRow.classification,
                                                       TlsHandshakeRow.outcome)).all()
    return {(m, c, o): int(n) for m, c, o, n in rows}
