"""The fast path of canonical_json writes exactly what the reference RFC 8785 serialiser writes."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from sdk.canonical import canonical_json
from sdk.errors import QaiError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


def _same_as_reference(value: Any) -> None:
    """The same bytes as the reference, or refused with our code where the reference refuses."""
    expected = _reference(value)
    if isinstance(expected, bytes):
        assert canonical_json(value) == expected
    else:
        with pytest.raises(QaiError) as err:
            canonical_json(value)
        assert err.value.code == "json.not_canonicalizable"


def _reference(value: Any) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(value)
    except Exception as exc:  # whatever the reference refuses, we must refuse too
        return type(exc)


@settings(max_examples=1500, deadline=None)
@given(json_values)
def test_matches_the_reference_serialiser(value: Any) -> None:
    _same_as_reference(value)


@pytest.mark.parametrize("value", [
    {"\ue000": 1, "\U0001f600": 2},  # sorted by UTF-16 code units, not code points
    {"s": "\x00\x1f\x7f\u2028\b\t\n\f\r\"\\/"},  # every escape rule
    {"n": 2**53 - 1, "m": -(2**53 - 1)},
    {"big": 2**53 + 1},  # not a double: refused by the reference
    {"f": 1e21, "g": 5e-324, "h": -0.0, "i": 100.0},
    {"j": 2.0**53, "k": 2.0**60, "l": 1e16 + 2, "m": 1.5e-5, "n": 1e-4, "o": 9.99e15 + 0.5, "p": 1e-7},
    {"marker": "\ue0001\ue000", "f": 1e-9},  # a string like a float marker goes the long way
    {"marker": "\ue000"}, ["\ue000", 1.5e-300, "\ue000"],  # ... with or without floats marked
    ["\ud800"],  # a lone surrogate
])
def test_edge_cases_match_the_reference(value: Any) -> None:
    _same_as_reference(value)


@pytest.mark.parametrize("depth", [600, 5000])
def test_deep_nesting_matches_the_reference_or_is_refused_with_a_code(depth: int) -> None:
    value: Any = 1.5
    for _ in range(depth):
        value = [value]
    _same_as_reference(value)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_orjson_reads_canonical_bytes_as_json_does_but_for_integers_past_64_bits(value: Any) -> None:
    """The scheduler reads decisions with orjson, the rest of qai with json. The two agree, except
    that an integer literal past 64 bits (the ES6 form of a large double) is read by orjson as the
    double it was written from."""
    try:
        data = canonical_json(value)
    except QaiError:
        return
    _same_reading(json.loads(data), orjson.loads(data))


def _same_reading(by_json: Any, by_orjson: Any) -> None:
    if type(by_json) is int and abs(by_json) >= 2**64:
        assert type(by_orjson) is float and float(by_json) == by_orjson
    elif isinstance(by_json, dict):
        assert type(by_orjson) is dict and list(by_json) == list(by_orjson)
        for k, v in by_json.items():
            _same_reading(v, by_orjson[k])
    elif isinstance(by_json, list):
        assert type(by_orjson) is list and len(by_json) == len(by_orjson)
        for a, b in zip(by_json, by_orjson, strict=True):
            _same_reading(a, b)
    else:
        assert type(by_json) is type(by_orjson) and by_json == by_orjson


def test_a_large_integral_double_reads_back_as_that_double() -> None:
    """ES6 writes 2**64 as 18446744073709552000: json reads an int no double equals (and that
    canonicalisation refuses); orjson reads the double."""
    data = canonical_json({"x": 2.0**64})
    assert data == b'{"x":18446744073709552000}'
    assert orjson.loads(data) == {"x": 2.0**64}
    assert json.loads(data) != {"x": 2.0**64}
    with pytest.raises(QaiError):
        canonical_json(json.loads(data))
