"""The registry of algorithm names used everywhere in qai.

Names follow the NIST standards: ML-DSA (FIPS 204), SLH-DSA (FIPS 205), ML-KEM (FIPS 203), plus
the classical algorithms the HSM holds natively (ECDSA P-256, Ed25519).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdk.errors import QaiError


@dataclass(frozen=True)
class Algorithm:
    name: str
    kind: Literal["signature", "kem"]
    pqc: bool
    hsm_native: bool  # generated and used inside the PKCS#11 token by the KMS
    oid: str
    public_key_size: int
    standard: str


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ML-DSA-44", "signature", True, False, "2.16.840.1.101.3.4.3.17", 1312, "FIPS 204"),
        Algorithm("ML-DSA-65", "signature", True, False, "2.16.840.1.101.3.4.3.18", 1952, "FIPS 204"),
        Algorithm("ML-DSA-87", "signature", True, False, "2.16.840.1.101.3.4.3.19", 2592, "FIPS 204"),
        Algorithm("SLH-DSA-SHA2-128s", "signature", True, False, "2.16.840.1.101.3.4.3.20", 32,
                  "FIPS 205"),
        Algorithm("SLH-DSA-SHA2-128f", "signature", True, False, "2.16.840.1.101.3.4.3.21", 32,
                  "FIPS 205"),
        Algorithm("ML-KEM-768", "kem", True, False, "2.16.840.1.101.3.4.4.2", 1184, "FIPS 203"),
        Algorithm("ML-KEM-1024", "kem", True, False, "2.16.840.1.101.3.4.4.3", 1568, "FIPS 203"),
        Algorithm("ECDSA-P256", "signature", False, True, "1.2.840.10045.2.1", 65, "FIPS 186-5"),
        Algorithm("Ed25519", "signature", False, True, "1.3.101.112", 32, "RFC 8032"),
    )
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise QaiError(
            "crypto.unknown_algorithm",
            f"unknown algorithm {name!r}",
            status=400,
            details={"algorithm": name, "known": sorted(ALGORITHMS)},
        ) from None
