"""Looking back: backups with their generations, content at a generation, verify, repair.

These read the whole log, so they are for people and tools (a REPL, the CLI), not
for the commit path. ``state.py`` exposes them as methods.

They run while writers commit, without the lock, so each reads in an order that keeps
its answer true: the backups are listed before the log is read (a listed backup's
version was logged before the backup was made), a backup pruned between the listing
and the reading is taken as gone, and :func:`verify` looks again holding the lock
before it reports a problem that a commit in flight could explain.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _fs, _json, _log
from ._atomic import temp_path_for
from ._history import BackupInfo, Check, RepairReport, VerifyReport
from .errors import (
    StateBackupError,
    StateError,
    StateLockError,
    StateSidecarError,
    StateValidationError,
)

if TYPE_CHECKING:
    from .state import PipelineState

__all__ = ["backup_infos", "content_at", "repair", "resolve", "verify"]


def _records(state: PipelineState) -> list[dict[str, Any]]:
    out = []
    for raw in _log.read_lines(state.log_path):
        record = _log.parse_line(raw)
        if record is not None:
            out.append(record)
    return out


def _created(name: str) -> datetime:
    stamp = name.rsplit("_", 3)[-3:]
    text = "_".join(stamp).split(".", 1)[0]
    try:
        return datetime.strptime(text, "%Y%m%d_%H%M%S_%f").replace(tzinfo=timezone.utc)
    except ValueError:
        return datetime.fromtimestamp(0, timezone.utc)


def backup_infos(state: PipelineState, limit: int | None = None) -> list[BackupInfo]:
    """Backups newest first, each with the generation and operation of the version it holds.

    A backup named in a commit record of generation g holds generation g - 1 (the
    version that commit replaced); failing that, its content hash is looked up.
    The folder is listed before the log is read, so the version each listed backup
    holds is in the records read (it was logged before the backup was made).
    """
    paths = state.backup_manager.list_paths(limit)
    records = _records(state)
    by_generation = {
        r.get("generation", 0): r for r in records if r.get("success") and r.get("sha256")
    }
    by_sha = {r["sha256"]: r for r in by_generation.values()}
    replaced_in = {
        r["details"]["backup"]: r
        for r in records
        if isinstance(r.get("details"), dict) and isinstance(r["details"].get("backup"), str)
    }
    out = []
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        generation: int | None = None
        maker = replaced_in.get(path.name)
        if maker is not None and isinstance(maker.get("generation"), int):
            # the replacing commit's generation, minus one for commits that advanced it
            generation = maker["generation"] - (1 if maker.get("sha256") else 0)
        source = by_generation.get(generation) if generation is not None else None
        if source is None:
            try:
                digest = hashlib.sha256(state.backup_manager.load(path)).hexdigest()
            except FileNotFoundError:
                continue  # pruned since it was listed: gone, so not shown
            except (OSError, EOFError, zlib.error):
                digest = ""  # unreadable: shown, with the generation unknown
            source = by_sha.get(digest)
            if source is not None:
                generation = source.get("generation")
        out.append(
            BackupInfo(
                path=path,
                generation=generation,
                created=_created(path.name),
                size=size,
                operation=source.get("operation") if source else None,
                compressed=path.name.endswith(".gz"),
            )
        )
    return out


def content_at(state: PipelineState, generation: int) -> dict[str, Any]:
    """The state as it was at ``generation``, from the current file or a backup.

    Raises:
        StateBackupError: no backup holds that generation (pruned, or never backed up).
    """
    for _ in range(3):  # writers may commit and prune meanwhile: look again, twice at most
        data, version = state.read_versioned()
        if generation == version:
            return data
        infos = backup_infos(state)
        for info in infos:
            if info.generation == generation:
                try:
                    return _json.decode(state.backup_manager.load(info.path))
                except FileNotFoundError:
                    break  # pruned since it was listed: look again
        else:
            if generation < version:
                break  # not in the backups listed after that version: pruned or never made
    held = sorted({i.generation for i in infos if i.generation is not None})
    raise StateBackupError(
        f"no backup of {state.path} holds generation {generation} (the current one is "
        f"{version}; backups hold {held or 'none'}): it was pruned or never backed up",
        path=state.path,
    )


def resolve(state: PipelineState, ref: Any) -> dict[str, Any]:
    """Turn a diff operand into data: ``"current"``, a generation, a backup, or a dict."""
    if isinstance(ref, dict):
        return ref
    if isinstance(ref, str) and ref == "current":
        return state.read()
    if isinstance(ref, int) and not isinstance(ref, bool):
        return content_at(state, ref)
    if isinstance(ref, (str, os.PathLike)):
        backup = state.backup_manager.check(ref)
        return _json.decode(state.backup_manager.read_checked(backup))
    if isinstance(ref, BackupInfo):
        return resolve(state, ref.path)
    raise TypeError(
        f"cannot compare {ref!r}: use 'current', a generation (int), a backup path, "
        "a BackupInfo or a dict"
    )


_LOCK_FREE_PASSES = 3  # before verify takes the lock for a pass that writers wait on


def verify(state: PipelineState) -> VerifyReport:
    """Check the state, the log, the backups, stray files and the lock file.

    The first passes take no lock. Writers may move things between their reads (a
    state replaced before its log record is appended, a backup linked before the
    prune, a temp file being written), which can only add false problems: a healthy
    pass is the answer. When every lock-free pass found a problem, one more pass runs
    holding the lock, when no commit of this library is in flight, and only what it
    finds is reported (writers wait for that one pass). Without the lock (held by a
    writer longer than ``state.timeout``, or a lock file this user cannot open) the
    last lock-free pass's findings are reported as they are.
    """
    for _ in range(_LOCK_FREE_PASSES):
        report = _verify_pass(state)
        if report:  # a race only adds false problems, so a healthy pass is true
            return report
    with _quiet(state) as quiet:
        if quiet:
            return _verify_pass(state)
    return report


@contextlib.contextmanager
def _quiet(state: PipelineState) -> Iterator[bool]:
    """Hold the state's lock for the block, if it can be had; yield whether it is held."""
    lock = state._lock
    if lock.held_by_current_thread():  # inside a transaction of this thread: nothing moves
        yield True
        return
    # Never committed, so nothing can be in flight: the lock file is absent. Under a Redis
    # lock that file is this host's own, absent on a host that only reads while others
    # commit: there the log tells.
    committed = lock.path if lock.path == state.lock_path else state.log_path
    if not os.path.exists(committed):
        yield False
        return
    try:
        lock.acquire(state.timeout, "verify", state.path)
    except (StateLockError, StateSidecarError):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """``check()``, or a failed check saying why it could not run (never a raw OSError)."""
    try:
        return check()
    except OSError as exc:
        return _failed(name, exc)


def _failed(name: str, exc: OSError) -> Check:
    where = f" {exc.filename}" if exc.filename else ""
    return Check(name, False, f"cannot read{where}: {exc.strerror or exc}")


def _verify_pass(state: PipelineState) -> VerifyReport:
    checks: list[Check] = []
    # Backups first: every version a listed backup holds is then in the log read after.
    try:
        backups: list[Path] | OSError = state.backup_manager.list_paths(None)
    except OSError as exc:
        backups = exc
    raw = None
    try:
        raw = state._read_bytes()
        data = state._decode(raw)
        checks.append(Check("state parses", True, "no state file yet" if raw is None else ""))
        try:
            state._validate(data)
            checks.append(Check("state validates", True, state.schema.__name__))
        except StateValidationError as exc:
            found = "; ".join(
                (".".join(str(p) for p in e["loc"]) + ": " if e["loc"] else "")
                + str(e["msg"]).removeprefix("Value error, ")
                for e in exc.errors
            )
            checks.append(Check("state validates", False, f"{state.schema.__name__}: {found}"))
    except StateError as exc:
        checks.append(Check("state parses", False, str(exc)))

    log_error: OSError | None = None
    try:
        lines, torn = _log.read_log(state.log_path)
    except OSError as exc:
        log_error, lines, torn = exc, [], b""
    records = [r for r in (_log.parse_line(x) for x in lines) if r is not None]
    commits = [r for r in records if r.get("success") and r.get("sha256")]
    if raw is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if not commits:
            checks.append(Check("state matches log", False, "no commit record in the log"))
        elif commits[-1]["sha256"] != digest:
            checks.append(
                Check(
                    "state matches log",
                    False,
                    f"the file's sha256 {digest[:12]} is not the newest commit's "
                    f"{commits[-1]['sha256'][:12]} (changed outside the library, or a "
                    "commit whose record is missing: repair() records it)",
                )
            )
        else:
            checks.append(
                Check("state matches log", True, f"generation {commits[-1]['generation']}")
            )

    if log_error is not None:
        checks.append(_failed("log chain intact", log_error))
    else:
        checks.append(_check_chain(lines, torn, state._log.damaged_path))
    if any("fence" in r for r in commits):
        checks.append(_check_fences(commits))
    name = "backups parse and match commits"
    if isinstance(backups, OSError):
        checks.append(_failed(name, backups))
    else:
        listed = backups
        checks.append(_guarded(name, lambda: _check_backups(state, commits, listed)))
    checks.append(_guarded("no orphan temp files", lambda: _check_debris(state)))
    checks.append(_guarded("lock file sane", lambda: _check_lock_file(state)))
    return VerifyReport(state.path, tuple(checks))


def _check_chain(lines: list[bytes], torn: bytes, damaged: Path) -> Check:
    problems = []
    prev_hash = None
    prev_seq = None
    last_damaged = False
    for i, raw in enumerate(lines):
        record = _log.parse_line(raw)
        last_damaged = record is None or record.get("prev") != prev_hash
        if record is None:
            # A complete line (it ends with a newline) is damage, not a torn append.
            problems.append(f"line {i + 1} does not parse (damaged)")
            prev_hash = _log.line_hash(raw)
            continue
        seq = record.get("seq")
        if prev_seq is not None and seq != prev_seq + 1:
            problems.append(f"line {i + 1}: seq {seq} after {prev_seq} (a record is missing)")
        if record.get("prev") != prev_hash:
            problems.append(f"line {i + 1}: seq {seq} does not chain to the line before (edited?)")
        prev_seq = seq if isinstance(seq, int) else prev_seq
        prev_hash = _log.line_hash(raw)
    if last_damaged:
        problems.append(
            f"the damaged last line is kept; the next commit or repair() moves it to {damaged}"
        )
    if torn:
        problems.append(
            f"the last line is torn ({len(torn)} bytes with no newline: a crash during an "
            "append; the next commit or repair() cuts it)"
        )
    if damaged.exists():
        problems.append(f"damaged log lines were moved aside to {damaged}: read it, then delete it")
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        return Check("log chain intact", False, shown)
    return Check("log chain intact", True, f"{len(lines)} records")


def _check_fences(commits: list[dict[str, Any]]) -> Check:
    """Commits made under the Redis lock carry fencing tokens that must only grow: a
    token that does not is a commit by a writer that had lost the lock."""
    problems = []
    newest = 0
    holder: tuple[Any, Any] | None = None  # who committed with the newest token
    for record in commits:
        fence = record.get("fence")
        if not isinstance(fence, int):
            continue
        writer = (record.get("pid"), record.get("host"))
        # One hold may commit more than once with its token (a recover or migrate
        # record, then the transaction); the same token from another writer may not.
        if fence < newest or (fence == newest and writer != holder):
            problems.append(
                f"seq {record.get('seq')}: token {fence} after {newest} (a writer that had "
                "lost the lock committed)"
            )
        if fence >= newest:
            newest, holder = fence, writer
    if problems:
        return Check("fencing tokens grow", False, "; ".join(problems[:5]))
    return Check("fencing tokens grow", True, f"newest token {newest}")


def _check_backups(
    state: PipelineState, commits: list[dict[str, Any]], listed: list[Path]
) -> Check:
    known_sha = {r["sha256"] for r in commits}
    known_ino = {r["stat"][0] for r in commits if isinstance(r.get("stat"), list) and r["stat"]}
    problems = []
    paths = []
    for path in listed:
        try:
            data = state.backup_manager.load(path)
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            continue  # pruned since the listing: gone is no problem
        except (OSError, EOFError, zlib.error) as exc:
            problems.append(f"{path.name} is unreadable or corrupt ({exc})")
            paths.append(path)
            continue
        paths.append(path)
        try:
            _json.decode(data)
        except _json.DecodeError as exc:
            problems.append(f"{path.name} is unreadable or corrupt ({exc})")
            continue
        if commits and hashlib.sha256(data).hexdigest() not in known_sha:
            detail = "changed after it was made" if ino in known_ino else "matches no commit"
            problems.append(f"{path.name} {detail}")
    if len(paths) > state.max_backups:
        problems.append(f"{len(paths)} backups, more than max_backups={state.max_backups}")
    if problems:
        return Check("backups parse and match commits", False, "; ".join(problems[:5]))
    return Check("backups parse and match commits", True, f"{len(paths)} backups")


def _debris(state: PipelineState) -> list[Path]:
    found = []
    tmp = temp_path_for(state.path)
    if os.path.lexists(tmp):
        found.append(tmp)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(state.backups_dir):  # (other OSErrors: verify reports them)
            if name.startswith(".") and name.endswith(".tmp"):
                found.append(state.backups_dir / name)
    return found


def _check_debris(state: PipelineState) -> Check:
    found = _debris(state)
    if found:
        return Check("no orphan temp files", False, ", ".join(str(p) for p in found))
    return Check("no orphan temp files", True)


def _check_lock_file(state: PipelineState) -> Check:
    try:
        st = os.lstat(state.lock_path)
    except FileNotFoundError:
        return Check("lock file sane", True, "not created yet")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return Check("lock file sane", False, f"{state.lock_path} is not a regular file")
    if st.st_mode & 0o002:
        return Check("lock file sane", False, f"{state.lock_path} is world-writable")
    return Check("lock file sane", True)


def repair(state: PipelineState) -> RepairReport:
    """Fix what can be fixed without losing data, as one logged ``recover`` record.

    Cuts a torn log tail, removes orphan temp files, and records a commit whose log
    record is missing (the transaction machinery does that part on entry). Problems
    that cannot be fixed without a choice (a corrupt state: restore a backup; an
    edited log record) are left and reported.
    """
    actions: list[str] = []
    with state._locked_operation("recover") as txn:
        moved, cut = state._log.repair_tail(durable=state.durability == "full")
        if moved:
            actions.append(
                f"moved {moved} damaged line(s) from {state.log_path.name} to "
                f"{state._log.damaged_path}"
            )
        if cut:
            actions.append(f"cut a torn tail of {cut} bytes from {state.log_path.name}")
        for path in _debris(state):
            with contextlib.suppress(FileNotFoundError):
                _fs.unlink(str(path))
                actions.append(f"removed orphan temp file {path}")
        if txn.details.get("recovered_commit"):
            actions.append("recorded a commit whose log record was missing")
        txn.details["actions"] = actions
        if not actions:
            txn.skip_log()  # nothing fixed: the log does not grow
    remaining = tuple(c for c in verify(state).checks if not c.ok)
    return RepairReport(state.path, tuple(actions), remaining)
