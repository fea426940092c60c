"""RFC 8785 JSON Canonicalization Scheme (JCS).

Signers and verifiers hash and sign exactly these bytes. Nothing in qai signs any other
serialisation of a JSON document.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import rfc8785

from sdk.errors import QaiError

_MAX_SAFE_INTEGER = 2**53 - 1  # RFC 8785 §3.2.2.3: numbers are IEEE 754 doubles


class _Slow(Exception):
    """The value needs the reference serialiser (or is refused by it)."""


# A float whose ES6 form Python's repr does not write is swapped for this marker around its index,
# then the marker (quoted) for the ES6 text. A private-use character: a real string containing it
# sends the whole value the long way, so a marker is never confused with data.
_MARK = "\ue000"
_MARKED = re.compile('"' + _MARK + '([0-9]+)' + _MARK + '"')


def _es6(f: float) -> str:
    """ECMA-262 Number::toString of a finite float (RFC 8785 section 3.2.2.3), via the reference."""
    return rfc8785.dumps(f).decode()


def _prepare(value: Any, floats: list[str]) -> Any:
    """``value`` with every float made ``json.dumps``-safe: an integral one (below 2**53) becomes
    the int ES6 writes the same way; one whose repr is already its ES6 form stays; any other is
    marked. Raises :class:`_Slow` for what only the reference handles: a non-ASCII key (sorting by
    code point is sorting by UTF-16 code unit only for ASCII, section 3.2.3), an integer a double
    does not hold, NaN or infinity, a string containing the marker, a non-JSON type.

    Containers are copied only where something in them changes, and the common leaves (strings,
    booleans, null, safe integers) are checked inline: a decision document has thousands of
    nodes, and a call per leaf cost more than the C serialiser itself."""
    t = type(value)
    if t is dict:
        changed: dict[str, Any] | None = None
        for k, v in value.items():
            if type(k) is not str or not k.isascii():
                raise _Slow
            if _plain(v):
                continue
            p = _prepare(v, floats)
            if p is not v:
                if changed is None:
                    changed = dict(value)
                changed[k] = p
        return value if changed is None else changed
    if t is list:
        copied: list[Any] | None = None
        for i, v in enumerate(value):  # a loop, not a comprehension: one stack frame per level, as the reference
            if _plain(v):
                continue
            p = _prepare(v, floats)
            if p is not v:
                if copied is None:
                    copied = list(value)
                copied[i] = p
        return value if copied is None else copied
    if t is float:
        if not math.isfinite(value):
            raise _Slow
        if value.is_integer():
            if abs(value) <= _MAX_SAFE_INTEGER:
                return int(value)
        elif 1e-4 <= abs(value) < 1e16:  # repr writes positional digits here, the shortest that round-trip, as ES6
            return value
        floats.append(_es6(value))
        return f"{_MARK}{len(floats) - 1}{_MARK}"
    if _plain(value):
        return value
    raise _Slow


def _plain(v: Any) -> bool:
    """A leaf ``json.dumps`` writes as RFC 8785 does; raises :class:`_Slow` for a string with the
    marker or an integer a double does not hold; False for anything else (containers, floats)."""
    t = type(v)
    if t is str:
        if _MARK in v:
            raise _Slow
        return True
    if t is int:
        if -_MAX_SAFE_INTEGER <= v <= _MAX_SAFE_INTEGER:
            return True
        raise _Slow
    return t is bool or v is None


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value."""
    floats: list[str] = []
    try:
        prepared = _prepare(value, floats)
        # The common case in C: the pure-Python serialiser costs as much as an ML-DSA verification
        # per manifest, and tens of ms per scheduler decision. String escaping agrees: both use the
        # two-character escapes (backspace, tab, newline, form feed, carriage return, quote,
        # backslash) and lowercase six-character escapes for the other control characters.
        text = json.dumps(prepared, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
        if floats:
            text = _MARKED.sub(lambda m: floats[int(m.group(1))], text)
        return text.encode()  # a lone surrogate fails here and goes the long way
    except (_Slow, UnicodeEncodeError, RecursionError):
        pass
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise QaiError("json.not_canonicalizable", f"value cannot be canonicalised: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
