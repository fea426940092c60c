"""Provider ``openssl``: the OpenSSL 4 bundled with ``cryptography`` >= 50 (the default).

ML-DSA-44/65/87 and ML-KEM-768/1024, plus software ECDSA P-256 and Ed25519 for tests and
verification (the KMS keeps its classical keys in the HSM). Private keys:

* ML-DSA: the 32-byte FIPS 204 seed ξ (``KeyGen_internal``); ML-KEM: the 64-byte FIPS 203 seed
  ``d ‖ z``. The expanded keys are derived on load and never leave this process;
* ECDSA P-256: the 32-byte big-endian private scalar; Ed25519: the 32-byte RFC 8032 private key.

Verification is :func:`sdk.crypto.verify_signature`: one code path for the KMS and for auditors.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem, utils

from kms.providers.base import KeyPair, bad_ciphertext, bad_private_key, bad_public_key, unsupported
from sdk.algorithms import get_algorithm
from sdk.crypto import check_prehash, hash_mldsa_mu, verify_signature

NAME = "openssl"
_MLDSA: dict[str, Any] = {
    "ML-DSA-44": mldsa.MLDSA44PrivateKey,
    "ML-DSA-65": mldsa.MLDSA65PrivateKey,
    "ML-DSA-87": mldsa.MLDSA87PrivateKey,
}
_MLKEM: dict[str, tuple[Any, Any]] = {
    "ML-KEM-768": (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
    "ML-KEM-1024": (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
}
_ALGORITHMS = frozenset({*_MLDSA, *_MLKEM, "ECDSA-P256", "Ed25519"})


def _require(alg: str, kind: str, operation: str) -> None:
    info = get_algorithm(alg)  # crypto.unknown_algorithm first
    if alg not in _ALGORITHMS or info.kind != kind:
        raise unsupported(NAME, alg, operation)


class OpenSSLProvider:
    name = NAME

    def available(self) -> bool:
        return True

    def algorithms(self) -> frozenset[str]:
        return _ALGORITHMS

    def generate(self, alg: str) -> KeyPair:
        get_algorithm(alg)
        if alg in _MLDSA or alg in _MLKEM:
            k = (_MLDSA[alg] if alg in _MLDSA else _MLKEM[alg][0]).generate()
            return KeyPair(bytes(k.public_key().public_bytes_raw()), bytes(k.private_bytes_raw()))
        if alg == "ECDSA-P256":
            e = ec.generate_private_key(ec.SECP256R1())
            pub = e.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
            return KeyPair(pub, e.private_numbers().private_value.to_bytes(32, "big"))
        if alg == "Ed25519":
            d = ed25519.Ed25519PrivateKey.generate()
            return KeyPair(d.public_key().public_bytes_raw(), d.private_bytes_raw())
        raise unsupported(NAME, alg)

    def load_private(self, alg: str, private_key: bytes) -> _OpenSSLKey:
        get_algorithm(alg)
        if alg not in _ALGORITHMS:
            raise unsupported(NAME, alg)
        raw = bytes(private_key)
        try:
            if alg in _MLDSA:
                k = _MLDSA[alg].from_seed_bytes(raw)
                return _OpenSSLKey(alg, k, bytes(k.public_key().public_bytes_raw()))
            if alg in _MLKEM:
                return _OpenSSLKey(alg, _MLKEM[alg][0].from_seed_bytes(raw), b"")
            if alg == "ECDSA-P256":
                if len(raw) != 32:
                    raise ValueError("an ECDSA P-256 private scalar is 32 bytes")
                return _OpenSSLKey(alg, ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1()), b"")
            return _OpenSSLKey(alg, ed25519.Ed25519PrivateKey.from_private_bytes(raw), b"")
        except ValueError as exc:
            raise bad_private_key(NAME, alg, str(exc)) from None

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes:
        _require(alg, "signature", "signing")
        check_prehash(alg, prehash, len(message))  # before the key is expanded
        return self.load_private(alg, private_key).sign(message, prehash=prehash)

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool:
        _require(alg, "signature", "verification")
        return verify_signature(alg, public_key, message, signature, prehash=prehash)

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]:
        _require(alg, "kem", "encapsulation")
        try:
            key = _MLKEM[alg][1].from_public_bytes(bytes(public_key))
        except ValueError as exc:
            raise bad_public_key(alg, str(exc)) from None
        shared, ct = key.encapsulate()
        return bytes(ct), bytes(shared)

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes:
        _require(alg, "kem", "decapsulation")
        return self.load_private(alg, private_key).decapsulate(ciphertext)


class _OpenSSLKey:
    """A loaded ``cryptography`` private key: key expansion happens once, not per signature."""

    def __init__(self, alg: str, key: Any, public_key: bytes) -> None:
        self._alg = alg
        self._key = key
        self._public_key = public_key  # ML-DSA only: HashML-DSA's μ binds the public key

    @property
    def alg(self) -> str:
        return self._alg

    def __repr__(self) -> str:
        return f"<openssl {self._alg} private key>"

    def sign(self, message: bytes, *, prehash: str | None = None) -> bytes:
        alg, key = self._alg, self._key
        _require(alg, "signature", "signing")
        check_prehash(alg, prehash, len(message))
        if alg in _MLDSA:
            if prehash is None:
                return bytes(key.sign(message))  # pure ML-DSA, empty context, hedged
            return bytes(key.sign_mu(hash_mldsa_mu(self._public_key, message, prehash)))
        if alg == "ECDSA-P256":
            if prehash is None:
                return bytes(key.sign(message, ec.ECDSA(hashes.SHA256())))
            h = hashes.SHA256() if prehash == "sha256" else hashes.SHA512()
            return bytes(key.sign(message, ec.ECDSA(utils.Prehashed(h))))
        return bytes(key.sign(message))  # Ed25519

    def decapsulate(self, ciphertext: bytes) -> bytes:
        _require(self._alg, "kem", "decapsulation")
        try:
            return bytes(self._key.decapsulate(bytes(ciphertext)))
        except ValueError as exc:
            raise bad_ciphertext(self._alg, str(exc)) from None
