"""Strict JSON both ways: what is written is standard JSON, what is read is checked.

orjson does the work (the stdlib encoder drops to pure Python with ``indent``: 7.5 ms
against 0.14 ms at 100 KB). Where orjson is lenient, this module is not:

- orjson writes NaN and Infinity as ``null``; they are rejected instead.
- orjson keeps the last of duplicate keys; duplicates are rejected.
- orjson cannot write integers beyond 64 bits; those fall back to the stdlib encoder,
  which writes them exactly.
- What you write is what you read: a value is accepted only if it reads back as the
  same JSON type. orjson would silently store a UUID as a string, an Enum member as
  its value and a datetime or dataclass as a string or object: those are rejected
  (see ``ACCEPTED``). Subclasses of str, int, dict and list (a ``StrEnum`` member,
  an ``OrderedDict``) are stored as the base type's value, and a tuple as a list.
"""

from __future__ import annotations

import enum
import json
import marshal
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic_core

from . import _diff

__all__ = [
    "ACCEPTED",
    "DecodeError",
    "EncodeError",
    "Encoded",
    "decode",
    "encode",
    "encode_ex",
    "encode_full",
    "has_long_integers",
]

_LONG_DIGITS = re.compile(rb"\d{19}")

ACCEPTED = (dict, list, tuple, str, int, float, bool, type(None))
"""The types a state may hold (dict keys: ``str`` only). Also accepted: instances of
subclasses of ``str``, ``int``, ``dict`` and ``list`` (stored as the base type: an
``IntEnum`` member as its int, an ``OrderedDict`` as an object). A tuple is stored as
a list. Everything else is rejected, whether or not orjson could convert it."""

_EXACT = frozenset(ACCEPTED)
_SUBCLASSABLE = (str, int, dict, list)


def has_long_integers(data: bytes) -> bool:
    """True when ``data`` may hold an integer orjson would read back as a float."""
    return _LONG_DIGITS.search(data) is not None


_OPTIONS = (
    orjson.OPT_INDENT_2
    | orjson.OPT_APPEND_NEWLINE
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_BOM = b"\xef\xbb\xbf"


class EncodeError(ValueError):
    """The value is not strict JSON (the reason is the message)."""


class DecodeError(ValueError):
    """The bytes are not a strict JSON object (the reason is the message)."""


def _reject_nonfinite(value: Any, where: str = "") -> None:
    """Raise EncodeError at the first NaN or Infinity inside ``value`` (found at ``where``)."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        where, item = stack.pop()
        kind = type(item)
        if kind is dict or isinstance(item, dict):
            stack.extend((f"{where}/{k}", v) for k, v in item.items())
        elif kind is list or isinstance(item, (list, tuple)):
            stack.extend((f"{where}/{i}", v) for i, v in enumerate(item))
        elif isinstance(item, enum.Enum):
            stack.append((where, item.value))  # orjson writes a member as its value
        elif isinstance(item, float) and not math.isfinite(item):
            raise EncodeError(
                f"{item!r} at {where or '/'} is not valid JSON (NaN and Infinity are not)"
            )


def encode(value: Any) -> bytes:
    """Serialize ``value`` to indented, newline-terminated UTF-8 JSON (see :func:`encode_ex`)."""
    return encode_ex(value)[0]


@dataclass(frozen=True)
class Encoded:
    """Serialized state: the bytes, whether they hold integers beyond 64 bits (orjson
    would read those back as floats, so readers must take the exact path), and the
    top-level value spans (None when not in canonical form)."""

    data: bytes
    long_ints: bool
    spans: _diff.Spans | None


def encode_ex(value: Any) -> tuple[bytes, bool]:
    """Serialize ``value``; also say whether it holds integers beyond 64 bits."""
    encoded = encode_full(value)
    return encoded.data, encoded.long_ints


def encode_full(value: Any) -> Encoded:
    """Serialize ``value`` with everything the commit path needs to know about it.

    Raises:
        EncodeError: NaN/Infinity, a non-string key, a cycle, a lone surrogate, or a
            value of a type JSON does not have (set, bytes, datetime, ...).
    """
    try:
        out = orjson.dumps(value, option=_OPTIONS)
    except TypeError as exc:
        text = str(exc)
        if "64-bit" in text:
            data = _encode_stdlib(value)
            _reject_converted(value)
            return Encoded(data, True, _diff.top_level_spans(data))
        if "Recursion limit" in text:
            raise EncodeError("the data is nested too deeply or contains a cycle") from exc
        _reject_converted(value, screened=False)  # names the value, where, what to do
        raise EncodeError(text) from exc
    image = _reject_converted(value)
    # NaN and Infinity come out of orjson as null. marshal's bytes of the value, made by
    # the type screen, show every float's bits: when they prove there is none of those,
    # nothing more is done; otherwise a value whose output holds a null is looked into.
    if (image is None or _may_hold_nonfinite(image)) and b"null" in out:
        _check_finite(value, "")
    spans = _spans_of(value, out) if isinstance(value, dict) else None
    return Encoded(out, False, spans)


_FLOAT_TYPES = (ord("g"), ord("g") | 0x80)  # marshal's binary float, without and with FLAG_REF


def _may_hold_nonfinite(image: bytes) -> bool:
    """False when ``image`` (``marshal.dumps`` of a value) proves the value holds no NaN
    or Infinity; True when it may.

    marshal writes a float as a type byte and its 8 IEEE 754 bytes, little-endian. NaN
    and +-Infinity, and only they, have all 11 exponent bits set: their last byte is
    0x7F or 0xFF and the one before it at least 0xF0. Those two byte values are rare
    (UTF-8 text never holds 0xFF), so each is found at memchr speed and looked at: 2 ms
    for 10 MB, against 6 ms for the search of orjson's output for nulls it replaces.
    A document full of them (negative integers, say) exhausts the budget: "may".
    """
    budget = 64 + len(image) // 256
    for byte in (0x7F, 0xFF):
        pos = image.find(byte, 8)
        while pos >= 0:
            if image[pos - 8] in _FLOAT_TYPES and image[pos - 1] >= 0xF0:
                return True
            budget -= 1
            if budget < 0:
                return True
            pos = image.find(byte, pos + 1)
    return False


def _spans_of(value: dict[str, Any], out: bytes) -> _diff.Spans | None:
    """The top-level spans of ``out``, which orjson just made from ``value``.

    The keys and their order are known, so each member's key line is searched for
    as a whole (twice as fast as scanning for any key line); none can occur inside
    another member's value, where lines are indented deeper.
    """
    if not value:
        return {}
    close = len(out) - 3
    if not out.endswith(b"\n}\n"):
        return None
    spans: _diff.Spans = {}
    previous: bytes | None = None
    start = 1
    for key in value:
        quoted = orjson.dumps(key)
        header = b"\n  " + quoted + b": "
        at = out.find(header, start, close)
        if previous is None:
            if at != 1:  # the first member starts right after the brace
                return None
        elif at < 0:
            return None
        else:
            spans[previous] = (start, at - 1 if out[at - 1] == 0x2C else at)
        previous, start = quoted[1:-1], at + len(header)
    assert previous is not None
    spans[previous] = (start, close)
    return spans


def _check_finite(value: Any, where: str) -> None:
    # A second, Rust-speed encoding spells NaN/Infinity out; only then walk in Python.
    try:
        spelled = pydantic_core.to_json(value, inf_nan_mode="constants")
    except Exception:  # noqa: BLE001 - any doubt means: look properly
        spelled = b"NaN"
    if b"NaN" in spelled or b"Infinity" in spelled:
        _reject_nonfinite(value, where)


def _reject_converted(value: Any, *, screened: bool = True) -> bytes | None:
    """Raise EncodeError at the first value that is not of an :data:`ACCEPTED` type.

    ``marshal`` screens the whole value at C speed first (2.5 us at 1 KB, about as long
    as orjson's own pass at 1 MB): it fails on any object that is not of an exact
    built-in type, and orjson has already refused the built-ins JSON lacks (set, bytes,
    complex). Only then is the value walked in Python, to tell an accepted subclass
    from a converted type and to say where it is. Returns marshal's bytes when that
    screen passed (the NaN screen reads the floats there), else None.
    """
    if screened:
        try:
            return marshal.dumps(value)
        except (ValueError, RecursionError):
            pass
    found = _first_converted(value)
    if found is not None:
        where, item, is_key = found
        raise EncodeError(_converted_message(where, item, is_key=is_key))
    return None


def _first_converted(value: Any) -> tuple[str, Any, bool] | None:
    """``(where, value, is_key)`` of the first object of a type not accepted, or None."""
    stack: list[tuple[str, Any]] = [("", value)]
    seen: set[int] = set()
    while stack:
        where, item = stack.pop()
        kind = type(item)
        if kind is dict or kind is list or kind is tuple or isinstance(item, (dict, list)):
            if id(item) in seen:
                continue  # a cycle: orjson reports it
            seen.add(id(item))
            if isinstance(item, dict):
                for key, val in item.items():
                    if type(key) is not str:
                        return f"{where}/{key!r}", key, True
                    stack.append((f"{where}/{key}", val))
            else:
                stack.extend((f"{where}/{i}", v) for i, v in enumerate(item))
        elif kind not in _EXACT and not isinstance(item, _SUBCLASSABLE):
            return where, item, False
    return None


def _converted_message(where: str, item: Any, *, is_key: bool) -> str:
    kind = type(item)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    if is_key:
        return (
            f"the key {item!r} at {where} is a {name}, not a str: JSON keys are strings, "
            "so it would read back as another key; convert it with str()"
        )
    hint = "convert it to one of those yourself"
    if isinstance(item, enum.Enum):
        hint = (
            f"it would be stored as its value {item.value!r}; store {kind.__name__}."
            f"{item.name}.value, or make the Enum subclass str or int (class "
            f"{kind.__name__}(str, Enum))"
        )
    elif kind.__module__ == "uuid":
        hint = "it would be stored as a string; store str(value)"
    elif kind.__module__ == "datetime":
        hint = "store value.isoformat()"
    elif kind.__module__ == "decimal":
        hint = "store str(value) (exact) or float(value)"
    elif kind.__module__ == "numpy":
        hint = "store value.item() (a scalar) or value.tolist() (an array)"
    elif kind.__module__ == "orjson":
        hint = "store the parsed value, not a Fragment of raw JSON"
    elif isinstance(item, float):
        hint = "store float(value)"
    elif isinstance(item, tuple):
        hint = "store list(value) or value._asdict()"
    elif isinstance(item, (set, frozenset)):
        hint = "store sorted(value) (a list)"
    elif isinstance(item, (bytes, bytearray, memoryview)):
        hint = "store text: value.decode() or base64"
    elif hasattr(kind, "__dataclass_fields__"):
        hint = "store dataclasses.asdict(value)"
    return (
        f"{name} at {where or '/'} is not a JSON type (a state holds dicts with str keys, "
        "lists, tuples, str, int, float, bool and None, and subclasses of str, int, "
        f"dict and list), and would not read back as what was written: {hint}"
    )


def _reject_non_string_keys(value: Any) -> None:
    # json.dumps would turn int/float/bool/None keys into strings, possibly colliding
    # with a real string key: refuse them, as orjson does.
    stack: list[Any] = [value]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue  # a cycle: json.dumps reports it
            seen.add(id(item))
        if isinstance(item, dict):
            for key, val in item.items():
                if not isinstance(key, str):
                    raise EncodeError(f"Dict key must be str, not {type(key).__name__}")
                stack.append(val)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _encode_stdlib(value: Any) -> bytes:
    # Only for integers beyond 64 bits, which orjson refuses and json writes exactly.
    _reject_non_string_keys(value)
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8") + b"\n"
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise EncodeError(str(exc)) from exc


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, val in pairs:
        if key in result:
            raise DecodeError(f"duplicate key {key!r}")
        result[key] = val
    return result


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf: not representable, refuse it
        raise DecodeError(f"the number {text} is too large for a float")
    return value


def decode(data: bytes, *, trusted: bool = False) -> dict[str, Any]:
    """Parse bytes that must hold one strict JSON object.

    A UTF-8 BOM is accepted. ``trusted`` bytes (the very file this library committed,
    recognised by the log) are parsed directly. Other bytes in this library's
    canonical form are checked by re-encoding them, which is cheaper than the
    stdlib's pair hook; any other text goes through the stdlib parser with duplicate
    keys and NaN rejected.

    Raises:
        DecodeError: empty, not UTF-8, not JSON, NaN, duplicate keys, too deep, or not
            an object at the top level.
    """
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    if not data or data.isspace():
        raise DecodeError("the file is empty")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        fast_error: str | None = str(exc)
    else:
        fast_error = None
        if not isinstance(value, dict):
            raise DecodeError(f"the top level is a JSON {_kind(value)}, not an object")
        if trusted:
            return value
        try:
            canonical = orjson.dumps(value, option=_OPTIONS) == data
        except TypeError:
            canonical = False
        if canonical:
            return value
    return _decode_stdlib(data, fast_error)


def _decode_stdlib(data: bytes, fast_error: str | None) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs_without_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except DecodeError:
        raise
    except json.JSONDecodeError as exc:
        raise DecodeError(
            f"not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise DecodeError("nested too deeply to parse") from exc
    except ValueError as exc:  # e.g. an integer over 4300 digits
        raise DecodeError(f"not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"the top level is a JSON {_kind(value)}, not an object")
    if fast_error is not None and "surrogate" in fast_error:
        # The stdlib accepts lone surrogate escapes that orjson rightly refused.
        raise DecodeError(f"not valid JSON ({fast_error})")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"
