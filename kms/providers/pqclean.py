"""Provider ``pqclean``: the ``pqcrypto`` package (PQClean implementations).

SLH-DSA-SHA2-128s/128f, and ML-DSA / ML-KEM as a fallback. Private keys are the expanded FIPS
secret keys. With ``prehash``, ML-DSA signs the given digest as HashML-DSA through pqcrypto's
``hash_algorithm`` mode (which takes the digest for ML-DSA); SLH-DSA refuses digests.
"""

from __future__ import annotations

from types import ModuleType

from kms.providers.base import BytesPrivateKey, KeyPair, unsupported
from sdk.crypto import check_prehash, pqclean_hash

_SIGN = {
    "ML-DSA-44": "ml_dsa_44",
    "ML-DSA-65": "ml_dsa_65",
    "ML-DSA-87": "ml_dsa_87",
    "SLH-DSA-SHA2-128s": "slh_dsa_sha2_128s",
    "SLH-DSA-SHA2-128f": "slh_dsa_sha2_128f",
}
_KEM = {"ML-KEM-768": "ml_kem_768", "ML-KEM-1024": "ml_kem_1024"}


def _module(alg: str) -> ModuleType:
    import importlib

    if alg in _SIGN:
        return importlib.import_module(f"pqcrypto.sign.{_SIGN[alg]}")
    return importlib.import_module(f"pqcrypto.kem.{_KEM[alg]}")


class PQCleanProvider:
    name = "pqclean"

    def available(self) -> bool:
        try:
            import pqcrypto  # noqa: F401
        except ImportError:
            return False
        return True

    def algorithms(self) -> frozenset[str]:
        return frozenset({*_SIGN, *_KEM})

    def load_private(self, alg: str, private_key: bytes) -> BytesPrivateKey:
        if alg not in self.algorithms():
            raise unsupported(self.name, alg)
        return BytesPrivateKey(self, alg, private_key)

    def generate(self, alg: str) -> KeyPair:
        if alg not in self.algorithms():
            raise unsupported(self.name, alg)
        pk, sk = _module(alg).keygen()
        return KeyPair(bytes(pk), bytes(sk))

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes:
        if alg not in _SIGN:
            raise unsupported(self.name, alg)
        check_prehash(alg, prehash, len(message))
        return bytes(_module(alg).sign(private_key, message, hash_algorithm=pqclean_hash(prehash)))

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool:
        if alg not in _SIGN:
            raise unsupported(self.name, alg)
        check_prehash(alg, prehash, len(message))
        try:
            _module(alg).verify(public_key, message, signature, hash_algorithm=pqclean_hash(prehash))
        except Exception as exc:
            if type(exc).__name__ == "InvalidSignatureError" or isinstance(exc, ValueError):
                return False
            raise
        return True

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]:
        if alg not in _KEM:
            raise unsupported(self.name, alg)
        ct, ss = _module(alg).encaps(public_key)
        return bytes(ct), bytes(ss)

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes:
        if alg not in _KEM:
            raise unsupported(self.name, alg)
        return bytes(_module(alg).decaps(private_key, ciphertext))
