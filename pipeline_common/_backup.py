"""Rotating backups of every replaced state version.

A backup is a hard link to the replaced version's inode, made before the state is
replaced: no data is copied (8 microseconds at any size, against 28 ms to copy 10 MB),
and since a commit never writes into the state file in place, that inode is never
changed again. Names carry a timestamp that only moves forward, so name order is
creation order even when the clock steps back.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import stat
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from . import _fs, _json
from ._lock import ProcessLock
from .errors import StateBackupError, StateWriteError

if TYPE_CHECKING:
    from ._redis_lock import CrossHostLock

__all__ = ["BackupManager"]

_STAMP = "%Y%m%d_%H%M%S_%f"


class BackupManager:
    """Creates, lists, prunes and checks the backups of one state file.

    Reach it as ``state.backup_manager``. ``create_backup()`` takes the state's lock;
    the other methods only read.
    """

    def __init__(
        self,
        state_path: Path,
        backups_dir: Path,
        max_backups: int,
        locked: Callable[[str], AbstractContextManager[object]],
        *,
        compress: bool = False,
        durable: bool = True,
        lock: ProcessLock | CrossHostLock | None = None,
    ) -> None:
        self.state_path = state_path
        self.backups_dir = backups_dir
        self.max_backups = max_backups
        self._locked = locked
        self.compress = compress
        self.durable = durable
        self._listed: list[str] | None = None
        self._lock = lock
        stem = re.escape(state_path.stem)
        self._pattern = re.compile(rf"^{stem}_(\d{{8}}_\d{{6}}_\d{{6}})\.json\.(?:bak|gz)\Z")
        # The same, over a whole listing joined by newlines (which names cannot hold):
        # one C-speed pass instead of a match call per name.
        self._listing_pattern = re.compile(
            rf"^{stem}_\d{{8}}_\d{{6}}_\d{{6}}\.json\.(?:bak|gz)$", re.MULTILINE
        )
        self._corrupt_pattern = re.compile(rf"^{stem}_(\d{{8}}_\d{{6}}_\d{{6}})\.json\.corrupt\Z")

    def create_backup(self) -> Path:
        """Back up the current state now, under the lock, and return the backup's path.

        Raises:
            StateBackupError: there is no state file to back up.
            StateLockError: the lock was not obtained in time.
        """
        with self._locked("create_backup") as txn:
            backup = self.link_current()
            if backup is not None:
                self.sync()
            if backup is None:
                raise StateBackupError(
                    f"{self.state_path} does not exist yet, so there is nothing to back up",
                    path=self.state_path,
                )
            txn_details = getattr(txn, "details", None)
            if isinstance(txn_details, dict):
                txn_details["backup"] = backup.name
            self.prune()
            return backup

    def names(self) -> list[str]:
        """Backup file names, oldest first (name order is creation order)."""
        try:
            entries = os.listdir(self.backups_dir)
        except FileNotFoundError:
            return []
        if "\n" in self.state_path.stem:  # names hold newlines: match them one by one
            return sorted(n for n in entries if self._pattern.match(n))
        # A name may hold a newline on POSIX; with this stem, such a name is no backup.
        joined = "\n".join(n for n in entries if "\n" not in n)
        return sorted(self._listing_pattern.findall(joined))

    def list_paths(self, limit: int | None = 10) -> list[Path]:
        """Backups, newest first; at most ``limit`` (None for all)."""
        names = self.names()[::-1]
        if limit is not None:
            names = names[: max(limit, 0)]
        return [self.backups_dir / n for n in names]

    def newest_good(self) -> Path | None:
        """The newest backup that parses as a JSON object: the one to restore."""
        for path in self.list_paths(None):
            try:
                _json.decode(self.load(path))
            except (OSError, EOFError, zlib.error, _json.DecodeError):
                continue
            return path
        return None

    def _next_name(self, existing: list[str], suffix: str) -> str:
        seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
        stamp = time.strftime("%Y%m%d_%H%M%S_", time.gmtime(seconds)) + f"{micros:06d}"
        # Fixed-width stamps compare as strings (listed names all match the pattern);
        # parse only when the clock stepped back (or did not move), to stay ordered.
        offset = len(self.state_path.stem) + 1
        newest = existing[-1][offset : offset + len(stamp)] if existing else ""
        if stamp <= newest:
            last = datetime.strptime(newest, _STAMP)
            stamp = (last + timedelta(microseconds=1)).strftime(_STAMP)
        return f"{self.state_path.stem}_{stamp}{suffix}"

    def load(self, backup: Path) -> bytes:
        """The state bytes a backup holds (decompressed for ``.json.gz``)."""
        data = backup.read_bytes()
        return gzip.decompress(data) if backup.name.endswith(".gz") else data

    def link_current(self, *, corrupt: bool = False, current: bytes | None = None) -> Path | None:
        """Hard-link the current state file into the backups folder.

        Called under the lock, before the state is replaced; :meth:`sync` must follow
        before the replace. Returns None when there is no state file. ``corrupt=True``
        keeps an unparseable state aside under a ``.json.corrupt`` name, outside the
        rotation, so a full replacement of a broken file loses nothing.

        Raises:
            StateWriteError: the link failed; nothing was replaced.
        """
        self._listed = None
        if current is None and not os.path.lexists(self.state_path):
            return None  # (given ``current``, the caller has just read the file, locked)
        # Listed afresh at every commit: no remembered listing is trusted across lock
        # holds, since nothing cheap proves that no program changed the folder since
        # (its mtime and ctime can stay the same within one timestamp tick).
        existing = self.names()
        # Crashes in a row each leave one backup beyond the window (a crash lands before
        # the pruning step): drop those first, so they never pile up. The window itself
        # is pruned only after the commit.
        excess = max(len(existing) - self.max_backups, 0)
        for name in existing[:excess]:
            with contextlib.suppress(FileNotFoundError):
                _fs.unlink(str(self.backups_dir / name))
        existing = existing[excess:]
        compress = self.compress and not corrupt
        suffix = ".json.corrupt" if corrupt else (".json.gz" if compress else ".json.bak")
        for _ in range(100):
            name = self._next_name(existing, suffix)
            target = self.backups_dir / name
            try:
                if compress:
                    self._write_compressed(target, current)
                else:
                    _fs.link(str(self.state_path), str(target))
                if not corrupt:
                    self._listed = [*existing, name]
                return target
            except FileExistsError:
                existing = [*existing, name.replace(".json.corrupt", ".json.bak")]
            except OSError as exc:
                raise StateWriteError(
                    f"could not back up {self.state_path} into {self.backups_dir}: "
                    f"link failed ({exc.strerror or exc}); the state file is unchanged. "
                    "Backups need a file system with hard links; fix the cause or pass "
                    "backup_before_write=False.",
                    path=self.state_path,
                    step="link backup",
                    errno=exc.errno,
                ) from exc
        raise StateWriteError(  # 100 name collisions in a row
            f"could not back up {self.state_path}: every backup name tried in "
            f"{self.backups_dir} already exists (link keeps failing with EEXIST); the state "
            "file is unchanged. Check the backups folder.",
            path=self.state_path,
            step="link backup",
        )

    def _write_compressed(self, target: Path, current: bytes | None) -> None:
        # Complete and fsynced under a temp name, then linked to the final name, which
        # fails rather than overwrite an existing backup. The temp never outlives this.
        data = gzip.compress(
            current if current is not None else self.state_path.read_bytes(), compresslevel=1
        )
        tmp = str(target.with_name(f".{target.name}.tmp"))
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = _fs.open_file(tmp, flags, 0o600)
            try:
                _fs.fchmod(fd, stat.S_IMODE(os.stat(self.state_path).st_mode), tmp)
                _fs.write_all(fd, data, tmp)
                if self.durable:
                    _fs.fsync(fd, tmp)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                _fs.unlink(tmp)
            raise StateWriteError(
                f"could not back up {self.state_path}: writing the compressed backup "
                f"{tmp} failed ({exc.strerror or exc}); the state file is unchanged.",
                path=self.state_path,
                step="write compressed backup",
                errno=exc.errno,
            ) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                _fs.unlink(tmp)
            raise
        try:
            _fs.link(tmp, str(target))
        finally:
            with contextlib.suppress(OSError):
                _fs.unlink(tmp)

    def sync(self) -> None:
        """fsync the backups folder, so a new backup survives a power loss.

        The commit calls this after the new state's temp file is fsynced: on a
        journaling file system that fsync has usually committed the link already,
        so this one is cheap, and the backup is still durable before the replace.

        Raises:
            StateWriteError: the fsync failed; the commit must not go ahead.
        """
        if not self.durable:
            return
        try:
            _fs.fsync_dir(str(self.backups_dir))
        except OSError as exc:
            raise StateWriteError(
                f"could not make a backup of {self.state_path} durable: fsync of "
                f"{self.backups_dir} failed ({exc.strerror or exc}); the state file is "
                "unchanged.",
                path=self.state_path,
                step="fsync backups folder",
                errno=exc.errno,
            ) from exc

    def discard(self, backup: Path) -> None:
        """Remove a backup made for a commit that then failed (best effort)."""
        self._listed = None
        with contextlib.suppress(OSError):
            _fs.unlink(str(backup))

    def prune(self) -> list[str]:
        """Delete the oldest backups beyond ``max_backups``; return the names removed.

        Runs after the commit, so a crash here only leaves one backup too many.
        """
        # The listing made for the link just before is still right (we hold the lock).
        names, self._listed = (self._listed or self.names()), None
        cut = max(len(names) - self.max_backups, 0)
        excess = names[:cut]
        # No fsync after: a pruned backup that comes back after a power loss is harmless.
        for name in excess:
            with contextlib.suppress(FileNotFoundError):  # gone already: the goal
                _fs.unlink(os.path.join(self.backups_dir, name))
        return excess

    def check(self, backup_path: str | os.PathLike[str]) -> Path:
        """Return ``backup_path`` as a path inside the backups folder, or raise.

        Accepts a full path or a bare name. Refuses anything that is not a regular,
        non-symlinked backup of this state by name.

        Raises:
            StateBackupError: outside the folder, ``..``, a symlink, a directory, a FIFO,
                or a name that is not one of this state's backups.
        """
        if backup_path is None:
            raise StateBackupError(
                f"no backup given: {self.state_path} has "
                f"{'no good backup' if not self.names() else 'backups, see state.list_backups()'}"
                "; repair the file by hand or move it away to start over",
                path=self.state_path,
            )
        given = Path(os.fspath(backup_path))
        candidate = (
            given if given.is_absolute() or len(given.parts) > 1 else self.backups_dir / given
        )
        problem = None
        if ".." in given.parts:
            problem = "contains '..'"
        elif os.path.realpath(candidate.parent) != os.path.realpath(self.backups_dir):
            problem = f"is not in this state's backups folder {self.backups_dir}"
        elif not self._pattern.match(candidate.name):
            problem = f"is not named like a backup of {self.state_path.name}"
        else:
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                problem = "does not exist"
            else:
                if stat.S_ISLNK(st.st_mode):
                    problem = "is a symlink"
                elif not stat.S_ISREG(st.st_mode):
                    problem = "is not a regular file"
        if problem is not None:
            raise StateBackupError(
                f"cannot restore {given}: it {problem}. Choose one of "
                f"state.list_backups(); nothing was changed.",
                path=given,
            )
        return self.backups_dir / candidate.name

    def read_checked(self, backup: Path) -> bytes:
        """Read a checked backup without following links or blocking on a FIFO; parse it.

        Raises:
            StateBackupError: unreadable, not a regular file, or not a JSON object.
        """
        try:
            fd = os.open(backup, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise StateBackupError(
                f"cannot open backup {backup}: {exc.strerror}; nothing was changed.", path=backup
            ) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateBackupError(
                    f"cannot restore {backup}: not a regular file; nothing was changed.",
                    path=backup,
                )
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read()
        finally:
            os.close(fd)
        try:
            if backup.name.endswith(".gz"):
                data = gzip.decompress(data)
            _json.decode(data)
        except (_json.DecodeError, OSError, EOFError, zlib.error) as exc:
            raise StateBackupError(
                f"cannot restore {backup}: it is corrupt ({exc}); choose another of "
                "state.list_backups(); nothing was changed.",
                path=backup,
            ) from exc
        return data
