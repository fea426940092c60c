"""DSSE envelopes (Dead Simple Signing Envelope, secure-systems-lab/dsse v1.0).

Signatures cover ``PAE(payloadType, payload)``, never the JSON around them, so the envelope can be
re-serialised freely without breaking a signature. A hybrid suite puts one DSSE signature per
algorithm, each with keyid ``name@version/alg``; :func:`verify_envelope` demands every part of the
key's suite, exactly like :func:`sdk.signing.verify_bundle` (it builds the bundle and calls it).

What is stored and ledgered is :func:`envelope_bytes`: the RFC 8785 canonical JSON of the
envelope, so its SHA-256 is one stable value for the same envelope.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdk.canonical import canonical_json
from sdk.errors import QaiError
from sdk.signing import (
    KeyDocument,
    KeyVersionDocument,
    SignatureBundle,
    SignaturePart,
    b64decode,
    b64encode,
    parse_keyid,
    verify_bundle,
)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


class EnvelopeSignature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keyid: str
    sig: str = Field(description="base64")


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    payload_type: str = Field(alias="payloadType", min_length=1)
    payload: str = Field(description="base64 of the payload bytes")
    signatures: list[EnvelopeSignature] = Field(min_length=1)

    def payload_bytes(self) -> bytes:
        return b64decode(self.payload, what="envelope payload")

    def signed_bytes(self) -> bytes:
        return pae(self.payload_type, self.payload_bytes())

    def to_bytes(self) -> bytes:
        return envelope_bytes(self)


def envelope_bytes(envelope: Envelope) -> bytes:
    return canonical_json(envelope.model_dump(by_alias=True))


def envelope_from_bundle(payload_type: str, payload: bytes, bundle: SignatureBundle) -> Envelope:
    """Wrap a KMS signature bundle made over ``pae(payload_type, payload)``."""
    if bundle.prehash is not None:
        raise QaiError("dsse.prehashed", "a DSSE signature covers the PAE bytes, not a digest")
    return Envelope.model_validate({
        "payloadType": payload_type,
        "payload": b64encode(payload),
        "signatures": [{"keyid": p.keyid, "sig": p.signature} for p in bundle.parts],
    })


def parse_envelope(data: bytes) -> Envelope:
    try:
        return Envelope.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        raise QaiError("dsse.malformed", f"not a DSSE envelope: {str(exc).splitlines()[0]}") from exc


def verify_envelope(
    envelope: Envelope,
    keys: KeyDocument | Mapping[str, KeyDocument],
    *,
    at: datetime,
) -> KeyVersionDocument:
    """Verify every signature of ``envelope`` as one suite of one key version, valid at ``at``.

    ``at`` is the trusted time of the envelope (its ledger entry's time, or the manifest's own).
    """
    parts = []
    for s in envelope.signatures:
        name, version, alg = parse_keyid(s.keyid)
        try:
            parts.append(SignaturePart(key_name=name, version=version, alg=alg, signature=s.sig))
        except ValidationError as exc:
            raise QaiError("signature.bad_keyid", f"malformed keyid {s.keyid!r}") from exc
    name = parts[0].key_name
    key = keys if isinstance(keys, KeyDocument) else keys.get(name)
    suite = key.suite if key is not None else "+".join(p.alg for p in parts)
    bundle = SignatureBundle(suite=suite, parts=parts, signed_at=at)
    return verify_bundle(bundle, envelope.signed_bytes(), keys, at=at)
