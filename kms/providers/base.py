"""The crypto-provider interface: key generation, signing and KEM by algorithm name.

Providers are swappable (SPEC: "abstraction layer for future swaps"). Each works on raw bytes in
the wire formats of :mod:`sdk.crypto` (public keys, signatures, ciphertexts), so anything one
provider makes public is usable by every other. Private keys are each provider's own encoding
(``openssl``: the FIPS 204 / 203 seeds; ``pqclean`` and ``liboqs``: the expanded FIPS secret
keys), so a sealed key records the provider that made it.

Failures are :class:`~sdk.errors.QaiError` with stable codes: ``crypto.unknown_algorithm`` (not
in the registry), ``crypto.unsupported_algorithm`` (in the registry, not in this provider, or the
wrong kind for the operation), ``crypto.provider_unavailable``, ``crypto.prehash_unsupported``,
``crypto.bad_prehash``, ``crypto.bad_key`` and ``crypto.bad_ciphertext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sdk.errors import QaiError


@dataclass(frozen=True)
class KeyPair:
    public_key: bytes
    private_key: bytes = field(repr=False)


class PrivateKey(Protocol):
    """A loaded private key: what the KMS keeps in proxy memory between unseal and expiry."""

    @property
    def alg(self) -> str: ...

    def sign(self, message: bytes, *, prehash: str | None = None) -> bytes: ...

    def decapsulate(self, ciphertext: bytes) -> bytes: ...


class Provider(Protocol):
    """A crypto provider. ``prehash`` means ``message`` is already that hash's digest (sdk.crypto)."""

    name: str

    def available(self) -> bool: ...

    def algorithms(self) -> frozenset[str]: ...

    def generate(self, alg: str) -> KeyPair: ...

    def load_private(self, alg: str, private_key: bytes) -> PrivateKey: ...

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes: ...

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool: ...

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]:
        """(ciphertext, shared_secret)."""
        ...

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes: ...


def unsupported(provider: str, alg: str, operation: str | None = None) -> QaiError:
    what = f"{operation} with {alg}" if operation else alg
    return QaiError("crypto.unsupported_algorithm", f"provider {provider} does not implement {what}",
                    status=400, details={"provider": provider, "algorithm": alg})


def bad_private_key(provider: str, alg: str, why: str) -> QaiError:
    return QaiError("crypto.bad_key", f"malformed {alg} private key for provider {provider}: {why}",
                    status=400, details={"provider": provider, "algorithm": alg})


def bad_public_key(alg: str, why: str) -> QaiError:
    return QaiError("crypto.bad_key", f"malformed {alg} public key: {why}", status=400,
                    details={"algorithm": alg})


def bad_ciphertext(alg: str, why: str) -> QaiError:
    return QaiError("crypto.bad_ciphertext", f"malformed {alg} ciphertext: {why}", status=400,
                    details={"algorithm": alg})


@dataclass(frozen=True)
class BytesPrivateKey:
    """A private key kept as bytes, for providers without a native key object."""

    provider: Provider
    alg: str
    private_key: bytes = field(repr=False)

    def sign(self, message: bytes, *, prehash: str | None = None) -> bytes:
        return self.provider.sign(self.alg, self.private_key, message, prehash=prehash)

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return self.provider.decapsulate(self.alg, self.private_key, ciphertext)
