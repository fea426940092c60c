"""Provider ``pqclean``: the ``pqcrypto`` package (PQClean implementations).

SLH-DSA-SHA2-128s/128f, and ML-DSA / ML-KEM as a fallback. Private keys are the expanded FIPS
secret keys (ML-DSA ``skEncode``, SLH-DSA ``SK.seed ‖ SK.prf ‖ PK.seed ‖ PK.root``, ML-KEM
``dk``). With ``prehash``, ML-DSA signs the given digest as HashML-DSA through pqcrypto's
``hash_algorithm`` mode, which for ML-DSA takes the digest as its message (the same signatures
as ``openssl``'s μ computation). SLH-DSA refuses digests: pqcrypto's HashSLH-DSA hashes the
whole message itself (see :mod:`sdk.crypto`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kms.providers.base import (
    BytesPrivateKey,
    KeyPair,
    bad_ciphertext,
    bad_private_key,
    bad_public_key,
    unsupported,
)
from sdk.algorithms import get_algorithm
from sdk.crypto import check_prehash, pqclean_hash

NAME = "pqclean"
_SIGN = {
    "ML-DSA-44": "ml_dsa_44",
    "ML-DSA-65": "ml_dsa_65",
    "ML-DSA-87": "ml_dsa_87",
    "SLH-DSA-SHA2-128s": "slh_dsa_sha2_128s",
    "SLH-DSA-SHA2-128f": "slh_dsa_sha2_128f",
}
_KEM = {"ML-KEM-768": "ml_kem_768", "ML-KEM-1024": "ml_kem_1024"}


def _module(alg: str, kind: str, operation: str) -> ModuleType:
    """The pqcrypto submodule for ``alg``, after checking the name and the kind of operation."""
    get_algorithm(alg)
    table = _SIGN if kind == "signature" else _KEM
    if alg not in table:
        raise unsupported(NAME, alg, operation)
    return importlib.import_module(f"pqcrypto.{'sign' if kind == 'signature' else 'kem'}.{table[alg]}")


def _check_len(module: ModuleType, attr: str, value: bytes, alg: str) -> None:
    size = int(getattr(module, attr))
    if len(value) != size:
        why = f"{size} bytes expected, not {len(value)}"
        if attr == "PUBLIC_KEY_SIZE":
            raise bad_public_key(alg, why)
        raise bad_private_key(NAME, alg, why)


class PQCleanProvider:
    name = NAME

    def available(self) -> bool:
        try:
            import pqcrypto  # noqa: F401
        except ImportError:
            return False
        return True

    def algorithms(self) -> frozenset[str]:
        return frozenset({*_SIGN, *_KEM})

    def load_private(self, alg: str, private_key: bytes) -> BytesPrivateKey:
        get_algorithm(alg)
        if alg not in self.algorithms():
            raise unsupported(NAME, alg)
        module = _module(alg, get_algorithm(alg).kind, "loading")
        _check_len(module, "SECRET_KEY_SIZE", private_key, alg)
        return BytesPrivateKey(self, alg, bytes(private_key))

    def generate(self, alg: str) -> KeyPair:
        get_algorithm(alg)
        if alg not in self.algorithms():
            raise unsupported(NAME, alg)
        pk, sk = _module(alg, get_algorithm(alg).kind, "key generation").keygen()
        return KeyPair(bytes(pk), bytes(sk))

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes:
        module = _module(alg, "signature", "signing")
        check_prehash(alg, prehash, len(message))
        _check_len(module, "SECRET_KEY_SIZE", private_key, alg)
        return bytes(module.sign(bytes(private_key), bytes(message), hash_algorithm=pqclean_hash(prehash)))

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool:
        from pqcrypto import InvalidSignatureError

        module = _module(alg, "signature", "verification")
        check_prehash(alg, prehash, len(message))
        _check_len(module, "PUBLIC_KEY_SIZE", public_key, alg)
        try:
            module.verify(bytes(public_key), bytes(message), bytes(signature), hash_algorithm=pqclean_hash(prehash))
        except InvalidSignatureError:
            return False
        except ValueError:  # a signature of the wrong length (the key length was checked above)
            return False
        return True

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]:
        module = _module(alg, "kem", "encapsulation")
        _check_len(module, "PUBLIC_KEY_SIZE", public_key, alg)
        try:
            ct, ss = module.encaps(bytes(public_key))
        except ValueError as exc:
            raise bad_public_key(alg, str(exc)) from None
        return bytes(ct), bytes(ss)

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes:
        module = _module(alg, "kem", "decapsulation")
        _check_len(module, "SECRET_KEY_SIZE", private_key, alg)
        try:
            return bytes(module.decaps(bytes(private_key), bytes(ciphertext)))
        except ValueError as exc:
            raise bad_ciphertext(alg, str(exc)) from None
