"""The whole exception tree of pipeline_common.

Every error names the file it concerns and says what to do next. Each class also
subclasses the builtin it resembles, so generic handlers keep working::

    Exception
     +-- StateError                       base of everything raised here
          +-- StateReadError              the state file cannot be read or parsed
          +-- StateValidationError        (also ValueError) the data fails the schema
          +-- StateSerializationError     (also ValueError) txn.data is not strict JSON
          +-- StateLockError              (also TimeoutError) the lock was not obtained in time
          |    +-- StateLockUnavailableError  the lock server (Redis) cannot be reached
          |    +-- StateLockLostError     the lock was lost during the transaction; the
          |                               commit was refused before the replace
          +-- StateWriteError             a file-system step of a commit failed; nothing changed
          +-- StateDurabilityError        committed and visible, but maybe not durable
          +-- StateBackupError            a backup is unusable or cannot be restored
          +-- StateSidecarError           a sidecar (lock file, .<stem>/ folder) is unusable
          +-- StateConflictError          another writer committed since the expected version
          +-- StateSchemaError            the file's schema version is newer than the code's,
                                          or a migration is missing or failed

    UserWarning
     +-- StateWarning                     committed, but the audit log or pruning failed

Errors pickle with their attributes, because they cross process boundaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "StateBackupError",
    "StateConflictError",
    "StateDurabilityError",
    "StateError",
    "StateLockError",
    "StateLockLostError",
    "StateLockUnavailableError",
    "StateReadError",
    "StateSchemaError",
    "StateSerializationError",
    "StateSidecarError",
    "StateValidationError",
    "StateWarning",
    "StateWriteError",
]


class StateError(Exception):
    """Base class of every error raised by pipeline_common.

    Attributes:
        path: The file the error concerns (state file, lock file or backup).
    """

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the message, then restore every attribute: subclasses add
        # keyword-only attributes that Exception's default pickling would drop.
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def _rebuild(cls: type[StateError], message: str, state: dict[str, Any]) -> StateError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class StateReadError(StateError):
    """The state file exists but is empty, corrupt, not UTF-8 or not a JSON object.

    Attributes:
        backup: The newest backup that parses, if any: the one to restore.
    """

    def __init__(
        self, message: str, *, path: str | Path | None = None, backup: Path | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.backup = backup


class StateValidationError(StateError, ValueError):
    """The data does not match the schema; nothing was written.

    Attributes:
        errors: Pydantic's list of error dicts (location, message, type).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.errors = errors or []


class StateSerializationError(StateError, ValueError):
    """``txn.data`` holds something that is not strict JSON; nothing was written."""


class StateLockError(StateError, TimeoutError):
    """The exclusive lock was not obtained within the timeout.

    Attributes:
        lock_file: The lock file waited on.
        timeout: How long the caller waited, in seconds.
        holder: What the holder recorded (pid, host, since, operation), if readable.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        lock_file: str | Path | None = None,
        timeout: float | None = None,
        holder: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.lock_file = Path(lock_file) if lock_file is not None else None
        self.timeout = timeout
        self.holder = holder


class StateLockUnavailableError(StateLockError):
    """The lock server (Redis) could not be reached to take the lock; nothing was written.

    Attributes:
        url: The lock server's URL (without its password).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        url: str = "",
        timeout: float | None = None,
    ) -> None:
        super().__init__(message, path=path, timeout=timeout)
        self.url = url


class StateLockLostError(StateLockError):
    """The lock was lost while a transaction held it, so its commit was refused.

    Raised right before the replace (fencing): the holder record in Redis is no longer
    this transaction's, Redis cannot confirm it, or a newer holder already committed.
    The state file is untouched and no log record was written (another writer may hold
    the lock now); run the transaction again.

    Attributes:
        url: The lock server's URL (without its password).
        token: This transaction's fencing token.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        url: str = "",
        token: int | None = None,
        holder: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, path=path, holder=holder)
        self.url = url
        self.token = token


class StateWriteError(StateError):
    """A file-system step failed before the commit point; the state is unchanged.

    Attributes:
        step: The failing step of the commit protocol, for example ``"fsync temp file"``.
        errno: The errno of the underlying OSError, if any (also in ``__cause__``).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        step: str = "",
        errno: int | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.step = step
        self.errno = errno


class StateDurabilityError(StateError):
    """The new state was committed and is visible, but may not survive a power loss.

    Raised when the folder fsync after the rename fails. The commit is not undone
    (readers may already have seen it); a failed fsync is never retried and trusted.

    Attributes:
        step: The failing step.
        errno: The errno of the underlying OSError.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        step: str = "",
        errno: int | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.step = step
        self.errno = errno


class StateBackupError(StateError):
    """A backup path is not one of this state's backups, or it is unreadable."""


class StateSidecarError(StateError):
    """A sidecar of the state (lock file, ``.<stem>/`` folder, log) is unusable."""


class StateConflictError(StateError):
    """Another writer committed since the version the caller expected.

    Raised by ``state.transaction(expect_version=v)`` before the block runs; read
    again, decide again, and retry.

    Attributes:
        expected: The version the caller expected.
        actual: The version found under the lock.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        expected: int | None = None,
        actual: int | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.expected = expected
        self.actual = actual


class StateSchemaError(StateError):
    """The file's schema version cannot be handled by this code; nothing was written.

    Attributes:
        file_version: The schema version the file was last committed with.
        code_version: The ``schema_version`` this ``PipelineState`` was opened with.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        file_version: int | None = None,
        code_version: int | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.file_version = file_version
        self.code_version = code_version


class StateWarning(UserWarning):
    """The commit stands, but an after-commit step (log append, pruning) failed.

    The next transaction repairs what it can (it logs a ``recover`` record for a commit
    whose record is missing, and prunes again).
    """
