"""The durable atomic replace: temp file beside the target, fsync, rename, fsync folder.

This is the only code that makes a state version durable. Each step is named, so an
error says which step failed; cleanup never hides the original error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import _fs
from ._oserror import ADVISED, explain
from .errors import StateDurabilityError, StateError, StateWriteError

__all__ = ["Committed", "atomic_replace", "temp_path_for"]


@dataclass(frozen=True)
class Committed:
    """What was committed: enough to recognise the file later without hashing it."""

    ino: int
    size: int
    mtime_ns: int


def temp_path_for(target: Path) -> Path:
    """The one temp name for ``target``: in its folder, since rename is atomic only
    within one file system. One name suffices because writers hold the lock, and it
    means a crash leaves at most one orphan, which the next commit reuses."""
    return target.with_name(f".{target.name}.tmp")


def _fail(step: str, target: Path, exc: OSError) -> StateWriteError:
    if exc.errno in ADVISED:
        return StateWriteError(
            f"could not commit {target}: {step} failed: {explain(exc, target.parent)}. The "
            "state file is unchanged.",
            path=target,
            step=step,
            errno=exc.errno,
        )
    return StateWriteError(
        f"could not commit {target}: {step} failed ({exc.strerror or exc}); the state file "
        "is unchanged. Fix the cause (disk space, permissions, a read-only file system) "
        "and run the transaction again.",
        path=target,
        step=step,
        errno=exc.errno,
    )


def atomic_replace(
    target: Path,
    data: bytes,
    mode: int | None,
    *,
    before_replace: Callable[[], None] | None = None,
    durable: bool = True,
    check_temp: bool = False,
) -> Committed:
    """Make ``data`` the content of ``target``, durably and atomically.

    Args:
        target: The state file (already resolved: a symlink's target).
        data: The complete new content.
        mode: The permission bits to give the file, or None for ``0o666 & ~umask``.
        before_replace: Called after the temp file is durable and before the rename:
            the last moment to make a backup durable. An error from it aborts the
            commit like any other step.
        durable: False skips both fsyncs (``durability="atomic"``): never torn, but
            a power loss may take the newest commits back.
        check_temp: Right before the rename, check that the file at the temp name is
            still ours. Only a lock that can be lost while held (Redis) needs it: a
            writer paused past its fencing check may find the temp name taken by the
            new holder's unfinished file, and renaming that would tear the state.

    Raises:
        StateWriteError: a step before the rename failed; ``target`` is untouched and
            no temp file is left.
        StateDurabilityError: the folder fsync after the rename failed; the new content
            is in place but may not survive a power loss.
    """
    tmp = str(temp_path_for(target))
    step = "create temp file"
    fd: int | None = None
    # The temp file's identity, once created: (device, inode) while our descriptor keeps
    # the inode from being reused, then with its ctime too, once the descriptor is closed.
    ours: tuple[int, ...] | None = None
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = _fs.open_file(tmp, flags, 0o666)
        except FileExistsError:
            # An orphan of a crashed writer (we hold the lock, so nobody else's).
            step = "remove orphan temp file"
            _fs.unlink(tmp)
            step = "create temp file"
            fd = _fs.open_file(tmp, flags, 0o666)
        created = os.fstat(fd)
        ours = (created.st_dev, created.st_ino)
        if mode is not None:
            step = "set temp file mode"
            _fs.fchmod(fd, mode, tmp)
        step = "write temp file"
        _fs.write_all(fd, data, tmp)
        if durable:
            step = "fsync temp file"
            _fs.fsync(fd, tmp)
        st = os.fstat(fd)
        ours = (st.st_dev, st.st_ino, st.st_ctime_ns)
        step = "close temp file"
        closing, fd = fd, None
        _fs.close(closing, tmp)
        if before_replace is not None:
            step = "before replace"
            before_replace()
        if check_temp:
            step = "check temp file"
            now = os.lstat(tmp)
            if (now.st_dev, now.st_ino, now.st_ctime_ns) != ours:
                raise StateWriteError(
                    f"the temp file {tmp} is no longer this writer's: another writer took "
                    f"over (this one must have lost its lock). {target} was not replaced; "
                    "check the lock's timeouts (docs/multi-host.md).",
                    path=target,
                    step=step,
                )
        step = "replace state file"
        _fs.replace(tmp, str(target))
    except OSError as exc:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        _remove_quietly(tmp, ours)
        if isinstance(exc, StateError):
            raise  # from before_replace, e.g. a lost lock (StateLockError is a TimeoutError)
        raise _fail(step, target, exc) from exc
    except BaseException:
        # KeyboardInterrupt and friends: same cleanup, original error untouched.
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        _remove_quietly(tmp, ours)
        raise
    try:
        if durable:
            _fs.fsync_dir(str(target.parent))
    except OSError as exc:
        raise StateDurabilityError(
            f"{target} was replaced with the new state, but fsync of its folder failed "
            f"({exc.strerror or exc}): the commit is visible but may not survive a power loss. "
            "Check the disk (dmesg); do not assume the change is durable.",
            path=target,
            step="fsync state folder",
            errno=exc.errno,
        ) from exc
    return Committed(ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _remove_quietly(path: str, ours: tuple[int, ...] | None) -> None:
    """Remove our temp file, never another writer's: a writer that lost a Redis lock while
    paused finds the new holder's temp file at the name (that holder removed ours as an
    orphan), and removing it would fail the new holder's commit."""
    # Gone already, or left for the next commit, which reuses the name. Not created yet
    # as far as we know (``ours`` None: cut short around the create): remove the name.
    with contextlib.suppress(OSError):
        if ours is not None:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino, st.st_ctime_ns)[: len(ours)] != ours:
                return
        _fs.unlink(path)
