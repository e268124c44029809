"""Injected OSErrors and KeyboardInterrupts at every seam call, plus real faults."""

from __future__ import annotations

import errno
import os
import pickle
import resource
import signal
import warnings
from pathlib import Path

import pytest

from pipeline_common import (
    PipelineState,
    StateDurabilityError,
    StateError,
    StateWarning,
    StateWriteError,
)
from pipeline_common.testing import (
    Call,
    check_invariants,
    inject_fault,
    record_calls,
    short_writes,
    sidecar_paths,
)

from ._scenarios import MAX_BACKUPS, commit, state_file, version

ERRNOS = {
    "ENOSPC": errno.ENOSPC,
    "EIO": errno.EIO,
    "EACCES": errno.EACCES,
    "EROFS": errno.EROFS,
    "EDQUOT": errno.EDQUOT,
    "EXDEV": errno.EXDEV,
    "EEXIST": errno.EEXIST,
}
COUNTS: dict[str, int] = {}


def _prepared(folder: Path) -> Path:
    """A state at the rotation boundary, so one commit makes every kind of call."""
    path = state_file(folder)
    for n in range(1, MAX_BACKUPS + 2):
        commit(path, n)
    return path


def _trace(tmp_path: Path) -> tuple[list[Call], Path]:
    path = _prepared(tmp_path / "trace")
    with record_calls() as calls:
        commit(path, 10)
    return [c for c in calls if c.when == "before"], path


def _phase(calls: list[Call], k: int, path: Path) -> str:
    """Where the k-th call (1-based) sits: before the replace, the folder fsync, or after."""
    p = sidecar_paths(path)
    replace = next(i for i, c in enumerate(calls) if c.op == "replace" and c.path == str(p.state))
    i = k - 1
    if i <= replace:
        return "before"
    if calls[i].op == "fsync_dir" and calls[i].path == str(p.state.parent):
        return "durability"
    return "after"


def _run_one(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    k: int,
    exc: BaseException | None,
    err: int,
    *,
    persistent: bool = False,
    calls: list[Call] | None = None,
):
    """Fail the k-th call; a persistent fault keeps failing every later call of that op."""
    path = _prepared(tmp_path)
    op = None
    nth = k
    if calls is not None:
        op = calls[k - 1].op
        nth = sum(1 for c in calls[:k] if c.op == op)
    before = path.read_bytes()
    log = sidecar_paths(path).log
    log_lines = log.read_bytes().count(b"\n")
    raised: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with inject_fault(op, nth=nth, errno=err, persistent=persistent, exception=exc) as fault:
            try:
                commit(path, 10)
            except BaseException as e:  # KeyboardInterrupt included, on purpose
                raised = e
    return path, before, log, log_lines, raised, [w.category for w in caught], fault


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
@pytest.mark.parametrize("name", list(ERRNOS))
def test_oserror_at_every_call(name: str, persistent: bool, tmp_path: Path) -> None:
    """Every errno at every call: a typed error or warning, clean files, lock free, recovery."""
    calls, traced = _trace(tmp_path)
    problems: list[str] = []
    for k in range(1, len(calls) + 1):
        call = calls[k - 1]
        where = f"{name} {'persistent' if persistent else 'once'} at call {k} {call.op} {call.path}"
        folder = tmp_path / f"k{k}"
        path, before, log, lines, raised, warned, _fault = _run_one(
            folder, k, None, ERRNOS[name], persistent=persistent, calls=calls
        )
        phase = _phase(calls, k, traced)
        COUNTS["oserror"] = COUNTS.get("oserror", 0) + 1
        if raised is not None and not isinstance(raised, StateError):
            problems.append(f"{where}: raw {type(raised).__name__}: {raised}")
        # EEXIST from an exclusive create or a link means "that name is taken": the
        # library picks another backup name or reads the existing owner file, by design.
        name_taken = name == "EEXIST" and call.op in {"link", "open"} and raised is None
        # EACCES opening the lock file read-write falls back to read-only (flock works on
        # it): another user's lock file still locks.
        read_only_lock = (
            name == "EACCES"
            and call.op == "open"
            and call.path.endswith(".lock")
            and not persistent
        )
        if name_taken or (read_only_lock and raised is None):
            pass  # checked by the invariants and the recovery below
        elif phase == "before" and call.op != "unlock":
            if raised is None:
                problems.append(f"{where}: no error")
            elif isinstance(raised, StateWriteError) and not raised.step:
                problems.append(f"{where}: StateWriteError without .step")
            if raised is not None and str(path) not in str(raised):
                problems.append(f"{where}: the message does not name the state file")
            if path.read_bytes() != before:
                problems.append(f"{where}: the state changed")
            new_lines = log.read_bytes().splitlines()[lines:]
            # A failed lock call (or a failed open of the lock file) means the lock is
            # not held, and the log is written only under the lock: no record, by design.
            if (
                not persistent
                and call.op != "lock"
                and not call.path.endswith(".lock")
                and not any(b'"success":false' in line for line in new_lines)
            ):
                problems.append(f"{where}: no success:false log record")
        elif phase == "durability":
            if not isinstance(raised, StateDurabilityError):
                problems.append(f"{where}: expected StateDurabilityError, got {raised!r}")
        elif raised is None and StateWarning not in warned and call.op != "unlock":
            problems.append(f"{where}: an after-commit failure was silent")
        try:
            check_invariants(path, max_backups=MAX_BACKUPS, after_crash=True)
            if list(path.parent.glob(".*.tmp")):
                problems.append(f"{where}: a temp file is left")
            # The fault is cleared: the next transaction succeeds and cleans up.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StateWarning)
                commit(path, 11)
            check_invariants(
                path, acknowledged=version(11), max_backups=MAX_BACKUPS, after_crash=False
            )
        except Exception as exc:
            problems.append(f"{where}: {type(exc).__name__}: {exc}")
    assert not problems, "\n".join(problems)


def test_short_writes_are_completed(tmp_path: Path) -> None:
    """A write syscall that writes only a few bytes at a time still commits everything."""
    path = state_file(tmp_path)
    commit(path, 1)
    with short_writes(limit=7):
        commit(path, 2, size=5000)
    check_invariants(
        path, acknowledged=version(2, 5000), max_backups=MAX_BACKUPS, after_crash=False
    )


def test_zero_byte_write_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that writes nothing fails the commit with StateWriteError; nothing changes."""
    from pipeline_common import _fs

    path = state_file(tmp_path)
    commit(path, 1)
    before = path.read_bytes()
    monkeypatch.setattr(_fs, "_os_write", lambda fd, data: 0)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(StateWriteError) as info:
            commit(path, 2)
    monkeypatch.undo()
    assert info.value.step
    assert path.read_bytes() == before
    check_invariants(path, max_backups=MAX_BACKUPS)


def test_keyboard_interrupt_at_every_call_of_a_steady_commit(tmp_path: Path) -> None:
    """KeyboardInterrupt at each call propagates unchanged; old-or-new; lock free."""
    calls, traced = _trace(tmp_path)
    problems = []
    for k in range(1, len(calls) + 1):
        path, _before, *_rest = _run_one(tmp_path / f"k{k}", k, KeyboardInterrupt(), 0)
        raised = _rest[2]
        COUNTS["interrupt"] = COUNTS.get("interrupt", 0) + 1
        if not isinstance(raised, KeyboardInterrupt) and _phase(calls, k, traced) == "before":
            problems.append(f"call {k} {calls[k - 1].op}: {raised!r}")
        try:
            check_invariants(path, max_backups=MAX_BACKUPS, after_crash=True, lock_timeout=0.2)
        except AssertionError as exc:
            problems.append(f"call {k} {calls[k - 1].op} {calls[k - 1].path}: {exc}")
    assert not problems, problems


def _in_child(fn) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Run ``fn`` in a forked child; return what it reported (a pickled dict)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        out: dict[str, object]
        try:
            out = fn()
        except BaseException as exc:
            out = {"raised": type(exc).__name__, "error": str(exc)}
        os.write(w, pickle.dumps(out))
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(data)


def _typed_result(path: Path, n: int, size: int, **kwargs: object) -> dict[str, object]:
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            state = PipelineState(path, max_backups=MAX_BACKUPS, timeout=2, **kwargs)  # type: ignore[arg-type]
            with state.transaction() as txn:
                txn.data.update(version(n, size))
    except StateError as exc:
        return {"raised": type(exc).__name__, "step": getattr(exc, "step", None), "error": str(exc)}
    except BaseException as exc:
        return {"raised": f"raw {type(exc).__name__}", "error": str(exc)}
    return {"raised": None}


def test_real_file_size_limit_is_a_typed_error(tmp_path: Path) -> None:
    """RLIMIT_FSIZE below the new state's size: EFBIG becomes StateWriteError, nothing changes."""
    path = state_file(tmp_path)
    commit(path, 1)
    before = path.read_bytes()

    def body() -> dict[str, object]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        return _typed_result(path, 2, 200_000)

    result = _in_child(body)
    assert result["raised"] == "StateWriteError", result
    assert result["step"] == "write temp file", result
    assert path.read_bytes() == before
    check_invariants(path, acknowledged=version(1), max_backups=MAX_BACKUPS, after_crash=False)


@pytest.mark.parametrize("backups", [True, False], ids=["with_backups", "without_backups"])
def test_real_read_only_folder_is_a_typed_error(backups: bool, tmp_path: Path) -> None:
    """A folder the process may not write (as nobody when root): typed error, nothing changes."""
    path = state_file(tmp_path / "ro")
    commit(path, 1)
    before = path.read_bytes()
    os.chmod(tmp_path, 0o755)

    def body() -> dict[str, object]:
        if os.getuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        else:
            os.chmod(path.parent, 0o555)
        return _typed_result(path, 2, 100, backup_before_write=backups)

    try:
        result = _in_child(body)
    finally:
        os.chmod(path.parent, 0o755)
    assert result["raised"] in ("StateWriteError", "StateSidecarError", "StateLockError"), result
    assert path.read_bytes() == before
    assert list(path.parent.glob(".*.tmp")) == []
    check_invariants(path, acknowledged=version(1), max_backups=MAX_BACKUPS, after_crash=False)
