"""The KMS REST API over a real uvicorn server, PostgreSQL and SoftHSM."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from orchestrator.app import create_app
from orchestrator.auth import Role, create_tenant, issue_token, revoke_token
from orchestrator.db import Database
from orchestrator.services import Services, build_services
from orchestrator.settings import Settings
from sdk.signing import KeyDocument, SignatureBundle, verify_bundle
from tests.conftest import LiveServer

MSG = base64.b64encode(b"hello manifest").decode()


@pytest.fixture
def services(settings: Settings, pg_db: Database) -> Iterator[Services]:
    svc = build_services(settings, db=pg_db)
    create_tenant(svc.db, "org-a")
    create_tenant(svc.db, "org-b")
    yield svc
    svc.close()


@pytest.fixture
def server(services: Services) -> Iterator[LiveServer]:
    with LiveServer(create_app(services)) as srv:
        yield srv


def _token(svc: Services, role: Role, tenant: str | None = "org-a", **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(svc.db, role=role, tenant=tenant, **kw).token}"}


def _error(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]  # type: ignore[no-any-return]


def test_key_lifecycle_over_http(server: LiveServer, services: Services) -> None:
    admin = _token(services, Role.ADMIN, None)
    signer = _token(services, Role.SIGNER)
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/v1/keys", json={"name": "org-a.manifest", "tenant": "org-a"}, headers=admin)
        assert r.status_code == 201, r.text
        r = c.post("/v1/keys/org-a.manifest/sign", json={"message": MSG}, headers=signer)
        assert r.status_code == 200, r.text
        bundle = r.json()
        assert [p["alg"] for p in bundle["parts"]] == ["ML-DSA-65", "ECDSA-P256"]
        r = c.post("/v1/verify", json={"bundle": bundle, "message": MSG}, headers=signer)
        assert r.json() == {"valid": True, "key": "org-a.manifest", "version": 1}
        # offline verification with the exported key document
        doc = KeyDocument.model_validate(c.get("/v1/keys/org-a.manifest", headers=signer).json())
        verify_bundle(SignatureBundle.model_validate(bundle), b"hello manifest", doc)
        pem = c.get("/v1/keys/org-a.manifest/public.pem", headers=signer).text
        assert pem.count("BEGIN PUBLIC KEY") == 2
        r = c.post("/v1/keys/org-a.manifest/rotate", headers=admin)
        assert [v["version"] for v in r.json()["versions"]] == [1, 2]
        r = c.post("/v1/keys/org-a.manifest/revoke", json={"version": 1, "reason": "drill"}, headers=admin)
        assert r.json()["versions"][0]["state"] == "revoked"
        r = c.post("/v1/verify", json={"bundle": bundle, "message": MSG,
                                       "at": "2999-01-01T00:00:00Z"}, headers=signer)
        assert r.status_code == 422 and _error(r)["code"] == "signature.key_revoked"
        digest = base64.b64encode(hashlib.sha256(b"big artifact").digest()).decode()
        r = c.post("/v1/keys/org-a.manifest/sign", json={"digest": digest, "prehash": "sha256"},
                   headers=signer)
        assert r.status_code == 200 and r.json()["parts"][0]["version"] == 2
        r = c.post("/v1/keys/org-a.manifest/sign-batch",
                   json={"items": [{"message": MSG}] * 5}, headers=signer)
        assert r.status_code == 200 and len(r.json()) == 5
        assert [k["name"] for k in c.get("/v1/keys", headers=signer).json()] == ["org-a.manifest"]


def test_auth_errors(server: LiveServer, services: Services) -> None:
    admin = _token(services, Role.ADMIN, None)
    expired = _token(services, Role.SIGNER, ttl=timedelta(seconds=-1))
    other = _token(services, Role.SIGNER, tenant="org-b")
    with httpx.Client(base_url=server.url) as c:
        c.post("/v1/keys", json={"name": "k", "tenant": "org-a"}, headers=admin).raise_for_status()
        r = c.post("/v1/keys/k/sign", json={"message": MSG})
        assert r.status_code == 401 and _error(r)["code"] == "auth.missing_token"
        r = c.post("/v1/keys/k/sign", json={"message": MSG}, headers={"Authorization": "Bearer qai_x_y"})
        assert r.status_code == 401 and _error(r)["code"] == "auth.bad_token"
        r = c.post("/v1/keys/k/sign", json={"message": MSG}, headers=expired)
        assert r.status_code == 401 and _error(r)["code"] == "auth.token_expired"
        r = c.post("/v1/keys/k/sign", json={"message": MSG}, headers=other)
        assert r.status_code == 403 and _error(r)["code"] == "auth.forbidden"
        # a verified token is cached, but revoking it takes effect at once
        issued = issue_token(services.db, role=Role.SIGNER, tenant="org-a")
        good = {"Authorization": f"Bearer {issued.token}"}
        assert c.post("/v1/keys/k/sign", json={"message": MSG}, headers=good).status_code == 200
        revoke_token(services.db, issued.token_id)
        r = c.post("/v1/keys/k/sign", json={"message": MSG}, headers=good)
        assert r.status_code == 401 and _error(r)["code"] == "auth.token_revoked"


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/keys", {"name": "k2", "tenant": "org-a", "suite": "ML-DSA-99"}, 400, "crypto.unknown_algorithm"),
        ("/v1/keys", {"name": "k2", "tenant": "org-a", "colour": "red"}, 422, "request.invalid"),
        ("/v1/keys/k/sign", {"message": "not base64!!"}, 400, "encoding.bad_base64"),
        ("/v1/keys/k/sign", {"message": MSG, "digest": MSG}, 422, "request.invalid"),
        ("/v1/keys/nope/sign", {"message": MSG}, 404, "kms.key_not_found"),
        ("/v1/keys/k/sign", {"message": base64.b64encode(b"x" * 300_000).decode()}, 413,
         "kms.message_too_large"),
    ],
)
def test_bad_input_gets_stable_codes(server: LiveServer, services: Services, path: str,
                                     body: dict[str, Any], status: int, code: str) -> None:
    admin = _token(services, Role.ADMIN, None)
    with httpx.Client(base_url=server.url) as c:
        c.post("/v1/keys", json={"name": "k", "tenant": "org-a"}, headers=admin).raise_for_status()
        before = c.get("/v1/keys", headers=admin).json()
        r = c.post(path, json=body, headers=admin)
        assert r.status_code == status, r.text
        assert _error(r)["code"] == code
        assert c.get("/v1/keys", headers=admin).json() == before


def test_malformed_json_bad_utf8_and_oversized_body(server: LiveServer, services: Services) -> None:
    admin = _token(services, Role.ADMIN, None)
    with httpx.Client(base_url=server.url) as c:
        headers = {**admin, "Content-Type": "application/json"}
        r = c.post("/v1/keys", content=b'{"name": "k", ', headers=headers)
        assert r.status_code == 400 and _error(r)["code"] == "request.malformed_json"
        r = c.post("/v1/keys", content=b'{"name": "\xff\xfe", "tenant": "org-a"}', headers=headers)
        assert r.status_code == 400 and _error(r)["code"] == "request.bad_encoding"
        r = c.post("/v1/keys", content=b"x" * (2 * 1024 * 1024), headers=headers)
        assert r.status_code == 413 and _error(r)["code"] == "request.too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds
            for _ in range(40):
                yield b"y" * 65536

        r = c.post("/v1/keys", content=chunks(), headers=headers)
        assert r.status_code == 413 and _error(r)["code"] == "request.too_large"
        assert c.get("/v1/keys", headers=admin).json() == []


def test_probes(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "object_store": "ok", "hsm": "ok"}
        assert c.get("/openapi.json").json()["paths"]["/v1/keys/{name}/sign"]
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and _error(r)["code"] == "http.not_found"
