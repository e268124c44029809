"""Crash, fault and invariant helpers for the test suites of code that uses PipelineState.

Every file-system call of pipeline_common's write path goes through one private seam.
This module lets a test suite use that seam without knowing it:

- :func:`record_calls` records the calls (``Call(when, op, path)``) of a block;
- :func:`inject_fault` makes the n-th matching call raise an ``OSError`` (or any
  exception, e.g. ``KeyboardInterrupt``), once or from then on;
- :func:`short_writes` makes every ``write`` syscall write at most a few bytes;
- :func:`crash_points` runs a callable in forked children that die (``os._exit``)
  before, and again after, its k-th file-system call, k = 1, 2, ... until it
  completes, and checks the invariants after every crash;
- :func:`random_kills` runs a callable in a loop in a child and ``SIGKILL``\\ s it at
  random times, checking the invariants after every kill;
- :func:`check_invariants` checks a state file and its sidecars: the state parses and
  is the acknowledged version (or the one in flight), the log parses and agrees with
  the state, backups parse, no more than one orphan temp file, the lock is free.

Forking needs POSIX; the helpers are meant for Linux CI. See ``docs/testing.md``.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import _fs

__all__ = [
    "CRASH_EXIT_CODE",
    "Call",
    "CrashPoint",
    "Fault",
    "InvariantViolation",
    "KillResult",
    "Report",
    "Version",
    "check_invariants",
    "crash_points",
    "inject_fault",
    "random_kills",
    "record_calls",
    "short_writes",
    "sidecar_paths",
]

CRASH_EXIT_CODE = 77
"""Exit status of a child that :func:`crash_points` stopped on purpose."""

Version = Mapping[str, Any] | bytes
"""A state version: the parsed dict, or the exact bytes of the file."""

When = Literal["before", "after"]


@dataclass(frozen=True)
class Call:
    """One event at the file-system seam: ``when`` is "before" or "after" the call."""

    when: str
    op: str
    path: str


class InvariantViolation(AssertionError):
    """A state file or its sidecars break an invariant; ``problems`` lists them all."""

    def __init__(self, state_path: Path, problems: list[str]) -> None:
        super().__init__(f"{state_path}: " + "; ".join(problems))
        self.state_path = state_path
        self.problems = problems


@dataclass(frozen=True)
class Report:
    """What :func:`check_invariants` found (only returned when every check passed)."""

    state: dict[str, Any] | None
    state_sha256: str | None
    log_records: int
    torn_log_tail: bool
    backups: int
    orphan_temps: int
    lock_inode: int | None


@dataclass(frozen=True)
class SidecarPaths:
    """The files pipeline_common keeps beside a state file."""

    state: Path
    lock: Path
    temp: Path
    sidecar_dir: Path
    backups_dir: Path
    log: Path


def sidecar_paths(state_path: str | os.PathLike[str]) -> SidecarPaths:
    """Return the paths of a state file's lock, temp file, backups folder and log."""
    state = Path(os.path.realpath(Path(os.fspath(state_path)).expanduser()))
    sidecar = state.parent / f".{state.stem}"
    return SidecarPaths(
        state=state,
        lock=state.with_name(state.name + ".lock"),
        temp=state.with_name(f".{state.name}.tmp"),
        sidecar_dir=sidecar,
        backups_dir=sidecar / "backups",
        log=sidecar / "transactions.log",
    )


# -- recording and fault injection ------------------------------------------------


def _chain(hook: _fs.Hook) -> Callable[[], None]:
    """Install ``hook`` in front of the current one; return a function that undoes it."""
    previous = _fs.get_hook()

    def both(when: str, op: str, path: str) -> None:
        # The outer hook first, so a recorder around a fault still sees the failing call.
        if previous is not None:
            previous(when, op, path)
        hook(when, op, path)

    _fs.set_hook(both)

    def undo() -> None:
        _fs.set_hook(previous)

    return undo


@contextlib.contextmanager
def record_calls() -> Iterator[list[Call]]:
    """Record every seam event of the block, in order.

    Yields:
        A list that fills with :class:`Call` events ("before" and "after" each call).
    """
    calls: list[Call] = []
    undo = _chain(lambda when, op, path: calls.append(Call(when, op, path)))
    try:
        yield calls
    finally:
        undo()


@dataclass
class Fault:
    """A fault armed by :func:`inject_fault`; ``fired`` counts the calls it failed."""

    op: str | None
    path: str | None
    errno: int
    nth: int
    persistent: bool
    exception: BaseException | None = None
    matched: int = 0
    fired: int = 0
    calls: list[Call] = field(default_factory=list)

    def _error(self, op: str, path: str) -> BaseException:
        if self.exception is not None:
            return self.exception
        return OSError(self.errno, f"{os.strerror(self.errno)} (injected at {op})", path)

    def hook(self, when: str, op: str, path: str) -> None:
        """The seam hook: fail the matching call before it runs."""
        if when != "before":
            return
        if self.op is not None and op != self.op:
            return
        if self.path is not None and (
            self.path != path if os.path.isabs(self.path) else self.path not in path
        ):
            return
        self.matched += 1
        if self.matched == self.nth or (self.persistent and self.matched > self.nth):
            self.fired += 1
            self.calls.append(Call(when, op, path))
            raise self._error(op, path)


@contextlib.contextmanager
def inject_fault(
    op: str | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    errno: int = errno_codes.EIO,
    nth: int = 1,
    persistent: bool = False,
    exception: BaseException | None = None,
) -> Iterator[Fault]:
    """Make the ``nth`` matching file-system call fail (and every later one if persistent).

    Args:
        op: The seam operation ("open", "write", "fsync", "fdatasync", "close", "chmod",
            "truncate", "replace", "link", "unlink", "mkdir", "fsync_dir", "lock",
            "unlock"), or None for any.
        path: Only calls on this path (an absolute path matches exactly, anything else
            as a substring); for "replace" and "link" the path is the destination.
        errno: The errno of the ``OSError`` raised.
        nth: Which matching call fails first (1 = the first).
        persistent: Keep failing every later matching call too.
        exception: Raise this instead of an ``OSError`` (e.g. ``KeyboardInterrupt()``).

    Yields:
        The :class:`Fault`; ``fault.fired`` tells whether (how often) it struck.
    """
    fault = Fault(
        op=op,
        path=None if path is None else os.fspath(path),
        errno=errno,
        nth=nth,
        persistent=persistent,
        exception=exception,
    )
    undo = _chain(fault.hook)
    try:
        yield fault
    finally:
        undo()


@contextlib.contextmanager
def short_writes(limit: int = 1) -> Iterator[None]:
    """Make every ``write`` syscall of the seam write at most ``limit`` bytes."""
    original = _fs._os_write

    def short(fd: int, data: bytes | memoryview) -> int:
        return original(fd, data[:limit])

    _fs._os_write = short
    try:
        yield
    finally:
        _fs._os_write = original


# -- invariants ---------------------------------------------------------------------


def _strict_json(raw: bytes) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class _VersionSet:
    """Versions given as dicts or bytes, matched against a file's bytes."""

    def __init__(self, versions: Iterable[Version | str]) -> None:
        self.shas: set[str] = set()
        self.dicts: list[Mapping[str, Any]] = []
        for v in versions:
            if isinstance(v, bytes):
                self.shas.add(_sha(v))
            elif isinstance(v, str):
                self.shas.add(v)  # already a sha256
            else:
                self.dicts.append(v)

    def __contains__(self, item: tuple[str, Any]) -> bool:
        sha, parsed = item
        return sha in self.shas or any(parsed == d for d in self.dicts)

    def __bool__(self) -> bool:
        return bool(self.shas or self.dicts)


_UNSET: Any = object()


def _version_sha(version: Version) -> str:
    """The sha256 of a version as pipeline_common writes it."""
    from . import _json

    return _sha(version if isinstance(version, bytes) else _json.encode(dict(version)))


def _lock_is_free(lock: Path, timeout: float) -> bool:
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
    finally:
        os.close(fd)


def check_invariants(
    state_path: str | os.PathLike[str],
    *,
    acknowledged: Version | None = _UNSET,
    in_flight: Sequence[Version] = (),
    history: Iterable[Version | str] | None = None,
    max_backups: int | None = 50,
    after_crash: bool = True,
    backup_slack: int | None = None,
    lock_timeout: float = 1.0,
) -> Report:
    """Check a state file and its sidecars; raise :class:`InvariantViolation` if broken.

    Args:
        state_path: The state file.
        acknowledged: The newest version whose commit returned to its caller (None: no
            commit was acknowledged yet, so a missing file is fine). Omit to skip the
            old-or-new check.
        in_flight: Versions whose commit had started but not returned: the state may
            also equal one of these.
        history: Every version ever committed (dicts, bytes or sha256 hex strings);
            when given, every backup must equal one of them.
        max_backups: The state's ``max_backups``; None skips the count check.
        after_crash: Right after a crash: allow one orphan temp file, one extra backup,
            a torn log tail and a state one commit ahead of its log. False means right
            after a successful transaction: all of these must be clean.
        backup_slack: How many backups beyond ``max_backups`` are allowed (default 1
            after a crash, 0 otherwise; pass the number of crashes in a row when crashes
            accumulate without a commit in between).
        lock_timeout: How long another process may wait for the lock.

    Returns:
        A :class:`Report` of what was found.
    """
    paths = sidecar_paths(state_path)
    problems: list[str] = []

    # I1-I3: the state parses and is the acknowledged version or one in flight.
    state: dict[str, Any] | None = None
    state_sha: str | None = None
    raw: bytes | None
    try:
        raw = paths.state.read_bytes()
    except FileNotFoundError:
        raw = None
    if raw is None:
        if acknowledged is not _UNSET and acknowledged is not None:
            problems.append("the state file is missing, but a commit was acknowledged")
    else:
        state_sha = _sha(raw)
        try:
            parsed = _strict_json(raw)
        except (ValueError, RecursionError) as exc:
            problems.append(f"the state file does not parse ({exc})")
        else:
            if isinstance(parsed, dict):
                state = parsed
            else:
                problems.append(f"the state file holds a {type(parsed).__name__}, not an object")
        if state is not None and acknowledged is not _UNSET:
            allowed = _VersionSet([*([] if acknowledged is None else [acknowledged]), *in_flight])
            if (state_sha, state) not in allowed:
                problems.append(
                    "the state is neither the acknowledged version nor one in flight "
                    f"(state: {_short(state)})"
                )

    # I4: the log.
    newer = {_version_sha(v) for v in in_flight} - {state_sha}
    log_records, torn = _check_log(paths.log, state_sha, after_crash, newer, problems)

    # I5: backups.
    backups = 0
    backup_temps = []
    known = _VersionSet(history) if history is not None else None
    if paths.backups_dir.is_dir():
        for name in sorted(os.listdir(paths.backups_dir)):
            if not re.fullmatch(
                rf"{re.escape(paths.state.stem)}_\d{{8}}_\d{{6}}_\d{{6}}\.json\.(?:bak|gz)", name
            ):
                if name.endswith(".tmp"):
                    backup_temps.append(name)
                continue
            backups += 1
            try:
                braw = (paths.backups_dir / name).read_bytes()
                if name.endswith(".gz"):  # compress_backups=True
                    braw = gzip.decompress(braw)
            except FileNotFoundError:
                continue  # pruned by a writer that is still running
            except (OSError, EOFError, zlib.error) as exc:
                problems.append(f"backup {name} does not decompress ({exc})")
                continue
            try:
                bparsed = _strict_json(braw)
            except (ValueError, RecursionError) as exc:
                problems.append(f"backup {name} does not parse ({exc})")
                continue
            if known is not None and (_sha(braw), bparsed) not in known:
                problems.append(f"backup {name} is not a version that was ever committed")
    # A crash while a backup is copied (create_backup, compressed or cross-user
    # backups) leaves its one temp name; the next backup removes it.
    if len(backup_temps) > (1 if after_crash else 0):
        problems.append(f"a temp file is left in the backups folder: {', '.join(backup_temps)}")
    if max_backups is not None:
        slack = backup_slack if backup_slack is not None else (1 if after_crash else 0)
        allowed_count = max_backups + slack
        if backups > allowed_count:
            problems.append(f"{backups} backups, more than {allowed_count}")

    # I6: orphan temp files.
    temps = (
        [
            n
            for n in os.listdir(paths.state.parent)
            if n.startswith(f".{paths.state.name}") and n.endswith(".tmp")
        ]
        if paths.state.parent.is_dir()
        else []
    )
    if len(temps) > (1 if after_crash else 0):
        problems.append(f"orphan temp files left: {temps}")

    # I7: the lock is a regular file and free.
    lock_ino: int | None = None
    try:
        lst = os.lstat(paths.lock)
    except FileNotFoundError:
        pass
    else:
        lock_ino = lst.st_ino
        if not os.path.isfile(paths.lock) or os.path.islink(paths.lock):
            problems.append("the lock file is not a regular file")
        elif not _lock_is_free(paths.lock, lock_timeout):
            problems.append(f"the lock is still held after {lock_timeout} s")

    if problems:
        raise InvariantViolation(paths.state, problems)
    return Report(
        state=state,
        state_sha256=state_sha,
        log_records=log_records,
        torn_log_tail=torn,
        backups=backups,
        orphan_temps=len(temps),
        lock_inode=lock_ino,
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_log(
    log: Path, state_sha: str | None, after_crash: bool, newer: set[str], problems: list[str]
) -> tuple[int, bool]:
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return 0, False
    lines = data.split(b"\n")
    tail = lines.pop()  # bytes after the last newline: a torn line, or b""
    records: list[tuple[dict[str, Any], bytes]] = []
    junk_at: int | None = None
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if junk_at is None:
                junk_at = i
            continue
        if junk_at is not None:
            problems.append(f"log line {junk_at + 1} does not parse, but later lines do")
            junk_at = None
        records.append((record, line))
    torn = bool(tail) or junk_at is not None
    if torn and not after_crash:
        problems.append("the log ends in a torn or garbage line after a successful commit")
    previous_seq = 0
    previous_line: bytes | None = None
    for record, line in records:
        seq = record.get("seq")
        if not isinstance(seq, int) or seq <= previous_seq:
            problems.append(f"log sequence numbers do not increase ({previous_seq} then {seq})")
        elif not after_crash and seq != previous_seq + 1:
            problems.append(f"log sequence numbers have a gap ({previous_seq} then {seq})")
        if previous_line is not None and record.get("prev") != _sha(previous_line):
            problems.append(f"log record {seq} does not chain to the line before it")
        previous_seq = seq if isinstance(seq, int) else previous_seq
        previous_line = line
    commits = [r for r, _ in records if r.get("success") and r.get("sha256")]
    if commits and state_sha is not None and commits[-1]["sha256"] != state_sha:
        if not after_crash:
            problems.append("the newest commit record does not match the state file")
        elif commits[-1]["sha256"] in newer:
            # The state may be one commit ahead of its log (a crash between the rename
            # and the append), never behind it: the log must not claim a version the
            # state file does not hold.
            problems.append("the log records a commit that the state file does not hold")
    if commits and state_sha is None:
        problems.append("the log records a commit, but the state file is missing")
    return len(records), torn


# -- crash and kill drivers ---------------------------------------------------------


class _ChildReport:
    """Framed records a child appends to a file: survives SIGKILL of the child."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="pipeline-crash-", suffix=".report")
        os.close(fd)
        self.path = Path(name)
        self.fd: int | None = None

    def open_in_child(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def put(self, kind: str, data: bytes = b"", **extra: Any) -> None:
        assert self.fd is not None
        head = json.dumps({"t": kind, "n": len(data), **extra}).encode() + b"\n"
        os.write(self.fd, head + data)

    def read(self) -> list[tuple[dict[str, Any], bytes]]:
        raw = self.path.read_bytes()
        out: list[tuple[dict[str, Any], bytes]] = []
        pos = 0
        while True:
            end = raw.find(b"\n", pos)
            if end < 0:
                break
            try:
                head = json.loads(raw[pos:end])
            except ValueError:
                break
            data = raw[end + 1 : end + 1 + head["n"]]
            if len(data) < head["n"]:
                break
            out.append((head, data))
            pos = end + 1 + head["n"]
        return out

    def clear(self) -> None:
        os.truncate(self.path, 0)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def _instrument_child(paths: SidecarPaths, report: _ChildReport) -> None:
    """In a child: report every new state version before it is written, and every ack."""
    temp = str(paths.temp)
    state = str(paths.state)
    original_write = _fs.write_all
    pending: dict[str, bytes] = {}

    def write_all(fd: int, data: bytes, path: str) -> None:
        if path == temp:
            report.put("write", bytes(data))
            pending["data"] = bytes(data)
        original_write(fd, data, path)

    replaced = {"yes": False}

    def hook(when: str, op: str, path: str) -> None:
        if when != "after":
            return
        if op == "lock":
            replaced["yes"] = False
        elif op == "replace" and path == state:
            replaced["yes"] = True
        elif op == "unlock" and replaced["yes"]:
            replaced["yes"] = False
            report.put("ack", pending.get("data", b""))

    _fs.write_all = write_all
    _fs.set_hook(hook)


def _run_child(body: Callable[[], None]) -> None:
    """Run ``body`` in the forked child and leave with ``os._exit``, whatever happens."""
    code = 0
    try:
        body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child must never return into the test runner
        code = 1
    finally:
        os._exit(code)


@dataclass(frozen=True)
class CrashPoint:
    """One crash of :func:`crash_points` (or the final, complete run)."""

    k: int
    when: str
    op: str | None
    path: str | None
    completed: bool
    report: Report
    recovered: Report | None
    error: str | None = None


def _snapshot(paths: SidecarPaths) -> dict[str, bytes | None]:
    snap: dict[str, bytes | None] = {}
    for p in (paths.state, paths.lock, paths.temp):
        snap[str(p)] = p.read_bytes() if p.exists() else None
    if paths.sidecar_dir.is_dir():
        for root, dirs, files in os.walk(paths.sidecar_dir):
            for d in dirs:
                snap[str(Path(root) / d) + os.sep] = b""
            for f in files:
                snap[str(Path(root) / f)] = (Path(root) / f).read_bytes()
        snap[str(paths.sidecar_dir) + os.sep] = b""
    return snap


def _restore(paths: SidecarPaths, snap: dict[str, bytes | None]) -> None:
    shutil.rmtree(paths.sidecar_dir, ignore_errors=True)
    for p in (paths.state, paths.lock, paths.temp):
        if snap.get(str(p)) is None:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    for name in sorted(snap):
        data = snap[name]
        if name.endswith(os.sep):
            os.makedirs(name, exist_ok=True)
        elif data is not None:
            Path(name).write_bytes(data)


def _versions(
    records: list[tuple[dict[str, Any], bytes]], before: bytes | None
) -> tuple[bytes | None, list[bytes]]:
    """The last acknowledged version and the versions in flight after it."""
    acked = before
    flight: list[bytes] = []
    for head, data in records:
        if head["t"] == "write":
            flight.append(data)
        elif head["t"] == "ack":
            acked, flight = data, []
    return acked, flight


def _recover(paths: SidecarPaths, state_kwargs: Mapping[str, Any]) -> None:
    from .state import PipelineState

    state = PipelineState(paths.state, timeout=1.0, **state_kwargs)
    with state.transaction(validate=False, operation="check"):
        pass


def crash_points(
    fn: Callable[[], object],
    state_path: str | os.PathLike[str],
    *,
    when: Sequence[When] = ("before", "after"),
    max_backups: int | None = 50,
    recover: bool = True,
    state_kwargs: Mapping[str, Any] | None = None,
    limit: int = 10_000,
) -> Iterator[CrashPoint]:
    """Crash ``fn`` at every file-system call, one child per crash point.

    For k = 1, 2, ...: restore the state file and its sidecars as they were on entry,
    fork a child that runs ``fn()`` and ``os._exit``\\ s just before (and, in another
    child, just after) its k-th seam call; check the invariants; then, if ``recover``,
    run one clean transaction and check again, strictly. Stops after the first k that
    ``fn`` completes without reaching. Each result is yielded once checked.

    Args:
        fn: Runs the work on ``state_path`` (any number of transactions).
        state_path: The state file ``fn`` works on.
        when: Crash "before" the call, "after" it, or both.
        max_backups: The ``max_backups`` that ``fn`` uses, for the backup count check.
        recover: Run one clean transaction after each crash and check strictly.
        state_kwargs: Keyword arguments for the recovering ``PipelineState``.
        limit: Give up after this many values of k (a guard against endless loops).

    Raises:
        InvariantViolation: an invariant failed after a crash; the message says where.
    """
    paths = sidecar_paths(state_path)
    kwargs = dict(state_kwargs or {})
    if max_backups is not None:
        kwargs.setdefault("max_backups", max_backups)
    snap = _snapshot(paths)
    before = snap[str(paths.state)]
    # Backups made before the call are versions committed earlier: known history.
    earlier = [
        data
        for name, data in snap.items()
        if data and name.startswith(str(paths.backups_dir) + os.sep)
    ]
    report = _ChildReport()
    try:
        for k in range(1, limit + 1):
            completed_without_crash = False
            for w in when:
                _restore(paths, snap)
                report.clear()
                _crash_once(fn, paths, report, k, w)
                records = report.read()
                crashed = [h for h, _ in records if h["t"] == "crash"]
                acked, flight = _versions(records, before)
                where = f"crash {w} seam call {k}"
                if crashed:
                    where += f" ({crashed[0]['op']} {crashed[0]['path']})"
                history = [v for v in (before, *earlier, *(d for _, d in records)) if v]
                try:
                    checked = check_invariants(
                        paths.state,
                        acknowledged=acked,
                        in_flight=flight,
                        history=history,
                        max_backups=max_backups,
                        after_crash=True,
                    )
                    recovered = None
                    if recover:
                        _recover(paths, kwargs)
                        recovered = check_invariants(
                            paths.state,
                            # the clean transaction recommits what it found
                            acknowledged=checked.state if checked.state is not None else {},
                            history=history,
                            max_backups=max_backups,
                            after_crash=False,
                        )
                except InvariantViolation as exc:
                    raise InvariantViolation(
                        paths.state, [f"{where}: {p}" for p in exc.problems]
                    ) from None
                done = [h for h, _ in records if h["t"] == "done"]
                if done and done[0]["calls"] < k:
                    completed_without_crash = True  # fn made fewer than k calls
                yield CrashPoint(
                    k=k,
                    when=w,
                    op=crashed[0]["op"] if crashed else None,
                    path=crashed[0]["path"] if crashed else None,
                    completed=not crashed,
                    report=checked,
                    recovered=recovered,
                    error=next((d.decode() for h, d in records if h["t"] == "error"), None),
                )
            if completed_without_crash:
                return
    finally:
        report.remove()
        _restore(paths, snap)


def _crash_once(
    fn: Callable[[], object], paths: SidecarPaths, report: _ChildReport, k: int, when: str
) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child

        def body() -> None:
            report.open_in_child()
            _instrument_child(paths, report)
            reporter = _fs.get_hook()
            count = {"n": 0}

            def hook(w: str, op: str, path: str) -> None:
                if w == "before":
                    count["n"] += 1
                if reporter is not None:
                    reporter(w, op, path)
                if w == when and count["n"] == k:
                    report.put("crash", op=op, path=path)
                    os._exit(CRASH_EXIT_CODE)

            _fs.set_hook(hook)
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                report.put("error", repr(exc).encode())
            report.put("done", calls=count["n"])

        _run_child(body)
    _, status = os.waitpid(pid, 0)
    return status


@dataclass(frozen=True)
class KillResult:
    """One kill of :func:`random_kills`."""

    kill: int
    acknowledged: int
    report: Report


def random_kills(
    fn: Callable[[], object],
    state_path: str | os.PathLike[str],
    *,
    kills: int = 100,
    max_delay: float = 0.02,
    seed: int | None = None,
    max_backups: int | None = 50,
    recover_every: int = 0,
    state_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[KillResult]:
    """Run ``fn`` in a loop in a child and SIGKILL it at random times, ``kills`` times.

    The same folder is used throughout, so crashes accumulate. After every kill the
    invariants are checked against the versions the child announced and acknowledged
    (every version it ever wrote counts as history for the backup check).

    Args:
        fn: One unit of work (for example one transaction); called again and again.
        state_path: The state file ``fn`` works on.
        kills: How many children to start and kill.
        max_delay: Each child is killed after a uniform random delay up to this (s).
        seed: Seed of the random delays, for a reproducible run.
        max_backups: The ``max_backups`` that ``fn`` uses.
        recover_every: Every n-th kill, also run one clean transaction and check
            strictly (0: never).
        state_kwargs: Keyword arguments for the recovering ``PipelineState``.

    Raises:
        InvariantViolation: an invariant failed after a kill.
    """
    rng = random.Random(seed)
    paths = sidecar_paths(state_path)
    kwargs = dict(state_kwargs or {})
    if max_backups is not None:
        kwargs.setdefault("max_backups", max_backups)
    history: set[str] = set()
    current = paths.state.read_bytes() if paths.state.exists() else None
    if current is not None:
        history.add(_sha(current))
    report = _ChildReport()
    acks_total = 0
    unacked_kills = 0
    try:
        for i in range(1, kills + 1):
            report.clear()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child

                def body() -> None:
                    report.open_in_child()
                    _instrument_child(paths, report)
                    while True:
                        fn()

                _run_child(body)
            try:
                time.sleep(rng.uniform(0, max_delay))
            finally:
                # Even if the sleep is interrupted, never leave the child writing.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            records = report.read()
            history.update(_sha(d) for h, d in records if h["t"] == "write")
            acks = sum(1 for h, _ in records if h["t"] == "ack")
            acks_total += acks
            unacked_kills = 1 if acks else unacked_kills + 1
            acked, flight = _versions(records, current)
            try:
                checked = check_invariants(
                    paths.state,
                    acknowledged=acked,
                    in_flight=flight,
                    history=history,
                    max_backups=max_backups,
                    after_crash=True,
                    # each crash between a backup and its pruning may leave one more
                    backup_slack=unacked_kills,
                )
                if recover_every and i % recover_every == 0:
                    _recover(paths, kwargs)
                    unacked_kills = 0
                    check_invariants(
                        paths.state, history=history, max_backups=max_backups, after_crash=False
                    )
            except InvariantViolation as exc:
                raise InvariantViolation(
                    paths.state, [f"after kill {i}: {p}" for p in exc.problems]
                ) from None
            current = paths.state.read_bytes() if paths.state.exists() else None
            yield KillResult(kill=i, acknowledged=acks_total, report=checked)
    finally:
        report.remove()
