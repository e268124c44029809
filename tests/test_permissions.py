"""Permission problems and read-only file systems say what happened and what to do.

A user who may not write the state's folder got "cannot open the lock file ...: No such
file or directory ... must be a regular file" (the EACCES of the create was hidden by
the ENOENT of a read-only retry); on a read-only file system the message advised
removing the lock file. Now each says "permission denied" (naming the user and the
folder) or "read-only file system", and never advises removing anything.

Permission tests need a user the kernel checks: as root they run in a forked child that
drops to ``nobody``; as any other user they run as that user on folders made read-only
for it. The read-only file system is a real read-only bind mount when this process may
mount (root in CI), and an ``EROFS`` injected through the ``_fs`` seam otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateError, StateSidecarError, StateWriteError
from pipeline_common.testing import inject_fault

assert fcntl  # imported before a child drops privileges (it cannot import it later)

_NOBODY = 65534
_MISLEADING = ("No such file or directory", "must be a regular file", "remove", "delete")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pc-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for sub in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            if sub.is_dir() and not sub.is_symlink():
                sub.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


def _as_other_user(fn: Callable[[], Any]) -> tuple[str, Any]:
    """Run ``fn`` as a user that the folder's permissions apply to; return
    ``("ok", result)`` or ``("raised", exception)``.

    As root: in a forked child that dropped to ``nobody`` (the result comes back
    pickled). Otherwise: right here, as this user.
    """
    if os.geteuid() != 0:
        try:
            return "ok", fn()
        except Exception as exc:
            return "raised", exc
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            try:
                result: tuple[str, Any] = ("ok", fn())
            except Exception as exc:
                result = ("raised", exc)
            with os.fdopen(write, "wb") as fh:
                pickle.dump(result, fh)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    assert data, "the unprivileged child sent nothing"
    outcome: tuple[str, Any] = pickle.loads(data)
    return outcome


def _commit_failure(commit: Callable[[], None]) -> tuple[BaseException, list[str]]:
    """Run ``commit``, which must fail; return its error and the warnings it gave (the
    failed transaction's log record cannot be appended either: a StateWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            commit()
        except Exception as exc:
            return exc, [str(w.message) for w in caught]
    raise AssertionError("the commit did not fail")


def _read_only_for_others(*folders: Path) -> None:
    for folder in folders:
        folder.chmod(0o555)


def _assert_says_permission_denied(exc: BaseException, folder: Path) -> None:
    message = str(exc)
    assert "permission denied" in message, message
    assert str(folder) in message, message
    for bad in _MISLEADING:
        assert bad not in message, (bad, message)


def test_a_new_state_in_a_folder_this_user_cannot_write(shared_dir: Path) -> None:
    """Defect 10's reproduction: a typed error that says permission denied, names the
    user and the folder, and advises nothing destructive; nothing is created."""
    folder = shared_dir / "rootdir"
    folder.mkdir()
    _read_only_for_others(folder)
    outcome, exc = _as_other_user(lambda: PipelineState(folder / "new.json").write({}))
    assert outcome == "raised"
    assert isinstance(exc, StateSidecarError), repr(exc)
    _assert_says_permission_denied(exc, folder)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("lock_readable", [True, False])
def test_an_existing_state_this_user_may_read_but_not_write(
    shared_dir: Path, lock_readable: bool
) -> None:
    """Another user's state: reading works; a commit says "permission denied" (at the
    lock file when this user cannot even read it, else at the backup step, with errno
    EACCES); the file keeps its bytes."""
    state = PipelineState(shared_dir / "pipeline.json")
    state.write({"n": 1})
    state.write({"n": 2})
    before = state.path.read_bytes()
    os.chmod(state.lock_path, 0o644 if lock_readable else 0o600)
    _read_only_for_others(shared_dir, state.sidecar_dir, state.backups_dir)

    def attempt() -> Any:
        other = PipelineState(shared_dir / "pipeline.json")
        assert other.read() == {"n": 2}
        return _commit_failure(lambda: other.write({"n": 3}))

    outcome, (exc, warned) = _as_other_user(attempt)
    assert outcome == "ok"
    if lock_readable:
        assert isinstance(exc, StateWriteError), repr(exc)
        assert exc.errno in (errno.EACCES, errno.EPERM)
        _assert_says_permission_denied(exc, state.backups_dir)
        for text in warned:  # the failure's own log record could not be appended
            _assert_says_permission_denied(
                Exception(text.split("; the state")[0]), state.sidecar_dir
            )
    else:
        assert isinstance(exc, StateSidecarError), repr(exc)
        _assert_says_permission_denied(exc, shared_dir)
    assert state.path.read_bytes() == before


def test_without_backups_the_temp_file_step_says_permission_denied(shared_dir: Path) -> None:
    """The same through the atomic replace (no backup step): the temp file's create fails."""
    state = PipelineState(shared_dir / "pipeline.json")
    state.write({"n": 1})
    os.chmod(state.lock_path, 0o666)  # the lock itself is usable: only the folder is not
    _read_only_for_others(shared_dir)

    def attempt() -> Any:
        other = PipelineState(shared_dir / "pipeline.json", backup_before_write=False)
        return _commit_failure(lambda: other.write({"n": 2}))[0]

    outcome, exc = _as_other_user(attempt)
    assert outcome == "ok"
    assert isinstance(exc, StateWriteError), repr(exc)
    assert exc.step == "create temp file"
    _assert_says_permission_denied(exc, shared_dir)


@contextlib.contextmanager
def _read_only(folder: Path, mount_point: Path) -> Iterator[tuple[Path, str]]:
    """``folder`` seen read-only: a real read-only bind mount at ``mount_point`` when
    this process may mount, else ``folder`` itself with EROFS injected on every
    file-system call under it. Yields the folder to use and how it was made."""
    mount_point.mkdir()
    if os.geteuid() == 0 and shutil.which("mount"):
        bound = subprocess.run(["mount", "--bind", str(folder), str(mount_point)], check=False)
        if bound.returncode == 0:
            try:
                subprocess.run(["mount", "-o", "remount,bind,ro", str(mount_point)], check=True)
                yield mount_point, "read-only bind mount"
            finally:
                subprocess.run(["umount", str(mount_point)], check=True)
            return
    with inject_fault(path=folder.name, errno=errno.EROFS, persistent=True):
        yield folder, "EROFS injected through the _fs seam"


@pytest.mark.parametrize("existing", [False, True], ids=["new state", "existing state"])
def test_a_read_only_file_system_says_so_and_never_advises_removing(
    tmp_path: Path, existing: bool
) -> None:
    """On a read-only file system: "read-only file system" and what to do; the lock
    file is never called removable; reading and verify still work."""
    folder = tmp_path / "data"
    folder.mkdir()
    if existing:
        PipelineState(folder / "pipeline.json").write({"n": 1})
        PipelineState(folder / "pipeline.json").write({"n": 2})
    with _read_only(folder, tmp_path / "ro") as (where, how):
        state = PipelineState(where / "pipeline.json")
        error, warned = _commit_failure(lambda: state.write({"n": 3}))
        assert isinstance(error, StateError), repr(error)
        for text in warned:
            assert "read-only file system" in text, (how, text)
        message = str(error)
        assert "read-only file system" in message, (how, message)
        assert "Remount it read-write" in message, (how, message)
        for bad in _MISLEADING:
            assert bad not in message, (how, bad, message)
        if existing:
            assert state.read() == {"n": 2}, how
            assert state.verify(), how
    if existing:
        assert PipelineState(folder / "pipeline.json").read() == {"n": 2}


def test_a_second_user_of_a_shared_state_still_gets_backups(shared_dir: Path) -> None:
    """Two users share a state folder: the kernel refuses to hard-link the other user's
    file that this user may not write (fs.protected_hardlinks, EPERM), though the
    commit may replace it; the backup of the version being replaced is then a copy of
    the bytes read under the lock."""
    state = PipelineState(shared_dir / "pipeline.json")
    state.write({"n": 1})
    for path in (shared_dir, state.sidecar_dir, state.backups_dir):
        path.chmod(0o777)
    for path in (state.lock_path, state.log_path):
        path.chmod(0o666)
    state.path.chmod(0o644)  # readable by the other user, and replaceable (folder 0777),
    # but not writable: the kernel then refuses the other user a hard link to it

    def attempt() -> Any:
        other = PipelineState(shared_dir / "pipeline.json")
        other.write({"n": 2})
        return [json.loads(p.read_bytes()) for p in other.list_backups()]

    outcome, backups = _as_other_user(attempt)
    assert outcome == "ok", backups
    assert backups == [{"n": 1}]
    assert state.read() == {"n": 2}
    # (the lock file is world-writable here, which verify rightly flags: nobody is in
    # no group of root's, so "others" stands for a shared group)
    assert [c.name for c in state.verify().problems] == ["lock file sane"]
