"""Shared fixtures: real PostgreSQL, real SoftHSM tokens, real HTTP servers. No mocks of services.

* Every test that asks for ``pg_db`` gets a fresh PostgreSQL schema on the machine's server, with
  all migrations applied; ``db`` runs a test on SQLite *and* PostgreSQL.
* Every test that asks for ``hsm`` gets its own SoftHSM token directory and a freshly
  initialised token.
* A missing service fails the test run loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import create_engine, text

from kms.hsm import Hsm, HsmConfig
from kms.service import KMS, KmsConfig
from orchestrator import migrate
from orchestrator.auth import Principal, Role, create_tenant
from orchestrator.db import Database
from orchestrator.settings import Settings, _default_module

PG_URL = os.environ.get("QAI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SOFTHSM_MODULE = _default_module()


@pytest.fixture(scope="session")
def pg_server() -> str:
    engine = create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(f"PostgreSQL is required at {PG_URL} and is not reachable: {exc}", pytrace=False)
    finally:
        engine.dispose()
    return PG_URL


@contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """A fresh, empty schema on the PostgreSQL server at ``url``, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _pg_database(url: str) -> Iterator[Database]:
    with pg_schema(url) as schema:
        db = Database(url, schema=schema)
        try:
            migrate.upgrade(db)
            yield db
        finally:
            db.dispose()


def _sqlite_database(path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{path}")
    try:
        migrate.upgrade(db)
        yield db
    finally:
        db.dispose()


@pytest.fixture
def pg_db(pg_server: str) -> Iterator[Database]:
    yield from _pg_database(pg_server)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    yield from _sqlite_database(tmp_path / "qai.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Runs the test once per engine."""
    if request.param == "sqlite":
        yield from _sqlite_database(tmp_path / "qai.db")
    else:
        yield from _pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def hsm_config(tmp_path: Path) -> HsmConfig:
    if not Path(SOFTHSM_MODULE).exists():
        pytest.fail(f"SoftHSM2 is required ({SOFTHSM_MODULE} missing): apt install softhsm2",
                    pytrace=False)
    return HsmConfig(module=SOFTHSM_MODULE, token_label="qai-test", user_pin="1234-user",
                     so_pin="5678-so", pool_size=4, softhsm_dir=tmp_path / "softhsm")


@pytest.fixture
def hsm(hsm_config: HsmConfig) -> Iterator[Hsm]:
    h = Hsm(hsm_config)
    h.open()
    yield h
    h.close()


@pytest.fixture
def admin() -> Principal:
    return Principal.system("test-admin")


@pytest.fixture
def tenant(db: Database) -> str:
    create_tenant(db, "org-a")
    create_tenant(db, "org-b")
    return "org-a"


@pytest.fixture
def kms(db: Database, hsm: Hsm, tenant: str) -> KMS:
    return KMS(db, hsm, KmsConfig(unsealed_ttl=300.0))


@pytest.fixture
def signer_a() -> Principal:
    return Principal(subject="signer-a", role=Role.SIGNER, tenant="org-a")


@pytest.fixture
def settings(tmp_path: Path, hsm_config: HsmConfig) -> Settings:
    return Settings(
        home=tmp_path / ".qai",
        pkcs11_module=hsm_config.module,
        pkcs11_token_label=hsm_config.token_label,
        pkcs11_user_pin=hsm_config.user_pin,  # type: ignore[arg-type]
        pkcs11_so_pin=hsm_config.so_pin,  # type: ignore[arg-type]
        # Many apps start in one test process: none freezes the process's heap or changes its GC
        # thresholds (test_foundation checks the freeze itself).
        gc_freeze=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,  # type: ignore[arg-type]
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP API (moto's server) on a loopback port, shared by the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def storage_settings(request: pytest.FixtureRequest, settings: Settings, bucket_prefix: str
                     ) -> tuple[Settings, Database]:
    """For a fixture parametrised over ``postgresql+s3`` and ``sqlite+local``: the database, and the
    settings of the object store (an S3 bucket with Object Lock on moto's server, or the local
    directory)."""
    if request.param == "postgresql+s3":
        import boto3
        from pydantic import SecretStr

        db: Database = request.getfixturevalue("pg_db")
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"{bucket_prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t",
                     aws_secret_access_key="t").create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        settings = settings.model_copy(update={"s3_bucket": bucket, "s3_endpoint_url": endpoint,
                                               "s3_access_key_id": SecretStr("t"),
                                               "s3_secret_access_key": SecretStr("t")})
        return settings, db
    return settings, request.getfixturevalue("sqlite_db")
