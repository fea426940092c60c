"""Signature verification with public keys only: what an auditor needs, and nothing more.

Wire formats used throughout qai:

* public keys are raw: the FIPS 204 / 205 / 203 encodings for ML-DSA, SLH-DSA and ML-KEM, the
  uncompressed SEC1 point (65 bytes) for ECDSA P-256 and the 32-byte RFC 8032 key for Ed25519;
* ECDSA signatures are DER over SHA-256 of the message; Ed25519 signatures are RFC 8032;
  ML-DSA and SLH-DSA signatures are the FIPS encodings, pure mode with an empty context;
* ``prehash`` ("sha256" or "sha512") means the signer was given only a digest. ML-DSA then uses
  HashML-DSA (FIPS 204 §5.4, empty context) and ECDSA signs the digest directly. SLH-DSA and
  Ed25519 sign whole messages only: no library here signs HashSLH-DSA from a bare digest
  (pqcrypto's SLH-DSA hash mode hashes the message itself), and pure EdDSA has no digest form.
"""

from __future__ import annotations

import base64
import hashlib
import textwrap
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, utils

from sdk.algorithms import get_algorithm
from sdk.errors import QaiError

Prehash = str  # "sha256" | "sha512"

# DER-encoded OIDs of the pre-hash functions (FIPS 204 §5.4, Algorithm 4 line 23).
HASH_OIDS = {
    "sha256": bytes.fromhex("0609608648016503040201"),
    "sha512": bytes.fromhex("0609608648016503040203"),
}
DIGEST_SIZES = {"sha256": 32, "sha512": 64}

_MLDSA_PUBLIC: dict[str, type[mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey]] = {
    "ML-DSA-44": mldsa.MLDSA44PublicKey,
    "ML-DSA-65": mldsa.MLDSA65PublicKey,
    "ML-DSA-87": mldsa.MLDSA87PublicKey,
}


def check_prehash(alg: str, prehash: Prehash | None, digest_len: int) -> None:
    if prehash is None:
        return
    if prehash not in HASH_OIDS:
        raise QaiError("crypto.bad_prehash", "prehash is sha256 or sha512", status=422)
    if alg.startswith(("SLH-DSA", "Ed25519")):
        raise QaiError("crypto.prehash_unsupported", f"{alg} signs whole messages only", status=422,
                       details={"algorithm": alg})
    if digest_len != DIGEST_SIZES[prehash]:
        raise QaiError("crypto.bad_prehash", f"a {prehash} digest is {DIGEST_SIZES[prehash]} bytes",
                       status=422)


def hash_mldsa_mu(public_key: bytes, digest: bytes, prehash: Prehash) -> bytes:
    """μ for HashML-DSA with an empty context (FIPS 204 Algorithms 4 and 7).

    tr = H(pk, 64); M' = 0x01 ‖ 0x00 ‖ OID(PH) ‖ PH(M); μ = H(tr ‖ M', 64), H = SHAKE256.
    """
    tr = hashlib.shake_256(public_key).digest(64)
    m_prime = b"\x01\x00" + HASH_OIDS[prehash] + digest
    return hashlib.shake_256(tr + m_prime).digest(64)


def _verify_mldsa(alg: str, pk: bytes, msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
    key = _MLDSA_PUBLIC[alg].from_public_bytes(pk)
    if prehash is None:
        key.verify(sig, msg)
    else:
        key.verify_mu(sig, hash_mldsa_mu(pk, msg, prehash))


def pqclean_hash(prehash: Prehash | None) -> Any:
    """pqcrypto's pre-hash selector. For ML-DSA, pqcrypto then takes the *digest* as the message."""
    if prehash is None:
        return None
    import pqcrypto

    return pqcrypto.HashAlgorithm.Sha256 if prehash == "sha256" else pqcrypto.HashAlgorithm.Sha512


def _verify_slhdsa(alg: str, pk: bytes, msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
    from pqcrypto.sign import slh_dsa_sha2_128f, slh_dsa_sha2_128s

    module = slh_dsa_sha2_128s if alg == "SLH-DSA-SHA2-128s" else slh_dsa_sha2_128f
    module.verify(pk, msg, sig)  # raises on a bad signature; prehash was refused above


def _verify_ecdsa(alg: str, pk: bytes, msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pk)
    if prehash is None:
        key.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
    else:
        h = hashes.SHA256() if prehash == "sha256" else hashes.SHA512()
        key.verify(sig, msg, ec.ECDSA(utils.Prehashed(h)))


def _verify_ed25519(alg: str, pk: bytes, msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
    ed25519.Ed25519PublicKey.from_public_bytes(pk).verify(sig, msg)


_VERIFIERS: dict[str, Callable[[str, bytes, bytes, bytes, Prehash | None], None]] = {
    "ML-DSA-44": _verify_mldsa,
    "ML-DSA-65": _verify_mldsa,
    "ML-DSA-87": _verify_mldsa,
    "SLH-DSA-SHA2-128s": _verify_slhdsa,
    "SLH-DSA-SHA2-128f": _verify_slhdsa,
    "ECDSA-P256": _verify_ecdsa,
    "Ed25519": _verify_ed25519,
}


def verify_signature(
    alg: str, public_key: bytes, message: bytes, signature: bytes, *, prehash: Prehash | None = None
) -> bool:
    """True if ``signature`` is valid; False if not. Unknown algorithms and bad keys raise."""
    info = get_algorithm(alg)
    if info.kind != "signature":
        raise QaiError("crypto.not_a_signature", f"{alg} is a KEM, not a signature algorithm")
    check_prehash(alg, prehash, len(message))
    if len(public_key) != info.public_key_size:
        raise QaiError("crypto.bad_key", f"{alg} public keys are {info.public_key_size} bytes",
                       details={"length": len(public_key)})
    try:
        _VERIFIERS[alg](alg, public_key, message, signature, prehash)
    except (InvalidSignature, ValueError):
        return False
    except Exception as exc:  # pqcrypto raises its own error type on a bad signature
        if type(exc).__name__ in ("InvalidSignatureError", "InvalidSignature"):
            return False
        raise
    return True


# -- PEM (SubjectPublicKeyInfo) ---------------------------------------------------------------


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body.extend(reversed(chunk))
    return b"\x06" + _der_len(len(body)) + bytes(body)


def _spki(oid: str, raw: bytes) -> bytes:
    """SubjectPublicKeyInfo with an absent-parameters AlgorithmIdentifier (RFC 5280 §4.1)."""
    alg_id = _der_oid(oid)
    alg_seq = b"\x30" + _der_len(len(alg_id)) + alg_id
    bitstring = b"\x03" + _der_len(len(raw) + 1) + b"\x00" + raw
    body = alg_seq + bitstring
    return b"\x30" + _der_len(len(body)) + body


def public_key_pem(alg: str, raw: bytes) -> str:
    info = get_algorithm(alg)
    if alg == "ECDSA-P256":
        der = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        der = _spki(info.oid, raw)
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


def public_key_from_pem(alg: str, pem: str) -> bytes:
    """The raw public key inside a PEM made by :func:`public_key_pem`."""
    info = get_algorithm(alg)
    lines = [ln for ln in pem.strip().splitlines() if not ln.startswith("-----")]
    der = base64.b64decode("".join(lines))
    if alg == "ECDSA-P256":
        key = serialization.load_der_public_key(der)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    prefix = _spki(info.oid, b"\x00" * info.public_key_size)[: -info.public_key_size]
    if not der.startswith(prefix) or len(der) != len(prefix) + info.public_key_size:
        raise QaiError("crypto.bad_key", f"PEM is not a {alg} public key")
    return der[len(prefix):]
