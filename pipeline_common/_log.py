"""The append-only transaction log: one JSON object per line, fsynced after each append.

The log is written after the commit, never before, so it never claims a commit that
did not happen. A crash during an append can leave a torn last line (or, after a
power loss, zeros or garbage: ALICE's default model); readers skip it, and the next
append first cuts the tail back to the last complete record.

Each record carries a sequence number, the generation it committed, the sha256 of
the committed bytes and the sha256 of the previous line, so edits and gaps show.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import _fs

__all__ = ["Tail", "TransactionLog", "line_hash", "parse_line", "read_lines"]

_BLOCK = 65536


@dataclass
class Tail:
    """The newest complete record, and where the log's clean end is."""

    seq: int = 0
    generation: int = 0
    line_hash: str = ""
    last_commit: dict[str, Any] | None = None  # newest successful record that committed bytes
    clean_size: int = 0  # bytes up to the last good record's newline; -1: none parses
    size: int = 0


class TransactionLog:
    """Append and read back the JSON Lines audit trail of one state file."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self._cache: tuple[int, int, Tail] | None = None  # (ino, size) -> tail
        self._seen = False  # whether the last tail() found the file

    # -- reading -------------------------------------------------------------

    def tail(self) -> Tail:
        """Return the newest complete record's facts (cached while the file is unchanged)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen = False
            return Tail()
        self._seen = True
        cache = self._cache
        if cache is not None and cache[0] == st.st_ino and cache[1] == st.st_size:
            return cache[2]
        tail = self._scan_tail(st.st_size)
        self._cache = (st.st_ino, st.st_size, tail)
        return tail

    def _scan_tail(self, size: int) -> Tail:
        tail = Tail(size=size, clean_size=-1)
        with open(self.path, "rb") as fh:
            for raw, line_end in _lines_backwards(fh, size):
                record = _parse(raw)
                if record is None:
                    continue
                if tail.clean_size < 0:
                    tail.seq = int(record.get("seq", 0))
                    tail.generation = int(record.get("generation", 0))
                    tail.line_hash = hashlib.sha256(raw).hexdigest()
                    tail.clean_size = line_end
                if record.get("success") and record.get("sha256"):
                    tail.last_commit = record
                    break
        return tail

    def read(self, limit: int | None = 50) -> list[dict[str, Any]]:
        """Records newest first; lines that do not parse (a torn tail) are skipped."""
        out: list[dict[str, Any]] = []
        if limit is not None and limit <= 0:
            return out
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return out
        with fh:
            size = fh.seek(0, os.SEEK_END)
            for raw, _ in _lines_backwards(fh, size):
                record = _parse(raw)
                if record is not None:
                    out.append(record)
                    if limit is not None and len(out) >= limit:
                        break
        return out

    # -- writing (under the state's lock) ------------------------------------

    def repair_tail(self, *, durable: bool = True) -> int:
        """Cut a torn or garbage tail back to the last complete record; return bytes cut."""
        tail = self.tail()
        if tail.clean_size < 0 or tail.size <= tail.clean_size:
            return 0
        path = str(self.path)
        fd = _fs.open_file(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            _fs.ftruncate(fd, tail.clean_size, path)
            if durable:
                _fs.fdatasync(fd, path)
        finally:
            os.close(fd)
        self._cache = None
        return tail.size - tail.clean_size

    def append(
        self, record: dict[str, Any], *, created_dir: Path | None = None, durable: bool = True
    ) -> dict[str, Any]:
        """Number ``record``, chain it to the previous line, append it and fsync.

        A torn or garbage tail left by a crash is cut off first, so a new record never
        lands on the end of a broken line. Returns the record as written.

        Raises:
            OSError: the append or its fsync failed (the caller decides what that means).
        """
        tail = self.tail()
        record = {
            "seq": tail.seq + 1,
            **record,
            "generation": tail.generation + (1 if record.get("commits") else 0),
            "prev": tail.line_hash or None,
        }
        record.pop("commits", None)
        raw = _encode_record(record)
        path = str(self.path)
        new_file = not self._seen  # tail() just looked (a stat less per commit)
        # Read-write: the tail checks below read the file through this descriptor.
        fd = _fs.open_file(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, self.mode)
        try:
            prefix = b""
            if tail.clean_size >= 0 and tail.size > tail.clean_size:
                # Cut a torn or garbage tail back to the last complete record.
                _fs.ftruncate(fd, tail.clean_size, path)
            elif tail.clean_size < 0 and tail.size > 0:
                if b"\n" not in os.pread(fd, tail.size, 0):
                    _fs.ftruncate(fd, 0, path)  # the torn first append of a crashed writer
                elif not _ends_with_newline(fd):
                    prefix = b"\n"  # no record parses at all: keep the bytes, start a new line
            _fs.write_all(fd, prefix + raw + b"\n", path)
            if durable:
                _fs.fdatasync(fd, path)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if new_file and created_dir is not None and durable:
            _fs.fsync_dir(str(created_dir))
        new_tail = Tail(
            seq=record["seq"],
            generation=record["generation"],
            line_hash=hashlib.sha256(raw).hexdigest(),
            last_commit=record
            if record.get("success") and record.get("sha256")
            else tail.last_commit,
            clean_size=st.st_size,
            size=st.st_size,
        )
        self._cache = (st.st_ino, st.st_size, new_tail)
        return record


_RECORD_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _encode_record(record: dict[str, Any]) -> bytes:
    """One compact UTF-8 JSON line. ``default=str``: a datetime or Path in txn.details
    must not fail a commit that already happened."""
    try:
        return orjson.dumps(record, default=str, option=_RECORD_OPTIONS)
    except TypeError:
        # Integers beyond 64 bits or non-string keys in details: the stdlib writes
        # those (and raises ValueError for what it cannot, which the caller reports).
        line = json.dumps(
            record, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
        )
        return line.encode("utf-8")


def read_lines(path: Path) -> list[bytes]:
    """Every line of the log, oldest first, without newlines; a torn tail is the last
    element when the file does not end with a newline (for verify)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """Parse one log line; None when it is not a JSON object (torn or garbage)."""
    return _parse(raw)


def line_hash(raw: bytes) -> str:
    """The chain hash of one line, as the next record's ``prev`` must carry it."""
    return hashlib.sha256(raw).hexdigest()


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _lines_backwards(fh: Any, size: int) -> Iterator[tuple[bytes, int]]:
    """Yield ``(line, end)`` for each newline-terminated line, newest first.

    ``end`` is the offset just past the line's newline. Bytes after the last newline
    (a torn tail) are not yielded.
    """
    pos = size
    rest = b""  # a line's right part whose left part is not read yet
    rest_end: int | None = None  # offset just past ``rest``'s newline; None: torn tail
    while pos > 0:
        start = max(0, pos - _BLOCK)
        fh.seek(start)
        data = fh.read(pos - start) + rest
        pos = start
        parts = data.split(b"\n")
        if len(parts) == 1 and start > 0:
            rest = data
            continue
        if rest_end is not None:
            yield parts[-1], rest_end
        if len(parts) == 1:  # the file's first line, already yielded (or torn)
            return
        # Offsets of the newline after each part, from the left of ``data``.
        ends = []
        offset = start
        for part in parts[:-1]:
            offset += len(part) + 1
            ends.append(offset)
        for i in range(len(parts) - 2, 0, -1):
            yield parts[i], ends[i]
        rest, rest_end = parts[0], ends[0]
        if start == 0:
            yield rest, rest_end
            return


def _parse(raw: bytes) -> dict[str, Any] | None:
    raw = raw.strip()
    if not raw or raw[:1] != b"{":
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) and _well_typed(value) else None


def _well_typed(value: dict[str, Any]) -> bool:
    """True when the record's fields have the types the library writes.

    Anything else (tampering, a foreign tool) is treated like a garbage line: skipped
    by readers and reported by verify().
    """
    for key, kinds in _FIELD_TYPES.items():
        if key in value and value[key] is not None and not isinstance(value[key], kinds):
            return False
    if type(value.get("seq", 0)) is not int or type(value.get("generation", 0)) is not int:
        return False  # bool is an int subclass; counters are plain ints
    stat = value.get("stat")
    return stat is None or (len(stat) == 2 and all(type(x) is int for x in stat))


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int,
    "generation": int,
    "timestamp": str,
    "operation": str,
    "success": bool,
    "details": dict,
    "sha256": str,
    "size": int,
    "stat": list,
    "changes": list,
    "duration_ms": (int, float),
    "pid": int,
    "host": str,
    "prev": str,
    "fence": int,
}
