"""Job ingest over real HTTP: PostgreSQL with S3 over HTTP (moto's server), and the embedded
default (SQLite with a local directory). Every attack and bad input is rejected with its own code
and leaves the DB, the object store and the ledger unchanged."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.jobs import ManifestRow
from orchestrator.objects import S3ObjectStore
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.audit import ServerSource, audit
from sdk.client import Client
from sdk.dsse import Envelope, envelope_from_bundle, pae
from sdk.ledger import verify_receipt
from sdk.manifest import PAYLOAD_TYPE, RunManifest, sign_manifest
from tests.conftest import LiveServer, storage_settings
from tests.ledger_helpers import ledger_services
from tests.test_manifest import manifest


@pytest.fixture(params=["postgresql+s3", "sqlite+local"])
def svc(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[Services]:
    yield from ledger_services(*storage_settings(request, settings, "jobs"))


def _sign(svc: Services, key: str, tenant: str, m: RunManifest) -> bytes:
    signer = Principal(subject="t", role=Role.SIGNER, tenant=tenant)
    return sign_manifest(m, lambda msg: svc.kms.sign(key, principal=signer, message=msg)).to_bytes()


def _state(svc: Services) -> tuple[int, int, list[str]]:
    with svc.db.read() as s:
        rows = s.scalar(select(func.count()).select_from(ManifestRow)) or 0
    return rows, svc.ledger.size(), svc.objects.list("manifests/")


def test_submit_get_list_upload_and_audit(svc: Services) -> None:
    token = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
    auditor = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    envs = [_sign(svc, "org-a.manifests", "org-a", manifest(job_id=str(uuid.UUID(int=i)))) for i in range(12)]
    with LiveServer(create_app(svc)) as srv, httpx.Client(base_url=srv.url,
                                                          headers={"Authorization": f"Bearer {token}"}) as c:
        svc.uploader.close()  # the server started it; this test moves the outbox by hand
        first = c.post("/v1/jobs", content=envs[0])
        assert first.status_code == 201, first.text
        again = c.post("/v1/jobs", content=envs[0])  # idempotent: same envelope, same record
        assert again.status_code == 200 and again.json()["receipt"]["index"] == first.json()["receipt"]["index"]
        as_yaml = yaml.safe_dump(json.loads(envs[1])).encode()
        assert c.post("/v1/jobs", content=as_yaml, headers={"Content-Type": "application/yaml"}).status_code == 201
        for env in envs[2:]:
            assert c.post("/v1/jobs", content=env).status_code == 201
        job = c.get(f"/v1/jobs/{uuid.UUID(int=3)}").json()
        assert job["tenant"] == "org-a" and job["status"] == "pending" and job["ledger_index"] == 3
        assert job["s3_path"].startswith("manifests/") and not job["uploaded"]
        assert Envelope.model_validate(job["envelope"]).payload_type == PAYLOAD_TYPE
        page1 = c.get("/v1/jobs", params={"limit": 5}).json()
        page2 = c.get("/v1/jobs", params={"limit": 5, "cursor": page1["next_cursor"]}).json()
        page3 = c.get("/v1/jobs", params={"limit": 5, "cursor": page2["next_cursor"]}).json()
        ids = [j["job_id"] for p in (page1, page2, page3) for j in p["jobs"]]
        assert sorted(ids) == sorted(str(uuid.UUID(int=i)) for i in range(12)) and page3["next_cursor"] is None
        # a receipt verifies offline once a checkpoint covers the job (every 10 entries here)
        with Client(srv.url, auditor) as a:
            verify_receipt(a.ledger_receipt(2), a.ledger_key())
        # the outbox moves envelopes to the object store, verified, then drops the DB copies
        assert svc.objects.list("manifests/") == []
        svc.uploader.drain()
        stored = svc.objects.list("manifests/")
        assert len(stored) == 12
        with svc.db.read() as s:
            assert s.scalar(select(func.count()).where(ManifestRow.envelope.is_not(None))) == 0
        job = c.get(f"/v1/jobs/{uuid.UUID(int=3)}").json()
        assert job["uploaded"] is True and job["storage"]["location"].endswith(job["s3_path"])
        if isinstance(svc.objects, S3ObjectStore):  # the bucket has Object Lock: the store itself holds it
            assert job["storage"]["object_lock"] == "COMPLIANCE"
            assert datetime.fromisoformat(job["storage"]["retain_until"]) > datetime.now(UTC) + timedelta(days=3000)
        else:
            assert job["storage"] == {"location": job["storage"]["location"], "mode": "write-once"}
        svc.ledger.checkpoint()
        with Client(srv.url, auditor) as a:
            report = audit(ServerSource(a), trusted_keys={k.name: k for k in a.list_keys()}, workers=1)
        assert report.ok and report.entries == 12 and report.signatures_verified == 12


def test_attacks_and_bad_input_leave_nothing_behind(svc: Services, admin: Principal) -> None:
    create_tenant(svc.db, "org-strict", crypto_policy={"allowed_suites": ["ML-DSA-87+ECDSA-P256"],
                                                         "min_crypto_mode": "hybrid"})
    svc.kms.create_key("org-a.classical", tenant="org-a", suite="ECDSA-P256", principal=admin)
    svc.kms.create_key("org-strict.manifests", tenant="org-strict", principal=admin)
    svc.kms.create_key("org-a.old", tenant="org-a", principal=admin)
    token = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
    strict = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-strict").token
    expired = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a", ttl=timedelta(seconds=-1)).token
    good = manifest(job_id=str(uuid.UUID(int=100)))
    env = json.loads(_sign(svc, "org-a.manifests", "org-a", good))
    tampered = {**env, "payload": base64.b64encode(
        manifest(job_id=str(uuid.UUID(int=100)), shots=1).to_bytes()).decode()}
    revoked = _sign(svc, "org-a.old", "org-a", manifest(job_id=str(uuid.UUID(int=101))))
    svc.kms.revoke("org-a.old", 1, reason="compromised", principal=admin,
                   effective_at=datetime.now(UTC) - timedelta(hours=1))
    signer = Principal(subject="t", role=Role.SIGNER, tenant="org-a")
    extra = json.loads(good.to_bytes()) | {"surprise": True, "job_id": str(uuid.UUID(int=102))}
    payload = json.dumps(extra, sort_keys=True, separators=(",", ":")).encode()
    unknown_fields = envelope_from_bundle(PAYLOAD_TYPE, payload, svc.kms.sign(
        "org-a.manifests", principal=signer, message=pae(PAYLOAD_TYPE, payload))).to_bytes()
    bomb = b"a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"
    with LiveServer(create_app(svc)) as srv, httpx.Client(base_url=srv.url) as c:
        auth = {"Authorization": f"Bearer {token}"}
        assert c.post("/v1/jobs", json=env, headers=auth).status_code == 201  # the one good job
        svc.uploader.close()
        svc.uploader.drain()  # settle the outbox so that "unchanged" means unchanged
        before = _state(svc)
        cases: list[tuple[str, Any, dict[str, str], int, str]] = [
            ("tampered payload", json.dumps(tampered), auth, 422, "signature.invalid"),
            ("another tenant's key", _sign(svc, "org-b.manifests", "org-b", manifest(job_id=str(uuid.UUID(int=103)))),
             auth, 422, "manifest.wrong_tenant"),
            ("revoked key version", revoked, auth, 422, "signature.key_revoked"),
            ("downgrade", _sign(svc, "org-a.classical", "org-a", manifest(
                job_id=str(uuid.UUID(int=104)), pqc_suite="ECDSA-P256", crypto_mode="pqc-required")),
             auth, 422, "manifest.downgrade"),
            ("suite the policy forbids", _sign(svc, "org-strict.manifests", "org-strict", manifest(
                job_id=str(uuid.UUID(int=105)), tenant="org-strict")),
             {"Authorization": f"Bearer {strict}"}, 403, "policy.suite_forbidden"),
            ("replayed job_id, other content", _sign(svc, "org-a.manifests", "org-a", manifest(
                job_id=str(uuid.UUID(int=100)), shots=7)), auth, 409, "job.conflict"),
            ("unknown fields", unknown_fields, auth, 422, "manifest.invalid"),
            ("YAML alias bomb", bomb, auth, 400, "yaml.alias_forbidden"),
            ("10 MiB body", b"{" + b" " * (10 * 1024 * 1024) + b"}", auth, 413, "request.too_large"),
            ("non-UTF-8", b"\xff\xfe\x00{", auth, 400, "input.not_utf8"),
            ("missing token", json.dumps(env), {}, 401, "auth.missing_token"),
            ("expired token", json.dumps(env), {"Authorization": f"Bearer {expired}"}, 401, "auth.token_expired"),
            ("other tenant's token", json.dumps(env), {"Authorization": f"Bearer {strict}"}, 403, "auth.forbidden"),
        ]
        seen = set()
        for what, body, headers, status, code in cases:
            r = c.post("/v1/jobs", content=body, headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), what
            seen.add(code)
            assert _state(svc) == before, f"{what} left something behind"
        assert len(seen) == len(cases)  # every case has its own code


def test_batch_stores_the_good_and_rejects_the_bad_alone(svc: Services, admin: Principal) -> None:
    """POST /v1/jobs/batch: one result per envelope, in order; a rejected one leaves nothing
    behind and does not stop the others. Duplicates within the batch and resubmissions are
    answered as by POST /v1/jobs."""
    svc.kms.create_key("org-a.old", tenant="org-a", principal=admin)
    token = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
    good = [_sign(svc, "org-a.manifests", "org-a", manifest(job_id=str(uuid.UUID(int=200 + i)))) for i in range(5)]
    revoked = _sign(svc, "org-a.old", "org-a", manifest(job_id=str(uuid.UUID(int=210))))
    svc.kms.revoke("org-a.old", 1, reason="compromised", principal=admin,
                   effective_at=datetime.now(UTC) - timedelta(hours=1))
    tampered = json.loads(good[1]) | {"payload": base64.b64encode(
        manifest(job_id=str(uuid.UUID(int=201)), shots=1).to_bytes()).decode()}
    conflict = _sign(svc, "org-a.manifests", "org-a", manifest(job_id=str(uuid.UUID(int=200)), shots=9))
    other_tenant = _sign(svc, "org-b.manifests", "org-b", manifest(job_id=str(uuid.UUID(int=211)), tenant="org-b"))
    with LiveServer(create_app(svc)) as srv, Client(srv.url, token) as client:
        svc.uploader.close()
        assert client.submit_job(good[0])["created"]  # stored before the batch
        before_rows, before_size, _ = _state(svc)
        batch = [good[0], json.dumps(tampered).encode(), good[1], revoked, conflict, good[2], good[2],
                 other_tenant, b'{"not": "an envelope"}', good[3]]
        results = client.submit_jobs(batch)
        assert [r["status"] for r in results] == [200, 422, 201, 422, 409, 201, 200, 403, 422, 201]
        assert [r["error"]["code"] for r in results if "error" in r] == [
            "signature.invalid", "signature.key_revoked", "job.conflict", "auth.forbidden", "dsse.malformed"]
        assert results[5]["receipt"] == results[6]["receipt"] and not results[6]["created"]
        stored = [r for r in results if r["status"] == 201]
        assert sorted(r["receipt"]["index"] for r in stored) == [before_size, before_size + 1, before_size + 2]
        rows, size, _ = _state(svc)
        assert (rows, size) == (before_rows + 3, before_size + 3)  # only the three new good jobs
        for r in stored:  # each index row points at its own ledger entry
            job = client.get_job(r["job_id"])
            assert job["ledger_index"] == r["receipt"]["index"]
            assert svc.ledger.entry(job["ledger_index"]).sha256 == job["envelope_sha256"]
        # the same batch again changes nothing: every good job is a resubmission now
        again = client.submit_jobs(batch)
        assert [r["status"] for r in again] == [200, 422, 200, 422, 409, 200, 200, 403, 422, 200]
        assert _state(svc)[:2] == (rows, size)
        # SDK helpers: sign through the KMS in one request, submit in one request
        signer = issue_token(svc.db, role=Role.SIGNER, tenant="org-a").token
        with Client(srv.url, signer) as c2:
            made = c2.create_jobs([manifest(job_id=str(uuid.UUID(int=300 + i))) for i in range(3)], "org-a.manifests")
        assert [r["status"] for r in made] == [201, 201, 201]
        c = client.http
        for body, code in [(b'{"envelopes": []}', "job.bad_batch"), (b'[1, 2]', "job.bad_batch"),
                           (b'{"envelopes": [], "x": 1}', "job.bad_batch"), (b"\xff", "input.not_utf8")]:
            r = c.post("/v1/jobs/batch", content=body)
            assert r.status_code in (400, 422) and r.json()["error"]["code"] == code, body
        r = c.post("/v1/jobs/batch", content=json.dumps({"envelopes": [{}] * 1001}))
        assert r.status_code == 422 and r.json()["error"]["details"]["max"] == 1000
        assert _state(svc)[:2] == (rows + 3, size + 3)


def test_client_batches_stay_under_the_request_limit() -> None:
    from sdk.client import BATCH_BYTES, BATCH_ITEMS, chunks

    sizes = [300 * 1024, 300 * 1024, 300 * 1024, 10, 2 * BATCH_BYTES] + [1] * (BATCH_ITEMS + 5)
    chunks = list(chunks(sizes, lambda n: n))
    assert [x for c in chunks for x in c] == sizes  # every item once, in order
    assert all(sum(c) <= BATCH_BYTES or len(c) == 1 for c in chunks)  # an oversized item goes alone
    assert all(len(c) <= BATCH_ITEMS for c in chunks)
    assert [len(c) for c in chunks][:3] == [2, 2, 1]
