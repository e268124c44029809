"""Every file-system call of the write path, behind one seam.

The commit protocol's safety rests on the order of these calls, so all of them go
through here: tests install a hook that records the order, injects an ``OSError``
or kills the process before or after any call (the analogue of SQLite's test VFS).
Nothing here retries a failed call: a failed fsync is reported, never trusted.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

__all__ = [
    "Hook",
    "close",
    "fchmod",
    "fdatasync",
    "flock",
    "fsync",
    "fsync_dir",
    "ftruncate",
    "get_hook",
    "link",
    "mkdir",
    "open_file",
    "replace",
    "set_hook",
    "unlink",
    "write_all",
]

Hook = Callable[[str, str, str], None]
"""Called as ``hook(when, op, path)`` with ``when`` "before" or "after" each call."""

_hook: Hook | None = None

# Indirection so tests can force short writes without touching the os module.
_os_write: Callable[[int, bytes | memoryview], int] = os.write


def set_hook(hook: Hook | None) -> Hook | None:
    """Install ``hook`` (or remove it with None) and return the previous one."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def get_hook() -> Hook | None:
    """Return the installed hook, if any."""
    return _hook


def _before(op: str, path: str) -> None:
    if _hook is not None:
        _hook("before", op, path)


def _after(op: str, path: str) -> None:
    if _hook is not None:
        _hook("after", op, path)


def open_file(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that is seen by the hook (it creates files, so it counts)."""
    _before("open", path)
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    _after("open", path)
    return fd


def write_all(fd: int, data: bytes, path: str) -> None:
    """Write every byte of ``data``; a short write continues, a zero write fails."""
    _before("write", path)
    view = memoryview(data)
    while view:
        n = _os_write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write wrote nothing", path)
        view = view[n:]
    _after("write", path)


def fsync(fd: int, path: str) -> None:
    """fsync a file: its data and metadata reach the disk, or OSError."""
    _before("fsync", path)
    os.fsync(fd)
    _after("fsync", path)


def fdatasync(fd: int, path: str) -> None:
    """fdatasync an appended file (size is flushed, atime/mtime need not be)."""
    _before("fdatasync", path)
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS and Windows have no fdatasync
        os.fsync(fd)
    _after("fdatasync", path)


def close(fd: int, path: str) -> None:
    """Close a file descriptor; a failed close after writes is an error (NFS reports there)."""
    _before("close", path)
    os.close(fd)
    _after("close", path)


def fchmod(fd: int, mode: int, path: str) -> None:
    """Set the mode of an open file."""
    _before("chmod", path)
    os.fchmod(fd, mode)
    _after("chmod", path)


def ftruncate(fd: int, length: int, path: str) -> None:
    """Cut a file to ``length`` bytes (log tail repair)."""
    _before("truncate", path)
    os.ftruncate(fd, length)
    _after("truncate", path)


def replace(src: str, dst: str) -> None:
    """Atomically rename ``src`` over ``dst`` (same folder, so same file system)."""
    _before("replace", dst)
    os.replace(src, dst)
    _after("replace", dst)


def link(src: str, dst: str) -> None:
    """Hard-link ``src`` as ``dst``; fails with EEXIST rather than overwrite."""
    _before("link", dst)
    os.link(src, dst, follow_symlinks=False)
    _after("link", dst)


def unlink(path: str) -> None:
    """Remove a file."""
    _before("unlink", path)
    os.unlink(path)
    _after("unlink", path)


def mkdir(path: str, mode: int) -> None:
    """Create one folder."""
    _before("mkdir", path)
    os.mkdir(path, mode)
    _after("mkdir", path)


def fsync_dir(path: str) -> None:
    """fsync a folder, so the names created, renamed or removed in it are durable.

    fsync(2): syncing a file "does not necessarily ensure that the entry in the
    directory containing the file has also reached disk".
    """
    _before("fsync_dir", path)
    if os.name == "nt":  # pragma: no cover - Windows cannot open a folder for fsync
        _after("fsync_dir", path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _after("fsync_dir", path)


def flock(fd: int, operation: int, path: str) -> None:
    """``fcntl.flock``; seen by the hook as "lock" or "unlock"."""
    import fcntl

    op = "unlock" if operation & fcntl.LOCK_UN else "lock"
    _before(op, path)
    fcntl.flock(fd, operation)
    _after(op, path)
