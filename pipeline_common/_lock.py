"""The exclusive cross-process lock on ``<state>.lock``.

One ``ProcessLock`` per lock file per process. Threads of the process queue on a
``threading.Lock``; processes on ``flock(2)`` of a dedicated lock file that is never
deleted (deleting it breaks mutual exclusion: filelock #574) and never the state file
itself (its inode changes at every commit).

Why not ``filelock.FileLock`` on POSIX: it polls every 50 ms under contention, which
starves waiters (slowest of 4 workers 3.9x the fastest) and costs 0.12-0.23 ms per
acquire. Here an uncontended acquire is one non-blocking flock; a contended one
blocks in the kernel on a helper thread, so the wait has no poll latency and still
honours the timeout. On Windows, filelock does the locking.

The holder writes who it is (pid, host, since, operation) into the lock file while it
holds the lock, so a waiter that times out can say who blocked it. On release it
blanks the record (spaces), so nobody is named as the holder of a free lock.

Acquire and release are safe against an exception raised anywhere (Ctrl-C): a partial
acquire is undone, and a release cut short can be run again to finish.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from . import _fs
from ._oserror import ADVISED, PERMISSION, explain
from ._time import now_iso
from .errors import StateLockError, StateSidecarError

__all__ = ["ProcessLock", "get_process_lock", "read_holder"]

_HOST = socket.gethostname()


_ATTEMPTS = 10  # cleanup retries when interrupts keep cutting it short


def _owns(lock: Any) -> bool:
    """True when the calling thread holds ``lock`` (an RLock): unlike a flag, this
    cannot be left stale by an interrupt between the acquire and its bookkeeping."""
    return bool(lock._is_owned())


_RECORD = 256  # holder records (and the blank left on release) are padded to this size


def _pad(record: bytes) -> bytes:
    """``record`` padded with spaces (JSON allows them) to ``_RECORD`` bytes, newline
    last, so each write covers the previous one and the file's length never changes:
    one ``pwrite``, no ``ftruncate``. A longer record is left as it is."""
    return record.ljust(_RECORD - 1) + b"\n" if len(record) < _RECORD else record


_BLANK = _pad(b"")


class _Waiter:
    """Blocks in flock on its own descriptor, on a helper thread.

    A caller that gives up (timeout, KeyboardInterrupt) cancels it: if the lock then
    arrives, the waiter closes its descriptor at once, which releases the lock. A
    later acquire adopts a waiter that is still blocked instead of starting another,
    so timeouts against a stuck holder never pile up threads or descriptors.
    """

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.mode = mode
        self.pid = os.getpid()
        self.done = threading.Event()
        self.fd: int | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.finished = False
        self.guard = threading.Lock()

    def run(self) -> None:
        import fcntl

        fd: int | None = None
        try:
            fd = _open_lock_file(self.path, self.mode)
            _fs.flock(fd, fcntl.LOCK_EX, self.path)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            if fd is not None:
                os.close(fd)
            with self.guard:
                self.error = exc
                self.finished = True
            self.done.set()
            return
        with self.guard:
            self.finished = True
            if self.cancelled:
                # Nobody waits any more: let go at once (closing releases the flock).
                os.close(fd)
            else:
                self.fd = fd
        self.done.set()

    def cancel(self) -> int | None:
        """Give up; return the descriptor if the lock arrived in the meantime."""
        with self.guard:
            self.cancelled = True
            fd, self.fd = self.fd, None
            return fd

    def adopt(self) -> bool:
        """Wait on this waiter again, if it is still blocked in the kernel."""
        with self.guard:
            if self.finished or self.pid != os.getpid():
                return False
            self.cancelled = False
            return True


def _open_error(path: str, exc: OSError) -> StateSidecarError:
    if exc.errno in ADVISED:
        # Nothing is wrong with the file: never advise removing it.
        return StateSidecarError(
            f"cannot open the lock file {path}: {explain(exc, os.path.dirname(path))}. "
            "Nothing was changed.",
            path=path,
        )
    return StateSidecarError(
        f"cannot open the lock file {path}: {exc.strerror or exc}. It must be a regular file "
        "this user can open (a lock file holds no data: whatever is at that path can "
        "be removed when no pipeline runs)",
        path=path,
    )


def _open_lock_file(path: str, mode: int) -> int:
    # O_NONBLOCK: a FIFO planted at the path must not hang the open; it is refused below.
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = _fs.open_file(path, os.O_RDWR | flags, mode)
    except OSError as exc:
        if exc.errno not in PERMISSION:
            raise _open_error(path, exc) from exc
        # Another user's lock file we may only read: flock works on a read-only fd.
        try:
            fd = _fs.open_file(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            # It could not be created: the first error is the cause, not this one.
            raise _open_error(path, exc) from exc
        except OSError as again:
            raise _open_error(path, again) from again
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateSidecarError(
            f"the lock file {path} is not a regular file; remove whatever is at that path "
            "(a lock file holds no data) and run again",
            path=path,
        )
    return fd


def read_holder(lock_path: str | Path) -> dict[str, Any] | None:
    """Return what the current holder wrote into the lock file, if anything."""
    try:
        with open(lock_path, "rb") as fh:
            raw = fh.read(4096)
        holder = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "the holder left no record (another program, or an older version)"
    return (
        f"held by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
        f"for {holder.get('operation')!r}"
    )


class ProcessLock:
    """The lock on one lock file, shared by every PipelineState of this process."""

    def __init__(self, path: Path, mode: int = 0o664) -> None:
        self.path = path
        self.mode = mode & ~0o002  # never world-writable
        # Reentrant only so a thread can tell that it owns it (see _owns); a second
        # acquire by the holding thread is refused in acquire().
        self._threads = threading.RLock()
        self._fd: int | None = None
        self._fd_pid = 0
        self._pending: _Waiter | None = None  # a waiter still blocked after a timeout
        self._held_by: tuple[int, int, str, str] | None = None  # pid, thread id, since, op
        self._length = -1  # the lock file's length after our last write (-1: unknown)

    def acquire(self, timeout: float | None, operation: str, state_path: Path) -> None:
        """Take the lock within ``timeout`` seconds (None waits forever), or raise.

        Whatever is raised where (a timeout, or a ``KeyboardInterrupt`` between any two
        steps), the thread lock and the flock are let go before it propagates.
        """
        start = time.monotonic()
        if timeout is not None and timeout > threading.TIMEOUT_MAX:
            timeout = None  # float("inf") and the like: wait forever
        if _owns(self._threads):
            held = self._held_by
            if held is not None and held[:2] == (os.getpid(), threading.get_ident()):
                raise self._timeout_error(timeout, self._holder(), state_path, in_process=True)
            # Left by an acquire interrupted just as the thread lock was granted.
            self._threads.release()
        if not self._threads.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise self._timeout_error(timeout, self._holder(), state_path, in_process=True)
        try:
            self._acquire_os(timeout, start, operation, state_path)
            since = now_iso()
            self._held_by = (os.getpid(), threading.get_ident(), since, operation)
            self._write_holder(since, operation, self._record_length())
        except BaseException:
            # Retried: an interrupt inside the cleanup must not leave the lock held.
            for _ in range(_ATTEMPTS):
                try:
                    self._abandon()
                except BaseException:  # noqa: BLE001 - the first error is re-raised
                    continue
                break
            raise

    def _holder(self) -> dict[str, Any] | None:
        held = self._held_by
        if held is None:
            return None
        return {"pid": held[0], "host": _HOST, "since": held[2], "operation": held[3]}

    def _abandon(self) -> None:
        """Undo a partial :meth:`acquire`; safe to run again after an interruption."""
        waiter = self._pending
        if waiter is not None:
            fd = waiter.cancel()
            if fd is not None:  # the lock arrived as we gave up: closing releases it
                os.close(fd)
        if self._fd is not None and self._fd_pid == os.getpid() and os.name != "nt":
            import fcntl

            try:  # noqa: SIM105 - no contextlib frames in the cleanup path
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # a no-op if we never got it
            except OSError:
                pass
        self._held_by = None
        if _owns(self._threads):
            self._threads.release()

    def _record_length(self) -> int:
        """The lock file's length, up to ``_RECORD + 1`` (-1: unknown): a record written
        by another program or an older version may not be padded to ``_RECORD``."""
        if self._fd is None:  # pragma: no cover - Windows
            return -1
        try:
            return len(os.pread(self._fd, _RECORD + 1, 0))
        except OSError:
            return -1

    def _acquire_os(
        self, timeout: float | None, start: float, operation: str, state_path: Path
    ) -> None:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            self._acquire_windows(timeout, state_path)
            return
        import fcntl

        path = str(self.path)
        if self._fd is not None and self._fd_pid != os.getpid():
            # Inherited across fork: that descriptor shares the parent's lock, so it
            # must never be unlocked here; drop it (closing does not release it).
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self._fd = _open_lock_file(path, self.mode)
            self._fd_pid = os.getpid()
        try:
            _fs.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise self._flock_error(exc, timeout, state_path) from exc
        remaining = None if timeout is None else timeout - (time.monotonic() - start)
        if remaining is not None and remaining <= 0:
            raise self._timeout_error(timeout, read_holder(path), state_path)
        waiter = self._pending
        if waiter is None or not waiter.adopt():
            waiter = _Waiter(path, self.mode)
            threading.Thread(target=waiter.run, name="pipeline-lock-wait", daemon=True).start()
        # Interrupted while waiting: acquire()'s cleanup cancels the waiter, so a lock
        # that arrives later is let go at once.
        self._pending = waiter
        arrived = waiter.done.wait(remaining)
        if not arrived:
            fd = waiter.cancel()
            if fd is None:
                raise self._timeout_error(timeout, read_holder(path), state_path)
            waiter.fd = fd  # it arrived just as we gave up: take it
        if waiter.error is not None:
            self._pending = None
            if isinstance(waiter.error, OSError) and not isinstance(
                waiter.error, StateSidecarError
            ):
                raise self._flock_error(waiter.error, timeout, state_path) from waiter.error
            raise waiter.error
        assert waiter.fd is not None
        # Keep the descriptor that holds the lock; the idle one is closed. One statement,
        # so no interrupt can fall between taking the descriptor and recording it.
        idle, self._fd, waiter.fd, self._pending = self._fd, waiter.fd, None, None
        os.close(idle)

    def _acquire_windows(self, timeout: float | None, state_path: Path) -> None:  # pragma: no cover
        import filelock

        if not hasattr(self, "_filelock"):
            self._filelock = filelock.FileLock(str(self.path), poll_interval=0.001)
        try:
            self._filelock.acquire(timeout=-1 if timeout is None else timeout)
        except filelock.Timeout:
            raise self._timeout_error(timeout, None, state_path) from None

    def release(self) -> None:
        """Release the lock. After fork, a child never releases its parent's lock.

        Safe to call again when an interrupt cut a release short: each step is either
        idempotent or recorded before the next one, so a retry finishes the job.
        """
        held = self._held_by
        if held is not None and held[0] == os.getpid():
            if os.name == "nt":  # pragma: no cover
                self._filelock.release()
            elif self._fd is not None:
                import fcntl

                fd = self._fd
                self._blank_record(fd)
                try:  # noqa: SIM105 - no contextlib frames in the cleanup path
                    # Explicit: a forked child may share the descriptor, so closing
                    # alone would not release the flock.
                    _fs.flock(fd, fcntl.LOCK_UN, str(self.path))
                except OSError:
                    pass  # closing below releases it too
                # The descriptor is closed after each release, so a process that touches
                # many state files does not keep one open per file; reopening costs ~10 us.
                self._fd = None
                try:  # noqa: SIM105 - no contextlib frames in the cleanup path
                    os.close(fd)
                except OSError:
                    pass
            self._held_by = None
        if _owns(self._threads):
            self._threads.release()

    def _blank_record(self, fd: int) -> None:
        """Blank the holder record (still locked): a free lock names no holder."""
        try:
            os.pwrite(fd, _BLANK, 0)
            if self._length != len(_BLANK):
                os.ftruncate(fd, len(_BLANK))
        except OSError:
            pass  # a read-only lock file keeps no record

    def held_by_current_thread(self) -> bool:
        """True when this thread of this process holds the lock."""
        held = self._held_by
        return held is not None and held[0] == os.getpid() and held[1] == threading.get_ident()

    def _write_holder(self, since: str, operation: str, length: int) -> None:
        """Write the holder record over whatever the file holds (``length`` bytes)."""
        self._length = -1
        if os.name == "nt" or self._fd is None:  # pragma: no cover
            return
        holder = {"pid": os.getpid(), "host": _HOST, "since": since, "operation": operation}
        try:
            record = _pad(orjson.dumps(holder))
        except TypeError:  # e.g. a lone surrogate in the operation name
            record = _pad(json.dumps(holder).encode())
        try:
            os.pwrite(self._fd, record, 0)
            if length != len(record):  # records are padded to one size: rarely needed
                os.ftruncate(self._fd, len(record))
        except OSError:
            return  # informational only; a read-only lock file still locks
        self._length = len(record)

    def _flock_error(self, exc: OSError, timeout: float | None, state_path: Path) -> StateLockError:
        return StateLockError(
            f"could not lock {state_path}: flock on {self.path} failed ({exc.strerror or exc}); "
            "the lock file must be on a local file system that supports flock. Nothing was "
            "changed.",
            path=state_path,
            lock_file=self.path,
            timeout=timeout,
        )

    def _timeout_error(
        self,
        timeout: float | None,
        holder: dict[str, Any] | None,
        state_path: Path,
        in_process: bool = False,
    ) -> StateLockError:
        who = _describe(holder)
        where = " (another thread of this process)" if in_process else ""
        return StateLockError(
            f"could not lock {state_path} within {timeout} s: the lock file {self.path} is "
            f"{who}{where}. Wait for it to finish, or stop that process if it is stuck; "
            "never delete the lock file.",
            path=state_path,
            lock_file=self.path,
            timeout=timeout,
            holder=holder,
        )

    def _reset_after_fork(self) -> None:
        # The child has one thread; a threading lock taken by another parent thread
        # would never be released here, so start over. The fd is dropped at next use.
        self._threads = threading.RLock()
        self._held_by = None
        self._pending = None  # its thread does not exist in the child


_registry: dict[str, ProcessLock] = {}
_registry_guard = threading.Lock()


def get_process_lock(path: Path, mode: int) -> ProcessLock:
    """Return this process's lock object for ``path`` (one per canonical path)."""
    key = str(path)
    with _registry_guard:
        lock = _registry.get(key)
        if lock is None:
            lock = _registry[key] = ProcessLock(path, mode)
        return lock


def _after_fork_in_child() -> None:
    global _registry_guard
    _registry_guard = threading.Lock()
    for lock in _registry.values():
        lock._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
