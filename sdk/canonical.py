"""RFC 8785 JSON Canonicalization Scheme (JCS).

Signers and verifiers hash and sign exactly these bytes. Nothing in qai signs any other
serialisation of a JSON document.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

from sdk.errors import QaiError

_MAX_SAFE_INTEGER = 2**53 - 1  # RFC 8785 §3.2.2.3: numbers are IEEE 754 doubles


def _plain(value: Any) -> bool:
    """True when ``json.dumps`` already writes the RFC 8785 bytes of ``value``: no floats (whose
    ES6 form differs from Python's), integers a double holds exactly, and ASCII keys (so that
    sorting by code point is sorting by UTF-16 code unit, section 3.2.3). String escaping agrees:
    both use the two-character escapes (backspace, tab, newline, form feed, carriage return, quote,
    backslash) and lowercase six-character escapes for the other control characters."""
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        return bool(-_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER)
    if t is dict:
        return all(type(k) is str and k.isascii() and _plain(v) for k, v in value.items())
    if t is list:
        return all(_plain(v) for v in value)
    return False


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value."""
    if _plain(value):
        # The common case (manifests, envelopes) in C: the pure-Python serialiser costs as much as
        # an ML-DSA verification per document. Lone surrogates fail to encode and go the long way.
        try:
            return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
        except UnicodeEncodeError:
            pass
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise QaiError("json.not_canonicalizable", f"value cannot be canonicalised: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
