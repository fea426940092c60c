"""Signature bundles and public key documents: what the KMS emits and what auditors verify.

A **suite** is the set of algorithms that sign together, written ``ALG+ALG`` (for example
``ML-DSA-65+ECDSA-P256``). A **signature bundle** holds one part per algorithm of the suite, all
from the same key version. Verification requires every part: a hybrid signature is only as strong
as both halves together, and dropping one is a downgrade.

A key version is valid for signatures made at ``t`` when ``created_at <= t`` and it was not
revoked at or before ``t``. The time a bundle states (``signed_at``) is the KMS's claim; where a
trusted time exists (the ledger's inclusion time, a manifest's ``created_at``), callers pass it as
``at``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sdk.algorithms import get_algorithm
from sdk.crypto import verify_signature
from sdk.errors import QaiError, VerificationError

Prehash = Literal["sha256", "sha512"]


def parse_suite(suite: str) -> tuple[str, ...]:
    """``"ML-DSA-65+ECDSA-P256"`` → ``("ML-DSA-65", "ECDSA-P256")``, each name checked."""
    algs = tuple(a.strip() for a in suite.split("+"))
    if not algs or any(not a for a in algs):
        raise QaiError("kms.bad_suite", f"malformed suite {suite!r}")
    if len(set(algs)) != len(algs):
        raise QaiError("kms.bad_suite", f"suite {suite!r} repeats an algorithm")
    for alg in algs:
        get_algorithm(alg)
    return algs


def keyid(key_name: str, version: int, alg: str) -> str:
    """The identifier of one signing key component, as used in DSSE ``keyid``."""
    return f"{key_name}@{version}/{alg}"


def parse_keyid(value: str) -> tuple[str, int, str]:
    try:
        name_version, alg = value.rsplit("/", 1)
        name, version = name_version.rsplit("@", 1)
        return name, int(version), alg
    except ValueError as exc:
        raise QaiError("signature.bad_keyid", f"malformed keyid {value!r}") from exc


def b64decode(value: str, *, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise QaiError("encoding.bad_base64", f"{what} is not valid base64") from exc


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class SignaturePart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_name: str
    version: int = Field(ge=1)
    alg: str
    signature: str = Field(description="base64")

    @property
    def keyid(self) -> str:
        return keyid(self.key_name, self.version, self.alg)


class SignatureBundle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str
    parts: list[SignaturePart]
    prehash: Prehash | None = None
    signed_at: datetime


class KeyVersionDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    state: Literal["enabled", "disabled", "revoked"]
    created_at: datetime
    disabled_at: datetime | None = None
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    public_keys: dict[str, str] = Field(description="algorithm → base64 raw public key")


class KeyDocument(BaseModel):
    """Public material of a key and all its versions. Contains no private data."""

    model_config = ConfigDict(extra="forbid")

    name: str
    tenant: str
    purpose: Literal["signing", "kem"]
    suite: str
    created_at: datetime
    versions: list[KeyVersionDocument]

    def version(self, number: int) -> KeyVersionDocument:
        for v in self.versions:
            if v.version == number:
                return v
        raise VerificationError("signature.unknown_version",
                                f"key {self.name} has no version {number}",
                                details={"key": self.name, "version": number})


def check_validity(key: KeyDocument, version: KeyVersionDocument, at: datetime) -> None:
    """Raise unless ``version`` of ``key`` could sign at time ``at``."""
    if at < version.created_at:
        raise VerificationError(
            "signature.not_yet_valid",
            f"{key.name}@{version.version} did not exist at {at.isoformat()}",
            details={"key": key.name, "version": version.version},
        )
    if version.revoked_at is not None and at >= version.revoked_at:
        raise VerificationError(
            "signature.key_revoked",
            f"signature dated {at.isoformat()} is after {key.name}@{version.version} was revoked "
            f"at {version.revoked_at.isoformat()} ({version.revocation_reason or 'no reason given'})",
            details={"key": key.name, "version": version.version,
                     "revoked_at": version.revoked_at.isoformat(),
                     "reason": version.revocation_reason},
        )


def verify_bundle(
    bundle: SignatureBundle,
    message: bytes,
    keys: KeyDocument | Mapping[str, KeyDocument],
    *,
    at: datetime | None = None,
) -> KeyVersionDocument:
    """Verify every part of ``bundle`` over ``message``; return the key version that signed.

    Raises :class:`VerificationError` naming the first failing check.
    """
    if not bundle.parts:
        raise VerificationError("signature.missing_part", "bundle has no signatures")
    names = {p.key_name for p in bundle.parts}
    versions = {p.version for p in bundle.parts}
    if len(names) != 1 or len(versions) != 1:
        raise VerificationError("signature.mixed_keys",
                                "all parts of a bundle must come from one key version",
                                details={"keyids": [p.keyid for p in bundle.parts]})
    name = names.pop()
    key = keys if isinstance(keys, KeyDocument) else keys.get(name)
    if key is None or key.name != name:
        raise VerificationError("signature.unknown_key", f"no trusted key named {name!r}",
                                details={"key": name})
    if bundle.suite != key.suite:
        raise VerificationError("signature.suite_mismatch",
                                f"bundle suite {bundle.suite} is not the key's suite {key.suite}",
                                details={"bundle": bundle.suite, "key": key.suite})
    required = parse_suite(key.suite)
    present = [p.alg for p in bundle.parts]
    missing = [a for a in required if a not in present]
    extra = [a for a in present if a not in required]
    if missing or extra or len(present) != len(set(present)):
        raise VerificationError("signature.missing_part",
                                "bundle must carry exactly one signature per suite algorithm",
                                details={"missing": missing, "unexpected": extra})
    version = key.version(versions.pop())
    check_validity(key, version, at or bundle.signed_at)
    for part in bundle.parts:
        public = version.public_keys.get(part.alg)
        if public is None:
            raise VerificationError("signature.unknown_key", f"no public key for {part.keyid}")
        ok = verify_signature(
            part.alg,
            b64decode(public, what="public key"),
            message,
            b64decode(part.signature, what="signature"),
            prehash=bundle.prehash,
        )
        if not ok:
            raise VerificationError("signature.invalid", f"signature {part.keyid} does not verify",
                                    details={"keyid": part.keyid})
    return version
