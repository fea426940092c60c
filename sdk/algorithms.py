"""The registry of algorithm names used everywhere in qai.

Names follow the NIST standards: ML-DSA (FIPS 204), SLH-DSA (FIPS 205), ML-KEM (FIPS 203), plus
the classical algorithms the HSM holds natively (ECDSA P-256, Ed25519). Every other module takes
names from here: a name that is not in :data:`ALGORITHMS` is rejected with
``crypto.unknown_algorithm`` before any provider sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdk.errors import QaiError

Kind = Literal["signature", "kem"]


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of the registry.

    ``oid`` is the algorithm identifier of its SubjectPublicKeyInfo (for ECDSA P-256 that is
    id-ecPublicKey; the curve travels as the parameter ``curve_oid``). ``public_key_size`` is the
    length of the raw public key of :mod:`sdk.crypto`; ``signature_size`` is fixed for every
    signature algorithm except ECDSA (DER, variable); ``ciphertext_size`` is set for KEMs.
    """

    name: str
    kind: Kind
    pqc: bool
    hsm_native: bool  # generated and used inside the PKCS#11 token by the KMS
    oid: str
    public_key_size: int | None
    standard: str
    signature_size: int | None = None
    ciphertext_size: int | None = None
    curve_oid: str | None = None


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ML-DSA-44", "signature", True, False, "2.16.840.1.101.3.4.3.17", 1312, "FIPS 204",
                  signature_size=2420),
        Algorithm("ML-DSA-65", "signature", True, False, "2.16.840.1.101.3.4.3.18", 1952, "FIPS 204",
                  signature_size=3309),
        Algorithm("ML-DSA-87", "signature", True, False, "2.16.840.1.101.3.4.3.19", 2592, "FIPS 204",
                  signature_size=4627),
        Algorithm("SLH-DSA-SHA2-128s", "signature", True, False, "2.16.840.1.101.3.4.3.20", 32, "FIPS 205",
                  signature_size=7856),
        Algorithm("SLH-DSA-SHA2-128f", "signature", True, False, "2.16.840.1.101.3.4.3.21", 32, "FIPS 205",
                  signature_size=17088),
        Algorithm("ML-KEM-768", "kem", True, False, "2.16.840.1.101.3.4.4.2", 1184, "FIPS 203",
                  ciphertext_size=1088),
        Algorithm("ML-KEM-1024", "kem", True, False, "2.16.840.1.101.3.4.4.3", 1568, "FIPS 203",
                  ciphertext_size=1568),
        Algorithm("ECDSA-P256", "signature", False, True, "1.2.840.10045.2.1", 65, "FIPS 186-5",
                  curve_oid="1.2.840.10045.3.1.7"),
        Algorithm("Ed25519", "signature", False, True, "1.3.101.112", 32, "RFC 8032", signature_size=64),
    )
}


def get_algorithm(name: str) -> Algorithm:
    """The registry entry for ``name``; ``crypto.unknown_algorithm`` (400) if there is none."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise QaiError(
            "crypto.unknown_algorithm",
            f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}",
            status=400,
            details={"algorithm": str(name), "known": sorted(ALGORITHMS)},
        ) from None
