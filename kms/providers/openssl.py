"""Provider ``openssl``: the OpenSSL 4 bundled with ``cryptography`` >= 50 (the default).

ML-DSA-44/65/87 and ML-KEM-768/1024 with seed private keys (32 and 64 bytes), plus software
ECDSA P-256 and Ed25519 for tests and verification (the KMS keeps its classical keys in the HSM).
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem, utils

from kms.providers.base import KeyPair, unsupported
from sdk.algorithms import get_algorithm
from sdk.crypto import check_prehash, hash_mldsa_mu, verify_signature

_MLDSA: dict[str, Any] = {
    "ML-DSA-44": mldsa.MLDSA44PrivateKey,
    "ML-DSA-65": mldsa.MLDSA65PrivateKey,
    "ML-DSA-87": mldsa.MLDSA87PrivateKey,
}
_MLKEM: dict[str, tuple[Any, Any]] = {
    "ML-KEM-768": (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
    "ML-KEM-1024": (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
}
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class OpenSSLProvider:
    name = "openssl"

    def available(self) -> bool:
        return True

    def algorithms(self) -> frozenset[str]:
        return frozenset({*_MLDSA, *_MLKEM, "ECDSA-P256", "Ed25519"})

    def generate(self, alg: str) -> KeyPair:
        get_algorithm(alg)
        if alg in _MLDSA:
            k = _MLDSA[alg].generate()
            return KeyPair(k.public_key().public_bytes_raw(), k.private_bytes_raw())
        if alg in _MLKEM:
            k = _MLKEM[alg][0].generate()
            return KeyPair(k.public_key().public_bytes_raw(), k.private_bytes_raw())
        if alg == "ECDSA-P256":
            e = ec.generate_private_key(ec.SECP256R1())
            pub = e.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
            return KeyPair(pub, e.private_numbers().private_value.to_bytes(32, "big"))
        if alg == "Ed25519":
            d = ed25519.Ed25519PrivateKey.generate()
            return KeyPair(d.public_key().public_bytes(*_RAW), d.private_bytes_raw())
        raise unsupported(self.name, alg)

    def load_private(self, alg: str, private_key: bytes) -> _OpenSSLKey:
        if alg in _MLDSA:
            k = _MLDSA[alg].from_seed_bytes(private_key)
            return _OpenSSLKey(alg, k, k.public_key().public_bytes_raw())
        if alg in _MLKEM:
            return _OpenSSLKey(alg, _MLKEM[alg][0].from_seed_bytes(private_key), b"")
        if alg == "ECDSA-P256":
            return _OpenSSLKey(alg, ec.derive_private_key(int.from_bytes(private_key, "big"), ec.SECP256R1()), b"")
        if alg == "Ed25519":
            return _OpenSSLKey(alg, ed25519.Ed25519PrivateKey.from_private_bytes(private_key), b"")
        raise unsupported(self.name, alg)

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes:
        return self.load_private(alg, private_key).sign(message, prehash=prehash)

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool:
        if alg not in self.algorithms() or alg in _MLKEM:
            raise unsupported(self.name, alg)
        # sdk.crypto is the same library: one verification code path for the KMS and auditors.
        return verify_signature(alg, public_key, message, signature, prehash=prehash)

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]:
        if alg not in _MLKEM:
            raise unsupported(self.name, alg)
        shared, ct = _MLKEM[alg][1].from_public_bytes(public_key).encapsulate()
        return bytes(ct), bytes(shared)

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes:
        if alg not in _MLKEM:
            raise unsupported(self.name, alg)
        return self.load_private(alg, private_key).decapsulate(ciphertext)


class _OpenSSLKey:
    """A loaded ``cryptography`` private key: key expansion happens once, not per signature."""

    def __init__(self, alg: str, key: Any, public_key: bytes) -> None:
        self.alg = alg
        self._key = key
        self._public_key = public_key

    def sign(self, message: bytes, *, prehash: str | None = None) -> bytes:
        alg, key = self.alg, self._key
        check_prehash(alg, prehash, len(message))
        if alg in _MLDSA:
            if prehash is None:
                return bytes(key.sign(message))
            return bytes(key.sign_mu(hash_mldsa_mu(self._public_key, message, prehash)))
        if alg == "ECDSA-P256":
            if prehash is None:
                return bytes(key.sign(message, ec.ECDSA(hashes.SHA256())))
            h = hashes.SHA256() if prehash == "sha256" else hashes.SHA512()
            return bytes(key.sign(message, ec.ECDSA(utils.Prehashed(h))))
        if alg == "Ed25519":
            return bytes(key.sign(message))
        raise unsupported("openssl", alg)

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if self.alg not in _MLKEM:
            raise unsupported("openssl", self.alg)
        return bytes(self._key.decapsulate(ciphertext))
