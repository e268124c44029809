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

import copy
import hashlib
import os
import socket
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ValidationError

from . import _json
from ._atomic import atomic_replace
from ._backup import BackupManager
from ._lock import ProcessLock, get_process_lock
from ._log import TransactionLog
from .errors import (
    StateDurabilityError,
    StateError,
    StateReadError,
    StateSerializationError,
    StateSidecarError,
    StateValidationError,
    StateWarning,
    StateWriteError,
)
from .models import PipelineModel

__all__ = ["PipelineState", "StateTransaction"]

_HOST = socket.gethostname()
_active = threading.local()  # per thread: lock path -> the outermost open transaction


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Current:
    """The state file as read under the lock."""

    data: bytes | None  # None: no state file
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    mode: int | None = None
    logged: bool = True  # matches the newest commit record of the log


class StateTransaction:
    """One unit of work on a :class:`PipelineState`; use it as a context manager.

    ``txn.data`` is the caller's private, mutable copy of the state. A clean exit
    validates and commits it; an exception rolls back (the file is untouched) and is
    re-raised unchanged. ``txn.details`` (a dict) is stored in the log record.

    Entered while the same thread already has a transaction open on the same file, it
    joins that outer transaction: it shares ``data``, commits nothing itself, and an
    exception escaping it undoes only its own changes.
    """

    def __init__(
        self,
        state: PipelineState,
        *,
        validate: bool = True,
        seed_data: dict[str, Any] | None = None,
        operation: str = "transaction",
        _copy_seed: bool = True,
        _payload: bytes | None = None,
        _commit: bool = True,
    ) -> None:
        self.state = state
        self.validate = validate
        self.operation = operation
        self.details: dict[str, Any] = {}
        self.data: dict[str, Any] = {}
        self._seed = seed_data
        self._copy_seed = _copy_seed
        self._payload = _payload
        self._commits = _commit
        self._outer: StateTransaction | None = None
        self._snapshot: bytes | dict[str, Any] | None = None
        self._current: _Current | None = None
        self._pid = 0
        self._entered = False
        self._t0 = 0.0

    @property
    def nested(self) -> bool:
        """True when this transaction joined an outer one of the same thread."""
        return self._outer is not None

    def __enter__(self) -> StateTransaction:
        if self._entered:
            raise StateError(
                "a StateTransaction can be entered only once; call state.transaction() again"
            )
        self._entered = True
        state = self.state
        outer = state._active_transaction()
        if outer is not None:
            self._outer = outer
            self._snapshot = _snapshot(outer.data)
            if self._payload is not None:
                _replace_contents(outer.data, _json.decode(self._payload))
            elif self._seed is not None:
                _replace_contents(outer.data, copy.deepcopy(self._seed))
            self.data = outer.data
            return self
        self._t0 = time.perf_counter()
        state._lock.acquire(state.timeout, self.operation, state.path)
        self._pid = os.getpid()
        state._set_active(self)
        try:
            state._prepare_sidecars()
            self._current = state._read_current_locked()
            if self._payload is not None:
                self.data = {}
            elif self._seed is not None:
                self.data = copy.deepcopy(self._seed) if self._copy_seed else self._seed
            elif self._commits:
                self.data = state._decode(self._current.data)
        except BaseException:
            state._clear_active(self)
            state._lock.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._outer is not None:
            if exc_type is not None and self._snapshot is not None:
                _replace_contents(self._outer.data, _restore(self._snapshot))
            return
        state = self.state
        if self._pid != os.getpid():
            # fork() inside the block: the child never commits nor unlocks the parent's lock.
            raise StateError(
                f"this transaction on {state.path} was opened in process {self._pid} and "
                "cannot be finished in a forked child; open a new transaction in the child"
            )
        try:
            if exc_type is not None:
                state._log_quietly(self, success=False, error=f"{exc_type.__name__}: {exc}")
                return
            if self._commits:
                state._commit(self)
            else:
                state._log_quietly(self, success=True)
        finally:
            state._clear_active(self)
            state._lock.release()


def _snapshot(data: dict[str, Any]) -> bytes | dict[str, Any]:
    # Serializing is cheaper than copy.deepcopy for JSON data; anything odd is deep-copied.
    try:
        return _json.encode(data)
    except _json.EncodeError:
        return copy.deepcopy(data)


def _restore(snapshot: bytes | dict[str, Any]) -> dict[str, Any]:
    return _json.decode(snapshot) if isinstance(snapshot, bytes) else snapshot


def _replace_contents(target: dict[str, Any], source: dict[str, Any]) -> None:
    target.clear()
    target.update(source)


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
    ) -> None:
        if max_backups < 0:
            raise ValueError(f"max_backups must be >= 0, not {max_backups}")
        given = Path(os.fspath(path)).expanduser()
        self.path = Path(os.path.realpath(given))
        self.validate_on_read = validate_on_read
        self.max_backups = max_backups
        self.backup_before_write = backup_before_write
        self.timeout = timeout
        self.schema: type[BaseModel] = schema if schema is not None else PipelineModel
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.sidecar_dir = self.path.parent / f".{self.path.stem}"
        self.backups_dir = self.sidecar_dir / "backups"
        self.log_path = self.sidecar_dir / "transactions.log"
        base = self._base_mode()
        self._file_mode = base & 0o666
        self._dir_mode = base | ((base & 0o444) >> 2)  # x wherever r, like a folder should
        self._lock: ProcessLock = get_process_lock(self.lock_path, base & 0o660)
        self._log = TransactionLog(self.log_path, self._file_mode)
        self.backup_manager = BackupManager(
            self.path, self.backups_dir, max_backups, self._locked_operation
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
        data = self._decode(self._read_bytes())
        if validate or (validate is None and self.validate_on_read):
            self._validate(data)
        return data

    def transaction(
        self,
        validate: bool = True,
        seed_data: dict[str, Any] | None = None,
        *,
        operation: str = "transaction",
    ) -> StateTransaction:
        """Open a transaction: ``with state.transaction() as txn: txn.data[...] = ...``.

        Args:
            validate: Validate against the schema before committing.
            seed_data: Start from (a deep copy of) this instead of the current state.
            operation: The name recorded in the log and in the lock's holder record.
        """
        return StateTransaction(self, validate=validate, seed_data=seed_data, operation=operation)

    def write(self, data: dict[str, Any], validate: bool = True) -> None:
        """Replace the whole state with ``data``, committed exactly like a transaction."""
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

    def list_backups(self, limit: int = 10) -> list[Path]:
        """Return up to ``limit`` backups, newest first."""
        return self.backup_manager.list_paths(limit)

    def restore_backup(self, backup_path: str | os.PathLike[str], *, validate: bool = True) -> bool:
        """Make a backup the current state, as a logged transaction.

        The replaced state is backed up first, so a restore can itself be undone. The
        backup's bytes are copied into a new file; the backup stays as it is.

        Raises:
            StateBackupError: not one of this state's backups (outside its folder, ``..``,
                a symlink, a directory, a FIFO) or corrupt; nothing changed.
            StateValidationError: the backup fails the schema (pass ``validate=False``).
        """
        backup = self.backup_manager.check(backup_path)
        payload = self.backup_manager.read_checked(backup)
        txn = StateTransaction(self, validate=validate, operation="restore", _payload=payload)
        txn.details["restored_from"] = backup.name
        with txn:
            pass
        return True

    def get_transaction_history(self, limit: int = 50) -> list[dict[str, Any]]:
        """Return up to ``limit`` log records, newest first.

        Each has ``seq``, ``timestamp`` (ISO 8601, UTC), ``operation``, ``success``,
        ``details``, ``generation`` and, for commits, ``sha256`` of the committed bytes.
        """
        return self._log.read(limit)

    # -- internals -------------------------------------------------------------

    def _base_mode(self) -> int:
        try:
            return stat.S_IMODE(os.stat(self.path).st_mode) | 0o600
        except OSError:
            return 0o666  # like open(): the umask applies when files are created

    def _active_transaction(self) -> StateTransaction | None:
        stack: dict[str, StateTransaction] | None = getattr(_active, "by_lock", None)
        if not stack:
            return None
        txn = stack.get(str(self.lock_path))
        if txn is None or txn._pid != os.getpid():
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

    @contextmanager
    def _locked_operation(self, operation: str) -> Iterator[StateTransaction]:
        with StateTransaction(self, operation=operation, _commit=False) as txn:
            yield txn

    def _prepare_sidecars(self) -> None:
        """Create ``.<stem>/`` and ``backups/`` if needed; refuse symlinked ones."""
        from . import _fs

        for folder in (self.sidecar_dir, self.backups_dir):
            try:
                st = os.lstat(folder)
            except FileNotFoundError:
                try:
                    _fs.mkdir(str(folder), self._dir_mode)
                    _fs.fsync_dir(str(folder.parent))
                except FileExistsError:
                    st = os.lstat(folder)
                except OSError as exc:
                    raise StateWriteError(
                        f"cannot create the sidecar folder {folder} for {self.path}: "
                        f"{exc.strerror}; the state file is unchanged. Check the folder's "
                        "permissions and free space.",
                        path=self.path,
                        step="create sidecar folder",
                        errno=exc.errno,
                    ) from exc
                else:
                    continue
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise StateSidecarError(
                    f"{folder} must be a real folder, but it is a "
                    f"{'symlink' if stat.S_ISLNK(st.st_mode) else 'file'}; pipeline_common "
                    "refuses to follow it. Move it away and run again.",
                    path=folder,
                )

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

    def _decode(self, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            return {}
        try:
            return _json.decode(raw)
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

    def _read_current_locked(self) -> _Current:
        """Read the state under the lock and reconcile it with the log."""
        raw, st = self._read_file()
        if raw is None or st is None:
            return _Current(None)
        current = _Current(raw, st.st_ino, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
        last = self._log.tail().last_commit
        if (
            last is not None
            and last.get("size") == current.size
            and last.get("stat")
            == [
                current.ino,
                current.mtime_ns,
            ]
        ):
            return current  # exactly the file our newest record committed: no hashing
        digest = hashlib.sha256(raw).hexdigest()
        if last is not None and last.get("sha256") == digest:
            return current
        # A commit without its record (crash or log error after the rename), or a change
        # made outside this library: record it, so the log matches the state again.
        try:
            _json.decode(raw)
        except _json.DecodeError:
            current.logged = False
            return current  # a corrupt file is not a commit; read/write paths deal with it
        self._append_quietly(
            {
                "timestamp": _now(),
                "operation": "recover",
                "success": True,
                "commits": True,
                "sha256": digest,
                "size": current.size,
                "stat": [current.ino, current.mtime_ns],
                "details": {
                    "reason": "the state file was changed without a log record "
                    "(a crash or log failure after a commit, or an outside write)"
                },
                "pid": os.getpid(),
                "host": _HOST,
            }
        )
        return current

    def _commit(self, txn: StateTransaction) -> None:
        current = txn._current
        assert current is not None
        try:
            if txn._payload is not None:
                payload = txn._payload
                if txn.validate:
                    self._validate(_json.decode(payload))
            else:
                if not isinstance(txn.data, dict):
                    raise StateSerializationError(
                        f"txn.data for {self.path} must stay a dict, "
                        f"not {type(txn.data).__name__}; nothing was written",
                        path=self.path,
                    )
                if txn.validate:
                    self._validate(txn.data)
                try:
                    payload = _json.encode(txn.data)
                except _json.EncodeError as exc:
                    raise StateSerializationError(
                        f"the new state for {self.path} is not strict JSON: {exc}. Nothing was "
                        "written; store only dicts with string keys, lists, strings, finite "
                        "numbers, booleans and None.",
                        path=self.path,
                    ) from exc
            backup = None
            if current.data is not None and self.backup_before_write:
                backup = self.backup_manager.link_current(corrupt=not current.logged)
            try:
                committed = atomic_replace(
                    self.path,
                    payload,
                    current.mode,
                    before_replace=self.backup_manager.sync if backup is not None else None,
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
            st = os.stat(self.path)
            self._log_quietly(
                txn,
                success=True,
                durable_error=str(exc),
                commit={
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "size": st.st_size,
                    "stat": [st.st_ino, st.st_mtime_ns],
                },
            )
            raise
        except BaseException as exc:
            step = getattr(exc, "step", None)
            self._log_quietly(txn, success=False, error=f"{type(exc).__name__}: {exc}", step=step)
            raise
        digest = hashlib.sha256(payload).hexdigest()
        self._log_quietly(
            txn,
            success=True,
            commit={
                "sha256": digest,
                "size": committed.size,
                "stat": [committed.ino, committed.mtime_ns],
            },
        )
        if self.backup_before_write:
            try:
                self.backup_manager.prune()
            except OSError as exc:
                warnings.warn(
                    f"{self.path} was committed, but pruning old backups in {self.backups_dir} "
                    f"failed ({exc.strerror}); the next commit tries again.",
                    StateWarning,
                    stacklevel=4,
                )

    def _log_quietly(
        self,
        txn: StateTransaction,
        *,
        success: bool,
        error: str | None = None,
        step: str | None = None,
        commit: dict[str, Any] | None = None,
        durable_error: str | None = None,
    ) -> None:
        details = dict(txn.details)
        if error is not None:
            details["error"] = error
        if step:
            details["step"] = step
        if durable_error is not None:
            details["durable"] = False
            details["error"] = durable_error
        record: dict[str, Any] = {
            "timestamp": _now(),
            "operation": txn.operation,
            "success": success,
            "details": details,
            "pid": os.getpid(),
            "host": _HOST,
            "duration_ms": round((time.perf_counter() - txn._t0) * 1000, 3),
        }
        if commit is not None:
            record.update(commit)
            record["commits"] = True
        self._append_quietly(record)

    def _append_quietly(self, record: dict[str, Any]) -> None:
        try:
            self._log.append(record, created_dir=self.sidecar_dir)
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"could not append to the transaction log {self.log_path} "
                f"({getattr(exc, 'strerror', None) or exc}); the state itself is safe, and the "
                "next transaction records what is missing.",
                StateWarning,
                stacklevel=5,
            )
