"""TLS 1.3 key-exchange groups: which are post-quantum, and the lists each mode and client offers.

Names are those of the IANA TLS Supported Groups registry as OpenSSL spells them. OpenSSL reports a
classical group in lower case (``x25519``, ``secp256r1``) and a hybrid one in mixed case
(``X25519MLKEM768``), so every comparison here ignores case.

The group lists use OpenSSL 3.5+ syntax: ``/`` separates preference *tuples*. A server picks from
the first tuple that shares a group with the client, even when that costs a HelloRetryRequest, so
a client that supports ML-KEM but sent only an X25519 key share still ends up on the hybrid group.
"""

from __future__ import annotations

from typing import Literal

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from sdk.errors import QaiError

Mode = Literal["dual", "pqc-required", "classical-only"]
Prefer = Literal["pqc", "classical"]
Classification = Literal["hybrid", "pqc", "classical", "none"]

MODES: tuple[Mode, ...] = ("dual", "pqc-required", "classical-only")

# ML-KEM combined with a classical ECDH share (draft-ietf-tls-ecdhe-mlkem): secure while either holds.
HYBRID_GROUPS: tuple[str, ...] = ("X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024")
# Pure ML-KEM (draft-ietf-tls-mlkem). MLKEM512 is registered but OpenSSL does not enable it by default.
PQC_GROUPS: tuple[str, ...] = ("MLKEM512", "MLKEM768", "MLKEM1024")
CLASSICAL_GROUPS: tuple[str, ...] = ("X25519", "P-256", "P-384")

_HYBRID = frozenset(g.casefold() for g in HYBRID_GROUPS)
_PQC = frozenset(g.casefold() for g in PQC_GROUPS)

# dual and pqc-required offer the same groups: pqc-required must complete a classical handshake in
# order to refuse it with a readable message rather than a bare handshake_failure alert.
_PQC_FIRST = ":".join((*HYBRID_GROUPS, "MLKEM768", "MLKEM1024")) + "/" + ":".join(CLASSICAL_GROUPS)
SERVER_GROUPS: dict[Mode, str] = {
    "dual": _PQC_FIRST,
    "pqc-required": _PQC_FIRST,
    "classical-only": ":".join(CLASSICAL_GROUPS),
}
# "*" marks the groups a client sends key shares for up front: one hybrid and one classical share
# (as OpenSSL's own default does), so a classical-only server answers without a HelloRetryRequest.
CLIENT_GROUPS: dict[Prefer, str] = {
    "pqc": "*" + ":".join(HYBRID_GROUPS) + ":*" + ":".join(CLASSICAL_GROUPS),
    "classical": ":".join(CLASSICAL_GROUPS),
}
# A client pinned to hybrid groups: against a classical-only server the handshake fails instead of
# silently downgrading (what a production client should do once every server speaks ML-KEM).
CLIENT_PQC_ONLY = ":".join(HYBRID_GROUPS)


def classify(group: str | None) -> Classification:
    """``hybrid``, ``pqc`` (pure ML-KEM) or ``classical``; ``none`` when no handshake completed."""
    if group is None:
        return "none"
    g = group.casefold()
    if g in _HYBRID:
        return "hybrid"
    if g in _PQC:
        return "pqc"
    # a hybrid registered after this list was written still carries its ML-KEM part in the name
    if "mlkem" in g:
        return "pqc" if g.startswith("mlkem") else "hybrid"
    return "classical"


def is_post_quantum(group: str | None) -> bool:
    return classify(group) in ("hybrid", "pqc")


def set_groups(ctx: SSL.Context, groups: str) -> None:
    """Restrict ``ctx`` to ``groups``. pyOpenSSL has no ``Context.set_groups``; cryptography's
    bindings expose ``SSL_CTX_set1_curves_list``, which is OpenSSL's old name for (and the same
    control as) ``SSL_CTX_set1_groups_list``, tuple syntax included."""
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        raise QaiError("tls.bad_groups", f"OpenSSL refused the group list {groups!r}", status=500,
                       details={"groups": groups})


def openssl_version() -> str:
    """The OpenSSL that pyOpenSSL drives: cryptography's bundled build, not the system library."""
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
