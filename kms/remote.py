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

import logging
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from kms.service import KMS, read_public_key, read_public_keys
from orchestrator.auth import Principal, Role
from orchestrator.db import Database
from sdk.client import Client, chunks, sign_item_size
from sdk.errors import QaiError, VerificationError
from sdk.signing import KeyDocument, KeyVersionDocument, Prehash, SignatureBundle, b64decode, b64encode

log = logging.getLogger(__name__)

PING_TIMEOUT = 3.0  # under a readiness probe's own timeout (5 s in infra/k8s)


def _path(name: str) -> str:
    return quote(name, safe="")


class RemoteKMS:
    def __init__(self, db: Database, url: str, token: str, *, timeout: float = 30.0,
                 ca_file: str | None = None) -> None:
        self.db = db
        self.url = url.rstrip("/")
        # Retries cover connection set-up only (httpx retries ConnectError/ConnectTimeout): a
        # request that reached the KMS is never sent twice.
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        transport = httpx.HTTPTransport(retries=2, verify=verify)
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
            raise self._translated(exc) from exc

    def _translated(self, exc: QaiError) -> QaiError:
        """The KMS's own errors (``kms.*``: no such key, revoked, …) keep their code and status, as
        the in-process KMS raises them. The others concern this process, not whoever called it, and
        must not reach an API caller as theirs: a refused service token is not the caller's bad
        token. The KMS's address goes to the log, not into errors that API callers see."""
        if exc.code.startswith("signature."):  # the same type the in-process verify raises
            return VerificationError(exc.code, exc.message, details=exc.details)
        if exc.code.startswith("kms."):
            return exc
        if exc.code == "client.unreachable":
            log.error("cannot reach the KMS at %s", self.url)
            return QaiError("kms.unreachable", "cannot reach the KMS", status=503)
        if exc.status in (401, 403):
            log.error("the KMS at %s refused this process's service token: %s", self.url, exc.code)
            return QaiError("kms.client_unauthorized", "the KMS refused this service's token (QAI_KMS_TOKEN)",
                            status=503, details={"kms_code": exc.code})
        log.error("the KMS at %s answered %s %s", self.url, exc.status, exc.code)
        return QaiError("kms.client_error", "the KMS rejected this service's request", status=500,
                        details={"kms_code": exc.code})

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
        return KeyDocument.model_validate(self._post(f"/v1/keys/{_path(name)}/rotate", {}))

    def disable(self, name: str, version: int, *, principal: Principal) -> KeyDocument:
        self._as_service(principal, "disabling a key version")
        return KeyDocument.model_validate(self._post(f"/v1/keys/{_path(name)}/disable", {"version": version}))

    def revoke(self, name: str, version: int, *, principal: Principal, reason: str,
               effective_at: datetime | None = None) -> KeyDocument:
        self._as_service(principal, "revoking a key version")
        body: dict[str, Any] = {"version": version, "reason": reason,
                                "effective_at": effective_at.isoformat() if effective_at else None}
        return KeyDocument.model_validate(self._post(f"/v1/keys/{_path(name)}/revoke", body))

    # -- signing --------------------------------------------------------------------------------
    def sign(self, name: str, *, principal: Principal, message: bytes | None = None,
             digest: bytes | None = None, prehash: Prehash | None = None) -> SignatureBundle:
        return self.sign_many(name, principal=principal, items=[message if digest is None else digest],
                              prehash=prehash if digest is not None else None)[0]

    def sign_many(self, name: str, *, principal: Principal, items: Sequence[bytes | None],
                  prehash: Prehash | None = None) -> list[SignatureBundle]:
        self._as_service(principal, "signing")
        data = [item for item in items if item is not None]
        if len(data) != len(items):
            raise QaiError("kms.no_message", "give a message or a digest", status=422)
        field = "message" if prehash is None else "digest"
        out: list[SignatureBundle] = []
        for chunk in chunks(data, sign_item_size):  # the SDK's batching: under the API's body and item limits
            batch = [{field: b64encode(item), "prehash": prehash} for item in chunk]
            out.extend(SignatureBundle.model_validate(b)
                       for b in self._post(f"/v1/keys/{_path(name)}/sign-batch", {"items": batch}))
        return out

    def start_sign_many(self, name: str, *, principal: Principal, items: Sequence[bytes | None],
                        prehash: Prehash | None = None) -> tuple[list[SignatureBundle], Callable[[], None]]:
        """As ``KMS.start_sign_many``: the remote KMS returns signatures only once audited."""
        return self.sign_many(name, principal=principal, items=items, prehash=prehash), lambda: None

    def verify(self, bundle: SignatureBundle, message: bytes, *, principal: Principal,
               at: datetime | None = None) -> KeyVersionDocument:
        body: dict[str, Any] = {"bundle": bundle.model_dump(mode="json"),
                                "message" if bundle.prehash is None else "digest": b64encode(message),
                                "at": at.isoformat() if at else None}
        version = int(self._post("/v1/verify", body)["version"])
        return next(v for v in self.public_key(bundle.parts[0].key_name).versions if v.version == version)

    # -- KEM ------------------------------------------------------------------------------------
    def encapsulate(self, name: str) -> tuple[int, bytes, bytes]:
        out = self._post(f"/v1/keys/{_path(name)}/encapsulate", {})
        return (int(out["version"]), b64decode(out["ciphertext"], what="ciphertext"),
                b64decode(out["shared_secret"], what="shared secret"))

    def decapsulate(self, name: str, version: int, ciphertext: bytes, *, principal: Principal) -> bytes:
        self._as_service(principal, "decapsulating")
        body = {"version": version, "ciphertext": b64encode(ciphertext)}
        out = self._post(f"/v1/keys/{_path(name)}/decapsulate", body)
        return b64decode(out["shared_secret"], what="shared secret")

    # -- health ---------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise unless the KMS answers ready (its database and HSM reachable)."""
        try:
            resp = self.client.http.get("/readyz", timeout=PING_TIMEOUT)
        except httpx.TransportError as exc:
            log.warning("cannot reach the KMS at %s: %s", self.url, type(exc).__name__)
            raise QaiError("kms.unreachable", "cannot reach the KMS", status=503) from exc
        if resp.status_code != 200:
            checks = resp.json().get("checks", {}) if resp.headers.get("content-type", "").startswith(
                "application/json") else {}
            raise QaiError("kms.not_ready", "the KMS is not ready", status=503, details={"checks": checks})

    def forget_unsealed(self) -> None:
        """Nothing is unsealed in this process: the keys stay in the KMS."""

    def close(self) -> None:
        self.client.close()


# Either KMS a component may be given: in this process (with the HSM) or over the KMS API.
KeyService = KMS | RemoteKMS
