"""REST router of the KMS (``/v1/keys``, ``/v1/verify``). Thin: the logic is in :mod:`kms.service`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from orchestrator.http import PrincipalDep, ServicesDep, run_bulk
from sdk.crypto import public_key_pem
from sdk.errors import QaiError
from sdk.signing import KeyDocument, Prehash, SignatureBundle, b64decode, b64encode

router = APIRouter(prefix="/v1", tags=["kms"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateKeyRequest(_Strict):
    name: str
    tenant: str
    suite: str | None = Field(default=None, description="Default: ML-DSA-65+ECDSA-P256")
    purpose: Literal["signing", "kem"] = "signing"


class VersionRequest(_Strict):
    version: int = Field(ge=1)


class RevokeRequest(VersionRequest):
    reason: str = Field(min_length=1, max_length=256)
    effective_at: datetime | None = None


class SignInput(_Strict):
    message: str | None = Field(default=None, description="base64 message")
    digest: str | None = Field(default=None, description="base64 SHA-256 or SHA-512 digest")
    prehash: Prehash | None = Field(default=None, description="hash that made `digest`")

    @model_validator(mode="after")
    def _one_of(self) -> SignInput:
        if (self.message is None) == (self.digest is None):
            raise ValueError("give exactly one of message or digest")
        if self.digest is not None and self.prehash is None:
            raise ValueError("a digest needs prehash: sha256 or sha512")
        if self.message is not None and self.prehash is not None:
            raise ValueError("prehash goes with digest only")
        return self

    def data(self) -> bytes:
        if self.message is not None:
            return b64decode(self.message, what="message")
        return b64decode(self.digest or "", what="digest")


class SignBatchRequest(_Strict):
    items: list[SignInput] = Field(min_length=1, max_length=1000)


class VerifyRequest(_Strict):
    bundle: SignatureBundle
    message: str | None = Field(default=None, description="base64 message")
    digest: str | None = Field(default=None, description="base64 digest (bundle.prehash)")
    at: datetime | None = Field(default=None, description="trusted signing time; default signed_at")


class VerifyResponse(BaseModel):
    valid: bool
    key: str
    version: int


class EncapsulateResponse(BaseModel):
    version: int
    ciphertext: str
    shared_secret: str


class DecapsulateRequest(VersionRequest):
    ciphertext: str


class DecapsulateResponse(BaseModel):
    shared_secret: str


@router.post("/keys", response_model=KeyDocument, status_code=201)
def create_key(body: CreateKeyRequest, svc: ServicesDep, who: PrincipalDep) -> KeyDocument:
    return svc.kms.create_key(body.name, tenant=body.tenant, suite=body.suite, purpose=body.purpose,
                              principal=who)


@router.get("/keys", response_model=list[KeyDocument])
def list_keys(svc: ServicesDep, who: PrincipalDep, tenant: str | None = None) -> list[KeyDocument]:
    return svc.kms.list_keys(principal=who, tenant=tenant)


@router.get("/keys/{name}", response_model=KeyDocument)
def get_key(name: str, svc: ServicesDep, who: PrincipalDep) -> KeyDocument:
    return svc.kms.public_key(name)


@router.get("/keys/{name}/public.pem", response_class=PlainTextResponse)
def get_key_pem(name: str, svc: ServicesDep, who: PrincipalDep, version: int | None = None,
                alg: str | None = Query(default=None)) -> str:
    doc = svc.kms.public_key(name)
    versions = [v for v in doc.versions if version is None or v.version == version]
    if not versions:
        raise QaiError("kms.version_not_found", f"{name} has no version {version}", status=404)
    v = versions[-1]
    algs = [a for a in v.public_keys if alg is None or a == alg]
    if not algs:
        raise QaiError("kms.alg_not_found", f"{name}@{v.version} has no {alg} component", status=404)
    return "".join(public_key_pem(a, b64decode(v.public_keys[a], what="public key")) for a in algs)


@router.post("/keys/{name}/rotate", response_model=KeyDocument)
def rotate_key(name: str, svc: ServicesDep, who: PrincipalDep) -> KeyDocument:
    return svc.kms.rotate(name, principal=who)


@router.post("/keys/{name}/disable", response_model=KeyDocument)
def disable_key(name: str, body: VersionRequest, svc: ServicesDep, who: PrincipalDep) -> KeyDocument:
    return svc.kms.disable(name, body.version, principal=who)


@router.post("/keys/{name}/revoke", response_model=KeyDocument)
def revoke_key(name: str, body: RevokeRequest, svc: ServicesDep, who: PrincipalDep) -> KeyDocument:
    return svc.kms.revoke(name, body.version, principal=who, reason=body.reason,
                          effective_at=body.effective_at)


@router.post("/keys/{name}/sign", response_model=SignatureBundle)
async def sign(name: str, body: SignInput, svc: ServicesDep, who: PrincipalDep) -> Response:
    def signed() -> Response:  # one thread hop: FastAPI would validate a returned model on another
        data = body.data()
        if body.prehash is None:
            bundle = svc.kms.sign(name, principal=who, message=data)
        else:
            bundle = svc.kms.sign(name, principal=who, digest=data, prehash=body.prehash)
        return Response(bundle.model_dump_json(), media_type="application/json")

    return await run_in_threadpool(signed)


@router.post("/keys/{name}/sign-batch", response_model=list[SignatureBundle])
async def sign_batch(name: str, body: SignBatchRequest, request: Request, svc: ServicesDep,
                     who: PrincipalDep) -> Response:
    prehashes = {item.prehash for item in body.items}
    if len(prehashes) != 1:
        raise QaiError("kms.mixed_batch", "a batch signs messages or digests of one kind", status=422)

    # Signing is the CPU-bound part and takes the bulk lane; the wait for the audit records does
    # not hold it, so the next batch signs meanwhile. No signature is returned before its record.
    prehash = prehashes.pop()

    def sign() -> tuple[list[SignatureBundle], Callable[[], None]]:
        return svc.kms.start_sign_many(name, principal=who, items=[i.data() for i in body.items], prehash=prehash)

    bundles, durable = await run_bulk(request, "sign-batch", sign)

    def respond() -> Response:  # the response is built on a worker thread too, not on the event loop
        durable()
        return JSONResponse([b.model_dump(mode="json") for b in bundles])

    return await run_in_threadpool(respond)


@router.post("/verify", response_model=VerifyResponse)
def verify(body: VerifyRequest, svc: ServicesDep, who: PrincipalDep) -> VerifyResponse:
    if (body.message is None) == (body.digest is None):
        raise QaiError("request.invalid", "give exactly one of message or digest", status=422)
    if body.digest is not None and body.bundle.prehash is None:
        raise QaiError("request.invalid", "a digest needs a bundle made with prehash", status=422)
    data = b64decode(body.message if body.message is not None else body.digest or "", what="message")
    version = svc.kms.verify(body.bundle, data, principal=who, at=body.at)
    return VerifyResponse(valid=True, key=body.bundle.parts[0].key_name, version=version.version)


@router.post("/keys/{name}/encapsulate", response_model=EncapsulateResponse)
def encapsulate(name: str, svc: ServicesDep, who: PrincipalDep) -> EncapsulateResponse:
    version, ct, ss = svc.kms.encapsulate(name)
    return EncapsulateResponse(version=version, ciphertext=b64encode(ct), shared_secret=b64encode(ss))


@router.post("/keys/{name}/decapsulate", response_model=DecapsulateResponse)
def decapsulate(name: str, body: DecapsulateRequest, svc: ServicesDep, who: PrincipalDep) -> DecapsulateResponse:
    ss = svc.kms.decapsulate(name, body.version, b64decode(body.ciphertext, what="ciphertext"),
                             principal=who)
    return DecapsulateResponse(shared_secret=b64encode(ss))
