"""Provider ``liboqs``: Open Quantum Safe's liboqs through liboqs-python (optional extra).

Used only when the liboqs shared library loads; ``pip install 'qai[liboqs]'`` installs the Python
binding, and the shared library comes from the system (build liboqs with ``-DBUILD_SHARED_LIBS=ON``
or install a distribution package). The binding tries to download and build liboqs when it cannot
find it; we never let it: the import happens with ``OQS_INSTALL_PATH`` pointing at the system
library only, and any failure leaves the provider unavailable.
"""

from __future__ import annotations

import ctypes.util
import os
from functools import cache
from types import ModuleType
from typing import Any

from kms.providers.base import BytesPrivateKey, KeyPair, unsupported
from sdk.errors import QaiError

_NAMES = {
    "ML-DSA-44": "ML-DSA-44",
    "ML-DSA-65": "ML-DSA-65",
    "ML-DSA-87": "ML-DSA-87",
    "SLH-DSA-SHA2-128s": "SLH_DSA_PURE_SHA2_128S",
    "SLH-DSA-SHA2-128f": "SLH_DSA_PURE_SHA2_128F",
    "ML-KEM-768": "ML-KEM-768",
    "ML-KEM-1024": "ML-KEM-1024",
}
_KEMS = frozenset({"ML-KEM-768", "ML-KEM-1024"})


@cache
def _load() -> tuple[ModuleType | None, str]:
    """(module, reason). The binding is imported only when the shared library exists."""
    if ctypes.util.find_library("oqs") is None and not os.environ.get("OQS_INSTALL_PATH"):
        return None, "the liboqs shared library (liboqs.so) was not found"
    try:
        import oqs  # type: ignore[import-not-found,unused-ignore]
    except BaseException as exc:  # the binding raises SystemExit when its auto-install fails
        return None, f"liboqs-python could not load liboqs: {type(exc).__name__}"
    return oqs, ""


def _oqs() -> Any:
    module, reason = _load()
    if module is None:
        raise QaiError(
            "crypto.provider_unavailable",
            f"provider liboqs is unavailable: {reason}. Install liboqs as a shared library and "
            "`pip install 'qai[liboqs]'`, or use the openssl/pqclean providers.",
            status=503,
            details={"provider": "liboqs"},
        )
    return module


class LibOQSProvider:
    name = "liboqs"

    def available(self) -> bool:
        return _load()[0] is not None

    def algorithms(self) -> frozenset[str]:
        return frozenset(_NAMES)

    def load_private(self, alg: str, private_key: bytes) -> BytesPrivateKey:
        if alg not in self.algorithms():
            raise unsupported(self.name, alg)
        return BytesPrivateKey(self, alg, private_key)

    def generate(self, alg: str) -> KeyPair:
        oqs = _oqs()
        if alg not in _NAMES:
            raise unsupported(self.name, alg)
        cls = oqs.KeyEncapsulation if alg in _KEMS else oqs.Signature
        with cls(_NAMES[alg]) as obj:
            public = obj.generate_keypair()
            return KeyPair(bytes(public), bytes(obj.export_secret_key()))

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes:
        oqs = _oqs()
        if alg not in _NAMES or alg in _KEMS or prehash is not None:
            raise unsupported(self.name, alg)
        with oqs.Signature(_NAMES[alg], private_key) as s:
            return bytes(s.sign(message))

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool:
        oqs = _oqs()
        if alg not in _NAMES or alg in _KEMS or prehash is not None:
            raise unsupported(self.name, alg)
        with oqs.Signature(_NAMES[alg]) as s:
            return bool(s.verify(message, signature, public_key))

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]:
        oqs = _oqs()
        if alg not in _KEMS:
            raise unsupported(self.name, alg)
        with oqs.KeyEncapsulation(_NAMES[alg]) as k:
            ct, ss = k.encap_secret(public_key)
            return bytes(ct), bytes(ss)

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes:
        oqs = _oqs()
        if alg not in _KEMS:
            raise unsupported(self.name, alg)
        with oqs.KeyEncapsulation(_NAMES[alg], private_key) as k:
            return bytes(k.decap_secret(ciphertext))
