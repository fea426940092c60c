"""The signed hello: the server's signed statement of what one TLS connection negotiated.

After the handshake the client sends a nonce line; the server answers with one line, a DSSE
envelope (RFC 8785 canonical JSON) over a ``qai.tls.hello.v1`` document naming the group, cipher,
protocol, the server's mode, the classification of the group, the client's nonce and the SHA-256
of the server certificate, signed through the KMS with the hybrid suite ``ML-DSA-65+ECDSA-P256``.

The client verifies it with public keys only and checks every claim against what its own TLS stack
observed: a server cannot claim a hybrid group it did not negotiate, and the nonce keeps an old
hello from being replayed on a new connection. The hello also carries the connection's RFC 9266
``tls-exporter`` channel binding, so a hello relayed from another TLS session (a middlebox that
terminates TLS with a certificate the client trusts and forwards the hello) does not verify either.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL

from kms.tls.groups import classify
from sdk.canonical import canonical_json
from sdk.dsse import envelope_bytes, envelope_from_bundle, pae, parse_envelope, verify_envelope
from sdk.errors import QaiError, VerificationError
from sdk.signing import KeyDocument

if TYPE_CHECKING:
    from kms.remote import KeyService
    from orchestrator.db import Database

HELLO_KEY = "qai.tls-hello"
HELLO_SUITE = "ML-DSA-65+ECDSA-P256"
HELLO_PAYLOAD_TYPE = "application/vnd.qai.tls-hello.v1+json"
HELLO_TYPE = "qai.tls.hello.v1"
# URL-safe base64 or hex, 16 to 128 characters: at least 96 bits when random, and one short line
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_FIELDS = ("type", "handshake_id", "mode", "group", "classification", "cipher", "protocol", "server_time",
           "nonce", "server_cert_sha256", "client_identity", "tls_exporter")
# RFC 9266: 32 bytes of the TLS 1.3 exporter under this label, empty context
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
EXPORTER_BYTES = 32


@dataclass(frozen=True)
class Observed:
    """What one end saw of a handshake through its own TLS stack."""

    group: str | None  # None: this stack cannot tell (Python 3.11's ssl has no group accessor)
    cipher: str | None
    protocol: str | None
    server_cert_sha256: str
    client_identity: str | None = None  # the subject of the client certificate, with mutual TLS
    tls_exporter: str | None = None  # hex; None: this stack cannot export (Python's ssl)


@dataclass(frozen=True)
class VerifiedHello:
    document: dict[str, Any]
    key: str  # name@version of the key that signed
    suite: str
    group_checked: bool  # False when the client could not observe the group itself
    channel_bound: bool  # the hello's tls-exporter value was compared with this connection's


def tls_exporter(conn: SSL.Connection) -> str:
    """The RFC 9266 ``tls-exporter`` channel binding of a pyOpenSSL connection, hex."""
    return conn.export_keying_material(EXPORTER_LABEL, EXPORTER_BYTES, b"").hex()


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def check_nonce(nonce: str) -> str:
    if not NONCE_RE.fullmatch(nonce):
        raise QaiError("tls.bad_nonce", "the nonce must be 16-128 characters of [A-Za-z0-9_-]", status=400)
    return nonce


def hello_document(*, handshake_id: str, mode: str, observed: Observed, nonce: str, now: datetime) -> dict[str, Any]:
    return {
        "type": HELLO_TYPE,
        "handshake_id": handshake_id,
        "mode": mode,
        "group": observed.group,
        "classification": classify(observed.group),
        "cipher": observed.cipher,
        "protocol": observed.protocol,
        "server_time": now.astimezone(UTC).isoformat(),
        "nonce": nonce,
        "server_cert_sha256": observed.server_cert_sha256,
        "client_identity": observed.client_identity,
        "tls_exporter": observed.tls_exporter,
    }


class HelloSigner:
    """Signs hellos with the system tenant's key ``key_name``, created on first use like the other
    platform statements (dataset manifests, scheduler decisions)."""

    def __init__(self, db: Database, kms: KeyService, *, key_name: str = HELLO_KEY, suite: str = HELLO_SUITE) -> None:
        from orchestrator.ledger import system_signing_key

        self.kms = kms
        self.key_name = system_signing_key(db, kms, key_name, suite=suite, subject="tls", error_code="tls.bad_key")

    def public_key(self) -> KeyDocument:
        return self.kms.public_key(self.key_name)

    def sign(self, document: dict[str, Any]) -> bytes:
        """The DSSE envelope, canonical JSON: one line, since canonical JSON escapes every newline."""
        from orchestrator.auth import Principal

        payload = canonical_json(document)
        bundle = self.kms.sign(self.key_name, principal=Principal.system("tls"),
                               message=pae(HELLO_PAYLOAD_TYPE, payload))
        return envelope_bytes(envelope_from_bundle(HELLO_PAYLOAD_TYPE, payload, bundle))


def _malformed(why: str) -> QaiError:
    return VerificationError("tls.hello_malformed", f"the server's hello is not a signed qai hello: {why}")


def _parse_document(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise _malformed("its payload is not JSON") from exc
    if not isinstance(doc, dict) or doc.get("type") != HELLO_TYPE:
        raise _malformed(f"its payload is not a {HELLO_TYPE} document")
    missing = [f for f in _FIELDS if f not in doc]
    if missing:
        raise _malformed(f"its payload lacks {', '.join(missing)}")
    return doc


def _mismatch(field: str, claimed: object, seen: object) -> QaiError:
    return VerificationError("tls.hello_mismatch",
                             f"the signed hello says {field} {claimed!r}, but this connection has {seen!r}",
                             details={"field": field, "hello": claimed, "observed": seen})


def check_claims(doc: Mapping[str, Any], *, nonce: str, observed: Observed) -> tuple[bool, bool]:
    """Every claim of a verified hello against the client's own view. Returns whether the group and
    the channel binding were compared (they are not when the client's stack cannot report them)."""
    if doc["nonce"] != nonce:
        raise _mismatch("nonce", doc["nonce"], nonce)
    if doc["classification"] != classify(doc["group"]):
        raise _mismatch("classification", doc["classification"], classify(doc["group"]))
    group_checked = observed.group is not None
    if group_checked and doc["group"] != observed.group:
        raise _mismatch("group", doc["group"], observed.group)
    for field, seen in (("cipher", observed.cipher), ("protocol", observed.protocol),
                        ("server_cert_sha256", observed.server_cert_sha256),
                        ("client_identity", observed.client_identity)):
        if doc[field] != seen:
            raise _mismatch(field, doc[field], seen)
    bound = observed.tls_exporter is not None
    if bound and doc["tls_exporter"] != observed.tls_exporter:
        raise _mismatch("tls_exporter", doc["tls_exporter"], observed.tls_exporter)
    return group_checked, bound


def verify_hello(data: bytes, keys: KeyDocument | Mapping[str, KeyDocument], *, nonce: str, observed: Observed,
                 at: datetime | None = None) -> VerifiedHello:
    """Verify the signature of a hello with public keys only, then its claims against ``observed``.

    Raises ``tls.hello_malformed``, ``tls.hello_bad_signature`` (``details.reason`` carries the
    ``signature.*`` code) or ``tls.hello_mismatch`` (``details.field``).
    """
    try:
        envelope = parse_envelope(data)
    except QaiError as exc:
        raise _malformed(exc.message) from exc
    if envelope.payload_type != HELLO_PAYLOAD_TYPE:
        raise _malformed(f"payload type {envelope.payload_type!r}")
    try:
        version = verify_envelope(envelope, keys, at=at or datetime.now(UTC))
        payload = envelope.payload_bytes()
    except QaiError as exc:
        raise VerificationError("tls.hello_bad_signature", f"the signed hello does not verify: {exc.message}",
                                details={"reason": exc.code, **exc.details}) from exc
    doc = _parse_document(payload)
    group_checked, bound = check_claims(doc, nonce=nonce, observed=observed)
    key_name = envelope.signatures[0].keyid.split("@", 1)[0]
    key = keys if isinstance(keys, KeyDocument) else keys[key_name]
    return VerifiedHello(document=doc, key=f"{key.name}@{version.version}", suite=key.suite,
                         group_checked=group_checked, channel_bound=bound)
