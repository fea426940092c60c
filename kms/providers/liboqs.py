"""Provider ``liboqs``: Open Quantum Safe's liboqs through liboqs-python (optional extra).

Used only when the liboqs *shared library* loads. ``pip install 'qai[liboqs]'`` installs the
Python binding (``import oqs``) but not the library: build liboqs with ``-DBUILD_SHARED_LIBS=ON``
(or install a distribution package) and, if it is not on the system library path, point
``OQS_INSTALL_PATH`` at its install prefix. When liboqs-python cannot find the library it tries to
download and build it at import time; we never let it: the binding is imported only once the
shared library has been found and loaded, and any failure leaves the provider unavailable
(``crypto.provider_unavailable``, 503) with the reason in the message.

Private keys are liboqs's secret keys (the expanded FIPS encodings). Signatures are pure mode
with an empty context, so they interoperate with the other providers. ``prehash`` is refused:
liboqs signs whole messages only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib
import os
from functools import cache
from pathlib import Path
from typing import Any

from kms.providers.base import (
    BytesPrivateKey,
    KeyPair,
    bad_ciphertext,
    bad_private_key,
    bad_public_key,
    unsupported,
)
from sdk.algorithms import get_algorithm
from sdk.crypto import check_prehash
from sdk.errors import QaiError

NAME = "liboqs"
# qai name -> liboqs mechanism name (liboqs >= 0.14; the NIST names are stable upstream).
OQS_NAMES = {
    "ML-DSA-44": "ML-DSA-44",
    "ML-DSA-65": "ML-DSA-65",
    "ML-DSA-87": "ML-DSA-87",
    "SLH-DSA-SHA2-128s": "SLH_DSA_PURE_SHA2_128S",
    "SLH-DSA-SHA2-128f": "SLH_DSA_PURE_SHA2_128F",
    "ML-KEM-768": "ML-KEM-768",
    "ML-KEM-1024": "ML-KEM-1024",
}
_KEMS = frozenset({"ML-KEM-768", "ML-KEM-1024"})

INSTALL_HINT = (
    "Build liboqs as a shared library (git clone https://github.com/open-quantum-safe/liboqs && "
    "cmake -S liboqs -B liboqs/build -DBUILD_SHARED_LIBS=ON && "
    "cmake --build liboqs/build --target install), set OQS_INSTALL_PATH to its install prefix "
    "unless it is on the system library path, then `pip install 'qai[liboqs]'`. "
    "The openssl and pqclean providers implement every qai algorithm without it."
)


def _library_candidates() -> list[str]:
    """Where liboqs-python itself would look: the system library path, $OQS_INSTALL_PATH, ~/_oqs."""
    system = ctypes.util.find_library("oqs")
    found = [system] if system else []
    prefixes = [os.environ.get("OQS_INSTALL_PATH") or "", str(Path.home() / "_oqs")]
    for prefix in filter(None, prefixes):
        for pattern in ("lib/liboqs.so*", "lib64/liboqs.so*", "lib/liboqs*.dylib", "bin/oqs.dll"):
            found.extend(sorted(glob.glob(os.path.join(prefix, pattern))))
    return found


@cache
def _load() -> tuple[Any, str]:
    """(the ``oqs`` module or None, the reason it is unavailable)."""
    candidates = _library_candidates()
    if not candidates:
        return None, ("the liboqs shared library (liboqs.so) was not found on the system library path, "
                      "in $OQS_INSTALL_PATH or in ~/_oqs")
    errors = []
    for path in candidates:
        try:
            ctypes.CDLL(path)
            break
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    else:
        return None, f"the liboqs shared library was found but does not load ({'; '.join(errors)})"
    try:
        module = importlib.import_module("oqs")
    except ImportError:
        return None, "the liboqs shared library is present but liboqs-python (`import oqs`) is not installed"
    except BaseException as exc:  # the binding calls sys.exit() when its own loader fails
        return None, f"liboqs-python could not load the liboqs shared library ({type(exc).__name__}: {exc})"
    return module, ""


def unavailable_reason() -> str | None:
    """Why the provider is unavailable, or None when liboqs loads."""
    module, reason = _load()
    return None if module is not None else reason


def _oqs() -> Any:
    module, reason = _load()
    if module is None:
        raise QaiError(
            "crypto.provider_unavailable",
            f"provider liboqs is unavailable: {reason}. {INSTALL_HINT}",
            status=503,
            details={"provider": NAME, "reason": reason},
        )
    return module


def _mechanism(alg: str, kind: str, operation: str) -> tuple[Any, str]:
    """(oqs module, liboqs name), in the order: known name, provider loads, right kind."""
    get_algorithm(alg)
    oqs = _oqs()
    if alg not in OQS_NAMES or (alg in _KEMS) != (kind == "kem"):
        raise unsupported(NAME, alg, operation)
    return oqs, OQS_NAMES[alg]


def _open(oqs: Any, alg: str, secret_key: bytes | None = None) -> Any:
    cls = oqs.KeyEncapsulation if alg in _KEMS else oqs.Signature
    try:
        return cls(OQS_NAMES[alg], secret_key)
    except oqs.MechanismNotSupportedError:  # also MechanismNotEnabledError, its subclass
        raise unsupported(NAME, alg, "this liboqs build") from None


def _check_len(alg: str, what: str, value: bytes, expected: int) -> None:
    # liboqs-python copies into fixed-size buffers: a wrong length would be truncated or padded.
    if len(value) == expected:
        return
    why = f"{expected} bytes expected, not {len(value)}"
    if what == "public":
        raise bad_public_key(alg, why)
    if what == "secret":
        raise bad_private_key(NAME, alg, why)
    raise bad_ciphertext(alg, why)


class LibOQSProvider:
    name = NAME

    def available(self) -> bool:
        return _load()[0] is not None

    def algorithms(self) -> frozenset[str]:
        return frozenset(OQS_NAMES)

    def load_private(self, alg: str, private_key: bytes) -> BytesPrivateKey:
        get_algorithm(alg)
        _oqs()
        if alg not in OQS_NAMES:
            raise unsupported(NAME, alg)
        return BytesPrivateKey(self, alg, bytes(private_key))

    def generate(self, alg: str) -> KeyPair:
        oqs, _ = _mechanism(alg, get_algorithm(alg).kind, "key generation")
        with _open(oqs, alg) as obj:
            public = obj.generate_keypair()
            return KeyPair(bytes(public), bytes(obj.export_secret_key()))

    def sign(self, alg: str, private_key: bytes, message: bytes, *, prehash: str | None = None) -> bytes:
        oqs, _ = _mechanism(alg, "signature", "signing")
        check_prehash(alg, prehash, len(message))
        if prehash is not None:
            raise QaiError("crypto.prehash_unsupported", f"provider liboqs cannot sign a {alg} digest; "
                           "use the openssl or pqclean provider", status=422,
                           details={"algorithm": alg, "provider": NAME})
        with _open(oqs, alg, bytes(private_key)) as s:
            _check_len(alg, "secret", private_key, int(s.details["length_secret_key"]))
            return bytes(s.sign(bytes(message)))  # pure mode, empty context

    def verify(self, alg: str, public_key: bytes, message: bytes, signature: bytes, *,
               prehash: str | None = None) -> bool:
        oqs, _ = _mechanism(alg, "signature", "verification")
        check_prehash(alg, prehash, len(message))
        if prehash is not None:
            raise QaiError("crypto.prehash_unsupported", f"provider liboqs cannot verify a {alg} digest",
                           status=422, details={"algorithm": alg, "provider": NAME})
        with _open(oqs, alg) as s:
            _check_len(alg, "public", public_key, int(s.details["length_public_key"]))
            return bool(s.verify(bytes(message), bytes(signature), bytes(public_key)))

    def encapsulate(self, alg: str, public_key: bytes) -> tuple[bytes, bytes]:
        oqs, _ = _mechanism(alg, "kem", "encapsulation")
        with _open(oqs, alg) as k:
            _check_len(alg, "public", public_key, int(k.details["length_public_key"]))
            ct, ss = k.encap_secret(bytes(public_key))
            return bytes(ct), bytes(ss)

    def decapsulate(self, alg: str, private_key: bytes, ciphertext: bytes) -> bytes:
        oqs, _ = _mechanism(alg, "kem", "decapsulation")
        with _open(oqs, alg, bytes(private_key)) as k:
            _check_len(alg, "secret", private_key, int(k.details["length_secret_key"]))
            _check_len(alg, "ciphertext", ciphertext, int(k.details["length_ciphertext"]))
            return bytes(k.decap_secret(bytes(ciphertext)))
