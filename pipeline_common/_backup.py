"""Rotating backups of every replaced state version.

A commit's backup is a hard link to the replaced version's inode, made just before
the commit renames the new version over it: no data is copied (8 microseconds at any
size, against 28 ms to copy 10 MB), and once the rename has happened no name but the
backup's leads to that inode, so nothing writes into it again. Anywhere else (a
backup made on request, while the state stays in place) a link would share the live
inode, which a program that rewrites the file in place (``open(path, "w")``) would
change too: those backups are independent copies. Every backup gets the state's
current permission bits, and older backups are narrowed to them after each commit,
so tightening the state's mode leaves no wider copy of its data behind. Names carry
a timestamp that only moves forward, so name order is creation order even when the
clock steps back.
"""

from __future__ import annotations

import contextlib
import errno
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
from ._oserror import ADVISED, explain
from ._sidecar import check_folders
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
        self._narrowed: int | None = None  # the state mode the backups were narrowed to
        # One temp name for copies (like the state's own temp file): writers hold the
        # lock, and a crash while copying leaves at most this one orphan, removed by
        # the next backup.
        self._copy_tmp_name = f".{state_path.name}.backup.tmp"
        self.tmp_listed = False  # whether the last names() listing held the copy temp
        self._copy_tmp = str(backups_dir / self._copy_tmp_name)
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
            # A copy, never a link: the state stays in place, and a program that
            # rewrites it in place would change a linked backup with it.
            backup = self.link_current(copy=True)
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
            self.prune(self._state_mode())
            return backup

    def names(self) -> list[str]:
        """Backup file names, oldest first (name order is creation order).

        Also notes in ``tmp_listed`` whether the copy temp file was in this listing.

        Raises:
            StateSidecarError: the backups folder or its parent is a symlink or a file.
        """
        check_folders((self.backups_dir.parent, self.backups_dir))
        try:
            entries = os.listdir(self.backups_dir)
        except FileNotFoundError:
            self.tmp_listed = False
            return []
        self.tmp_listed = self._copy_tmp_name in entries
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

    def link_current(
        self, *, corrupt: bool = False, current: bytes | None = None, copy: bool = False
    ) -> Path | None:
        """Back up the current state file: a hard link, or a copy with ``copy=True``.

        Called under the lock. A link is only right just before the commit replaces
        the state by a rename (after which the linked inode cannot change); anything
        else passes ``copy=True``. :meth:`sync` must follow before the replace.
        Returns None when there is no state file. ``corrupt=True`` keeps an
        unparseable state aside under a ``.json.corrupt`` name, outside the rotation,
        so a full replacement of a broken file loses nothing.

        Raises:
            StateWriteError: the link or copy failed; nothing was replaced.
        """
        self._listed = None
        mode: int | None = None
        if copy:
            read = self._read_state()
            if read is None:
                return None
            current, mode = read
        elif current is None and not os.path.lexists(self.state_path):
            return None  # (given ``current``, the caller has just read the file, locked)
        # Listed afresh at every commit: no remembered listing is trusted across lock
        # holds, since nothing cheap proves that no program changed the folder since
        # (its mtime and ctime can stay the same within one timestamp tick).
        existing = self.names()
        # Seen in the listing just taken, not by an lstat: only lock holders create the
        # temp (_write_copy, which removes it before returning), and we hold the lock.
        if self.tmp_listed:  # a crash while copying left it
            with contextlib.suppress(FileNotFoundError):
                _fs.unlink(self._copy_tmp)
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
                if compress or copy:
                    self._write_copy(target, current, mode, compress=compress)
                else:
                    try:
                        _fs.link(str(self.state_path), str(target))
                    except PermissionError as exc:
                        # EPERM: the kernel refuses to link another user's file
                        # (fs.protected_hardlinks); a copy of the bytes read under the
                        # lock is the same backup. (EACCES: the folder is not writable.)
                        if current is None or exc.errno != errno.EPERM:
                            raise
                        self._write_copy(target, current, None, compress=False)
                if not corrupt:
                    self._listed = [*existing, name]
                return target
            except FileExistsError:
                existing = [*existing, name.replace(".json.corrupt", ".json.bak")]
            except OSError as exc:
                raise StateWriteError(
                    f"could not back up {self.state_path} into {self.backups_dir}: "
                    f"{explain(exc, self.backups_dir)}; the state file is unchanged."
                    + (
                        ""
                        if exc.errno in ADVISED
                        else " Backups need a file system with hard links; fix the cause or "
                        "pass backup_before_write=False."
                    ),
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

    def _read_state(self) -> tuple[bytes, int] | None:
        """The state file's bytes and permission bits, from one open; None if absent.

        Raises:
            StateWriteError: the file cannot be read (nothing was backed up).
        """
        try:
            fd = os.open(self.state_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateWriteError(
                f"could not back up {self.state_path}: reading it failed "
                f"({explain(exc, self.state_path.parent)}); nothing was backed up.",
                path=self.state_path,
                step="read state for backup",
                errno=exc.errno,
            ) from exc
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read(), mode
        finally:
            os.close(fd)

    def _state_mode(self) -> int | None:
        try:
            return stat.S_IMODE(os.stat(self.state_path).st_mode)
        except OSError:
            return None

    def _write_copy(
        self, target: Path, current: bytes | None, mode: int | None, *, compress: bool
    ) -> None:
        # Complete and fsynced under a temp name, then linked to the final name, which
        # fails rather than overwrite an existing backup. The temp never outlives this.
        data = current if current is not None else self.state_path.read_bytes()
        if compress:
            data = gzip.compress(data, compresslevel=1)
        if mode is None:
            mode = stat.S_IMODE(os.stat(self.state_path).st_mode)
        tmp = self._copy_tmp
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = _fs.open_file(tmp, flags, 0o600)
            try:
                _fs.fchmod(fd, mode, tmp)
                _fs.write_all(fd, data, tmp)
                if self.durable:
                    _fs.fsync(fd, tmp)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                _fs.unlink(tmp)
            raise StateWriteError(
                f"could not back up {self.state_path}: writing the backup "
                f"{tmp} failed ({explain(exc, self.backups_dir)}); the state file is unchanged.",
                path=self.state_path,
                step="write compressed backup" if compress else "write backup copy",
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

    def prune(self, state_mode: int | None = None) -> list[str]:
        """Delete the oldest backups beyond ``max_backups``; return the names removed.

        Runs after the commit, so a crash here only leaves one backup too many.
        ``state_mode`` (the committed state's permission bits) narrows the backups
        kept to it, once per mode per process: see :meth:`narrow`.
        """
        # The listing made for the link just before is still right (we hold the lock).
        names, self._listed = (self._listed or self.names()), None
        cut = max(len(names) - self.max_backups, 0)
        excess = names[:cut]
        # No fsync after: a pruned backup that comes back after a power loss is harmless.
        for name in excess:
            with contextlib.suppress(FileNotFoundError):  # gone already: the goal
                _fs.unlink(os.path.join(self.backups_dir, name))
        kept = names[cut:]
        # Narrow all when the state's mode is new to this object, or when the backup
        # before the newest is wider than the state (narrowed since it was made; the
        # newest is the replaced version, which had the state's mode). One lstat.
        if state_mode is not None and (
            state_mode != self._narrowed or self._wider(kept[-2:-1], state_mode)
        ):
            self.narrow(state_mode, kept)
        return excess

    def _wider(self, names: list[str], state_mode: int) -> bool:
        for name in names:
            with contextlib.suppress(OSError):
                if os.lstat(os.path.join(self.backups_dir, name)).st_mode & 0o7777 & ~state_mode:
                    return True
        return False

    def narrow(self, state_mode: int, names: list[str] | None = None) -> list[str]:
        """Take from each backup every permission bit the state does not have.

        A backup holds the data of the state, so it should be no more readable than
        the state is now: after ``chmod 600 pipeline.json``, the next commit narrows
        the older backups (made while it was 0644) to 0600. Bits are only removed,
        never added. Runs under the lock, after the commit's rename (a backup is then
        never the live file's inode). Returns the names changed.
        """
        changed = []
        if names is None:
            names = self.names()
        with contextlib.suppress(OSError):  # broken states kept aside hold data too
            names = names + [
                n for n in os.listdir(self.backups_dir) if self._corrupt_pattern.match(n)
            ]
        for name in names:
            path = os.path.join(self.backups_dir, name)
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & ~state_mode:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & state_mode)
                    changed.append(name)
            except OSError:
                continue  # gone, or not ours to change (another user's backup)
        self._narrowed = state_mode
        return changed

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
        check_folders((self.backups_dir.parent, self.backups_dir))
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
