"""StateTransaction: the context manager around one unit of work on a PipelineState.

It owns the mechanics: taking and releasing the lock, joining an outer transaction of
the same thread (with undo of just the inner block on error), refusing to finish in a
forked child, and firing commit hooks after the lock is released. The commit protocol
itself is ``PipelineState._commit``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from . import _check, _interrupt, _json
from ._log import Tail
from .errors import StateConflictError, StateError, StateSidecarError

if TYPE_CHECKING:
    from .state import PipelineState

__all__ = ["StateTransaction"]


@dataclass
class _Current:
    """The state file as read under the lock."""

    data: bytes | None  # None: no state file
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    mode: int | None = None
    logged: bool = True  # matches the newest commit record of the log
    recovered: bool = False  # a recover record was appended for it just now
    trusted: bool = False  # the very bytes the newest commit record wrote (by sha256)
    sha256: str = ""  # of ``data``
    tail: Tail | None = None  # the log's tail as read with ``data``, until an append uses it
    parsed: dict[str, Any] | None = None  # ``data`` parsed, when asked for and ``trusted``


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
        expect_version: int | None = None,
        backup: bool | None = None,
        _copy_seed: bool = True,
        _payload: bytes | None = None,
        _commit: bool = True,
    ) -> None:
        _check.check_bool("validate", validate)
        if seed_data is not None and not isinstance(seed_data, dict):
            raise TypeError(
                f"seed_data must be a dict or None, not {type(seed_data).__name__} {seed_data!r}"
            )
        _check.check_name("operation", operation)
        _check.check_int("expect_version", expect_version, optional=True)
        _check.check_bool("backup", backup, optional=True)
        self.state = state
        self.expect_version = expect_version
        self.backup = state.backup_before_write if backup is None else backup
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
        self._notify: tuple[int, str, list[str] | None] | None = None
        self._migrated: tuple[int, str, list[str] | None] | None = None  # its hook is due too
        self._log_it = True
        self._frame: FrameType | None = None  # the frame of the with statement, while open
        self._lasti = -1  # and its instruction (the with statement) at __enter__

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
            return self._join(outer)
        self._t0 = time.perf_counter()
        state._lock.acquire(state.timeout, self.operation, state.path)
        try:
            self._pid = os.getpid()
            # The frame of the with statement: if an interrupt kills __exit__ as it is
            # called, the next transaction of this thread sees the frame gone and
            # finishes the bookkeeping (state._active_transaction).
            self._frame = sys._getframe(1)
            self._lasti = self._frame.f_lasti
            _interrupt.install(self)
            state._set_active(self)
            state._prepare_sidecars()
            self._current = state._read_current_locked(
                parse=self._payload is None and self._seed is None and self._commits
            )
            if self._current.recovered:
                self.details["recovered_commit"] = True
            state._migrate_locked(self)
            if self.expect_version is not None:
                actual = state._tail().generation
                if actual != self.expect_version:
                    raise StateConflictError(
                        f"{state.path} is at version {actual}, not {self.expect_version}: "
                        "another writer committed since you read it. Read again "
                        "(state.read_versioned()), decide again, and retry.",
                        path=state.path,
                        expected=self.expect_version,
                        actual=actual,
                    )
            if self._payload is not None:
                self.data = {}
            elif self._seed is not None:
                self.data = copy.deepcopy(self._seed) if self._copy_seed else self._seed
            elif self._commits:
                parsed, self._current.parsed = self._current.parsed, None  # used once
                if parsed is None:
                    parsed = state._decode(self._current.data, trusted=self._current.trusted)
                self.data = parsed
        except BaseException as exc:
            interrupted: BaseException | None = None
            try:
                # Under the lock, so the log may be written: record the refusal (a corrupt
                # state, a conflict, a failing step), unless the sidecars are what failed.
                if not isinstance(exc, StateSidecarError) and state.sidecar_dir.is_dir():
                    state._log_quietly(self, success=False, error=f"{type(exc).__name__}: {exc}")
            finally:
                # Inline, not a helper: an interrupt as a helper is called would skip it all.
                # Both steps are safe to repeat, so an interrupt inside them is retried and
                # raised once the bookkeeping is consistent.
                for _ in range(_ATTEMPTS):
                    try:
                        self._frame = None
                        state._clear_active(self)
                        state._lock.release()
                        _interrupt.release(self)  # may raise a deferred Ctrl-C: kept below
                    except BaseException as cut:  # noqa: BLE001 - raised below
                        interrupted = interrupted or cut
                        continue
                    break
            if self._migrated is not None:  # the migration committed even so
                state._fire_hooks(*self._migrated)
            if interrupted is not None:
                raise interrupted from exc
            raise
        return self

    def _join(self, outer: StateTransaction) -> StateTransaction:
        if self.expect_version is not None and self.expect_version != outer.state.version:
            raise StateConflictError(
                f"{self.state.path} is at version {outer.state.version}, not "
                f"{self.expect_version}; the enclosing transaction cannot honour it",
                path=self.state.path,
                expected=self.expect_version,
                actual=outer.state.version,
            )
        self._outer = outer
        self._snapshot = _snapshot(outer.data)
        if self._payload is not None:
            _replace_contents(outer.data, _json.decode(self._payload))
        elif self._seed is not None:
            _replace_contents(outer.data, copy.deepcopy(self._seed))
        self.data = outer.data
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
            elif exc_type is None and self.data is not self._outer.data:
                # The block assigned a new dict to txn.data: that is the new content.
                _replace_contents(self._outer.data, self.data)
            return
        state = self.state
        if self._pid != os.getpid():
            # fork() inside the block: the child never commits nor unlocks the parent's lock.
            raise StateError(
                f"this transaction on {state.path} was opened in process {self._pid} and "
                "cannot be finished in a forked child; open a new transaction in the child"
            )
        interrupted: BaseException | None = None
        try:
            if exc_type is not None:
                state._log_quietly(self, success=False, error=f"{exc_type.__name__}: {exc}")
                return
            if self._commits:
                state._commit(self)
            elif self._log_it:
                state._log_quietly(self, success=True)
        finally:
            # Inline, not a helper: an interrupt as a helper is called would skip it all.
            # Both steps are safe to repeat, so an interrupt inside them is retried and
            # raised once the bookkeeping is consistent.
            for _ in range(_ATTEMPTS):
                try:
                    self._frame = None
                    state._clear_active(self)
                    state._lock.release()
                    _interrupt.release(self)  # may raise a deferred Ctrl-C: kept below
                except BaseException as cut:  # noqa: BLE001 - raised below
                    interrupted = interrupted or cut
                    continue
                break
            if self._migrated is not None:  # committed in __enter__, whatever the block did
                state._fire_hooks(*self._migrated)
            if interrupted is not None:
                raise interrupted  # after the bookkeeping is consistent again
        if self._notify is not None:
            state._fire_hooks(*self._notify)

    def skip_log(self) -> None:
        """Write no log record for this transaction (it changed nothing worth one)."""
        self._log_it = False


_ATTEMPTS = 10  # cleanup retries when interrupts keep cutting it short


# A Ctrl-C handled as __exit__ is entered would leave before any of its code runs.
_interrupt.defer_in(StateTransaction.__exit__.__code__)


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
