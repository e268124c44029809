"""The ``pipeline-state`` command: look at, check and repair a pipeline's state file.

Built on the public API only (``PipelineState``, ``ProgressTracker``); never imported
by ``pipeline_common/__init__.py``. Run ``pipeline-state --help``, or see docs/cli.md.

Exit codes::

    0  ok
    1  a problem was found (verify, repair, a failed pipeline or stage), or nothing was done
    2  usage error: bad arguments, an unknown backup, generation or stage, no terminal to
       ask, a MODULE:ATTR that does not name a Pipeline, a plan that is refused
    3  the state's lock was not obtained in time, or another runner holds the stage
    4  the state file cannot be read (missing, corrupt, not a JSON object)
    5  a stage's prerequisites have not succeeded (run: nothing was written)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

from pydantic import BaseModel

# The public API only: what the package exports, and the progress module.
from . import (
    MISSING,
    BackupInfo,
    Change,
    Diff,
    HistoryRecord,
    Pipeline,
    PipelineState,
    PlanError,
    PrerequisiteError,
    StageBusyError,
    StageFailedError,
    StateError,
    StateLockError,
    StateReadError,
    StateSidecarError,
    __version__,
)
from .pipeline import reset_stages
from .progress import ProgressError, ProgressTracker

__all__ = [
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_PREREQUISITES",
    "EXIT_PROBLEM",
    "EXIT_UNREADABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_UNREADABLE = 4
EXIT_PREREQUISITES = 5
_EXIT_INTERRUPTED = 130

PROG = "pipeline-state"
_FINISHED = ("success", "failed")


class CliError(Exception):
    """An error the CLI reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- output --------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STYLES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
_STATUS_STYLE = {
    "success": "green",
    "failed": "red",
    "running": "yellow",
    "pending": "dim",
    "skipped": "dim",
}


@dataclass
class Output:
    """Where results go, and whether it is a terminal that gets colour and bars."""

    stream: TextIO
    tty: bool
    color: bool

    @classmethod
    def for_stream(cls, stream: TextIO) -> Output:
        """Describe ``stream``: colour only on a terminal, and not when NO_COLOR is set.

        NO_COLOR follows https://no-color.org: present and not empty disables colour.
        """
        tty = _isatty(stream)
        color = tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        return cls(stream, tty, color)

    def paint(self, text: str, *styles: str) -> str:
        """Wrap ``text`` in ANSI codes when colour is on; return it unchanged otherwise."""
        if not self.color or not styles or not text:
            return text
        codes = ";".join(_STYLES[s] for s in styles if s in _STYLES)
        return f"\x1b[{codes}m{text}\x1b[0m"

    def status(self, status: str, width: int = 0) -> str:
        """A phase or pipeline status, padded to ``width``, coloured by meaning."""
        return self.paint(status.ljust(width), _STATUS_STYLE.get(status, "bold"))

    def line(self, text: str = "") -> None:
        """Write one line."""
        self.stream.write(text + "\n")

    def json(self, value: Any) -> None:
        """Write ``value`` as indented JSON (the stable, scriptable form)."""
        self.stream.write(_dumps(value, indent=2) + "\n")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _dumps(value: Any, *, indent: int | None = None) -> str:
    separators = (",", ": ") if indent is not None else (", ", ": ")
    return json.dumps(value, indent=indent, ensure_ascii=False, separators=separators, default=str)


def _short(value: Any, limit: int = 100) -> str:
    text = _dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: Any, limit: int = 100) -> str:
    """A string as it is, anything else as JSON; cut to ``limit`` characters."""
    text = " ".join(value.split()) if isinstance(value, str) else _dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _table(out: Output, rows: list[list[str]], styles: list[list[str]] | None = None) -> None:
    """Print aligned columns (padding is computed before any colour is added)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            padded = cell.ljust(widths[i]) if i < len(row) - 1 else cell
            style = styles[r][i] if styles is not None else ""
            cells.append(out.paint(padded, *style.split()) if style else padded)
        out.line("  ".join(cells).rstrip())


# -- opening a state -------------------------------------------------------------------


def _schema(spec: str | None) -> type[BaseModel] | None:
    """Import ``module:Class`` (a Pydantic model), for states with their own schema."""
    if not spec:
        return None
    module_name, _, class_name = spec.partition(":")
    try:
        model = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CliError(f"--schema {spec}: cannot import it ({exc})", EXIT_USAGE) from exc
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise CliError(f"--schema {spec}: not a Pydantic model class", EXIT_USAGE)
    return model


LOCK_ENV = "PIPELINE_STATE_LOCK"
"""Environment variable with the lock to use when ``--lock`` is not given."""


def _open(
    path: str,
    *,
    timeout: float | None = 10.0,
    schema: str | None = None,
    lock: str | None = None,
) -> PipelineState:
    """Open ``path``; a path with neither a state file nor sidecars is a typo, not a state.

    ``max_backups`` is unbounded here: the CLI does not know the pipeline's own limit,
    and must never prune backups the pipeline means to keep (its next commit prunes).
    ``lock`` (``--lock``, else ``$PIPELINE_STATE_LOCK``, else flock) must be the lock
    the pipeline itself uses.
    """
    lock = lock or os.environ.get(LOCK_ENV) or None
    try:
        state = PipelineState(
            path, timeout=timeout, max_backups=sys.maxsize, schema=_schema(schema), lock=lock
        )
    except (ValueError, ImportError) as exc:
        raise CliError(f"--lock: {exc}", EXIT_USAGE) from exc  # exc names it, password hidden
    if not (state.path.exists() or state.sidecar_dir.exists()):
        raise CliError(
            f"{path}: no such state file (and no {state.sidecar_dir.name}/ folder beside it); "
            "check the path",
            EXIT_UNREADABLE,
        )
    return state


def _read(state: PipelineState) -> tuple[dict[str, Any], int]:
    """``state.read_versioned()``, failing at once on a corrupt file.

    read_versioned() waits up to a second for a log record that matches the file;
    a plain read() first turns a corrupt file into an error without that wait.
    """
    state.read()
    return state.read_versioned()


def _last_commit(state: PipelineState, generation: int) -> HistoryRecord | None:
    for record in state.history(limit=100):
        if record.commits and record.generation == generation:
            return record
    return None


def _record_json(record: HistoryRecord) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "generation": record.generation,
        "timestamp": record.timestamp,
        "operation": record.operation,
        "success": record.success,
        "commits": record.commits,
        "changes": record.changes,
        "duration_ms": record.duration_ms,
        "pid": record.pid,
        "host": record.host,
        "details": record.details,
    }


def _backup_json(info: BackupInfo) -> dict[str, Any]:
    return {
        "name": info.path.name,
        "path": str(info.path),
        "generation": info.generation,
        "created": _iso(info.created),
        "size": info.size,
        "operation": info.operation,
        "compressed": info.compressed,
    }


def _change_json(change: Change) -> dict[str, Any]:
    out: dict[str, Any] = {"pointer": change.pointer, "kind": change.kind}
    if change.old is not MISSING:
        out["old"] = change.old
    if change.new is not MISSING:
        out["new"] = change.new
    return out


def _print_diff(out: Output, changes: Diff) -> None:
    for change in changes:
        if change.kind == "added":
            out.line(out.paint(f"+ {change.pointer}: {_short(change.new)}", "green"))
        elif change.kind == "removed":
            out.line(out.paint(f"- {change.pointer}: {_short(change.old)}", "red"))
        else:
            text = f"~ {change.pointer}: {_short(change.old)} -> {_short(change.new)}"
            out.line(out.paint(text, "yellow"))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _find_backup(state: PipelineState, ref: str) -> BackupInfo:
    """Resolve a backup given as a name, a path, or the generation it holds."""
    infos = state.backups()
    if ref.isascii() and ref.isdigit():
        generation = int(ref)
        for info in infos:  # newest first: the newest backup of that generation
            if info.generation == generation:
                return info
        held = sorted({i.generation for i in infos if i.generation is not None})
        raise CliError(
            f"no backup of {state.path.name} holds generation {generation} "
            f"(backups hold {', '.join(map(str, held)) or 'none'}); "
            f"list them with `{PROG} backups {state.path}`",
            EXIT_USAGE,
        )
    given = Path(ref)
    for info in infos:
        if info.path.name == given.name and (
            len(given.parts) == 1 or os.path.realpath(given) == os.path.realpath(info.path)
        ):
            return info
    raise CliError(
        f"{ref} is not a backup of {state.path.name}; list them with `{PROG} backups {state.path}`",
        EXIT_USAGE,
    )


@dataclass
class _Ref:
    """A diff operand: what to hand to ``state.diff`` and how to name it."""

    value: Any
    label: str


def _resolve_ref(state: PipelineState, ref: str) -> _Ref:
    if ref == "current":
        return _Ref("current", f"current (generation {state.version})")
    if ref.isascii() and ref.isdigit():
        generation = int(ref)
        if generation == state.version:
            return _Ref(generation, f"generation {generation} (current)")
        info = _find_backup(state, ref)
        return _Ref(generation, f"generation {generation} ({info.path.name})")
    info = _find_backup(state, ref)
    gen = "?" if info.generation is None else info.generation
    return _Ref(info.path, f"{info.path.name} (generation {gen})")


def _split_pointer(pointer: str) -> list[str]:
    if pointer == "":  # RFC 6901: "" is the whole document, "/" the key ""
        return []
    if not pointer.startswith("/"):
        raise CliError(
            f"--pointer {pointer!r} is not a JSON pointer; write it like /phase1/status",
            EXIT_USAGE,
        )
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def _at_pointer(data: Any, pointer: str) -> Any:
    value = data
    for part in _split_pointer(pointer):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list)
            and part.isascii()
            and part.isdigit()
            and (part == "0" or not part.startswith("0"))  # RFC 6901: no leading zeros
            and int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            raise CliError(f"no value at {pointer} in the state", EXIT_PROBLEM)
    return value


# -- subcommands -------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    """Print the current state with its generation and last commit."""
    state = _open(args.path, lock=args.lock, schema=args.schema)
    data, generation = _read(state)
    record = _last_commit(state, generation)
    value = _at_pointer(data, args.pointer) if args.pointer is not None else data
    if args.json:
        out.json(
            {
                "path": str(state.path),
                "generation": generation,
                "last_commit": _record_json(record) if record is not None else None,
                "pointer": args.pointer,
                "data": value,
            }
        )
        return EXIT_OK
    if args.pointer is not None and not isinstance(value, (dict, list)):
        # a bare scalar, like `jq -r`, so shell scripts can use it as it is
        out.line(value if isinstance(value, str) else _dumps(value))
        return EXIT_OK
    if args.pointer is None:
        head = f"# {state.path}  generation {generation}"
        if record is not None:
            head += f"  last commit {record.timestamp} {record.operation!r}"
            if record.pid is not None:
                head += f" (pid {record.pid} on {record.host})"
        out.line(out.paint(head, "dim"))
    out.line(_dumps(value, indent=2))
    return EXIT_OK


def _progress(state: PipelineState, stages: str | None) -> dict[str, Any]:
    """The pipeline's status from ProgressTracker: the stored plan (or ``stages``).

    Without a plan in the file (an old state), the tracker falls back to its phase* keys.
    """
    _, generation = _read(state)
    names = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    try:
        # declare=False: looking at a pipeline never writes a plan into it
        with ProgressTracker(state, names, declare=False) as tracker:
            snapshot = tracker.status()
    except ProgressError as exc:
        raise CliError(str(exc), EXIT_UNREADABLE) from exc
    return {"path": str(state.path), "generation": generation, **snapshot}


def _bar(out: Output, percent: float, width: int = 24) -> str:
    filled = round(width * max(0.0, min(percent, 100.0)) / 100)
    unicode = (getattr(out.stream, "encoding", "") or "").lower().replace("-", "") == "utf8"
    full, empty = ("\u2588", "\u2591") if unicode else ("#", "-")
    return full * filled + empty * (width - filled)


def _render_status(out: Output, snap: dict[str, Any]) -> list[str]:
    """The stage table as lines (a progress bar column only on a terminal)."""
    path = Path(snap["path"]).name
    head = (
        f"{path}: {out.status(snap['status'])}  {snap['overall_progress']:.1f}% overall"
        f"  ETA {_duration(snap['eta_seconds'])}  (generation {snap['generation']})"
    )
    lines = [head]
    stages: dict[str, dict[str, Any]] = snap["stages"]
    if not stages:
        lines.append("no stages yet (no stage plan and no phase* keys in the state)")
        return lines
    columns = ["STAGE", "STATUS", "PERCENT", "DONE", "ELAPSED", "ETA", "ATTEMPTS", "RETRIES"]
    if out.tty:
        columns.insert(2, "PROGRESS")
    rows = [columns]
    for name, s in stages.items():
        done = _number(s["current"]) + ("/" + _number(s["total"]) if s["total"] else "")
        row = [
            name,
            s["status"],
            f"{s['progress_percent']:.1f}%",
            done,
            _duration(s["elapsed_seconds"]),
            _duration(s["eta_seconds"]),
            str(s.get("attempts", 0)),
            str(s["retries"]),
        ]
        if out.tty:
            row.insert(2, _bar(out, s["progress_percent"]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            if columns[i] == "PERCENT":
                padded = cell.rjust(widths[i])
            else:
                padded = cell.ljust(widths[i]) if i < len(row) - 1 else cell
            if r == 0:
                padded = out.paint(padded, "bold")
            elif i == 1:
                padded = out.status(cell, widths[i])
            cells.append(padded)
        lines.append("  ".join(cells).rstrip())
    for name, s in stages.items():
        owner = s.get("owner")
        if owner:
            lines.append(
                f"{name}: run by pid {owner.get('pid')} on {owner.get('host')} "
                f"since {owner.get('since')}"
            )
        if s["status"] == "failed" and s.get("error"):
            lines.append(f"{name}: {_text(s['error'])}")
    return lines


def _status_code(snap: dict[str, Any]) -> int:
    return EXIT_PROBLEM if snap["status"] == "failed" else EXIT_OK


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    """Print the stage table; with --follow, redraw it until the pipeline ends."""
    state = _open(args.path, lock=args.lock, schema=args.schema)
    if not args.follow:
        snap = _progress(state, args.stages)
        if args.json:
            out.json(snap)
        else:
            for line in _render_status(out, snap):
                out.line(line)
        return _status_code(snap)
    return _follow(state, args, out)


def _follow(state: PipelineState, args: argparse.Namespace, out: Output) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    live = out.tty and not args.json
    drawn = 0
    seen: tuple[int, int, int, int] | None = None
    while True:
        snap = _progress(state, args.stages)
        key = (snap["generation"], *_stat_key(state.path))
        if live:
            width = max(shutil.get_terminal_size().columns, 1)
            lines = _render_status(out, snap)
            if drawn:  # up to the first row drawn before, and clear to the end
                out.stream.write(f"\x1b[{drawn}F\x1b[J")
            out.stream.write("\n".join(lines) + "\n")
            out.stream.flush()
            # a line wider than the terminal wraps onto more rows
            drawn = sum(max(1, -(-len(_ANSI.sub("", line)) // width)) for line in lines)
        elif key != seen or snap["status"] in _FINISHED:
            # piped: one snapshot per change, never a redraw
            if args.json:
                out.stream.write(_dumps(snap) + "\n")
            else:
                for line in _render_status(out, snap):
                    out.line(line)
                out.line()
            out.stream.flush()
        seen = key
        if snap["status"] in _FINISHED:
            return _status_code(snap)
        wait = args.interval
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(
                    f"{state.path.name} is still {snap['status']} after --timeout "
                    f"{args.timeout:g} s",
                    EXIT_PROBLEM,
                )
            wait = min(wait, left)
        # wakes at the next commit, or after `wait` so elapsed time and ETA tick on
        state.wait_for_change(snap["generation"], timeout=wait, interval=min(0.05, wait))


def _stat_key(path: Path) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def cmd_history(args: argparse.Namespace, out: Output) -> int:
    """Print the transaction log, newest first, one line per record."""
    state = _open(args.path, lock=args.lock, schema=args.schema)
    if args.n < 0:
        raise CliError(f"-n must be 0 (all) or more, not {args.n}", EXIT_USAGE)
    limit = args.n or None
    if args.failed or limit is None:
        records = state.history(limit=sys.maxsize)
        if args.failed:
            records = [r for r in records if not r.success]
        records = records[:limit]
    else:
        records = state.history(limit=limit)
    if args.json:
        out.json({"path": str(state.path), "records": [_record_json(r) for r in records]})
        return EXIT_OK
    for r in records:
        outcome = out.paint("ok", "green") if r.success else out.paint("FAILED", "red")
        parts = [f"#{r.seq}", f"gen {r.generation}", r.timestamp, r.operation, outcome]
        if r.duration_ms is not None:
            parts.append(f"{r.duration_ms:.1f}ms")
        if r.changes:
            shown = ",".join(r.changes[:5]) + (",..." if len(r.changes) > 5 else "")
            parts.append(f"changed {shown}")
        for key in ("restored_from", "backup", "error"):
            if r.details.get(key):
                parts.append(f"{key.replace('_', ' ')} {_text(r.details[key], 120)}")
        out.line("  ".join(parts))
    if not records:
        out.line("no failed transactions" if args.failed else "no transactions yet")
    return EXIT_OK


def cmd_backups(args: argparse.Namespace, out: Output) -> int:
    """Print the backups, newest first."""
    state = _open(args.path, lock=args.lock, schema=args.schema)
    infos = state.backups()
    if args.json:
        out.json({"path": str(state.path), "backups": [_backup_json(i) for i in infos]})
        return EXIT_OK
    if not infos:
        out.line("no backups yet")
        return EXIT_OK
    rows = [["NAME", "GEN", "CREATED", "SIZE", "OPERATION"]]
    for i in infos:
        gen = "?" if i.generation is None else str(i.generation)
        rows.append([i.path.name, gen, _iso(i.created), _size(i.size), i.operation or "-"])
    _table(out, rows, [["bold"] * 5] + [[""] * 5] * len(infos))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    """Print the changes from A to B."""
    state = _open(args.path, lock=args.lock, schema=args.schema)
    a, b = _resolve_ref(state, args.a), _resolve_ref(state, args.b)
    changes = state.diff(a.value, b.value)
    if args.json:
        out.json(
            {
                "path": str(state.path),
                "from": a.label,
                "to": b.label,
                "changes": [_change_json(c) for c in changes],
            }
        )
        return EXIT_OK
    out.line(out.paint(f"--- {a.label}", "bold"))
    out.line(out.paint(f"+++ {b.label}", "bold"))
    if not changes:
        out.line("identical")
    _print_diff(out, changes)
    return EXIT_OK


def _confirm(
    question: str, hint: str = "pass --yes to restore without asking (or --dry-run to only look)"
) -> bool:
    if not _isatty(sys.stdin):
        raise CliError(
            f"refusing to ask for confirmation: stdin is not a terminal; {hint}",
            EXIT_USAGE,
        )
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_restore(args: argparse.Namespace, out: Output) -> int:
    """Show what a restore changes, ask, and restore the backup."""
    state = _open(args.path, lock=args.lock, timeout=args.timeout, schema=args.schema)
    info = _find_backup(state, args.backup)
    result: dict[str, Any] = {
        "path": str(state.path),
        "backup": info.path.name,
        "backup_generation": info.generation,
        "dry_run": args.dry_run,
        "current_readable": True,
        "changes": None,
        "restored": False,
        "generation": None,
        "replaced_state_backup": None,
    }
    changes: Diff | None
    try:
        state.read()
    except StateReadError as exc:
        # The usual reason to restore: the current file is corrupt. Nothing to diff.
        changes = None
        result["current_readable"] = False
        if not args.json:
            out.line(f"the current state cannot be read ({exc})")
            out.line(f"restoring replaces it with {info.path.name}; the broken file is kept aside")
    else:
        changes = state.restore_backup(info, dry_run=True)
        result["changes"] = [_change_json(c) for c in changes]
        if not args.json:
            out.line(out.paint(f"--- current (generation {state.version})", "bold"))
            gen = "?" if info.generation is None else info.generation
            out.line(out.paint(f"+++ {info.path.name} (generation {gen})", "bold"))
            _print_diff(out, changes)
    if changes is not None and not changes:
        if args.json:
            out.json(result)
        else:
            out.line(f"the state already matches {info.path.name}; nothing to restore")
        return EXIT_OK
    if args.dry_run:
        if args.json:
            out.json(result)
        else:
            n = "" if changes is None else f" ({_plural(len(changes), 'change')})"
            out.line(f"dry run{n}: nothing was changed")
        return EXIT_OK
    if not args.yes:
        out.stream.flush()
        if not _confirm(f"Restore {state.path.name} from {info.path.name}?"):
            if args.json:
                out.json(result)
            else:
                out.line("not restored; nothing was changed")
            return EXIT_PROBLEM
    state.restore_backup(info, validate=False)  # a backup is a version once committed
    result["restored"] = True
    result["generation"] = state.version
    newest = state.history(limit=1)
    if newest and newest[0].operation == "restore":
        result["replaced_state_backup"] = newest[0].details.get("backup")
    if args.json:
        out.json(result)
        return EXIT_OK
    out.line(f"restored {state.path.name} from {info.path.name}: now generation {state.version}")
    if result["replaced_state_backup"]:
        out.line(f"the replaced state was backed up as {result['replaced_state_backup']}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Print the integrity report; exit 1 when a check failed."""
    state = _open(args.path, lock=args.lock, schema=args.schema)
    report = state.verify()
    if args.json:
        out.json(
            {
                "path": str(state.path),
                "healthy": bool(report),
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks],
            }
        )
        return EXIT_OK if report else EXIT_PROBLEM
    for c in report.checks:
        mark = out.paint("ok  ", "green") if c.ok else out.paint("FAIL", "red", "bold")
        out.line(f"{mark}  {c.name}" + (f": {c.detail}" if c.detail else ""))
    if report:
        out.line(out.paint(f"{state.path.name} is healthy", "green"))
        return EXIT_OK
    out.line(
        out.paint(f"{_plural(len(report.problems), 'problem')} found", "red")
        + f"; `{PROG} repair {args.path}` fixes what it can without losing data"
    )
    return EXIT_PROBLEM


def cmd_repair(args: argparse.Namespace, out: Output) -> int:
    """Run state.repair() and summarize what it did and what is left."""
    state = _open(args.path, lock=args.lock, timeout=args.timeout, schema=args.schema)
    report = state.repair()
    if args.json:
        out.json(
            {
                "path": str(state.path),
                "actions": list(report.actions),
                "remaining": [
                    {"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.remaining
                ],
                "healthy": bool(report),
            }
        )
        return EXIT_OK if report else EXIT_PROBLEM
    for action in report.actions:
        out.line(f"{out.paint('fixed', 'green')}  {action}")
    if not report.actions:
        out.line("nothing to fix")
    for c in report.remaining:
        out.line(f"{out.paint('still', 'red')}  {c.name}: {c.detail}")
    if report:
        out.line(out.paint(f"{state.path.name} is healthy", "green"))
        return EXIT_OK
    hint = ""
    if any(c.name == "state parses" for c in report.remaining):
        hint = f"; restore a backup: `{PROG} restore {args.path} BACKUP` (see `{PROG} backups`)"
    out.line(
        f"{_plural(len(report.remaining), 'problem')} left that repair cannot fix "
        f"without a choice{hint}"
    )
    return EXIT_PROBLEM


def cmd_lock(args: argparse.Namespace, out: Output) -> int:
    """Say whether the lock is held, and by whom."""
    state = _open(args.path, lock=args.lock, schema=args.schema)
    info = state.lock_info()
    if args.json:
        out.json(
            {
                "path": str(state.path),
                "lock_file": str(info.lock_file),
                "held": info.held,
                "holder": info.holder,
            }
        )
        return EXIT_OK
    if not info.held:
        out.line(f"{info.lock_file}: {out.paint('free', 'green')}")
        return EXIT_OK
    h = info.holder or {}
    if not h:
        out.line(
            f"{info.lock_file}: {out.paint('held', 'yellow')} "
            "(the holder left no record: another program, or an older version)"
        )
        return EXIT_OK
    since = str(h.get("since", "?"))
    age = ""
    with contextlib.suppress(ValueError):
        started = datetime.fromisoformat(since.replace("Z", "+00:00"))
        if started.tzinfo is not None:
            age = f" ({_duration((datetime.now(timezone.utc) - started).total_seconds())} ago)"
    out.line(
        f"{info.lock_file}: {out.paint('held', 'yellow')} by pid {h.get('pid')} on "
        f"{h.get('host')} since {since}{age} for {h.get('operation')!r}"
    )
    return EXIT_OK


# -- serve: the status page (the web extra) ------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    """Serve the live status page and read-only API of one state file until Ctrl-C."""
    try:  # the web extra is optional: import it only here
        import uvicorn

        from .web import status_app
    except ImportError as exc:
        raise CliError(
            f"`{PROG} serve` needs the web extra ({exc.name or 'a module'} is not installed): "
            "pip install 'pipeline-common[web]'",
            EXIT_USAGE,
        ) from exc
    path = Path(args.path)
    if not _is_loopback(args.host):
        sys.stderr.write(
            f"{PROG}: warning: serving on {args.host}, not a loopback address: anyone who can "
            f"reach port {args.port} sees the state of {path.name} (stage messages, errors, "
            "log records). The server is read-only, but it has no login.\n"
        )
    if not path.exists():
        sys.stderr.write(
            f"{PROG}: warning: {path} does not exist yet; the page says so and updates "
            "when it appears\n"
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    out.line(f"serving {path} at http://{host}:{args.port}/ (Ctrl-C to stop)")
    out.stream.flush()
    app = status_app(path)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Open event streams never end by themselves, and uvicorn waits for them:
            # end them, from a thread (the signal may interrupt a holder of the lock).
            threading.Thread(target=app.state.watcher.end_streams, daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2
    )
    Server(config).run()
    return EXIT_OK


# -- run and reset: the Pipeline runner ---------------------------------------------------


def _load_pipeline(spec: str) -> Pipeline:
    """Import ``module:attr`` (or ``path/to/file.py:attr``) naming a Pipeline, like uvicorn."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(
            f"{spec!r} is not MODULE:ATTR; name the Pipeline object, e.g. mypipeline:pipeline",
            EXIT_USAGE,
        )
    # like `python -m`: the current folder is importable
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            where = Path(module_name)
            found = importlib.util.spec_from_file_location(where.stem, where)
            if found is None or found.loader is None or not where.is_file():
                raise ImportError(f"no such file: {where}")
            module = importlib.util.module_from_spec(found)
            sys.modules[where.stem] = module
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"{spec}: cannot import {module_name} ({exc})", EXIT_USAGE) from exc
    obj: Any = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise CliError(f"{spec}: {module_name} has no attribute {attr}", EXIT_USAGE) from exc
    if not isinstance(obj, Pipeline) and callable(obj):
        obj = obj()  # a factory: def make_pipeline() -> Pipeline
    if not isinstance(obj, Pipeline):
        raise CliError(
            f"{spec} is a {type(obj).__name__}, not a pipeline_common.Pipeline", EXIT_USAGE
        )
    return obj


class _RunView:
    """Shows a run: a redrawn stage table on a terminal, one plain line per event otherwise."""

    def __init__(self, out: Output, pipeline: Pipeline, *, live: bool, quiet: bool) -> None:
        self.out = out
        self.pipeline = pipeline
        self.live = live
        self.quiet = quiet
        self.drawn = 0
        self.last_draw = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.live:
            if event["event"] != "progress" or time.monotonic() - self.last_draw > 0.1:
                self.draw(event.get("status"))
            return
        self.out.line(self.describe(event))
        self.out.stream.flush()

    def describe(self, event: dict[str, Any]) -> str:  # noqa: PLR0911 - one line per event kind
        kind, stage = event["event"], event.get("stage")
        snap = event.get("status") or {}
        info = (snap.get("stages") or {}).get(stage, {}) if stage else {}
        if kind == "stage_started":
            return f"{stage}: started (attempt {info.get('attempts', '?')})"
        if kind == "progress":
            done = _number(info.get("current", 0))
            if info.get("total"):
                done += "/" + _number(info["total"])
            return f"{stage}: {info.get('progress_percent', 0.0):.1f}% ({done})"
        if kind == "stage_completed":
            return f"{stage}: success in {_duration(info.get('elapsed_seconds'))}"
        if kind == "stage_skipped":
            reason = event.get("message")
            return f"{stage}: skipped" + (f" ({reason})" if reason else "")
        if kind == "stage_failed":
            return f"{stage}: FAILED: {_text(event.get('error') or info.get('error'))}"
        if kind == "pipeline_completed":
            return "pipeline: success"
        if kind == "pipeline_failed":
            return f"pipeline: failed at stage {stage}"
        return f"{stage or 'pipeline'}: {kind}"

    def draw(self, snapshot: dict[str, Any] | None = None) -> None:
        if not self.live or self.quiet:
            return
        snap = snapshot if snapshot is not None else self.pipeline.status()
        full = {"path": str(self.pipeline.state.path), "generation": self.pipeline.state.version}
        lines = _render_status(self.out, {**full, **snap})
        width = max(shutil.get_terminal_size().columns, 1)
        if self.drawn:
            self.out.stream.write(f"\x1b[{self.drawn}F\x1b[J")
        self.out.stream.write("\n".join(lines) + "\n")
        self.out.stream.flush()
        self.drawn = sum(max(1, -(-len(_ANSI.sub("", line)) // width)) for line in lines)
        self.last_draw = time.monotonic()


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    """Import a Pipeline and run it (or the named stages)."""
    pipeline = _load_pipeline(args.target)
    unknown = [name for name in args.stages if name not in pipeline.stages]
    if unknown:
        raise CliError(
            f"unknown stage {', '.join(map(repr, unknown))}; {args.target} has the stages "
            f"{', '.join(pipeline.stages) or 'none'}",
            EXIT_USAGE,
        )
    force: bool | list[str] = bool(args.force)
    view = _RunView(out, pipeline, live=out.tty and not args.json, quiet=args.json)
    unsubscribe = pipeline.subscribe(view)
    result = None
    error: Exception | None = None
    try:
        view.draw()
        result = pipeline.run(*args.stages, force=force)
    except (StageFailedError, PrerequisiteError, StageBusyError) as exc:
        error = exc
    finally:
        unsubscribe()
        pipeline.close()
    view.draw()
    if args.json:
        doc: dict[str, Any] = {"path": str(pipeline.state.path), "ok": error is None}
        if result is not None:
            doc.update(ran=result.ran, skipped=result.skipped, already_done=result.already_done)
        if error is not None:
            doc["error"] = {
                "type": type(error).__name__,
                "stage": getattr(error, "stage", None),
                "message": str(error),
            }
        doc["status"] = pipeline.status()
        out.json(doc)
    elif result is not None and not view.live:
        if result.already_done:
            out.line(f"already done, not run: {', '.join(result.already_done)}")
        snap = result.status
        out.line(
            f"{pipeline.state.path.name}: {snap['status']}, {snap['overall_progress']:.1f}% overall"
        )
    if error is not None:
        if args.json:
            return _describe(error)[1]
        raise error
    return EXIT_OK


def cmd_reset(args: argparse.Namespace, out: Output) -> int:
    """Put a stage (and its dependents) back to pending, after asking."""
    state = _open(args.path, timeout=args.timeout, schema=args.schema)
    data, _ = _read(state)
    try:
        with ProgressTracker(state, declare=False) as tracker:
            plan = tracker.requires
    except ProgressError as exc:
        raise CliError(str(exc), EXIT_UNREADABLE) from exc
    if args.stage not in plan and not isinstance(data.get(args.stage), dict):
        known = ", ".join(plan) or "none"
        raise CliError(
            f"{state.path.name}: unknown stage {args.stage!r}; its stages are {known}", EXIT_USAGE
        )
    names = [args.stage]
    if args.downstream:
        for name, requires in plan.items():
            if any(r in names for r in requires) and name not in names:
                names.append(name)
    if not args.yes:
        listed = ", ".join(names)
        out.stream.flush()
        question = (
            f"Reset {listed} of {state.path.name} to pending? Their progress, attempts and "
            "records are forgotten (the replaced version is backed up)."
        )
        if not _confirm(question, "pass --yes to reset without asking"):
            if args.json:
                out.json({"path": str(state.path), "reset": [], "generation": state.version})
            else:
                out.line("not reset; nothing was changed")
            return EXIT_PROBLEM
    done = reset_stages(state, args.stage, downstream=args.downstream)
    if args.json:
        out.json({"path": str(state.path), "reset": done, "generation": state.version})
    else:
        out.line(f"reset {', '.join(done)} to pending: now generation {state.version}")
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line: ``pipeline-state: error: ...``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _add_lock_timeout(parser: argparse.ArgumentParser) -> None:
    """``--timeout S`` for a command that takes the lock (restore, repair, reset)."""
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="wait at most S seconds for the lock (default 10; exit 3)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


_EPILOG = """\
exit codes:
  0  ok
  1  a problem was found (verify, repair, a failed pipeline or stage), or nothing was done
  2  usage error (bad arguments, unknown backup, generation or stage, no terminal to ask,
     MODULE:ATTR not a Pipeline, a refused plan)
  3  the state's lock was not obtained in time, or another runner holds the stage
  4  the state file cannot be read (missing, corrupt, not a JSON object)
  5  run: a stage's prerequisites have not succeeded (nothing was written)

Colour and progress bars appear only on a terminal (and not when NO_COLOR is set).
"""

Handler = Callable[[argparse.Namespace, Output], int]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``pipeline-state`` (one subparser per command)."""
    parser = _Parser(
        prog=PROG,
        description="Look at, check and repair a pipeline's crash-safe JSON state file.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (for bug reports)"
    )
    # --debug also after the command; SUPPRESS keeps the subparser from resetting it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, handler: Handler, summary: str, *, json_help: bool = True) -> Any:
        p = sub.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            parents=[common],
        )
        p.add_argument("path", metavar="PATH", help="the state file, e.g. pipeline.json")
        p.add_argument(
            "--schema",
            metavar="MODULE:CLASS",
            help="the Pydantic model the pipeline validates with (default: the built-in "
            "pipeline schema), e.g. mypipeline.models:State",
        )
        if json_help:
            p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.add_argument(
            "--lock",
            metavar="URL",
            help="the lock the pipeline uses: 'flock' (default) or a Redis URL such as "
            f"redis://host:6379/0 (default: ${LOCK_ENV})",
        )
        p.set_defaults(handler=handler)
        return p

    p = command("show", cmd_show, "print the current state, its generation and last commit")
    p.add_argument(
        "--pointer",
        metavar="POINTER",
        help="print only the value at this JSON pointer, e.g. /phase1/status",
    )

    p = command("status", cmd_status, "print the stage table: status, progress, elapsed, ETA")
    p.add_argument("--follow", "-f", action="store_true", help="redraw until the pipeline ends")
    p.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="with --follow: redraw at least every S seconds (default 1)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="with --follow: give up after S seconds (exit 1); default: wait until it ends",
    )
    p.add_argument(
        "--stages",
        metavar="LIST",
        help="comma-separated stage names, in order (default: the phase* keys of the state)",
    )

    p = command("history", cmd_history, "print the transaction log, newest first, one per line")
    p.add_argument(
        "-n", type=int, default=20, metavar="N", help="show N records (default 20; 0: all)"
    )
    p.add_argument("--failed", action="store_true", help="only transactions that failed")

    command("backups", cmd_backups, "list the backups with generation, time, size, operation")

    p = command("diff", cmd_diff, "print the changes between two versions of the state")
    ref_help = "'current', a generation number, or a backup name or path"
    p.add_argument("a", metavar="A", help=f"from: {ref_help}")
    p.add_argument("b", metavar="B", nargs="?", default="current", help="to (default: current)")

    p = command("restore", cmd_restore, "make a backup the current state, after asking")
    p.add_argument(
        "backup", metavar="BACKUP", help="a backup name or path, or the generation it holds"
    )
    p.add_argument("--dry-run", action="store_true", help="only show what would change")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _add_lock_timeout(p)

    command("verify", cmd_verify, "check the state, log, backups and lock file (exit 1: problems)")

    p = command("repair", cmd_repair, "fix what can be fixed without losing data")
    _add_lock_timeout(p)

    command("lock", cmd_lock, "say whether the lock is held, and by whom")

    p = command(
        "serve",
        cmd_serve,
        "serve a live status page and read-only API (needs pipeline-common[web])",
        json_help=False,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other shows the state to the network)",
    )
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")

    p = command("reset", cmd_reset, "put a stage back to pending, after asking (logged, backed up)")
    p.add_argument("stage", metavar="STAGE", help="the stage to reset")
    p.add_argument(
        "--downstream", action="store_true", help="also reset every stage that depends on it"
    )
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _add_lock_timeout(p)

    summary = "import a Pipeline (MODULE:ATTR) and run its stages"
    p = sub.add_parser(
        "run", help=summary, description=summary[0].upper() + summary[1:] + ".", parents=[common]
    )
    p.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="the Pipeline object, e.g. mypipeline:pipeline or path/to/file.py:pipeline",
    )
    p.add_argument(
        "stages", metavar="STAGE", nargs="*", help="run only these stages (default: all)"
    )
    p.add_argument(
        "--force", action="store_true", help="run the stages even if they are already done"
    )
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(handler=cmd_run)
    return parser


# -- entry point ----------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


# First match wins: the more specific errors come before StateError.
_ERROR_CODES: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    ((StateLockError, StageBusyError), EXIT_LOCKED),
    (PrerequisiteError, EXIT_PREREQUISITES),
    (PlanError, EXIT_USAGE),
    ((StateReadError, StateSidecarError), EXIT_UNREADABLE),
    (StateError, EXIT_PROBLEM),
)


def _describe(exc: Exception) -> tuple[str, int]:
    """The one-line message and the exit code for an error."""
    if isinstance(exc, CliError):
        return str(exc), exc.code
    for kinds, code in _ERROR_CODES:
        if isinstance(exc, kinds):
            return str(exc), code
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot read{where}: {exc.strerror or exc}", EXIT_UNREADABLE
    return (
        f"unexpected {type(exc).__name__}: {exc} "
        f"(run `{PROG} --debug ...` for the traceback, and please report it)",
        EXIT_PROBLEM,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pipeline-state`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    out = Output.for_stream(sys.stdout)
    try:
        code = handler(args, out)
        out.stream.flush()
        return code
    except BrokenPipeError:
        # the reader went away (`| head`): not an error, and no second one at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return _EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error ends as one clear line
        if getattr(args, "debug", False):
            traceback.print_exception(exc)
        message, code = _describe(exc)
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    return code
