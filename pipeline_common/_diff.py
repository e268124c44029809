"""Differences between two JSON documents, as JSON pointers (RFC 6901).

Two uses: the log's short change summary (which top-level keys changed), computed
from the committed bytes at C speed without a second parse; and ``state.diff()``,
a full structural diff for people at a REPL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["MISSING", "Change", "Diff", "changed_top_level", "diff", "pointer"]


class _Missing:
    """Stands for 'no value here' in a change (key added or removed)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def pointer(parts: Iterable[str | int]) -> str:
    """Build a JSON pointer from path parts (``~`` and ``/`` escaped).

    RFC 6901: no parts give ``""``, the whole document; ``"/"`` is the key ``""``.
    """
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(frozen=True)
class Change:
    """One difference: the value at ``pointer`` went from ``old`` to ``new``."""

    pointer: str
    old: Any
    new: Any

    @property
    def kind(self) -> str:
        """``added``, ``removed`` or ``changed``."""
        if self.old is MISSING:
            return "added"
        if self.new is MISSING:
            return "removed"
        return "changed"

    def __repr__(self) -> str:
        where = self.pointer or "(the whole document)"
        if self.kind == "added":
            return f"+ {where}: {_short(self.new)}"
        if self.kind == "removed":
            return f"- {where}: {_short(self.old)}"
        return f"~ {where}: {_short(self.old)} -> {_short(self.new)}"


class Diff(list[Change]):
    """A list of :class:`Change` with a readable multi-line repr (empty: identical)."""

    def __repr__(self) -> str:
        if not self:
            return "<Diff: identical>"
        lines = [f"<Diff: {len(self)} change{'s' if len(self) != 1 else ''}>"]
        lines.extend(f"  {c!r}" for c in self)
        return "\n".join(lines)

    __str__ = __repr__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diff(old: Any, new: Any) -> Diff:
    """Return every difference between two JSON values, in document order."""
    out = Diff()
    _walk(old, new, [], out)
    return out


def _walk(old: Any, new: Any, path: list[str | int], out: Diff) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                out.append(Change(pointer([*path, key]), old[key], MISSING))
            else:
                _walk(old[key], new[key], [*path, key], out)
        for key in new:
            if key not in old:
                out.append(Change(pointer([*path, key]), MISSING, new[key]))
        return
    if isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            if i >= len(new):
                out.append(Change(pointer([*path, i]), old[i], MISSING))
            elif i >= len(old):
                out.append(Change(pointer([*path, i]), MISSING, new[i]))
            else:
                _walk(old[i], new[i], [*path, i], out)
        return
    if type(old) is not type(new) or old != new:
        out.append(Change(pointer(path), old, new))


_KEY_START = b'\n  "'
# A JSON string's body up to its closing quote, then the member separator: an escaped
# quote or backslash inside the key (\" or \\) cannot end it.
_KEY_BODY = re.compile(rb'(?:[^"\\\n]|\\.)*": ')
_SPACE = b" \t\r\n"


def _top_level_spans(data: bytes) -> dict[bytes, tuple[int, int]] | None:
    """Find each top-level key's value in canonical (2-space indented) JSON bytes.

    Returns ``{key bytes: (start, end)}`` offsets into ``data``, copying nothing but
    the keys: top-level keys are the only lines that start with exactly two spaces
    and a quote, and strings cannot hold raw newlines, so the scan is exact. Returns
    None when the bytes are not in that form.
    """
    end = len(data)
    while end and data[end - 1] in _SPACE:
        end -= 1
    if not data.startswith(b"{") or end < 2:
        return None
    if end == 2 and data[1:2] == b"}":
        return {}
    if data[end - 2 : end] != b"\n}":
        return None
    close = end - 2
    spans: dict[bytes, tuple[int, int]] = {}
    pos = data.find(_KEY_START, 0, close)
    while pos >= 0:
        key_start = pos + len(_KEY_START)
        match = _KEY_BODY.match(data, key_start, close)
        if match is None:
            return None
        key_end = match.end() - 3
        nxt = data.find(_KEY_START, key_end, close)
        value_end = nxt if nxt >= 0 else close
        if data[value_end - 1] == 0x2C:  # the comma between members
            value_end -= 1
        spans[data[key_start:key_end]] = (key_end + 3, value_end)
        pos = nxt
    return spans


Spans = dict[bytes, tuple[int, int]]


def top_level_spans(data: bytes) -> Spans | None:
    """Public name of the span scan, for the encoder and the commit path."""
    return _top_level_spans(data)


def changed_top_level(
    old: bytes | None,
    new: bytes,
    *,
    old_spans: Spans | None = None,
    new_spans: Spans | None = None,
) -> list[str] | None:
    """Pointers of the top-level keys that differ between two committed versions.

    Works on the bytes this library writes, comparing spans in place (no copies of
    large values); returns None when either side is in another form (a hand-written
    file), so the caller can say "unknown". Spans already known (from the encoder, or
    cached from the previous commit) are passed in to skip a scan of 10 MB.
    """
    if new_spans is None:
        new_spans = _top_level_spans(new)
    if old is None:
        old_spans = {}
    elif old_spans is None:
        old_spans = _top_level_spans(old)
    if new_spans is None or old_spans is None:
        return None
    old = old or b""
    view = memoryview(new)
    keys = []
    for key, (a, b) in old_spans.items():
        span = new_spans.get(key)
        if (
            span is None
            or span[1] - span[0] != b - a
            or not old.startswith(view[span[0] : span[1]], a)  # compared in place, no copy
        ):
            keys.append(key)
    keys += [k for k in new_spans if k not in old_spans]
    return [pointer([_unescape(k)]) for k in keys]


def _unescape(key: bytes) -> str:
    import json

    try:
        return str(json.loads(b'"' + key + b'"'))
    except ValueError:
        return key.decode("utf-8", "replace")
