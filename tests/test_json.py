"""Strict JSON both ways (pipeline_common._json): standard JSON out, checked JSON in."""

from __future__ import annotations

import json
import math
import struct
from datetime import date, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_common import _diff, _json

# JSON values as Python builds them; text excludes lone surrogates (Hypothesis' default).
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
JSON_OBJECTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6)


@settings(max_examples=100, deadline=None)
@given(JSON_OBJECTS)
def test_encode_then_decode_round_trips_any_json_object(value: dict[str, Any]) -> None:
    """Every JSON object, big integers and non-ASCII text included, survives encode/decode."""
    back = _json.decode(_json.encode(value))
    assert back == value
    assert _exact(back) == _exact(value)


def _exact(value: Any) -> str:
    """A spelling that tells 1 from 1.0 and a big int from its float, unlike ==."""
    return json.dumps(value, sort_keys=True)


@settings(max_examples=50, deadline=None)
@given(JSON_OBJECTS)
def test_encoded_bytes_are_standard_json_for_the_stdlib(value: dict[str, Any]) -> None:
    """What encode() writes parses with the stdlib as the same value, with no BOM."""
    raw = _json.encode(value)
    assert not raw.startswith(b"\xef\xbb\xbf")
    assert raw.endswith(b"\n")
    assert json.loads(raw.decode("utf-8")) == value


@settings(max_examples=50, deadline=None)
@given(JSON_OBJECTS)
def test_decode_accepts_stdlib_formatted_json(value: dict[str, Any]) -> None:
    """Files written by other tools (compact, ASCII-escaped) decode to the same value."""
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()
    assert _json.decode(raw) == value


@pytest.mark.parametrize("value", [2**63, 2**64, -(2**63) - 1, 10**100, -(7**200)])
def test_integers_beyond_64_bits_are_encoded_exactly(value: int) -> None:
    """Integers that orjson cannot write are written digit for digit."""
    raw = _json.encode({"n": value, "list": [value, 1]})
    assert str(value).encode() in raw
    assert _json.decode(raw) == {"n": value, "list": [value, 1]}


@pytest.mark.parametrize("value", [2**64 + 1, -(2**63) - 1, 10**30 + 7])
def test_big_integers_are_reported_so_the_fast_path_is_not_taken(value: int) -> None:
    """encode_ex flags integers beyond 64 bits (the commit records it), and the exact
    path reads them back as ints; trusted decoding is never used for such bytes."""
    data, long_ints = _json.encode_ex({"n": value})
    assert long_ints is True
    assert _json.has_long_integers(data)
    back = _json.decode(data)
    assert type(back["n"]) is int
    assert back["n"] == value


def test_ordinary_data_is_not_flagged_as_holding_big_integers() -> None:
    """Documents within 64-bit integers take the fast path: encode_ex does not flag them."""
    assert _json.encode_ex({"n": 2**63 - 1, "m": -(2**63)})[1] is False


def test_non_ascii_is_written_as_utf8_not_escaped() -> None:
    """encode() writes UTF-8 text, not \\u escapes."""
    raw = _json.encode({"k": "é✓"})
    assert "é✓".encode() in raw


def test_utf8_bom_is_accepted() -> None:
    """A leading UTF-8 BOM is skipped by decode()."""
    assert _json.decode(b"\xef\xbb\xbf" + b'{"a": 1}') == {"a": 1}


def _cycle() -> dict[str, Any]:
    data: dict[str, Any] = {}
    data["me"] = [data]
    return data


_UNENCODABLE = {
    "nan": {"x": math.nan},
    "inf": {"x": math.inf},
    "nested-inf": {"x": [{"y": -math.inf}]},
    "int-key": {1: 1},
    "float-key": {1.5: 1},
    "none-key": {None: 1},
    "tuple-key": {(1,): 1},
    "set": {"x": {1}},
    "frozenset": {"x": frozenset()},
    "bytes": {"x": b""},
    "bytearray": {"x": bytearray(b"a")},
    "datetime": {"x": datetime(2024, 1, 1)},
    "date": {"x": date(2024, 1, 1)},
    "object": {"x": object()},
    "complex": {"x": 1j},
    "cycle": _cycle(),
    "lone-surrogate": {"x": "a\ud800b"},
    "lone-surrogate-key": {"\udfff": 1},
    "big-int-and-nan": {"n": 2**70, "x": math.nan},
    "big-int-and-set": {"n": 2**70, "x": {1}},
    "big-int-and-int-key": {"n": 2**70, 7: 1},
    "big-int-and-colliding-keys": {"n": 2**70, 7: "int", "7": "str"},
    "big-int-and-none-key": {"n": 2**70, None: 1},
    "big-int-and-surrogate": {"n": 2**70, "x": "\ud800"},
    "5000-digit-int": {"n": 10**5000},
}


@pytest.mark.parametrize("value", list(_UNENCODABLE.values()), ids=list(_UNENCODABLE))
def test_encode_rejects_what_is_not_strict_json(value: dict[Any, Any]) -> None:
    """encode() raises EncodeError (a ValueError) for anything strict JSON cannot hold."""
    with pytest.raises(_json.EncodeError):
        _json.encode(value)


# Keys and strings that look like what the NaN screen searches for (null, key lines).
_TRICKY_TEXT = st.sampled_from(
    ["null", "nullable", 'a"null', "\\null", "x\\", "", "é", "/", "~1", '\n  "k": null']
) | st.text(max_size=6)
_MAYBE_NONFINITE = st.recursive(
    st.none()
    | st.floats()  # NaN and +-Infinity included
    | st.integers()
    | _TRICKY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_TRICKY_TEXT, children, max_size=5)
    ),
    max_leaves=30,
)


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nonfinite(v) for v in value)
    return False


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_TRICKY_TEXT, _MAYBE_NONFINITE, max_size=6))
def test_encode_rejects_nonfinite_floats_exactly_when_present(value: dict[str, Any]) -> None:
    """The NaN screen (which reads the floats' bits in marshal's bytes of the value)
    refuses every document with a NaN or Infinity anywhere, and nothing else."""
    if _has_nonfinite(value):
        with pytest.raises(_json.EncodeError):
            _json.encode_full(value)
    else:
        assert json.loads(_json.encode_full(value).data) == value


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"a": {"b": None, "c": {"d": math.nan}}}, "/a/c/d"),
        ({"a": {"null": math.inf, "b": None}}, "/a/null"),
        ({"a": {"b": "null", "c": [1, None, -math.inf]}}, "/a/c/2"),
        ({"a": {'x"null': math.nan}}, '/a/x"null'),
        ({"a": {"x\\": {"y": None, "z": math.nan}}}, "/a/x\\/z"),
        (
            {"big": {f"k{i}": {"v": i} for i in range(1000)}, "p": {"t": None, "m": math.nan}},
            "/p/m",
        ),
    ],
)
def test_encode_names_where_the_nonfinite_float_is(value: dict[str, Any], where: str) -> None:
    """The error names the path of the NaN or Infinity, however deep it is."""
    with pytest.raises(_json.EncodeError) as info:
        _json.encode_full(value)
    assert f"at {where} is not valid JSON" in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, None])
def test_nonfinite_screen_finds_a_nan_40_levels_deep(bad: float | None) -> None:
    """A NaN 40 levels deep, beside nulls at every level, is still found (and a None
    at that depth is still accepted)."""
    root: dict[str, Any] = {}
    node = root
    for i in range(40):
        node["sibling"] = None
        node[f"d{i}"] = {}
        node = node[f"d{i}"]
    node["x"] = bad
    if bad is None:
        assert json.loads(_json.encode(root)) == root
    else:
        with pytest.raises(_json.EncodeError):
            _json.encode(root)


def test_encode_rejects_deep_nesting_without_recursion_error() -> None:
    """100k levels of nesting raise EncodeError, not RecursionError."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(100_000):
        node["d"] = {}
        node = node["d"]
    with pytest.raises(_json.EncodeError):
        _json.encode(root)


_UNDECODABLE = {
    "empty": b"",
    "bom-only": b"\xef\xbb\xbf",
    "whitespace": b" \n",
    "truncated": b'{"a": ',
    "two-documents": b'{"a": 1}{"b": 2}',
    "trailing-nul": b'{"a": 1}\x00',
    "single-quotes": b"{'a': 1}",
    "trailing-comma": b'{"a": 1,}',
    "comment": b'{"a": 1 /* no */}',
    "array": b"[]",
    "string": b'"x"',
    "number": b"1.5",
    "null": b"null",
    "false": b"false",
    "nan": b'{"a": NaN}',
    "infinity": b'{"a": Infinity}',
    "minus-infinity": b'{"a": [-Infinity]}',
    "duplicate-keys": b'{"a": 1, "b": 2, "a": 1}',
    "nested-duplicate-keys": b'{"a": {"k": 1, "k": 1}}',
    "escaped-duplicate-keys": b'{"a": 1, "\\u0061": 2}',
    "invalid-utf8": b'{"a": "\xc3\x28"}',
    "overlong-utf8": b'{"a": "\xc0\xaf"}',
    "utf16": '{"a": 1}'.encode("utf-16"),
    "lone-surrogate-escape": b'{"a": "\\ud800"}',
    "deep-nesting": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep-unclosed-nesting": b"{" + b'"a": {' * 100_000,
    "5000-digit-int": b'{"a": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("raw", list(_UNDECODABLE.values()), ids=list(_UNDECODABLE))
def test_decode_rejects_what_is_not_one_strict_json_object(raw: bytes) -> None:
    """decode() raises DecodeError (a ValueError) for anything but one strict JSON object."""
    with pytest.raises(_json.DecodeError):
        _json.decode(raw)


def test_decode_reports_the_position_of_a_syntax_error() -> None:
    """The DecodeError of a syntax error says the line and column."""
    with pytest.raises(_json.DecodeError, match=r"line 2, column"):
        _json.decode(b'{"a": 1,\n "b": }')


def test_errors_are_value_errors() -> None:
    """EncodeError and DecodeError subclass ValueError, so callers can catch them generically."""
    assert issubclass(_json.EncodeError, ValueError)
    assert issubclass(_json.DecodeError, ValueError)


def test_big_floats_and_negative_zero_round_trip() -> None:
    """Extreme finite floats and -0.0 come back as the same float."""
    value = {"max": 1.7976931348623157e308, "tiny": 5e-324, "negzero": -0.0}
    back = _json.decode(_json.encode(value))
    assert back == value
    assert math.copysign(1.0, back["negzero"]) == -1.0


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_TRICKY_TEXT, JSON_VALUES, max_size=8))
def test_encoder_spans_match_a_scan_of_the_bytes(value: dict[str, Any]) -> None:
    """The spans the encoder finds from the keys it knows are exactly those a scan of
    the bytes finds, and each one holds exactly that member's value."""
    encoded = _json.encode_full(value)
    assert encoded.spans == _diff.top_level_spans(encoded.data)
    assert encoded.spans is not None
    for key, (start, end) in zip(value, encoded.spans.values(), strict=True):
        assert json.loads(encoded.data[start:end]) == value[key]


def test_an_enum_member_holding_nan_is_rejected() -> None:
    """orjson writes an Enum member as its value: a NaN value must not become null.

    A plain Enum member is refused whatever its value (it would read back as the value,
    see tests/test_json_types.py), so a NaN inside one never reaches the file either."""
    import enum

    class Level(enum.Enum):
        BAD = float("nan")
        OK = 1.5

    with pytest.raises(_json.EncodeError, match="Level at /level"):
        _json.encode({"level": Level.BAD, "t": None})
    big = {f"k{i}": {"v": i, "n": None} for i in range(2000)}  # a large document too
    with pytest.raises(_json.EncodeError):
        _json.encode({**big, "p": {"level": Level.BAD, "t": None}})
    with pytest.raises(_json.EncodeError, match="Level at /level"):
        _json.encode({"level": Level.OK, "t": None})


def _float_of_bits(bits: int) -> float:
    return float(struct.unpack("<d", bits.to_bytes(8, "little"))[0])


_NONFINITE_BITS = [
    0x7FF8000000000000,  # float("nan")
    0xFFF8000000000000,  # -nan, as C's 0.0 / 0.0 gives
    0x7FF0000000000001,  # a signalling NaN
    0x7FFFFFFFFFFFFFFF,  # NaN with every payload bit set
    0x7FF0000000000000,  # Infinity
    0xFFF0000000000000,  # -Infinity
]
_FINITE_BITS = [
    0x7FEFFFFFFFFFFFFF,  # the largest float: its last bytes are 0xEF 0x7F
    0xFFEFFFFFFFFFFFFF,  # and the most negative: 0xEF 0xFF
    0x3FFFFFFFFFFFFFFF,  # 0xFF bytes all through the mantissa
    0x0000000000000001,  # the smallest subnormal
    0x800000000000007F,  # -0.0's neighbour, ending in 0x7F
]


@pytest.mark.parametrize("bits", _NONFINITE_BITS, ids=hex)
@pytest.mark.parametrize("size", [1, 5000])
def test_every_nonfinite_bit_pattern_is_refused(bits: int, size: int) -> None:
    """Any NaN payload or sign, and both infinities, in a small and a large document,
    beside nulls and negative integers (whose bytes hold 0xFF too)."""
    doc: dict[str, Any] = {f"k{i}": {"v": -i, "n": None} for i in range(size)}
    doc["x"] = {"list": [1.5, None, _float_of_bits(bits)]}
    with pytest.raises(_json.EncodeError, match="at /x/list/2 is not valid JSON"):
        _json.encode_full(doc)


@pytest.mark.parametrize("bits", _FINITE_BITS, ids=hex)
def test_finite_floats_with_the_same_high_bytes_are_kept(bits: int) -> None:
    """Finite floats whose bytes hold 0x7F or 0xFF are written, and read back exactly."""
    value = _float_of_bits(bits)
    doc = {"x": value, "xs": [value, -value, None]}
    assert json.loads(_json.encode_full(doc).data) == doc


def test_a_document_of_negative_integers_still_has_its_nan_found() -> None:
    """Negative integers fill marshal's bytes with 0xFF: past the screen's budget it
    falls back to reading the document, and still finds the NaN (and passes without)."""
    doc: dict[str, Any] = {"ints": [-1] * 50_000, "n": None}
    assert json.loads(_json.encode_full(doc).data) == doc
    doc["x"] = math.nan
    with pytest.raises(_json.EncodeError, match="at /x is not valid JSON"):
        _json.encode_full(doc)


def test_one_nan_object_in_two_places_is_refused() -> None:
    """marshal writes a shared object once and refers back to it after: found anyway."""
    nan = float("nan")
    with pytest.raises(_json.EncodeError):
        _json.encode_full({"a": [nan, nan], "b": {"c": nan}})


def test_a_nan_beside_an_accepted_subclass_is_refused() -> None:
    """An IntEnum member (accepted, stored as its int) makes marshal refuse the value;
    the NaN is found by the walk instead."""
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    assert _json.encode_full({"level": Level.HIGH, "n": None}).data == (
        b'{\n  "level": 3,\n  "n": null\n}\n'
    )
    with pytest.raises(_json.EncodeError, match="at /x is not valid JSON"):
        _json.encode_full({"level": Level.HIGH, "x": -math.inf})


_ANY_FLOAT = st.integers(min_value=0, max_value=2**64 - 1).map(_float_of_bits)
_ANY_BITS_DOC = st.recursive(
    st.none() | _ANY_FLOAT | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _ANY_BITS_DOC, max_size=6))
def test_any_float_bits_are_refused_exactly_when_nonfinite(value: dict[str, Any]) -> None:
    """Floats drawn from all 2**64 bit patterns (so NaN payloads of every kind), among
    integers of every size and text: refused exactly when one is NaN or infinite."""
    if _has_nonfinite(value):
        with pytest.raises(_json.EncodeError):
            _json.encode_full(value)
    else:
        _json.encode_full(value)
