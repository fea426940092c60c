"""The crypto-provider interface: key generation, signing and KEM by algorithm name.

Providers are swappable (SPEC: "abstraction layer for future swaps"). Each works on raw bytes in
the wire formats of :mod:`sdk.crypto`; each provider's private-key encoding is its own (a seed for
``openssl``, the expanded key for ``pqclean``), so a sealed key records the provider that made it.
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
    name: str

    def available(self) -> bool: ...

    def algorithms(self) -> frozenset[str]: ...

    def generate(self, alg: str) -> KeyPair: ...

    def load_private(self, alg: str, private_key: bytes) -> PrivateKey: ...

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes: ...

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool: ...

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]: ...

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes: ...


def unsupported(provider: str, alg: str) -> QaiError:
    return QaiError("crypto.unsupported_algorithm", f"provider {provider} does not implement {alg}",
                    status=400, details={"provider": provider, "algorithm": alg})


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
