"""Signature verification with public keys only: what an auditor needs, and nothing more.

This module is the wire format of qai. It never imports server code (``kms``, ``orchestrator``…).

Public keys are raw bytes:

* ML-DSA-44/65/87: the FIPS 204 ``pkEncode`` public key (1312 / 1952 / 2592 bytes);
* SLH-DSA-SHA2-128s/128f: the FIPS 205 public key ``PK.seed ‖ PK.root`` (32 bytes);
* ML-KEM-768/1024: the FIPS 203 encapsulation key (1184 / 1568 bytes);
* ECDSA-P256: the uncompressed SEC1 point ``0x04 ‖ X ‖ Y`` (65 bytes);
* Ed25519: the RFC 8032 public key (32 bytes).

Signatures:

* ML-DSA and SLH-DSA: the FIPS 204 / 205 signature encodings, pure mode with an empty context;
* ECDSA-P256: DER ``ECDSA-Sig-Value`` (RFC 3279) over SHA-256 of the message;
* Ed25519: the 64-byte RFC 8032 signature (pure Ed25519, the whole message).

``prehash`` (``"sha256"`` or ``"sha512"``) means ``message`` is already the digest of that hash
(32 or 64 bytes; any other length is ``crypto.bad_prehash``):

* ML-DSA uses HashML-DSA (FIPS 204 §5.4, Algorithm 4/5) with an empty context:
  ``M' = 0x01 ‖ 0x00 ‖ DER(OID of the hash) ‖ digest``; see :func:`hash_mldsa_mu`;
* ECDSA verifies the digest directly (a SHA-512 digest is truncated to the curve size, as
  FIPS 186-5 says);
* SLH-DSA and Ed25519 refuse with ``crypto.prehash_unsupported``. Pure EdDSA has no digest form.
  HashSLH-DSA (FIPS 205 §10.2) exists, but the SLH-DSA library of the sdk (pqcrypto 1.0) computes
  ``PH(M)`` itself from the whole message, so no party holding only a digest can sign or verify
  it; qai therefore never produces HashSLH-DSA signatures.

Public keys are exchanged as SubjectPublicKeyInfo PEM (:func:`public_key_pem`), with the NIST
algorithm identifiers (absent parameters) for ML-DSA, SLH-DSA and ML-KEM, RFC 8410 for Ed25519
and id-ecPublicKey + prime256v1 for ECDSA P-256.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import textwrap
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem, utils

from sdk.algorithms import Algorithm, get_algorithm
from sdk.errors import QaiError

Prehash = str  # "sha256" | "sha512"

# DER-encoded OIDs of the pre-hash functions (FIPS 204 §5.4, Algorithm 4 line 23).
HASH_OIDS = {
    "sha256": bytes.fromhex("0609608648016503040201"),  # 2.16.840.1.101.3.4.2.1
    "sha512": bytes.fromhex("0609608648016503040203"),  # 2.16.840.1.101.3.4.2.3
}
DIGEST_SIZES = {"sha256": 32, "sha512": 64}
_NO_PREHASH = frozenset({"SLH-DSA-SHA2-128s", "SLH-DSA-SHA2-128f", "Ed25519"})

_MLDSA_PUBLIC: dict[str, type[mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey]] = {
    "ML-DSA-44": mldsa.MLDSA44PublicKey,
    "ML-DSA-65": mldsa.MLDSA65PublicKey,
    "ML-DSA-87": mldsa.MLDSA87PublicKey,
}
_MLKEM_PUBLIC: dict[str, type[mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey]] = {
    "ML-KEM-768": mlkem.MLKEM768PublicKey,
    "ML-KEM-1024": mlkem.MLKEM1024PublicKey,
}
_SLHDSA_MODULES = {"SLH-DSA-SHA2-128s": "slh_dsa_sha2_128s", "SLH-DSA-SHA2-128f": "slh_dsa_sha2_128f"}


def bad_key(alg: str, why: str) -> QaiError:
    return QaiError("crypto.bad_key", f"malformed {alg} public key: {why}", status=400,
                    details={"algorithm": alg})


def check_prehash(alg: str, prehash: Prehash | None, digest_len: int) -> None:
    """Refuse a ``prehash`` the algorithm cannot use, or a digest of the wrong length."""
    if prehash is None:
        return
    if prehash not in HASH_OIDS:
        raise QaiError("crypto.bad_prehash", f"prehash is sha256 or sha512, not {prehash!r}", status=422,
                       details={"prehash": str(prehash)})
    if alg in _NO_PREHASH:
        raise QaiError("crypto.prehash_unsupported", f"{alg} signs whole messages only, not digests",
                       status=422, details={"algorithm": alg})
    if digest_len != DIGEST_SIZES[prehash]:
        raise QaiError("crypto.bad_prehash", f"a {prehash} digest is {DIGEST_SIZES[prehash]} bytes",
                       status=422, details={"length": digest_len})


def hash_mldsa_mu(public_key: bytes, digest: bytes, prehash: Prehash) -> bytes:
    """μ for HashML-DSA with an empty context (FIPS 204 Algorithms 4, 5 and 7).

    tr = H(pk, 64); M' = 0x01 ‖ 0x00 ‖ OID(PH) ‖ PH(M); μ = H(tr ‖ M', 64), H = SHAKE256.
    """
    tr = hashlib.shake_256(public_key).digest(64)
    m_prime = b"\x01\x00" + HASH_OIDS[prehash] + digest
    return hashlib.shake_256(tr + m_prime).digest(64)


def pqclean_hash(prehash: Prehash | None) -> Any:
    """pqcrypto's pre-hash selector. For ML-DSA, pqcrypto then takes the *digest* as the message."""
    if prehash is None:
        return None
    import pqcrypto

    return pqcrypto.HashAlgorithm.Sha256 if prehash == "sha256" else pqcrypto.HashAlgorithm.Sha512


# -- verification -----------------------------------------------------------------------------
# Each verifier loads the key (a ValueError there is a malformed key) and returns a function that
# checks the signature (raising InvalidSignature / pqcrypto.InvalidSignatureError when it is bad).

_Check = Callable[[bytes, bytes, Prehash | None], None]


def _mldsa(alg: str, pk: bytes) -> _Check:
    key = _MLDSA_PUBLIC[alg].from_public_bytes(pk)

    def check(msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
        if prehash is None:
            key.verify(sig, msg)
        else:
            key.verify_mu(sig, hash_mldsa_mu(pk, msg, prehash))

    return check


def _slhdsa(alg: str, pk: bytes) -> _Check:
    import importlib

    module = importlib.import_module(f"pqcrypto.sign.{_SLHDSA_MODULES[alg]}")

    def check(msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
        module.verify(pk, msg, sig)  # raises InvalidSignatureError; prehash was refused before

    return check


def _ecdsa(alg: str, pk: bytes) -> _Check:
    if pk[:1] != b"\x04":
        raise ValueError("not an uncompressed SEC1 point")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pk)

    def check(msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
        if prehash is None:
            key.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        else:
            h = hashes.SHA256() if prehash == "sha256" else hashes.SHA512()
            key.verify(sig, msg, ec.ECDSA(utils.Prehashed(h)))

    return check


def _ed25519(alg: str, pk: bytes) -> _Check:
    key = ed25519.Ed25519PublicKey.from_public_bytes(pk)

    def check(msg: bytes, sig: bytes, prehash: Prehash | None) -> None:
        key.verify(sig, msg)

    return check


_VERIFIERS: dict[str, Callable[[str, bytes], _Check]] = {
    "ML-DSA-44": _mldsa,
    "ML-DSA-65": _mldsa,
    "ML-DSA-87": _mldsa,
    "SLH-DSA-SHA2-128s": _slhdsa,
    "SLH-DSA-SHA2-128f": _slhdsa,
    "ECDSA-P256": _ecdsa,
    "Ed25519": _ed25519,
}


def _check_size(info: Algorithm, raw: bytes) -> None:
    if info.public_key_size is not None and len(raw) != info.public_key_size:
        raise QaiError("crypto.bad_key", f"{info.name} public keys are {info.public_key_size} bytes, "
                       f"not {len(raw)}", status=400,
                       details={"algorithm": info.name, "length": len(raw)})


def verify_signature(
    alg: str, public_key: bytes, message: bytes, signature: bytes, *, prehash: Prehash | None = None
) -> bool:
    """True if ``signature`` is valid, False if not.

    Raises :class:`QaiError` for an unknown algorithm (``crypto.unknown_algorithm``), a KEM
    (``crypto.not_a_signature``), a malformed public key (``crypto.bad_key``) and a ``prehash``
    the algorithm refuses or a digest of the wrong length (``crypto.prehash_unsupported``,
    ``crypto.bad_prehash``).
    """
    from pqcrypto import InvalidSignatureError  # a ValueError subclass

    info = get_algorithm(alg)
    if info.kind != "signature":
        raise QaiError("crypto.not_a_signature", f"{alg} is a KEM, not a signature algorithm", status=400,
                       details={"algorithm": alg})
    check_prehash(alg, prehash, len(message))
    _check_size(info, public_key)
    try:
        check = _verifier(alg, bytes(public_key))
    except ValueError as exc:
        raise bad_key(alg, str(exc) or type(exc).__name__) from None
    try:
        check(bytes(message), bytes(signature), prehash)
    except (InvalidSignature, InvalidSignatureError):
        return False
    except ValueError:  # pqcrypto: a signature of the wrong length
        return False
    return True


@functools.lru_cache(maxsize=256)
def _verifier(alg: str, public_key: bytes) -> _Check:
    # Loading a key validates it (an EC point check, say), which costs as much as a verification;
    # public keys are few and public, so the loaded form is kept. Errors are not cached.
    return _VERIFIERS[alg](alg, public_key)


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


def _loaded_public_key(alg: str, raw: bytes) -> Any:
    """The ``cryptography`` key object for ``raw``, or None when cryptography lacks the algorithm."""
    if alg in _MLDSA_PUBLIC:
        return _MLDSA_PUBLIC[alg].from_public_bytes(raw)
    if alg in _MLKEM_PUBLIC:
        return _MLKEM_PUBLIC[alg].from_public_bytes(raw)
    if alg == "ECDSA-P256":
        if raw[:1] != b"\x04":
            raise ValueError("not an uncompressed SEC1 point")
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    if alg == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    return None


def _raw_of(alg: str, key: Any) -> bytes:
    if alg == "ECDSA-P256":
        return bytes(key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
    return bytes(key.public_bytes_raw())


def public_key_der(alg: str, raw: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of a raw public key."""
    info = get_algorithm(alg)
    _check_size(info, raw)
    try:
        key = _loaded_public_key(alg, bytes(raw))
    except ValueError as exc:
        raise bad_key(alg, str(exc) or type(exc).__name__) from None
    if key is None:  # SLH-DSA: cryptography has no such key type; NIST OID, absent parameters
        return _spki(info.oid, bytes(raw))
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def public_key_pem(alg: str, raw: bytes) -> str:
    """The SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``) of a raw public key."""
    der = public_key_der(alg, raw)
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


def public_key_from_pem(alg: str, pem: str) -> bytes:
    """The raw public key inside a SubjectPublicKeyInfo PEM; ``crypto.bad_key`` unless it is ``alg``."""
    info = get_algorithm(alg)
    lines = [ln.strip() for ln in pem.strip().splitlines()]
    if len(lines) < 3 or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        raise bad_key(alg, "not a PEM public key")
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise bad_key(alg, "PEM body is not base64") from None
    if alg in _SLHDSA_MODULES:
        size = info.public_key_size or 0
        prefix = _spki(info.oid, b"\x00" * size)[:-size]
        if not der.startswith(prefix) or len(der) != len(prefix) + size:
            raise bad_key(alg, f"PEM is not a {alg} SubjectPublicKeyInfo")
        return der[len(prefix):]
    expected = {**_MLDSA_PUBLIC, **_MLKEM_PUBLIC, "ECDSA-P256": ec.EllipticCurvePublicKey,
                "Ed25519": ed25519.Ed25519PublicKey}[alg]
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise bad_key(alg, f"PEM is not a {alg} SubjectPublicKeyInfo") from None
    if not isinstance(key, expected) or (
        isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1)
    ):
        raise bad_key(alg, f"PEM holds a {type(key).__name__}, not a {alg} key")
    return _raw_of(alg, key)
