"""RFC 8785 JSON Canonicalization Scheme (JCS).

Signers and verifiers hash and sign exactly these bytes. Nothing in qai signs any other
serialisation of a JSON document.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from sdk.errors import QaiError


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise QaiError("json.not_canonicalizable", f"value cannot be canonicalised: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
