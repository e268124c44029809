"""Strict JSON both ways: what is written is standard JSON, what is read is checked.

orjson does the work (the stdlib encoder drops to pure Python with ``indent``: 7.5 ms
against 0.14 ms at 100 KB). Where orjson is lenient, this module is not:

- orjson writes NaN and Infinity as ``null``; they are rejected instead.
- orjson keeps the last of duplicate keys; duplicates are rejected.
- orjson cannot write integers beyond 64 bits; those fall back to the stdlib encoder,
  which writes them exactly.
- datetime and dataclass instances are rejected (orjson would convert them silently).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic_core

from . import _diff

__all__ = [
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


def _reject_nonfinite(value: Any) -> None:
    """Raise EncodeError at the first NaN or Infinity inside ``value``."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        kind = type(item)
        if kind is dict or isinstance(item, dict):
            stack.extend((f"{where}/{k}", v) for k, v in item.items())
        elif kind is list or isinstance(item, (list, tuple)):
            stack.extend((f"{where}/{i}", v) for i, v in enumerate(item))
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
            return Encoded(data, True, _diff.top_level_spans(data))
        if "Recursion limit" in text:
            raise EncodeError("the data is nested too deeply or contains a cycle") from exc
        raise EncodeError(text) from exc
    spans = _diff.top_level_spans(out) if isinstance(value, dict) else None
    # NaN and Infinity come out of orjson as null, so only a value whose output holds a
    # null can hide one: look closer at those top-level values alone.
    if b"null" in out:
        if spans is not None and len(spans) == len(value):
            for (key, item), (start, end) in zip(value.items(), spans.values(), strict=True):
                if out.find(b"null", start, end) >= 0:
                    _check_finite({key: item})
        else:
            _check_finite(value)
    return Encoded(out, False, spans)


def _check_finite(value: Any) -> None:
    # A second, Rust-speed encoding spells NaN/Infinity out; only then walk in Python.
    try:
        spelled = pydantic_core.to_json(value, inf_nan_mode="constants")
    except Exception:  # noqa: BLE001 - any doubt means: look properly
        spelled = b"NaN"
    if b"NaN" in spelled or b"Infinity" in spelled:
        _reject_nonfinite(value)


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
