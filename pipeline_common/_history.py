"""REPL-friendly views of a state's history: log records, backups, reports.

Plain frozen dataclasses with one-line reprs, so ``state.history()`` and
``state.backups()`` read well at a Python prompt.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["BackupInfo", "Check", "HistoryRecord", "LockInfo", "RepairReport", "VerifyReport"]


@dataclass(frozen=True)
class HistoryRecord:
    """One transaction log record. ``raw`` holds every field as written."""

    seq: int
    generation: int
    timestamp: str
    operation: str
    success: bool
    details: dict[str, Any]
    sha256: str | None
    changes: list[str] | None
    duration_ms: float | None
    pid: int | None
    host: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> HistoryRecord:
        """Build a record from a parsed log line (missing fields become None)."""
        return cls(
            seq=int(raw.get("seq", 0)),
            generation=int(raw.get("generation", 0)),
            timestamp=str(raw.get("timestamp", "")),
            operation=str(raw.get("operation", "")),
            success=bool(raw.get("success", False)),
            details=dict(raw.get("details") or {}),
            sha256=raw.get("sha256"),
            changes=raw.get("changes"),
            duration_ms=raw.get("duration_ms"),
            pid=raw.get("pid"),
            host=raw.get("host"),
            raw=raw,
        )

    @property
    def commits(self) -> bool:
        """True when this record committed a new version of the state."""
        return self.success and self.sha256 is not None

    def __repr__(self) -> str:
        outcome = "ok" if self.success else "FAILED"
        parts = [f"#{self.seq}", f"gen {self.generation}", self.timestamp, repr(self.operation)]
        parts.append(outcome)
        if self.duration_ms is not None:
            parts.append(f"{self.duration_ms:.1f} ms")
        if self.changes:
            shown = ", ".join(self.changes[:4]) + (" ..." if len(self.changes) > 4 else "")
            parts.append(f"changed {shown}")
        error = self.details.get("error")
        if error:
            parts.append(f"error: {' '.join(str(error).split())[:80]}")  # one line, always
        return "<" + " ".join(parts) + ">"


@dataclass(frozen=True)
class BackupInfo:
    """One backup: where it is and which committed version it holds."""

    path: Path
    generation: int | None
    created: datetime
    size: int
    operation: str | None
    compressed: bool = False

    def read_bytes(self) -> bytes:
        """The state bytes this backup holds (decompressed when ``compressed``)."""
        data = self.path.read_bytes()
        return gzip.decompress(data) if self.compressed else data

    def read(self) -> dict[str, Any]:
        """The state this backup holds, parsed."""
        value = json.loads(self.read_bytes())
        return value if isinstance(value, dict) else {}

    def __repr__(self) -> str:
        gen = "gen ?" if self.generation is None else f"gen {self.generation}"
        op = f" {self.operation!r}" if self.operation else ""
        return (
            f"<BackupInfo {self.path.name} {gen}{op} "
            f"{self.created.isoformat(timespec='seconds')} {self.size} bytes>"
        )


@dataclass(frozen=True)
class Check:
    """One integrity check: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str = ""

    def __repr__(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"[{mark}] {self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class VerifyReport:
    """The result of ``state.verify()``: truthy when every check passed."""

    path: Path
    checks: tuple[Check, ...]

    def __bool__(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.ok]

    def __repr__(self) -> str:
        head = "healthy" if self else f"{len(self.problems)} problem(s)"
        return "\n".join(
            [f"<VerifyReport {self.path}: {head}>", *(f"  {c!r}" for c in self.checks)]
        )

    __str__ = __repr__


@dataclass(frozen=True)
class RepairReport:
    """What ``state.repair()`` did; empty ``actions`` means nothing needed fixing."""

    path: Path
    actions: tuple[str, ...]
    remaining: tuple[Check, ...] = ()

    def __bool__(self) -> bool:
        return not self.remaining

    def __repr__(self) -> str:
        lines = [f"<RepairReport {self.path}: {len(self.actions)} action(s)>"]
        lines += [f"  fixed: {a}" for a in self.actions] or ["  nothing to fix"]
        lines += [f"  still: {c!r}" for c in self.remaining]
        return "\n".join(lines)

    __str__ = __repr__


@dataclass(frozen=True)
class LockInfo:
    """Whether the state's lock is held right now, and what its holder recorded."""

    lock_file: Path
    held: bool
    holder: dict[str, Any] | None

    def __repr__(self) -> str:
        if not self.held:
            return f"<LockInfo {self.lock_file}: free>"
        h = self.holder or {}
        return (
            f"<LockInfo {self.lock_file}: held by pid {h.get('pid')} on {h.get('host')} "
            f"since {h.get('since')} for {h.get('operation')!r}>"
        )
