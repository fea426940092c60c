"""HTTP client of the qai API, for SDK users and auditors (httpx; no server imports).

Every non-2xx answer becomes the :class:`~sdk.errors.QaiError` the server raised, with its code.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import httpx

from sdk.dsse import Envelope, envelope_from_bundle, pae, parse_envelope
from sdk.errors import QaiError
from sdk.ledger import Receipt
from sdk.manifest import PAYLOAD_TYPE, RunManifest, VerifiedManifest, sign_manifest, verify_manifest
from sdk.signing import KeyDocument, SignatureBundle, parse_keyid

# A batch request stays under the server's default 1 MiB body limit, and under its item limits.
BATCH_BYTES = 768 * 1024
BATCH_ITEMS = 500
T = TypeVar("T")


def chunks(items: Sequence[T], size: Callable[[T], int]) -> Iterator[list[T]]:
    """``items`` in request-sized lists: at most :data:`BATCH_ITEMS` each and :data:`BATCH_BYTES` by ``size``."""
    chunk: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if chunk and (used + n > BATCH_BYTES or len(chunk) == BATCH_ITEMS):
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += n
    if chunk:
        yield chunk


def sign_item_size(message: bytes) -> int:
    """Bytes a message takes in a sign-batch request body: base64 plus its JSON wrapping."""
    return len(message) * 4 // 3 + 16


def _checked(resp: httpx.Response) -> httpx.Response:
    """The response, or the server's error as the :class:`QaiError` it raised."""
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        raise QaiError.from_body(body, resp.status_code)
    return resp


def _unreachable(url: str, exc: Exception) -> QaiError:
    return QaiError("client.unreachable", f"cannot reach {url}: {type(exc).__name__}", status=503,
                    details={"url": url})


class Client:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return _checked(self.http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc

    def get_json(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    # --- keys -----------------------------------------------------------------------------------

    def list_keys(self) -> list[KeyDocument]:
        return [KeyDocument.model_validate(k) for k in self.get_json("/v1/keys")]

    # --- ledger ---------------------------------------------------------------------------------

    def ledger_checkpoint(self) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = self.get_json("/v1/ledger/checkpoint")
            return out
        except QaiError as exc:
            if exc.code == "ledger.no_checkpoint":
                return None
            raise

    def ledger_checkpoints(self, since: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self.get_json("/v1/ledger/checkpoints", since=since)["checkpoints"]
            out.extend(page)
            if len(page) < 1000:
                return out
            since = page[-1]["tree_size"] + 1

    def ledger_key(self) -> KeyDocument:
        return KeyDocument.model_validate(self.get_json("/v1/ledger/key"))

    def ledger_entries(self, start: int, end: int, *, objects: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json("/v1/ledger/entries", start=start, end=end,
                                            objects=str(objects).lower())
        return out

    def ledger_consistency(self, first: int, second: int) -> list[bytes]:
        body = self.get_json("/v1/ledger/proof/consistency", first=first, second=second)
        return [bytes.fromhex(p) for p in body["proof"]]

    def ledger_inclusion(self, tree_size: int, *, index: int | None = None, leaf_hash: str | None = None
                         ) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json("/v1/ledger/proof/inclusion", tree_size=tree_size, index=index,
                                            hash=leaf_hash)
        return out

    def ledger_receipt(self, index: int) -> Receipt:
        return Receipt.model_validate(self.get_json(f"/v1/ledger/receipt/{index}"))

    def ledger_append(self, entry_type: str, tenant: str, data: bytes) -> Receipt:
        body = {"type": entry_type, "tenant": tenant, "object": base64.b64encode(data).decode()}
        return Receipt.model_validate(self.request("POST", "/v1/ledger/entries", json=body).json())

    # --- signing and jobs -----------------------------------------------------------------------

    def sign(self, key: str, message: bytes) -> SignatureBundle:
        """Sign through the KMS API (``POST /v1/keys/{key}/sign``); needs a signer token."""
        body = {"message": base64.b64encode(message).decode()}
        return SignatureBundle.model_validate(self.request("POST", f"/v1/keys/{key}/sign", json=body).json())

    def key(self, name: str) -> KeyDocument:
        return KeyDocument.model_validate(self.get_json(f"/v1/keys/{name}"))

    def sign_manifest(self, manifest: RunManifest, key: str) -> Envelope:
        return sign_manifest(manifest, lambda message: self.sign(key, message))

    def verify_manifest(self, envelope: Envelope | bytes) -> VerifiedManifest:
        """Verify with the public key fetched from the server (for offline use, see sdk.manifest)."""
        env = parse_envelope(envelope) if isinstance(envelope, bytes) else envelope
        return verify_manifest(env, self.key(parse_keyid(env.signatures[0].keyid)[0]))

    def submit_job(self, envelope: Envelope | bytes) -> dict[str, Any]:
        data = envelope.to_bytes() if isinstance(envelope, Envelope) else envelope
        out: dict[str, Any] = self.request("POST", "/v1/jobs", content=data,
                                           headers={"Content-Type": "application/json"}).json()
        return out

    def create_job(self, manifest: RunManifest, key: str) -> dict[str, Any]:
        """Sign ``manifest`` with ``key`` through the KMS and submit it; returns the job and its receipt."""
        return self.submit_job(self.sign_manifest(manifest, key))

    def sign_many(self, key: str, messages: Sequence[bytes]) -> list[SignatureBundle]:
        """Sign many messages with ``key`` (``POST /v1/keys/{key}/sign-batch``, in chunks)."""
        out: list[SignatureBundle] = []
        for chunk in chunks(messages, sign_item_size):
            body = {"items": [{"message": base64.b64encode(m).decode()} for m in chunk]}
            out.extend(SignatureBundle.model_validate(b)
                       for b in self.request("POST", f"/v1/keys/{key}/sign-batch", json=body).json())
        return out

    def sign_manifests(self, manifests: Sequence[RunManifest], key: str) -> list[Envelope]:
        payloads = [m.to_bytes() for m in manifests]
        bundles = self.sign_many(key, [pae(PAYLOAD_TYPE, p) for p in payloads])
        return [envelope_from_bundle(PAYLOAD_TYPE, p, b) for p, b in zip(payloads, bundles, strict=True)]

    def submit_jobs(self, envelopes: Sequence[Envelope | bytes]) -> list[dict[str, Any]]:
        """Submit many signed manifests (``POST /v1/jobs/batch``, in chunks under the request limit).

        One result per envelope, in order. Each stands alone: a rejected one is ``{"status": 4xx,
        "error": {...}}`` and the others are stored; check ``"error" in result``.
        """
        datas = [e.to_bytes() if isinstance(e, Envelope) else e for e in envelopes]
        out: list[dict[str, Any]] = []
        for chunk in chunks(datas, len):
            body = b'{"envelopes":[' + b",".join(chunk) + b"]}"
            resp = self.request("POST", "/v1/jobs/batch", content=body, headers={"Content-Type": "application/json"})
            out.extend(resp.json()["results"])
        return out

    def create_jobs(self, manifests: Sequence[RunManifest], key: str) -> list[dict[str, Any]]:
        """Sign every manifest with ``key`` and submit them, in batches; one result per manifest."""
        return self.submit_jobs(self.sign_manifests(manifests, key))

    def get_job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json(f"/v1/jobs/{job_id}")
        return out

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/cancel").json()
        return out

    def wait_job(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the job is completed, failed or cancelled; ``client.timeout`` (504) after ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise QaiError("client.timeout", f"job {job_id} is still {job['status']} after {timeout:g} s",
                               status=504, details={"job_id": job_id, "status": job["status"]})
            time.sleep(poll)

    def schedule(self, job_id: str) -> dict[str, Any]:
        """``POST /v1/schedule``: the signed decision (a job already scheduled gets its decision back)."""
        out: dict[str, Any] = self.request("POST", "/v1/schedule", json={"job_id": job_id}).json()
        return out

    def decision(self, decision_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json(f"/v1/decisions/{decision_id}")
        return out

    def replay_decision(self, decision_id: str, *, deep: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = self.request("POST", f"/v1/decisions/{decision_id}/replay",
                                           params={"deep": str(deep).lower()}).json()
        return out

    def list_jobs(self, *, tenant: str | None = None, status: str | None = None, limit: int = 100,
                  cursor: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json("/v1/jobs", tenant=tenant, status=status, limit=limit, cursor=cursor)
        return out


class AsyncClient:
    """The job-submission half of :class:`Client` for asyncio code."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return _checked(await self.http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc

    async def sign(self, key: str, message: bytes) -> SignatureBundle:
        body = {"message": base64.b64encode(message).decode()}
        return SignatureBundle.model_validate((await self.request("POST", f"/v1/keys/{key}/sign", json=body)).json())

    async def create_job(self, manifest: RunManifest, key: str) -> dict[str, Any]:
        payload = manifest.to_bytes()
        bundle = await self.sign(key, pae(PAYLOAD_TYPE, payload))
        envelope = envelope_from_bundle(PAYLOAD_TYPE, payload, bundle)
        out: dict[str, Any] = (await self.request("POST", "/v1/jobs", content=envelope.to_bytes())).json()
        return out

    async def get_job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = (await self.request("GET", f"/v1/jobs/{job_id}")).json()
        return out
