"""The sidecar folders (``.<stem>/`` and its ``backups/``) must be real folders.

One check for both sides: a writer refuses to create files through a symlinked or
replaced folder, and a reader refuses to read backups or the log from one, with the
same error, so no command shows data from outside the state's own folder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import StateSidecarError

__all__ = ["check_folders", "refused"]


def refused(folder: Path, st: os.stat_result) -> StateSidecarError:
    """The error for ``folder``, which ``lstat`` found to be ``st`` (not a real folder)."""
    return StateSidecarError(
        f"{folder} must be a real folder, but it is a "
        f"{'symlink' if stat.S_ISLNK(st.st_mode) else 'file'}; pipeline_common "
        "refuses to follow it. Move it away and run again.",
        path=folder,
    )


def check_folders(folders: Iterable[Path]) -> None:
    """Raise :class:`StateSidecarError` if any of ``folders`` exists but is not a real
    folder (a symlink, even to a folder, or a file); a missing one is fine."""
    for folder in folders:
        try:
            st = os.lstat(folder)
        except OSError:
            continue  # missing (nothing to read), or unreachable: the read itself says so
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise refused(folder, st)
