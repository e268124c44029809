"""PipelineState and StateTransaction: the crash-safe core.

The commit protocol, in order (each step's crash argument is in docs/protocol.md):

1. lock ``<path>.lock`` (exclusive, cross-process; threads queue first);
2. read the current bytes; reconcile them with the log (a commit whose record is
   missing gets a ``recover`` record); parse them into ``txn.data``: a fresh object,
   so no deep copy is needed;
3. the caller's block mutates ``txn.data``; an exception ends here: nothing written
   but a ``success: false`` record;
4. validate and serialize fully in memory;
5. back up the current version (hard link) before it is replaced;
6. temp file beside the state, write, fsync; fsync the backups folder; ``os.replace``;
   fsync the state's folder;
7. append the log record and fsync it; a failure here is a warning, not a loss;
8. prune old backups; unlock; return.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Literal, overload

from pydantic import BaseModel, ValidationError

from . import _check, _diff, _fs, _inspect, _interrupt, _json, _sidecar
from ._async import AsyncTransaction, async_active
from ._atomic import atomic_replace
from ._backup import BackupManager
from ._diff import Diff
from ._digest import Digest
from ._history import BackupInfo, HistoryRecord, LockInfo, RepairReport, VerifyReport
from ._lock import ProcessLock, get_process_lock, read_holder
from ._log import Tail, TransactionLog
from ._oserror import explain
from ._redis_lock import CrossHostLock, RedisLock, local_lock_path, resolve_lock
from ._time import now_iso
from ._transaction import StateTransaction, _Current
from .errors import (
    StateDurabilityError,
    StateLockLostError,
    StateReadError,
    StateSchemaError,
    StateSerializationError,
    StateSidecarError,
    StateValidationError,
    StateWarning,
    StateWriteError,
)
from .models import PipelineModel

__all__ = ["PipelineState", "StateTransaction"]  # StateTransaction lives in _transaction

_HOST = socket.gethostname()
_logger = logging.getLogger("pipeline_common")
_active = threading.local()  # per thread: lock path -> the outermost open transaction


_now = now_iso
_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _still_open(txn: StateTransaction) -> bool:
    """False when the with statement that entered ``txn`` is certainly over.

    That is when its frame has returned, or when that frame is entering the very same
    with statement again (a loop): a statement cannot be nested in itself. A frame of
    a generator or coroutine may be suspended inside the block, off the stack: open.
    """
    frame = txn._frame
    if frame is None or frame.f_code.co_flags & _SUSPENDABLE:
        return True
    current: FrameType | None = sys._getframe(1)
    while current is not None:
        if current is frame:
            return current.f_lasti != txn._lasti
        current = current.f_back
    return False


class PipelineState:
    """A crash-safe JSON state file: transactions, a cross-process lock, backups, a log.

    Args:
        path: The state file (``str`` or path-like). A symlink is resolved once, so the
            link survives and its target is replaced.
        validate_on_read: Validate on every :meth:`read` (default off: readers are fast).
        max_backups: How many backups to keep (oldest pruned first).
        backup_before_write: Back up every version before it is replaced.
        timeout: Seconds to wait for the lock (None waits forever).
        schema: A Pydantic model class; default :class:`~pipeline_common.models.PipelineModel`.
        schema_version: The schema version this code writes; each commit records it
            in the log (never in the file). A file last committed with an older
            version is migrated on the first transaction; a newer one is refused.
        migrations: ``{v: fn}`` where ``fn(data)`` turns version ``v`` data into
            version ``v + 1`` (returning the new dict, or None after changing it in
            place). A file with no recorded version counts as version 1.
        durability: ``"full"`` (default) fsyncs the file, its folder, the backups
            folder and the log: an acknowledged commit survives a power loss.
            ``"atomic"`` skips every fsync: a process crash still never leaves a torn
            file, but a power loss may take the newest commits back, and on some file
            systems leave an empty state file (tests, tmpfs, scratch runs).
        compress_backups: Store backups gzip-compressed as ``.json.gz`` (a copy, not
            a hard link, so it costs time at every commit).
        lock: ``"flock"`` (default: every process of one host), or a Redis URL
            (``"redis://host:6379/0"``) or :class:`RedisLock` for processes on several
            hosts sharing the folder (docs/multi-host.md); needs the ``redis`` extra.

    Sidecars: ``<path>.lock`` (never deleted), ``<dir>/.<stem>/backups/`` and
    ``<dir>/.<stem>/transactions.log``. The state file holds exactly the caller's JSON.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        validate_on_read: bool = False,
        max_backups: int = 50,
        backup_before_write: bool = True,
        timeout: float | None = 10.0,
        schema: type[BaseModel] | None = None,
        schema_version: int | None = None,
        migrations: Mapping[int, Callable[[dict[str, Any]], dict[str, Any] | None]] | None = None,
        durability: Literal["full", "atomic"] = "full",
        compress_backups: bool = False,
        lock: str | RedisLock | None = None,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or path-like, not {type(path).__name__} {path!r}")
        if not os.fspath(path):
            raise ValueError("path must not be empty")
        _check.check_bool("validate_on_read", validate_on_read)
        _check.check_int("max_backups", max_backups)
        _check.check_bool("backup_before_write", backup_before_write)
        _check.check_seconds("timeout", timeout, optional=True, forever=True)
        if schema is not None and not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise TypeError(f"schema must be a Pydantic model class or None, not {schema!r}")
        _check.check_int("schema_version", schema_version, minimum=1, optional=True)
        if migrations is not None:
            if not isinstance(migrations, Mapping):
                raise TypeError(f"migrations must be a mapping {{version: fn}}, not {migrations!r}")
            for version, step in migrations.items():
                _check.check_int("a migrations key", version, minimum=1)
                _check.check_callable(f"migrations[{version}]", step)
        _check.check_bool("compress_backups", compress_backups)
        if durability not in ("full", "atomic"):
            raise ValueError(f"durability must be 'full' or 'atomic', not {durability!r}")
        if migrations and schema_version is None:
            raise ValueError("migrations need schema_version (the version the code writes)")
        given = Path(os.fspath(path)).expanduser()
        self.path = Path(os.path.realpath(given))
        self.validate_on_read = validate_on_read
        self.max_backups = max_backups
        self.backup_before_write = backup_before_write
        self.timeout = timeout
        self.schema: type[BaseModel] = schema if schema is not None else PipelineModel
        self.schema_version = schema_version
        self.migrations = dict(migrations or {})
        self.durability = durability
        self._hooks: list[Callable[[int, str, list[str] | None], None]] = []
        self._hooks_guard = threading.Lock()
        self._owner_checked = 0  # pid that checked .<stem>/owner
        # The spans of our newest commit, keyed by its sha256: reused by the next commit's
        # change summary only if the file still holds exactly those bytes.
        self._committed_spans: tuple[str, _diff.Spans] | None = None
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.sidecar_dir = self.path.parent / f".{self.path.stem}"
        self.backups_dir = self.sidecar_dir / "backups"
        self.log_path = self.sidecar_dir / "transactions.log"
        base = self._base_mode()
        self._file_mode = base & 0o666
        self._dir_mode = base | ((base & 0o444) >> 2)  # x wherever r, like a folder should
        redis_lock = resolve_lock(lock)
        self._lock: ProcessLock | CrossHostLock
        if redis_lock is None:
            self._lock = get_process_lock(self.lock_path, base & 0o660)
        else:  # this host's flock queue first, then Redis (with fencing)
            local = get_process_lock(local_lock_path(self.lock_path), base & 0o660)
            self._lock = CrossHostLock(redis_lock, local, self.path, self._last_fence)
        self._log = TransactionLog(self.log_path, self._file_mode)
        self.backup_manager = BackupManager(
            self.path,
            self.backups_dir,
            max_backups,
            self._locked_operation,
            compress=compress_backups,
            durable=durability == "full",
            lock=self._lock,
        )

    def __repr__(self) -> str:
        return f"PipelineState({str(self.path)!r})"

    # -- public API ----------------------------------------------------------

    def read(self, validate: bool | None = None) -> dict[str, Any]:
        """Return the current state; ``{}`` when the file does not exist yet.

        Takes no lock: the rename-based commit means a reader always sees one whole
        committed version.

        Raises:
            StateReadError: the file is empty, corrupt, not UTF-8 or not an object.
            StateValidationError: validation is on and the data fails the schema.
        """
        # The log is not consulted: recognising "our" file by its stat is no proof (an
        # in-place write can keep inode, size and mtime), and hashing costs more than
        # the full parse's check.
        _check.check_bool("validate", validate, optional=True)
        raw, _ = self._read_file()
        data = self._decode(raw)
        if validate or (validate is None and self.validate_on_read):
            self._validate(data)
        return data

    def transaction(
        self,
        validate: bool = True,
        seed_data: dict[str, Any] | None = None,
        *,
        operation: str = "transaction",
        expect_version: int | None = None,
        backup: bool | None = None,
    ) -> StateTransaction:
        """Open a transaction: ``with state.transaction() as txn: txn.data[...] = ...``.

        Args:
            validate: Validate against the schema before committing.
            seed_data: Start from (a deep copy of) this instead of the current state.
            operation: The name recorded in the log and in the lock's holder record.
            expect_version: Raise :class:`StateConflictError` before the block runs if
                the state is no longer at this version (optimistic concurrency).
            backup: Back up the replaced version (default: ``backup_before_write``).
                Bookkeeping commits (progress, retry ledgers) pass False, so they do
                not push real versions out of the ``max_backups`` window.
        """
        return StateTransaction(
            self,
            validate=validate,
            seed_data=seed_data,
            operation=operation,
            expect_version=expect_version,
            backup=backup,
        )

    def write(self, data: dict[str, Any], validate: bool = True) -> None:
        """Replace the whole state with ``data``, committed exactly like a transaction."""
        _check.check_bool("validate", validate)
        if not isinstance(data, dict):
            raise StateSerializationError(
                f"the state of {self.path} must be a dict (a JSON object), "
                f"not {type(data).__name__}; nothing was written",
                path=self.path,
            )
        with StateTransaction(
            self, validate=validate, seed_data=data, operation="write", _copy_seed=False
        ):
            pass

    def list_backups(self, limit: int | None = 10) -> list[Path]:
        """Return up to ``limit`` backups, newest first."""
        _check.check_int("limit", limit, optional=True)
        return self.backup_manager.list_paths(limit)  # refuses symlinked sidecars

    @overload
    def restore_backup(
        self,
        backup_path: str | os.PathLike[str] | BackupInfo,
        *,
        validate: bool = ...,
        dry_run: Literal[False] = ...,
    ) -> bool: ...

    @overload
    def restore_backup(
        self,
        backup_path: str | os.PathLike[str] | BackupInfo,
        *,
        validate: bool = ...,
        dry_run: Literal[True],
    ) -> Diff: ...

    def restore_backup(
        self,
        backup_path: str | os.PathLike[str] | BackupInfo,
        *,
        validate: bool = True,
        dry_run: bool = False,
    ) -> bool | Diff:
        """Make a backup the current state, as a logged transaction.

        The replaced state is backed up first, so a restore can itself be undone. The
        backup's bytes are copied into a new file; the backup stays as it is. With
        ``dry_run=True`` nothing changes: the return value is the :class:`Diff` from
        the current state to the backup.

        Raises:
            StateBackupError: not one of this state's backups (outside its folder, ``..``,
                a symlink, a directory, a FIFO) or corrupt; nothing changed.
            StateValidationError: the backup fails the schema (pass ``validate=False``).
        """
        _check.check_bool("validate", validate)
        _check.check_bool("dry_run", dry_run)
        if isinstance(backup_path, BackupInfo):
            backup_path = backup_path.path
        if not isinstance(backup_path, (str, os.PathLike)):
            raise TypeError(
                "backup_path must be a str, a path-like or a BackupInfo, "
                f"not {type(backup_path).__name__} {backup_path!r}"
            )
        backup = self.backup_manager.check(backup_path)
        payload = self.backup_manager.read_checked(backup)  # decompressed, parsed once
        if dry_run:
            try:
                current = self.read()
            except StateReadError:
                current = {}  # unreadable now: the restore would bring everything back
            return _diff.diff(current, _json.decode(payload))
        txn = StateTransaction(self, validate=validate, operation="restore", _payload=payload)
        txn.details["restored_from"] = backup.name
        with txn:
            pass
        return True

    def get_transaction_history(self, limit: int | None = 50) -> list[dict[str, Any]]:
        """Return up to ``limit`` log records, newest first.

        Each has ``seq``, ``timestamp`` (ISO 8601, UTC), ``operation``, ``success``,
        ``details``, ``generation`` and, for commits, ``sha256`` of the committed bytes.

        Raises:
            StateSidecarError: the log is unreadable, or a sidecar folder is a symlink.
        """
        _check.check_int("limit", limit, optional=True)
        self._check_sidecars()
        try:
            return self._log.read(limit)
        except OSError as exc:
            raise StateSidecarError(
                f"cannot read the transaction log {self.log_path} of {self.path}: "
                f"{exc.strerror}. Check that it is a readable file.",
                path=self.log_path,
            ) from exc

    # -- history, generations, inspection --------------------------------------

    @property
    def version(self) -> int:
        """The generation of the current state: commits so far (0 before the first)."""
        self._check_sidecars()
        return self._tail().generation

    def read_versioned(self, *, wait: float = 1.0) -> tuple[dict[str, Any], int]:
        """Return ``(data, version)`` of one committed state, without a lock.

        The version is matched to the bytes read (by their sha256, as the log recorded
        it), so the pair never mixes two commits; a commit whose record is
        still being appended is waited for, up to ``wait`` seconds. A file changed
        outside the library gets the log's newest version after that wait.
        """
        _check.check_seconds("wait", wait)
        deadline = time.monotonic() + wait
        self._check_sidecars()
        while True:
            raw, st = self._read_file()
            tail = self._tail()
            last = tail.last_commit
            if raw is None or st is None:
                return {}, tail.generation
            if last is not None and last.get("sha256") == hashlib.sha256(raw).hexdigest():
                return self._decode(raw), int(last.get("generation", tail.generation))
            if time.monotonic() >= deadline:
                # Changed outside the library (or a crash lost the record): the next
                # transaction records it; until then the log's version is the best answer.
                return self._decode(raw), tail.generation
            time.sleep(0.002)

    def history(self, limit: int | None = 20) -> list[HistoryRecord]:
        """The newest ``limit`` log records as :class:`HistoryRecord` (one-line reprs)."""
        _check.check_int("limit", limit, optional=True)
        return [HistoryRecord.from_raw(r) for r in self.get_transaction_history(limit)]

    def backups(self, limit: int | None = None) -> list[BackupInfo]:
        """Backups newest first, as :class:`BackupInfo` (generation, created, size, operation)."""
        _check.check_int("limit", limit, optional=True)
        self._check_sidecars()
        return _inspect.backup_infos(self, limit)

    def at(self, generation: int) -> dict[str, Any]:
        """The state as it was at ``generation``, when the file or a backup holds it.

        Raises:
            StateBackupError: no backup holds that generation any more.
        """
        _check.check_int("generation", generation)
        self._check_sidecars()
        return _inspect.content_at(self, generation)

    def diff(self, a: Any, b: Any = "current") -> Diff:
        """Changes from ``a`` to ``b``; each is "current", a generation, a backup or a dict."""
        self._check_sidecars()
        return _diff.diff(_inspect.resolve(self, a), _inspect.resolve(self, b))

    def verify(self) -> VerifyReport:
        """Check the state, the log's hash chain, the backups, stray temps and the lock file.

        The report is truthy when healthy; its repr lists every check.

        Raises:
            StateSidecarError: a sidecar folder is a symlink (or a file): nothing is
                read through it.
        """
        self._check_sidecars()
        return _inspect.verify(self)

    def repair(self) -> RepairReport:
        """Fix what can be fixed without losing data (torn log tail, orphan temps, a
        commit with no record), logged as one ``recover`` record."""
        return _inspect.repair(self)

    def lock_info(self) -> LockInfo:
        """Whether the lock is held right now, and who holds it (pid, host, since, op)."""
        if isinstance(self._lock, CrossHostLock):
            held, holder = self._lock.info()
            return LockInfo(self._lock.path, held, holder)
        if self._lock.held_by_current_thread():
            return LockInfo(self.lock_path, True, read_holder(self.lock_path))
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return LockInfo(self.lock_path, False, None)
        except OSError as exc:
            raise StateSidecarError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror}", path=self.lock_path
            ) from exc
        try:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return LockInfo(self.lock_path, True, read_holder(self.lock_path))
            fcntl.flock(fd, fcntl.LOCK_UN)
            return LockInfo(self.lock_path, False, None)
        finally:
            os.close(fd)

    # -- watching and hooks -------------------------------------------------------

    def wait_for_change(
        self, since_version: int, timeout: float | None = None, *, interval: float = 0.05
    ) -> int | None:
        """Block until the version exceeds ``since_version``; return it, or None on timeout.

        Polls the log's size and mtime (a stat, no parsing) every ``interval`` seconds,
        so any process can follow another's commits.
        """
        _check.check_int("since_version", since_version)
        _check.check_seconds("timeout", timeout, optional=True, forever=True)
        _check.check_seconds("interval", interval, positive=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[int, int] | None = None
        self._check_sidecars()
        while True:
            try:
                st = os.stat(self.log_path)
                key = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                key = (0, 0)
            if key != seen:
                seen = key
                version = self.version
                if version > since_version:
                    return version
            if deadline is not None and time.monotonic() >= deadline:
                return None
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(wait, 0.0))

    def on_commit(
        self, callback: Callable[[int, str, list[str] | None], None]
    ) -> Callable[[], None]:
        """Call ``callback(generation, operation, changes)`` after each durable commit
        made through this object; return a function that unsubscribes it.

        Runs in the committing thread after the lock is released. A callback that
        raises is logged and ignored: it never breaks a commit.
        """
        _check.check_callable("callback", callback)
        with self._hooks_guard:
            self._hooks.append(callback)

        def unsubscribe() -> None:
            with self._hooks_guard, contextlib.suppress(ValueError):
                self._hooks.remove(callback)

        return unsubscribe

    def _fire_hooks(self, generation: int, operation: str, changes: list[str] | None) -> None:
        with self._hooks_guard:
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook(generation, operation, changes)
            except Exception:
                _logger.exception("on_commit callback %r failed for %s", hook, self.path)

    # -- async -------------------------------------------------------------------

    def atransaction(
        self,
        validate: bool = True,
        seed_data: dict[str, Any] | None = None,
        *,
        operation: str = "transaction",
        expect_version: int | None = None,
    ) -> AsyncTransaction:
        """``async with state.atransaction() as txn:``; the lock wait never blocks the loop.

        Locking and committing run on one worker thread per transaction, so the lock
        is acquired and released on the same thread.
        """
        return AsyncTransaction(
            self.transaction(
                validate, seed_data, operation=operation, expect_version=expect_version
            )
        )

    async def aread(self, validate: bool | None = None) -> dict[str, Any]:
        """:meth:`read` on a worker thread, for event loops."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.read, validate)

    # -- internals -------------------------------------------------------------

    def _base_mode(self) -> int:
        try:
            return stat.S_IMODE(os.stat(self.path).st_mode) | 0o600
        except OSError:
            return 0o666  # like open(): the umask applies when files are created

    def _active_transaction(self) -> StateTransaction | None:
        joined = async_active(str(self.lock_path))
        if joined is not None and joined._pid == os.getpid():
            return joined
        stack: dict[str, StateTransaction] | None = getattr(_active, "by_lock", None)
        if not stack:
            return None
        txn = stack.get(str(self.lock_path))
        if txn is None or txn._pid != os.getpid():
            return None
        if not _still_open(txn):
            # Its with statement is gone, yet __exit__ never ran (an interrupt as it was
            # called): finish its bookkeeping, or this transaction would join a dead one.
            txn._frame = None
            self._clear_active(txn)
            self._lock.release()
            _interrupt.release(txn)
            return None
        return txn

    def _set_active(self, txn: StateTransaction) -> None:
        stack = getattr(_active, "by_lock", None)
        if stack is None:
            stack = _active.by_lock = {}
        stack[str(self.lock_path)] = txn

    def _clear_active(self, txn: StateTransaction) -> None:
        stack = getattr(_active, "by_lock", None)
        if stack is not None and stack.get(str(self.lock_path)) is txn:
            del stack[str(self.lock_path)]

    def _locked_operation(self, operation: str) -> StateTransaction:
        """A transaction that commits nothing: the lock and a log record (a class, not a
        generator, so its with statement's frame is the caller's: see _active_transaction)."""
        return StateTransaction(self, operation=operation, _commit=False)

    def _check_sidecars(self) -> None:
        """Refuse to read through a sidecar folder that is a symlink (or a file), with
        the error a writer gets; see :mod:`pipeline_common._sidecar`."""
        _sidecar.check_folders((self.sidecar_dir, self.backups_dir))

    def _prepare_sidecars(self) -> None:
        """Create ``.<stem>/`` and ``backups/`` if needed; refuse symlinked ones."""
        for folder in (self.sidecar_dir, self.backups_dir):
            try:
                st = os.lstat(folder)
            except FileNotFoundError:
                try:
                    _fs.mkdir(str(folder), self._dir_mode)
                    if self.durability == "full":
                        _fs.fsync_dir(str(folder.parent))
                except FileExistsError:
                    st = os.lstat(folder)
                except OSError as exc:
                    raise StateWriteError(
                        f"cannot create the sidecar folder {folder} for {self.path}: "
                        f"{explain(exc, folder.parent)}; the state file is unchanged.",
                        path=self.path,
                        step="create sidecar folder",
                        errno=exc.errno,
                    ) from exc
                else:
                    continue
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise _sidecar.refused(folder, st)
        if self._owner_checked != os.getpid():
            self._check_owner()
            self._owner_checked = os.getpid()

    def _check_owner(self) -> None:
        """Claim ``.<stem>/`` for this state file, or refuse one claimed by another.

        ``pipeline.json`` and ``pipeline.yaml`` in one folder share the stem, so they
        would share backups and log; the first to commit owns the folder.
        """
        owner = self.sidecar_dir / "owner"
        try:
            claimed: str | None = owner.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            claimed = None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateSidecarError(
                f"cannot read {owner}: {exc}; it names the state file that owns "
                f"{self.sidecar_dir}. Write {self.path.name!r} into it if this one does.",
                path=owner,
            ) from exc
        if claimed is None:
            claimed = self._claim_owner(owner)
        if claimed != self.path.name:
            raise StateSidecarError(
                f"{self.sidecar_dir} holds the backups and log of {claimed!r}, not of "
                f"{self.path.name!r}: two state files with the stem {self.path.stem!r} in "
                "one folder would share them. Rename one of the two files.",
                path=self.sidecar_dir,
            )

    def _claim_owner(self, owner: Path) -> str:
        """Create ``owner`` whole or not at all (temp, fsync, link); return the claim."""
        tmp = str(owner.with_name(".owner.tmp"))
        try:
            fd = _fs.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                _fs.write_all(fd, (self.path.name + "\n").encode("utf-8"), tmp)
                if self.durability == "full":
                    _fs.fsync(fd, tmp)
            finally:
                os.close(fd)
            try:
                _fs.link(tmp, str(owner))  # fails rather than overwrite another's claim
            except FileExistsError:
                return owner.read_text(encoding="utf-8").strip()
            finally:
                with contextlib.suppress(OSError):
                    _fs.unlink(tmp)
            if self.durability == "full":
                _fs.fsync_dir(str(self.sidecar_dir))
        except OSError as exc:
            raise StateWriteError(
                f"cannot create {owner} for {self.path}: {explain(exc, owner.parent)}; the "
                "state file is unchanged.",
                path=self.path,
                step="create sidecar owner file",
                errno=exc.errno,
            ) from exc
        return self.path.name

    def _read_bytes(self) -> bytes | None:
        return self._read_file()[0]

    def _read_file(self) -> tuple[bytes | None, os.stat_result | None]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise StateReadError(
                f"cannot read {self.path}: {exc.strerror}. Check that it is a readable file.",
                path=self.path,
            ) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StateReadError(
                    f"cannot read {self.path}: it is not a regular file. Move it away.",
                    path=self.path,
                )
            chunks = []
            want = st.st_size + 1
            while True:
                chunk = os.read(fd, max(want, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks), st
        except OSError as exc:
            raise StateReadError(
                f"cannot read {self.path}: {exc.strerror}.", path=self.path
            ) from exc
        finally:
            os.close(fd)

    def _decode(self, raw: bytes | None, *, trusted: bool = False) -> dict[str, Any]:
        if raw is None:
            return {}
        try:
            return _json.decode(raw, trusted=trusted)
        except _json.DecodeError as exc:
            backup = self.backup_manager.newest_good()
            if backup is not None:
                advice = (
                    f"restore the newest good backup: state.restore_backup({str(backup)!r}) "
                    f"or `pipeline-state restore {self.path} {backup.name}`"
                )
            else:
                advice = "there is no backup; repair the file by hand or move it away to start over"
            raise StateReadError(
                f"{self.path} is not a valid state file: {exc}. "
                f"The file was left as it is; {advice}.",
                path=self.path,
                backup=backup,
            ) from exc

    def _validate(self, data: dict[str, Any]) -> None:
        try:
            self.schema.model_validate(data)
        except ValidationError as exc:
            errors = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
            ]
            summary = "; ".join(
                (f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "")
                + str(e["msg"]).removeprefix("Value error, ")
                for e in errors
            )
            raise StateValidationError(
                f"the new state for {self.path} fails {self.schema.__name__}: {summary}. "
                "Nothing was written; fix the data in the transaction.",
                path=self.path,
                errors=errors,
            ) from None

    def _read_current_locked(self, *, parse: bool = False) -> _Current:
        """Read the state under the lock and reconcile it with the log.

        ``parse``: the caller needs the document, so parse it while the bytes are
        hashed (a large file is hashed on a helper thread: about 4 ms of a 10 MB
        transaction hidden behind the parse). The parse is kept (``parsed``) only when
        the hash proves these are the very bytes of the newest commit.
        """
        raw, st = self._read_file()
        if raw is None or st is None:
            return _Current(None)
        current = _Current(raw, st.st_ino, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
        # Hashed, not recognised by stat: an in-place write of the same size within one
        # mtime tick keeps inode, size and mtime, so only the bytes prove the file is ours.
        hashing = Digest(raw)
        tail = current.tail = self._tail()
        last = tail.last_commit
        parsed = None
        if parse and hashing.threaded and last is not None and not last.get("long_integers"):
            with contextlib.suppress(_json.DecodeError):  # decoded properly below, if so
                parsed = _json.decode(raw, trusted=True)
        digest = current.sha256 = hashing.hexdigest()
        if last is not None and last.get("sha256") == digest:
            current.trusted = not last.get("long_integers")  # orjson reads those as floats
            current.parsed = parsed if current.trusted else None
            return current
        # A commit without its record (crash or log error after the rename), or a change
        # made outside this library: record it, so the log matches the state again.
        try:
            _json.decode(raw)
        except _json.DecodeError:
            current.logged = False
            return current  # a corrupt file is not a commit; read/write paths deal with it
        current.recovered = True
        self._append_quietly(
            {
                "timestamp": _now(),
                "operation": "recover",
                "success": True,
                "commits": True,
                "sha256": digest,
                "size": current.size,
                "stat": [current.ino, current.mtime_ns],
                # orjson would read integers beyond 64 bits as floats: keep readers exact
                **({"long_integers": True} if _json.has_long_integers(raw) else {}),
                **(
                    {"schema_version": last.get("schema_version")}
                    if last is not None and last.get("schema_version") is not None
                    else {}
                ),
                "details": {
                    "reason": "the state file was changed without a log record "
                    "(a crash or log failure after a commit, or an outside write)"
                },
                "pid": os.getpid(),
                "host": _HOST,
                **self._fence_field(),
            }
        )
        return current

    def _tail(self) -> Tail:
        try:
            return self._log.tail()
        except (OSError, ValueError, TypeError) as exc:
            raise StateSidecarError(
                f"cannot read the transaction log {self.log_path} of {self.path}: "
                f"{getattr(exc, 'strerror', None) or exc}. Check its permissions and its last "
                "lines (state.verify() reports them); the state file is unchanged.",
                path=self.log_path,
            ) from exc

    def _file_schema_version(self) -> int:
        last = self._tail().last_commit
        version = last.get("schema_version") if last else None
        return version if isinstance(version, int) else 1

    def _migrate_locked(self, txn: StateTransaction) -> None:
        """Bring an older file up to ``schema_version`` as one logged ``migrate`` commit."""
        current = txn._current
        if self.schema_version is None or current is None or current.data is None:
            return
        file_version = self._file_schema_version()
        if file_version == self.schema_version:
            return
        if file_version > self.schema_version:
            raise StateSchemaError(
                f"{self.path} was written with schema version {file_version}, newer than "
                f"this code's {self.schema_version}; refusing to rewrite it. Upgrade the "
                "code that opens it.",
                path=self.path,
                file_version=file_version,
                code_version=self.schema_version,
            )
        data = self._decode(current.data)
        for version in range(file_version, self.schema_version):
            step = self.migrations.get(version)
            if step is None:
                raise StateSchemaError(
                    f"{self.path} is at schema version {version} and no migration "
                    f"{version} -> {version + 1} was given; nothing was changed. Pass "
                    f"migrations={{{version}: fn, ...}}.",
                    path=self.path,
                    file_version=file_version,
                    code_version=self.schema_version,
                )
            try:
                result = step(data)
            except Exception as exc:
                raise StateSchemaError(
                    f"migration {version} -> {version + 1} of {self.path} failed "
                    f"({type(exc).__name__}: {exc}); nothing was changed.",
                    path=self.path,
                    file_version=file_version,
                    code_version=self.schema_version,
                ) from exc
            if result is not None:
                data = result
        migration = StateTransaction(self, operation="migrate")
        migration._current = current
        migration._t0 = time.perf_counter()
        migration.data = data
        migration.details.update(
            {"from_schema_version": file_version, "to_schema_version": self.schema_version}
        )
        self._commit(migration)
        txn._current = self._read_current_locked()
        if migration._notify is not None:
            txn.details["migrated"] = migration.details
            txn._migrated = migration._notify

    def _commit(self, txn: StateTransaction) -> None:
        current = txn._current
        assert current is not None
        try:
            # The block may have reassigned these: everything that can fail is checked
            # before the replace, after which only StateDurabilityError may be raised.
            if not isinstance(txn.details, dict):
                raise TypeError(
                    f"txn.details must stay a dict, not {type(txn.details).__name__}; "
                    f"nothing was written to {self.path}"
                )
            _check.check_name("txn.operation", txn.operation)
            new_spans: _diff.Spans | None = None
            if txn._payload is not None:
                payload = txn._payload
                long_ints = _json.has_long_integers(payload)
                if txn.validate:
                    self._validate(_json.decode(payload))
            else:
                if not isinstance(txn.data, dict):
                    raise StateSerializationError(
                        f"txn.data for {self.path} must stay a dict, "
                        f"not {type(txn.data).__name__}; nothing was written",
                        path=self.path,
                    )
                # Serialize first: data that is not JSON gets its own error, not a
                # schema complaint about the same thing.
                try:
                    encoded = _json.encode_full(txn.data)
                except _json.EncodeError as exc:
                    raise StateSerializationError(
                        f"the new state for {self.path} is not strict JSON: {exc}. Nothing was "
                        "written; store only dicts with string keys, lists, strings, finite "
                        "numbers, booleans and None.",
                        path=self.path,
                    ) from exc
                payload, long_ints, new_spans = encoded.data, encoded.long_ints, encoded.spans
                if txn.validate:
                    self._validate(txn.data)
            digest = Digest(payload)  # hashed beside the write (large payloads)
            self._check_fence()  # before anything is written
            backup = None
            if current.data is not None and txn.backup:
                backup = self.backup_manager.link_current(
                    corrupt=not current.logged, current=current.data
                )
            try:
                committed = atomic_replace(
                    self.path,
                    payload,
                    current.mode,
                    before_replace=self._before_replace(backup is not None),
                    durable=self.durability == "full",
                    check_temp=isinstance(self._lock, CrossHostLock),
                )
            except StateDurabilityError:
                raise
            except BaseException:
                if backup is not None:  # the state was not replaced: no extra backup
                    self.backup_manager.discard(backup)
                raise
            if backup is not None:
                txn.details["backup"] = backup.name
        except StateDurabilityError as exc:
            # Visible already: record it as the commit it is, flagged as maybe not durable.
            commit: dict[str, Any] = {
                "sha256": digest.hexdigest(),
                "size": len(payload),
                **({"long_integers": True} if long_ints else {}),
            }
            with contextlib.suppress(OSError):  # never hide the durability error
                st = os.stat(self.path)
                commit["stat"] = [st.st_ino, st.st_mtime_ns]
            self._log_quietly(txn, success=True, durable_error=str(exc), commit=commit)
            raise
        except StateLockLostError:
            raise  # another writer may hold the lock now: never touch its log
        except BaseException as exc:
            step = getattr(exc, "step", None)
            self._log_quietly(txn, success=False, error=f"{type(exc).__name__}: {exc}", step=step)
            raise
        sha256 = digest.hexdigest()
        cached = self._committed_spans
        old_spans = cached[1] if cached is not None and cached[0] == current.sha256 else None
        try:
            changes = _diff.changed_top_level(
                current.data, payload, old_spans=old_spans, new_spans=new_spans
            )
        except Exception:  # committed already: a summary is not worth failing the call
            _logger.exception("could not summarize the changes of a commit to %s", self.path)
            changes = None
        if new_spans is not None:  # the next commit's "old" side, while the file stays ours
            self._committed_spans = (sha256, new_spans)  # valid for exactly these bytes
        written = self._log_quietly(
            txn,
            success=True,
            commit={
                "sha256": sha256,
                "size": committed.size,
                "stat": [committed.ino, committed.mtime_ns],
                "changes": changes,
                **({"long_integers": True} if long_ints else {}),
            },
        )
        try:
            generation = written["generation"] if written else self._tail().generation + 1
        except StateSidecarError:  # committed already; the log is unreadable: warned above
            generation = -1
        txn._notify = (generation, txn.operation, changes)
        if backup is not None:
            try:
                self.backup_manager.prune(current.mode)
            except Exception as exc:  # noqa: BLE001 - committed already: never raise now
                warnings.warn(
                    f"{self.path} was committed, but pruning old backups in {self.backups_dir} "
                    f"failed ({getattr(exc, 'strerror', None) or exc}); the next commit tries "
                    "again.",
                    StateWarning,
                    stacklevel=4,
                )

    # -- fencing (Redis lock only) ---------------------------------------------------

    def _last_fence(self) -> int:
        """The newest fencing token a commit in the log carries (0: none)."""
        last = self._tail().last_commit
        if last is None:
            return 0
        fence = last.get("fence")
        if isinstance(fence, int):
            return fence
        # The newest commit carries no token (made under flock, or before the Redis lock
        # was used): the newest token is further back. Only then is the log read whole,
        # and only until the next commit under the Redis lock records a token again.
        try:
            records = self._log.read(None)
        except OSError as exc:
            raise StateSidecarError(
                f"cannot read the transaction log {self.log_path} of {self.path}: "
                f"{exc.strerror or exc}. Check its permissions; the state file is unchanged.",
                path=self.log_path,
            ) from exc
        return max(
            (
                r["fence"]
                for r in records
                if r.get("success") and r.get("sha256") and isinstance(r.get("fence"), int)
            ),
            default=0,
        )

    def _fence_field(self) -> dict[str, int]:
        """``{"fence": token}`` for a record written under the Redis lock, else ``{}``."""
        token = self._lock.token if isinstance(self._lock, CrossHostLock) else None
        return {"fence": token} if token is not None else {}

    def _check_fence(self) -> None:
        """Raise StateLockLostError unless our Redis hold is still the current one."""
        if isinstance(self._lock, CrossHostLock):
            self._lock.check(self._last_fence())

    def _still_holds_lock(self) -> bool:
        """False when a Redis lock was lost (flock cannot be lost while held)."""
        try:
            self._check_fence()
        except StateLockLostError:
            return False
        return True

    def _before_replace(self, sync_backups: bool) -> Callable[[], None] | None:
        """What runs right before the rename: make the backup durable, then fence."""
        if not isinstance(self._lock, CrossHostLock):
            return self.backup_manager.sync if sync_backups else None

        def sync_then_check() -> None:
            if sync_backups:
                self.backup_manager.sync()
            self._check_fence()  # last, so the window to the rename is as small as it gets

        return sync_then_check

    def _log_quietly(
        self,
        txn: StateTransaction,
        *,
        success: bool,
        error: str | None = None,
        step: str | None = None,
        commit: dict[str, Any] | None = None,
        durable_error: str | None = None,
    ) -> dict[str, Any] | None:
        if commit is None and not self._still_holds_lock():
            return None  # a lost Redis lock: another writer may be appending right now
        raw_details = txn.details
        details = (
            dict(raw_details) if isinstance(raw_details, dict) else {"details": repr(raw_details)}
        )
        operation = txn.operation if isinstance(txn.operation, str) else repr(txn.operation)
        if error is not None:
            details["error"] = error
        if step:
            details["step"] = step
        if durable_error is not None:
            details["durable"] = False
            details["error"] = durable_error
        record: dict[str, Any] = {
            "timestamp": _now(),
            "operation": operation,
            "success": success,
            "details": details,
            "pid": os.getpid(),
            "host": _HOST,
            "duration_ms": round((time.perf_counter() - txn._t0) * 1000, 3),
            **self._fence_field(),
        }
        if commit is not None:
            record.update(commit)
            record["commits"] = True
            if self.schema_version is not None:
                record["schema_version"] = self.schema_version
        # The tail read on entry spares a second read: we have held the flock since (it
        # cannot be lost while held, unlike the Redis lock), only lock holders write the
        # log, and append reads afresh if this process wrote any log since (a recover
        # record, repair's cut). Used once: the append moves the tail.
        current = txn._current
        tail = None
        if current is not None and not isinstance(self._lock, CrossHostLock):
            tail, current.tail = current.tail, None
        return self._append_quietly(record, tail)

    def _append_quietly(
        self, record: dict[str, Any], tail: Tail | None = None
    ) -> dict[str, Any] | None:
        try:
            return self._log.append(
                record, created_dir=self.sidecar_dir, durable=self.durability == "full", tail=tail
            )
        except (OSError, ValueError, TypeError) as exc:
            cause = (
                explain(exc, self.sidecar_dir)
                if isinstance(exc, OSError)
                else getattr(exc, "strerror", None) or exc
            )
            warnings.warn(
                f"could not append to the transaction log {self.log_path} ({cause}); the "
                "state itself is safe, and the next transaction records what is missing.",
                StateWarning,
                stacklevel=5,
            )
            return None
