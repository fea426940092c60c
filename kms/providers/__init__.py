"""Crypto providers behind one interface, looked up by name or by algorithm.

Order of preference: ``openssl`` (default), ``pqclean``, ``liboqs`` (optional; only when its
shared library loads). :func:`provider_for` picks the first available provider that implements an
algorithm, so a deployment without liboqs (or, one day, with another provider) needs no changes.
"""

from __future__ import annotations

from kms.providers.base import KeyPair, PrivateKey, Provider
from kms.providers.liboqs import LibOQSProvider
from kms.providers.openssl import OpenSSLProvider
from kms.providers.pqclean import PQCleanProvider
from sdk.algorithms import get_algorithm
from sdk.errors import QaiError

PROVIDERS: dict[str, Provider] = {
    p.name: p for p in (OpenSSLProvider(), PQCleanProvider(), LibOQSProvider())
}


def get_provider(name: str) -> Provider:
    """The provider called ``name`` (available or not); ``crypto.unknown_provider`` otherwise."""
    provider = PROVIDERS.get(name)
    if provider is None:
        raise QaiError("crypto.unknown_provider", f"unknown provider {name!r}", status=400,
                       details={"provider": str(name), "providers": list(PROVIDERS)})
    return provider


def available_providers() -> list[str]:
    """Names of the providers that load on this machine, in order of preference."""
    return [name for name, p in PROVIDERS.items() if p.available()]


def provider_for(alg: str, preferred: str | None = None) -> Provider:
    """The preferred provider if it is available and implements ``alg``, else the first that does."""
    get_algorithm(alg)
    if preferred is not None:
        p = get_provider(preferred)
        if alg in p.algorithms() and p.available():
            return p
    for p in PROVIDERS.values():
        if alg in p.algorithms() and p.available():
            return p
    raise QaiError("crypto.provider_unavailable", f"no available provider implements {alg}",
                   status=503, details={"algorithm": alg, "available": available_providers()})


__all__ = ["PROVIDERS", "KeyPair", "PrivateKey", "Provider", "available_providers", "get_provider", "provider_for"]
