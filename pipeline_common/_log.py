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
from ._time import now_iso

__all__ = ["Tail", "TransactionLog", "line_hash", "parse_line", "read_lines", "read_log"]

_BLOCK = 65536
_TAIL_BLOCK = 4096  # a few records: the tail is usually found in the first read


@dataclass
class Tail:
    """The newest good record, and where the log's clean end is.

    ``[clean_size, end)`` holds complete lines after the newest good record that are
    damage (they do not parse, or do not chain to the line before them): kept, and
    moved to the ``.damaged`` file by the next append. ``[end, size)`` is a torn append
    (no newline yet): cut.
    """

    seq: int = 0
    generation: int = 0
    line_hash: str = ""
    last_commit: dict[str, Any] | None = None  # newest successful record that committed bytes
    clean_size: int = 0  # bytes up to the last good record's newline; -1: none is good
    size: int = 0
    end: int = 0  # bytes up to the last newline: every complete line ends by here
    found: bool = False  # the log file existed when read
    writes: int = 0  # this process's count of log writes when read (see append)


class TransactionLog:
    """Append and read back the JSON Lines audit trail of one state file.

    Nothing about the file is remembered between calls: the tail is read afresh each
    time (about 2 us), since no cheap proof (size, mtime, inode) shows that another
    process did not change the file in between.
    """

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self.damaged_path = path.with_name(path.name + ".damaged")

    # -- reading -------------------------------------------------------------

    def tail(self) -> Tail:
        """Return the newest good record's facts, read from the file now."""
        writes = _writes[0]
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return Tail(writes=writes)
        try:
            tail = _scan_tail(_Reader(fd), os.fstat(fd).st_size)
        finally:
            os.close(fd)
        tail.found, tail.writes = True, writes
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

    def repair_tail(self, *, durable: bool = True) -> tuple[int, int]:
        """Move damaged last lines aside and cut a torn tail; return (lines moved, bytes cut)."""
        tail = self.tail()
        if tail.size <= max(tail.clean_size, 0):
            return 0, 0
        _writes[0] += 1
        path = str(self.path)
        fd = _fs.open_file(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            moved = self._set_aside(fd, tail, durable=durable)
            if durable:
                _fs.fdatasync(fd, path)
        finally:
            os.close(fd)
        return moved, tail.size - tail.end

    def _set_aside(self, fd: int, tail: Tail, *, durable: bool) -> int:
        """Copy the damaged complete lines to the ``.damaged`` file (durably), then cut
        the log back to its last good record. A complete line is never dropped."""
        start = max(tail.clean_size, 0)
        moved = 0
        if tail.end > start:
            damaged = os.pread(fd, tail.end - start, start)
            moved = damaged.count(b"\n")
            header = (
                f"# {moved} damaged line(s) moved here from {self.path.name} (bytes {start}-"
                f"{tail.end}) at {now_iso()} by pid {os.getpid()}; each line as it was:\n"
            ).encode()
            aside = str(self.damaged_path)
            out = _fs.open_file(
                aside, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, self.mode
            )
            try:
                _fs.write_all(out, header + damaged, aside)
                if durable:
                    _fs.fsync(out, aside)
            finally:
                os.close(out)
        _fs.ftruncate(fd, start, str(self.path))
        return moved

    def append(
        self,
        record: dict[str, Any],
        *,
        created_dir: Path | None = None,
        durable: bool = True,
        tail: Tail | None = None,
    ) -> dict[str, Any]:
        """Number ``record``, chain it to the previous line, append it and fsync.

        A torn tail left by a crash is cut off first, and damaged last lines are moved
        to the ``.damaged`` file, so a new record never lands on the end of a broken
        line. Returns the record as written.

        ``tail``: the tail the caller read earlier in the same hold of the state's
        lock, to spare a second read. It is used only when this process wrote nothing
        to any log since (the write count is unchanged); the proof that no other
        process wrote in between is the caller's: only holders of the lock append to
        or cut the log, and it must have held the lock throughout (never pass a tail
        read under a lock that can be lost, like the Redis one).

        Raises:
            OSError: the append or its fsync failed (the caller decides what that means).
        """
        if tail is None or tail.writes != _writes[0]:
            tail = self.tail()
        _writes[0] += 1  # before anything is written: a failed append spoils held tails too
        record = {
            "seq": tail.seq + 1,
            **record,
            "generation": tail.generation + (1 if record.get("commits") else 0),
            "prev": tail.line_hash or None,
        }
        record.pop("commits", None)
        raw = _encode_record(record)
        path = str(self.path)
        new_file = not tail.found  # the tail's read just looked (a stat less per commit)
        # Read-write: damaged lines are read through this descriptor to be moved aside.
        fd = _fs.open_file(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, self.mode)
        try:
            if tail.size > max(tail.clean_size, 0):
                self._set_aside(fd, tail, durable=durable)
            _fs.write_all(fd, raw + b"\n", path)
            if durable:
                _fs.fdatasync(fd, path)
        finally:
            os.close(fd)
        if new_file and created_dir is not None and durable:
            _fs.fsync_dir(str(created_dir))
        return record


# Log writes (appends, cuts) made by this process, in any log: a tail read before the
# count last moved is not passed on to an append. A list, so it is changed in place.
_writes = [0]

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


def read_log(path: Path) -> tuple[list[bytes], bytes]:
    """The log's complete lines, oldest first, without newlines, and the torn bytes
    after the last newline (``b""`` when the file ends with one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], b""
    lines = data.split(b"\n")
    return lines[:-1], lines[-1]


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """Parse one log line; None when it is not a JSON object (torn or garbage)."""
    return _parse(raw)


def line_hash(raw: bytes) -> str:
    """The chain hash of one line, as the next record's ``prev`` must carry it."""
    return hashlib.sha256(raw).hexdigest()


class _Reader:
    """``seek``/``read`` over ``pread`` on a raw descriptor: no buffered file object
    for the few kilobytes a tail read needs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data


def _scan_tail(fh: Any, size: int) -> Tail:
    """Find the newest good record (it parses and chains to the line before it) and
    the newest commit record, reading back from the end."""
    tail = Tail(size=size, clean_size=-1)
    candidate: tuple[dict[str, Any], bytes, int] | None = None  # awaiting its chain check
    found_end = False
    for raw, line_end in _lines_backwards(fh, size, _TAIL_BLOCK):
        if not found_end:
            tail.end, found_end = line_end, True
        if candidate is not None:
            if _chains(candidate[0], raw):
                _accept(tail, *candidate)
            candidate = None
            if tail.last_commit is not None:
                return tail
        record = _parse(raw)
        if record is None:
            continue
        if tail.clean_size < 0:
            candidate = (record, raw, line_end)
        elif record.get("success") and record.get("sha256"):
            tail.last_commit = record
            return tail
    if candidate is not None and _chains(candidate[0], None):  # the file's first line
        _accept(tail, *candidate)
    return tail


def _chains(record: dict[str, Any], before: bytes | None) -> bool:
    """True when ``record`` names the line before it (None: it is the first line)."""
    if "prev" not in record:
        return True  # written before records were chained
    return bool(record["prev"] == (None if before is None else line_hash(before)))


def _accept(tail: Tail, record: dict[str, Any], raw: bytes, line_end: int) -> None:
    tail.seq = int(record.get("seq", 0))
    tail.generation = int(record.get("generation", 0))
    tail.line_hash = line_hash(raw)
    tail.clean_size = line_end
    if record.get("success") and record.get("sha256"):
        tail.last_commit = record


def _lines_backwards(fh: Any, size: int, block: int = _BLOCK) -> Iterator[tuple[bytes, int]]:
    """Yield ``(line, end)`` for each newline-terminated line, newest first.

    ``end`` is the offset just past the line's newline. Bytes after the last newline
    (a torn tail) are not yielded.
    """
    pos = size
    rest = b""  # a line's right part whose left part is not read yet
    rest_end: int | None = None  # offset just past ``rest``'s newline; None: torn tail
    while pos > 0:
        start = max(0, pos - block)
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
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # integers beyond 64 bits, which orjson refuses
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
