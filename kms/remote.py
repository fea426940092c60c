"""The KMS of another process, reached over its REST API, with the in-process KMS's interface.

On Kubernetes only the KMS pods hold the HSM PIN and may reach the HSM (infra/k8s NetworkPolicy
``qai-kms-egress-hsm``). Every other component (orchestrator, scheduler, worker, em-policy,
nightly) sets ``QAI_KMS_URL`` and ``QAI_KMS_TOKEN`` and gets a :class:`RemoteKMS` instead of a
:class:`~kms.service.KMS`: it never loads the PKCS#11 module. Signing, key creation and the key
lifecycle go to the KMS API; public keys are public data and are read from the shared database,
exactly as the KMS itself reads them.

The KMS authorises the service token, not the ``principal`` a caller passes: that token is an
administrator's, so only system principals (in-process services) may sign through it. A tenant's
principal arriving here would be a privilege escalation, and is refused.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx

from kms.service import KMS, read_public_key, read_public_keys
from orchestrator.auth import Principal, Role
from orchestrator.db import Database
from sdk.client import Client
from sdk.errors import QaiError
from sdk.signing import KeyDocument, KeyVersionDocument, Prehash, SignatureBundle, b64decode

# The KMS API's sign-batch limit (kms.api.SignBatchRequest).
SIGN_BATCH_ITEMS = 1000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class RemoteKMS:
    def __init__(self, db: Database, url: str, token: str, *, timeout: float = 30.0,
                 ca_file: str | None = None) -> None:
        self.db = db
        self.url = url.rstrip("/")
        # Retries cover connection set-up only (httpx retries ConnectError/ConnectTimeout): a
        # request that reached the KMS is never sent twice.
        transport = httpx.HTTPTransport(retries=2, verify=ca_file if ca_file else True)
        self.client = Client(self.url, token, timeout=timeout, transport=transport)

    @staticmethod
    def _as_service(principal: Principal, action: str) -> None:
        if principal.role != Role.ADMIN:
            raise QaiError("kms.remote_principal",
                           f"{action} through the remote KMS is for this process's own services; "
                           f"{principal.subject} must call the KMS API with its own token",
                           status=403, details={"subject": principal.subject})

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return self.client.request("POST", path, json=body).json()
        except QaiError as exc:
            if exc.code != "client.unreachable":
                raise  # the KMS's own error, code and status as it raised them
            raise QaiError("kms.unreachable", f"cannot reach the KMS at {self.url}", status=503,
                           details={"url": self.url}) from exc

    # -- reads (public data, from the shared database) ------------------------------------------
    def public_key(self, name: str) -> KeyDocument:
        return read_public_key(self.db, name)

    def list_keys(self, *, principal: Principal, tenant: str | None = None) -> list[KeyDocument]:
        return read_public_keys(self.db, principal=principal, tenant=tenant)

    # -- key lifecycle --------------------------------------------------------------------------
    def create_key(self, name: str, *, tenant: str, principal: Principal, suite: str | None = None,
                   purpose: str = "signing") -> KeyDocument:
        self._as_service(principal, "creating a key")
        body = {"name": name, "tenant": tenant, "suite": suite, "purpose": purpose}
        return KeyDocument.model_validate(self._post("/v1/keys", body))

    def rotate(self, name: str, *, principal: Principal) -> KeyDocument:
        self._as_service(principal, "rotating a key")
        return KeyDocument.model_validate(self._post(f"/v1/keys/{name}/rotate", {}))

    def disable(self, name: str, version: int, *, principal: Principal) -> KeyDocument:
        self._as_service(principal, "disabling a key version")
        return KeyDocument.model_validate(self._post(f"/v1/keys/{name}/disable", {"version": version}))

    def revoke(self, name: str, version: int, *, principal: Principal, reason: str,
               effective_at: datetime | None = None) -> KeyDocument:
        self._as_service(principal, "revoking a key version")
        body: dict[str, Any] = {"version": version, "reason": reason,
                                "effective_at": effective_at.isoformat() if effective_at else None}
        return KeyDocument.model_validate(self._post(f"/v1/keys/{name}/revoke", body))

    # -- signing --------------------------------------------------------------------------------
    def sign(self, name: str, *, principal: Principal, message: bytes | None = None,
             digest: bytes | None = None, prehash: Prehash | None = None) -> SignatureBundle:
        return self.sign_many(name, principal=principal, items=[message if digest is None else digest],
                              prehash=prehash if digest is not None else None)[0]

    def sign_many(self, name: str, *, principal: Principal, items: Sequence[bytes | None],
                  prehash: Prehash | None = None) -> list[SignatureBundle]:
        self._as_service(principal, "signing")
        if any(item is None for item in items):
            raise QaiError("kms.empty_input", "nothing to sign", status=422)
        field = "message" if prehash is None else "digest"
        out: list[SignatureBundle] = []
        for start in range(0, len(items), SIGN_BATCH_ITEMS):
            chunk = items[start:start + SIGN_BATCH_ITEMS]
            batch = [{field: _b64(item or b""), "prehash": prehash} for item in chunk]
            out.extend(SignatureBundle.model_validate(b)
                       for b in self._post(f"/v1/keys/{name}/sign-batch", {"items": batch}))
        return out

    def verify(self, bundle: SignatureBundle, message: bytes, *, principal: Principal,
               at: datetime | None = None) -> KeyVersionDocument:
        body: dict[str, Any] = {"bundle": bundle.model_dump(mode="json"),
                                "message" if bundle.prehash is None else "digest": _b64(message),
                                "at": at.isoformat() if at else None}
        version = int(self._post("/v1/verify", body)["version"])
        return next(v for v in self.public_key(bundle.parts[0].key_name).versions if v.version == version)

    # -- KEM ------------------------------------------------------------------------------------
    def encapsulate(self, name: str) -> tuple[int, bytes, bytes]:
        out = self._post(f"/v1/keys/{name}/encapsulate", {})
        return (int(out["version"]), b64decode(out["ciphertext"], what="ciphertext"),
                b64decode(out["shared_secret"], what="shared secret"))

    def decapsulate(self, name: str, version: int, ciphertext: bytes, *, principal: Principal) -> bytes:
        self._as_service(principal, "decapsulating")
        out = self._post(f"/v1/keys/{name}/decapsulate", {"version": version, "ciphertext": _b64(ciphertext)})
        return b64decode(out["shared_secret"], what="shared secret")

    # -- health ---------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise unless the KMS answers ready (its database and HSM reachable)."""
        try:
            resp = self.client.http.get("/readyz")
        except httpx.TransportError as exc:
            raise QaiError("kms.unreachable", f"cannot reach the KMS at {self.url}: {type(exc).__name__}",
                           status=503, details={"url": self.url}) from exc
        if resp.status_code != 200:
            checks = resp.json().get("checks", {}) if resp.headers.get("content-type", "").startswith(
                "application/json") else {}
            raise QaiError("kms.not_ready", f"the KMS at {self.url} is not ready", status=503,
                           details={"url": self.url, "checks": checks})

    def forget_unsealed(self) -> None:
        """Nothing is unsealed in this process: the keys stay in the KMS."""

    def close(self) -> None:
        self.client.close()


# Either KMS a component may be given: in this process (with the HSM) or over the KMS API.
KeyService = KMS | RemoteKMS
