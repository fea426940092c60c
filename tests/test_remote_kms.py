"""A component that signs through the KMS API (``QAI_KMS_URL``) instead of opening the HSM.

This is how qai runs on Kubernetes, where only the KMS pods may reach the HSM: the KMS runs as
a real uvicorn server with its SoftHSM token; the client process has the same PostgreSQL database
and no HSM at all. Jobs are ingested and ledgered, checkpoints signed, through the API.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from kms.models import KmsAuditRecord
from kms.remote import RemoteKMS
from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.db import Database
from orchestrator.services import Services, build_services
from orchestrator.settings import Settings
from sdk.checkpoint import verify_checkpoint
from sdk.errors import QaiError, VerificationError
from sdk.manifest import sign_manifest, verify_manifest
from sdk.signing import verify_bundle
from tests.conftest import LiveServer
from tests.test_manifest import manifest

SYSTEM = Principal.system("test")


@pytest.fixture
def kms_side(settings: Settings, pg_db: Database) -> Iterator[Services]:
    """The KMS's process: the HSM, the database."""
    svc = build_services(settings, db=pg_db, migrate_db=False)
    create_tenant(pg_db, "org-a")
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def kms_server(kms_side: Services) -> Iterator[LiveServer]:
    with LiveServer(create_app(kms_side, components=("kms",))) as srv:
        yield srv


def client_settings(settings: Settings, tmp_path: Path, url: str, token: str) -> Settings:
    return settings.model_copy(update={
        "home": tmp_path / "client", "kms_url": url, "kms_token": SecretStr(token),
        # the client is given no HSM settings it could use: no PIN, a module that does not exist
        "pkcs11_module": str(tmp_path / "no-such-pkcs11.so"), "pkcs11_user_pin": None, "pkcs11_so_pin": None,
        "ledger_checkpoint_every": 5, "ledger_checkpoint_interval_seconds": 0,
    })


@pytest.fixture
def client_side(settings: Settings, tmp_path: Path, pg_db: Database, kms_server: LiveServer) -> Iterator[Services]:
    """Another process's services (the orchestrator's), on its own connection pool."""
    token = issue_token(pg_db, role=Role.ADMIN, tenant=None, label="orchestrator").token
    db = Database(pg_db.url, schema=pg_db.schema)
    svc = build_services(client_settings(settings, tmp_path, kms_server.url, token), db=db, migrate_db=False)
    try:
        yield svc
    finally:
        svc.close()


def _actors(db: Database, operation: str) -> set[str]:
    with db.read() as s:
        return set(s.scalars(select(KmsAuditRecord.actor).where(KmsAuditRecord.operation == operation)))


def test_ingest_and_ledger_sign_through_the_kms_api_without_an_hsm(
        client_side: Services, kms_side: Services, tmp_path: Path) -> None:
    assert client_side.hsm is None and isinstance(client_side.kms, RemoteKMS)
    home = tmp_path / "client"
    assert not (home / "softhsm").exists() and not (home / "hsm-pin.json").exists()

    key = client_side.kms.create_key("org-a.manifests", tenant="org-a", principal=SYSTEM)
    assert key.suite == "ML-DSA-65+ECDSA-P256" and key.versions[0].state == "enabled"
    # the key was made by the KMS's process, in its HSM
    assert any(o.label.startswith("qai:org-a.manifests:") for o in kms_side.hsm.key_objects())  # type: ignore[union-attr]

    signer = Principal.system("orchestrator")
    for i in range(6):
        env = sign_manifest(manifest(job_id=str(uuid.UUID(int=i))),
                            lambda msg: client_side.kms.sign("org-a.manifests", principal=signer, message=msg))
        assert verify_manifest(env, kms_side.kms.public_key("org-a.manifests")).manifest.tenant == "org-a"
        submitted = client_side.jobs.submit(env.to_bytes(), Principal(subject="u", role=Role.SUBMITTER,
                                                                     tenant="org-a"))
        assert submitted.created
    assert client_side.ledger.size() == 6
    client_side.ledger.checkpoint()  # the ledger's key is created and used over the API too
    note = client_side.ledger.latest_checkpoint()
    assert note is not None
    assert verify_checkpoint(note, client_side.ledger.checkpoint_key(refresh=True)).checkpoint.size == 6

    # The KMS's audit trail names the service token, never an in-process subject of the client.
    token_subjects = {a for a in _actors(kms_side.db, "sign") if a.startswith("token:")}
    assert token_subjects and _actors(kms_side.db, "sign") == token_subjects
    assert {a for a in _actors(kms_side.db, "create")} == token_subjects


def test_errors_keep_their_codes(client_side: Services, kms_server: LiveServer, pg_db: Database) -> None:
    with pytest.raises(QaiError) as err:
        client_side.kms.sign("no-such-key", principal=SYSTEM, message=b"x")
    assert err.value.code == "kms.key_not_found" and err.value.status == 404
    client_side.kms.create_key("org-a.k", tenant="org-a", principal=SYSTEM)
    with pytest.raises(QaiError) as err:
        client_side.kms.create_key("org-a.k", tenant="org-a", principal=SYSTEM)
    assert err.value.code == "kms.key_exists" and err.value.status == 409
    # A tenant's principal may not borrow the service token's rights.
    with pytest.raises(QaiError) as err:
        client_side.kms.sign("org-a.k", principal=Principal(subject="s", role=Role.SIGNER, tenant="org-a"),
                             message=b"x")
    assert err.value.code == "kms.remote_principal"
    # A wrong or revoked service token is this service's fault, never reported as the API caller's
    # bad token (401): a 503 with its own code, the KMS's code in the details.
    stranger = RemoteKMS(pg_db, kms_server.url, "qai_nope_nope")
    with pytest.raises(QaiError) as err:
        stranger.sign("org-a.k", principal=SYSTEM, message=b"x")
    assert err.value.code == "kms.client_unauthorized" and err.value.status == 503
    assert err.value.details == {"kms_code": "auth.bad_token"}
    stranger.close()
    with pytest.raises(QaiError) as err:
        client_side.kms.sign_many("org-a.k", principal=SYSTEM, items=[b"x", None])
    assert err.value.code == "kms.no_message"


def test_every_operation_round_trips_through_the_api(client_side: Services, kms_side: Services) -> None:
    kms = client_side.kms
    kms.create_key("org-a.k", tenant="org-a", principal=SYSTEM)
    # a digest, checked by the KMS's verify endpoint and offline
    digest = hashlib.sha256(b"payload").digest()
    bundle = kms.sign("org-a.k", principal=SYSTEM, digest=digest, prehash="sha256")
    assert bundle.prehash == "sha256"
    assert kms.verify(bundle, digest, principal=SYSTEM).version == 1
    verify_bundle(bundle, digest, kms_side.kms.public_key("org-a.k"))
    with pytest.raises(QaiError) as err:
        kms.verify(bundle, hashlib.sha256(b"other").digest(), principal=SYSTEM)
    assert isinstance(err.value, VerificationError) and err.value.code.startswith("signature.")
    # batches split by bytes as well as by count: 3 x 200 KB is over one request's body limit
    big = [bytes([i]) * 200_000 for i in range(3)]
    bundles = kms.sign_many("org-a.k", principal=SYSTEM, items=big)
    assert len(bundles) == 3
    for message, b in zip(big, bundles, strict=True):
        verify_bundle(b, message, kms_side.kms.public_key("org-a.k"))
    # the lifecycle
    assert [v.version for v in kms.rotate("org-a.k", principal=SYSTEM).versions] == [1, 2]
    assert kms.sign("org-a.k", principal=SYSTEM, message=b"m").parts[0].version == 2
    assert kms.disable("org-a.k", 1, principal=SYSTEM).versions[0].state == "disabled"
    revoked = kms.revoke("org-a.k", 2, principal=SYSTEM, reason="test")
    assert revoked.versions[1].state == "revoked" and revoked.versions[1].revocation_reason == "test"
    with pytest.raises(QaiError) as err:
        kms.sign("org-a.k", principal=SYSTEM, message=b"m")
    assert err.value.code == "kms.no_enabled_version"
    # a KEM key: the shared secret the KMS decapsulates is the one encapsulated
    kms.create_key("org-a.kem", tenant="org-a", suite="ML-KEM-768", purpose="kem", principal=SYSTEM)
    version, ciphertext, secret = kms.encapsulate("org-a.kem")
    assert kms.decapsulate("org-a.kem", version, ciphertext, principal=SYSTEM) == secret


def test_readyz_follows_the_kms_and_a_client_never_serves_the_kms_api(
        client_side: Services, kms_server: LiveServer) -> None:
    with pytest.raises(QaiError) as err:
        create_app(client_side, components=("kms",))
    assert err.value.code == "kms.remote_configured"
    with LiveServer(create_app(client_side)) as srv:
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {
            "database": "ok", "object_store": "ok", "kms": "ok"}
        # every component but the KMS: no proxy that would sign with the service token's rights
        paths = set(httpx.get(f"{srv.url}/openapi.json").json()["paths"])
        assert "/v1/jobs" in paths and "/v1/schedule" in paths
        assert not any(p.startswith("/v1/keys") or p == "/v1/verify" for p in paths)
        assert httpx.post(f"{srv.url}/v1/keys/org-a.manifests/sign", json={"message": ""}).status_code == 404
        kms_server.__exit__()  # the KMS goes away
        down = httpx.get(f"{srv.url}/readyz")
        assert down.status_code == 503 and down.json()["checks"]["kms"] == "kms.unreachable"
    with pytest.raises(QaiError) as err:
        client_side.kms.sign("org-a.manifests", principal=SYSTEM, message=b"x")
    assert err.value.code == "kms.unreachable" and err.value.status == 503


def test_a_kms_url_needs_a_token(settings: Settings, tmp_path: Path, pg_db: Database) -> None:
    bad = settings.model_copy(update={"home": tmp_path / "c", "kms_url": "http://127.0.0.1:9"})
    with pytest.raises(QaiError) as err:
        build_services(bad, db=pg_db, migrate_db=False)
    assert err.value.code == "settings.kms_token_required"
