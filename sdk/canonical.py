"""RFC 8785 JSON Canonicalization Scheme (JCS).

Signers and verifiers hash and sign exactly these bytes. Nothing in qai signs any other
serialisation of a JSON document.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import orjson
import rfc8785

from sdk.errors import QaiError

_MAX_SAFE_INTEGER = 2**53 - 1  # RFC 8785 §3.2.2.3: numbers are IEEE 754 doubles


class _Slow(Exception):
    """The value needs the reference serialiser (or is refused by it)."""


# A float whose ES6 form Python's repr does not write is swapped for this marker around its index,
# then the marker (quoted) for the ES6 text. A private-use character: a real string containing it
# sends the whole value the long way (the output then holds more markers than the floats put there),
# so a marker is never confused with data.
_MARK = "\ue000"
_MARK_BYTES = _MARK.encode()
_MARKED = re.compile(('"' + _MARK + '([0-9]+)' + _MARK + '"').encode())


def _es6(f: float) -> str:
    """ECMA-262 Number::toString of a finite float (RFC 8785 section 3.2.2.3), via the reference."""
    return rfc8785.dumps(f).decode()


def _prepare(value: Any, floats: list[str]) -> Any:
    """``value`` with every float made safe for the C serialiser: an integral one (below 2**53)
    becomes the int ES6 writes the same way; one whose repr is already its ES6 form stays; any other
    is marked. Raises :class:`_Slow` for what only the reference handles: a non-ASCII key (sorting by
    code point is sorting by UTF-16 code unit only for ASCII, section 3.2.3), an integer a double
    does not hold, NaN or infinity, a non-JSON type. (A string containing the marker is caught in the
    output, by :func:`canonical_json`.)

    Containers are copied only where something in them changes, and the common leaves (strings,
    booleans, null, safe integers) are checked inline: a decision document has thousands of
    nodes, and a call per leaf cost more than the C serialiser itself."""
    t = type(value)
    if t is dict:
        changed: dict[str, Any] | None = None
        for k, v in value.items():
            if type(k) is not str or not k.isascii():
                raise _Slow
            t = type(v)
            if t is str or t is bool or v is None:
                continue
            if t is int:
                if -_MAX_SAFE_INTEGER <= v <= _MAX_SAFE_INTEGER:
                    continue
                raise _Slow
            p = _prepare(v, floats)
            if p is not v:
                if changed is None:
                    changed = dict(value)
                changed[k] = p
        return value if changed is None else changed
    if t is list:
        copied: list[Any] | None = None
        for i, v in enumerate(value):  # a loop, not a comprehension: one stack frame per level, as the reference
            t = type(v)
            if t is str or t is bool or v is None:
                continue
            if t is int:
                if -_MAX_SAFE_INTEGER <= v <= _MAX_SAFE_INTEGER:
                    continue
                raise _Slow
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
    if t is str or t is bool or value is None:
        return value
    if t is int and -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER:
        return value
    raise _Slow


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value."""
    floats: list[str] = []
    try:
        prepared = _prepare(value, floats)
        # The common case in C (orjson): the pure-Python serialiser costs as much as an ML-DSA
        # verification per manifest, and tens of ms per scheduler decision; json.dumps, ten times
        # orjson's time, was a tenth of a decision. What _prepare lets through is written as RFC
        # 8785 writes it: ASCII keys, sorted by byte (so by UTF-16 code unit); integers within a
        # double; floats in the range where the shortest round-trip digits are written positionally
        # by both; strings as UTF-8 with the two-character escapes (backspace, tab, newline, form
        # feed, carriage return, quote, backslash) and lowercase six-character escapes for the other
        # control characters. A lone surrogate or nesting past orjson's depth limit raises
        # JSONEncodeError and goes the long way.
        data = orjson.dumps(prepared, option=orjson.OPT_SORT_KEYS)
        if data.count(_MARK_BYTES) != 2 * len(floats):  # a string holding the marker: not a float's
            raise _Slow
        if floats:
            data = _MARKED.sub(lambda m: floats[int(m.group(1))].encode(), data)
        return data
    except (_Slow, orjson.JSONEncodeError, RecursionError):
        pass
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise QaiError("json.not_canonicalizable", f"value cannot be canonicalised: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
