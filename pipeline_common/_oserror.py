"""Plain words for the OSErrors a user can fix: what happened, and what to do.

A permission problem or a read-only file system is not a broken file: the messages
say so, and never advise removing anything (nothing is wrong with the files).
"""

from __future__ import annotations

import errno
import os

try:
    import pwd
except ImportError:  # pragma: no cover - Windows
    pwd = None  # type: ignore[assignment]

__all__ = ["ADVISED", "PERMISSION", "explain"]

PERMISSION = frozenset({errno.EACCES, errno.EPERM})
"""errno values that mean "this user may not do that"."""

ADVISED = frozenset({*PERMISSION, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
"""errno values :func:`explain` gives a cause and a remedy for."""


def _user() -> str:
    try:
        return f"{pwd.getpwuid(os.geteuid()).pw_name!r} (uid {os.geteuid()})"
    except (KeyError, AttributeError):  # pragma: no cover - Windows, no passwd entry
        return "this user"


def explain(exc: OSError, folder: str | os.PathLike[str]) -> str:
    """What ``exc`` means for a file in ``folder``, and what to do about it.

    For errno values outside :data:`ADVISED`, the system's own words.
    """
    where = os.fspath(folder)
    if exc.errno in PERMISSION:
        return (
            f"{'permission denied' if exc.errno == errno.EACCES else 'operation not permitted'}"
            f": {_user()} may not write in {where}. "
            "Run as a user who can, or give this user write access to that folder and "
            "its files (chmod, chown)"
        )
    if exc.errno == errno.EROFS:
        return (
            f"read-only file system: {where} is on a file system mounted read-only. "
            "Remount it read-write, or keep the state in a writable folder (reading "
            "the state needs no write access)"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left ({exc.strerror}) on the file system of {where}. Free some "
            "space (or raise the quota) and run again"
        )
    return str(exc.strerror or exc)
