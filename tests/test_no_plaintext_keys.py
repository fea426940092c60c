"""After every key operation, no unsealed PQC private key, seed or PIN is found at rest or in logs.

The test unseals every stored blob through the token (exactly what the proxy holds in memory when
it signs) and searches the raw database (SQLite file and WAL, or every PostgreSQL row), the object
store directory and everything logged or printed, for those bytes in raw, hex and base64 form.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from kms.models import KmsKeyComponent
from kms.service import KMS, seal_aad
from orchestrator.auth import Principal
from orchestrator.db import Database
from sdk.errors import QaiError


def _exercise_everything(kms: KMS, admin: Principal, signer: Principal) -> None:
    kms.create_key("m", tenant="org-a", principal=admin)
    kms.create_key("hi", tenant="org-a", suite="ML-DSA-87+SLH-DSA-SHA2-128f", principal=admin)
    kms.create_key("ed", tenant="org-a", suite="ML-DSA-44+Ed25519", principal=admin)
    kms.create_key("kem", tenant="org-a", suite="ML-KEM-768", purpose="kem", principal=admin)
    for name in ("m", "hi", "ed"):
        bundle = kms.sign(name, principal=signer, message=b"payload")
        kms.verify(bundle, b"payload", principal=signer)
        with pytest.raises(QaiError):
            kms.verify(bundle, b"tampered", principal=signer)
    kms.sign("m", principal=signer, digest=hashlib.sha256(b"x").digest(), prehash="sha256")
    kms.rotate("m", principal=admin)
    kms.sign("m", principal=signer, message=b"after rotate")
    kms.disable("m", 2, principal=admin)
    kms.revoke("m", 1, principal=admin, reason="scan test")
    version, ct, _ = kms.encapsulate("kem")
    kms.decapsulate("kem", version, ct, principal=signer)
    kms.forget_unsealed()
    kms.sign("hi", principal=signer, message=b"unseal again")


def _needles(kms: KMS, db: Database, pins: list[str]) -> dict[str, bytes]:
    from kms.models import KmsKey

    needles: dict[str, bytes] = {}
    with db.read() as s:
        comps = s.scalars(select(KmsKeyComponent).where(KmsKeyComponent.sealed_private.is_not(None))).all()
        tenants = {k.name: k.tenant for k in s.scalars(select(KmsKey))}
    assert len(comps) >= 6
    for c in comps:
        assert c.sealed_private is not None and c.kek_label is not None
        secret = bytes(kms.hsm.unseal(c.kek_label, c.sealed_private,
                                      seal_aad(tenants[c.key_name], c.key_name, c.version, c.alg)))
        assert len(secret) >= 32
        label = f"{c.key_name}@{c.version}/{c.alg}"
        needles[f"{label} raw"] = secret
        needles[f"{label} hex"] = secret.hex().encode()
        needles[f"{label} b64"] = base64.b64encode(secret)
        # any 24-byte window of the key, so a truncated or re-framed copy is caught as well
        needles[f"{label} window"] = secret[4:28]
    for i, pin in enumerate(pins):
        needles[f"pin {i}"] = pin.encode()
    return needles


def _database_bytes(db: Database) -> bytes:
    if db.dialect == "sqlite":
        path = Path(db.engine.url.database or "")
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    chunks: list[bytes] = []
    with db.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                for value in row:
                    chunks.append(bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode())
    return b"\x00".join(chunks)


def test_no_plaintext_private_key_anywhere(
    kms: KMS, admin: Principal, signer_a: Principal, db: Database, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # log every statement and parameter
    try:
        _exercise_everything(kms, admin, signer_a)
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    captured = capsys.readouterr()
    logs = (caplog.text + captured.out + captured.err).encode()
    assert "INSERT INTO kms_key_components" in caplog.text  # the statement log really was captured
    haystacks = {
        "database": _database_bytes(db),
        "object store": b"".join(p.read_bytes() for p in tmp_path.rglob("objects/**/*") if p.is_file()),
        "logs": logs,
    }
    needles = _needles(kms, db, [kms.hsm.config.user_pin, kms.hsm.config.so_pin])
    assert len(haystacks["database"]) > 10_000
    for where, hay in haystacks.items():
        for what, needle in needles.items():
            assert needle not in hay, f"{what} found in {where}"
