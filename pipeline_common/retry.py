"""RetryHandler: retry a pipeline step with backoff, and remember the attempts in the state.

Without a state the ledger lives in memory. Given a :class:`~pipeline_common.state.PipelineState`,
it lives in the state file at ``data[operation]["retry"]`` and every change goes through a
transaction, so:

- a new process continues counting where a crashed one stopped; the attempt that was running
  when it died counts, because ``attempts + 1`` and ``in_flight`` are committed *before* the
  step is called;
- each attempt and its outcome is a record of ``state.get_transaction_history()``
  (operation ``"retry:<operation> attempt <n>"``, ``details["outcome"]``);
- after a restart the handler waits until ``next_eligible_at`` before the next attempt.

The ledger, the same in memory and in the file::

    {"attempts": 2, "in_flight": false, "max_attempts": 4,
     "first_attempt_at": "...Z", "last_attempt_at": "...Z",
     "last_error_type": "ConnectionError", "last_error_message": "reset by peer",
     "delay": 2.0, "next_eligible_at": "...Z", "pid": 4242, "host": "build-1"}

A success sets ``attempts`` to 0 and keeps ``succeeded_after`` (the attempts it took) and
``last_success_at``. Uses only the public API of PipelineState.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeAlias, TypeVar, cast

from . import _check
from ._time import iso as _iso
from ._time import parse_iso as _parse_iso

if TYPE_CHECKING:
    from .state import PipelineState

__all__ = ["RetryExhaustedError", "RetryHandler", "is_testing", "set_testing"]

P = ParamSpec("P")
R = TypeVar("R")

# A predicate answers: not retryable (False/None), retry with the backoff (True), or retry
# after exactly this many seconds (a number, for example a server's Retry-After).
RetryPredicate: TypeAlias = Callable[[Exception], "bool | float | None"]
RetryOn: TypeAlias = type[BaseException] | tuple[type[BaseException], ...] | RetryPredicate

_HOST = socket.gethostname()
_MAX_MESSAGE = 1000  # keep error messages in the state file short; the log has the rest


def _new_token() -> str:
    return uuid.uuid4().hex


# Identifies this process in the ledger. A pid alone is not enough: a restarted container
# often gets the same pid again, and then an interrupted attempt would look like our own.
_process_token = _new_token()


def _reset_token() -> None:
    global _process_token
    _process_token = _new_token()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_token)


# -- errors ---------------------------------------------------------------------------


class RetryExhaustedError(Exception):
    """Every allowed attempt failed, or the next wait would pass ``max_elapsed``.

    ``__cause__`` is the last exception of the step (None when a call found the ledger
    already exhausted, for example after a restart). Pickling keeps the attributes below,
    not ``__cause__``: its type and message are in ``last_error_type`` and
    ``last_error_message``.

    Attributes:
        operation: The operation retried, for example ``"phase4"``.
        attempts: How many attempts were made (the ledger's count).
        last_error_type: The class name of the last error, if known.
        last_error_message: ``str()`` of the last error, if known.
        reason: ``"max_retries"`` or ``"max_elapsed"``.
    """

    def __init__(
        self,
        operation: str,
        attempts: int,
        last_error_type: str | None = None,
        last_error_message: str | None = None,
        *,
        reason: str = "max_retries",
        advice: str = "",
    ) -> None:
        self.operation = operation
        self.attempts = attempts
        self.last_error_type = last_error_type
        self.last_error_message = last_error_message
        self.reason = reason
        self.advice = advice
        last = (
            f"{last_error_type}: {last_error_message}" if last_error_type else "no error recorded"
        )
        plural = "attempt" if attempts == 1 else "attempts"
        message = f"{operation} gave up after {attempts} {plural} ({reason}); last error: {last}"
        self.message = f"{message}. {advice}" if advice else message
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default pickling replays args only, which would drop the attributes.
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[RetryExhaustedError], state: dict[str, Any]) -> RetryExhaustedError:
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err


# -- the testing switch ---------------------------------------------------------------


@dataclass(frozen=True)
class _Testing:
    on: bool = False
    attempts: int | None = None


_testing = _Testing()
_testing_lock = threading.Lock()


class _RestoreTesting:
    """Returned by :func:`set_testing`; as a context manager it restores the previous mode."""

    def __init__(self, previous: _Testing) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _testing
        with _testing_lock:
            _testing = self._previous


def set_testing(testing: bool, *, attempts: int | None = None) -> _RestoreTesting:
    """Switch the testing mode of every RetryHandler: no sleeping at all, attempts capped.

    ``set_testing(True, attempts=2)`` also caps each call at 2 attempts in all (the handler's
    own limit applies when it is lower); ``set_testing(False)`` switches back. Used as a
    context manager, ``with set_testing(True): ...`` restores the previous mode on exit.
    The ledger, its records and the delays it stores are the same as outside testing.

    Raises:
        ValueError: ``attempts`` is less than 1.
    """
    global _testing
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    with _testing_lock:
        previous = _testing
        _testing = _Testing(on=True, attempts=attempts) if testing else _Testing()
    return _RestoreTesting(previous)


def is_testing() -> bool:
    """Return True while :func:`set_testing` has switched the testing mode on."""
    return _testing.on


# -- helpers --------------------------------------------------------------------------


def _describe(exc: BaseException) -> tuple[str, str]:
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error being recorded
        message = f"<unprintable {type(exc).__qualname__}>"
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    # Lone surrogates are not valid in the UTF-8 state file.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return type(exc).__qualname__, message


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _count(ledger: dict[str, Any]) -> int:
    attempts = ledger.get("attempts", 0)
    return attempts if isinstance(attempts, int) and attempts >= 0 else 0


# -- where the ledger lives -----------------------------------------------------------


# mutate(ledger, record of the operation) changes both in place; it may return a better
# name for the log record (the attempt number is only known under the lock).
Mutation = Callable[[dict[str, Any], dict[str, Any]], "str | None"]


class _MemoryLedgers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ledgers: dict[str, dict[str, Any]] = {}

    def get(self, operation: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._ledgers.get(operation, {}))

    def update(
        self, operation: str, mutate: Mutation, name: str, details: dict[str, Any]
    ) -> dict[str, Any]:
        with self._lock:
            ledger = dict(self._ledgers.get(operation, {}))
            mutate(ledger, {})
            self._ledgers[operation] = ledger
            return dict(ledger)

    def clear(self, operation: str, name: str) -> None:
        with self._lock:
            self._ledgers.pop(operation, None)


class _StateLedgers:
    def __init__(self, state: PipelineState) -> None:
        self.state = state

    def get(self, operation: str) -> dict[str, Any]:
        record = self.state.read().get(operation)
        ledger = record.get("retry") if isinstance(record, dict) else None
        return dict(ledger) if isinstance(ledger, dict) else {}

    def update(
        self, operation: str, mutate: Mutation, name: str, details: dict[str, Any]
    ) -> dict[str, Any]:
        # The transaction's lock makes the read-modify-write atomic across threads and processes.
        with self.state.transaction(operation=name, backup=False) as txn:
            record = txn.data.setdefault(operation, {})
            if not isinstance(record, dict):
                raise TypeError(
                    f"data[{operation!r}] in {self.state.path} is a {type(record).__name__}; "
                    "the retry ledger needs an object there (data[operation]['retry']). "
                    "Use another operation name or make it an object."
                )
            ledger = record.get("retry")
            ledger = dict(ledger) if isinstance(ledger, dict) else {}
            renamed = mutate(ledger, record)
            if renamed is not None and renamed != txn.operation:
                txn.operation = renamed  # another thread or process counted in between
            record["retry"] = ledger
            txn.details.update(details)  # after mutate(), which may add the attempt number
            return dict(ledger)

    def clear(self, operation: str, name: str) -> None:
        with self.state.transaction(operation=name, backup=False) as txn:
            txn.details["outcome"] = "reset"
            record = txn.data.get(operation)
            if isinstance(record, dict):
                record.pop("retry", None)


# -- the handler ----------------------------------------------------------------------


@dataclass
class _Run:
    """One call of call()/acall(): its operation, attempt limit and deadline."""

    operation: str
    max_attempts: int
    deadline: float | None  # on the handler's clock


@dataclass
class _Attempt:
    """The attempt in progress: its number and the status it replaced."""

    number: int = 0
    previous_status: Any = None


@dataclass(frozen=True)
class _Verdict:
    """What to do after a failed attempt."""

    action: str  # "reraise", "retry" or "give up"
    delay: float = 0.0
    error: RetryExhaustedError | None = None


class RetryHandler:
    """Retry a step with exponential backoff; persist the attempts when given a state.

    Args:
        max_retries: Retries after the first attempt (so ``max_retries + 1`` attempts).
        retry_delay: The delay before the first retry, in seconds.
        backoff_multiplier: Each further retry waits this many times longer (at least 1).
        max_delay: No backoff delay is longer than this.
        max_elapsed: Give up rather than sleep past this many seconds since the call began
            (None: no limit). A running step is never interrupted.
        jitter: Draw each delay uniformly from [0.5, 1.0] times the capped delay, so
            processes that failed together do not retry together; False: exact delays.
        retry_on: Exception types to retry, or a predicate ``(exc) -> bool | float | None``
            returning a falsy value (not retryable), True (retry after the backoff) or a
            number of seconds (retry after exactly that long, e.g. a Retry-After header).
            Anything else propagates at once, unchanged and not counted.
        state: Keep the ledger in this state file (``data[operation]["retry"]``).
        sleep: Called with the seconds to wait (tests inject a recorder).
        async_sleep: Awaited with the seconds to wait by :meth:`acall`.
        clock: A monotonic clock in seconds, for ``max_elapsed``.

    Raises:
        ValueError: a negative count or delay, a multiplier below 1, a non-positive
            ``max_elapsed``.
        TypeError: ``retry_on`` is neither exception types nor a callable.
    """

    def __init__(
        self,
        *,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        backoff_multiplier: float = 2.0,
        max_delay: float = 60.0,
        max_elapsed: float | None = None,
        jitter: bool = True,
        retry_on: RetryOn = (Exception,),
        state: PipelineState | None = None,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check.check_int("max_retries", max_retries)
        _check.check_seconds("retry_delay", retry_delay)
        _check.check_seconds("max_delay", max_delay)
        _check.check_seconds("backoff_multiplier", backoff_multiplier)
        if not backoff_multiplier >= 1:
            raise ValueError(f"backoff_multiplier must be >= 1, not {backoff_multiplier!r}")
        _check.check_seconds("max_elapsed", max_elapsed, optional=True, positive=True)
        _check.check_bool("jitter", jitter)
        if state is not None and not callable(getattr(state, "transaction", None)):
            raise TypeError(f"state must be a PipelineState or None, not {state!r}")
        _check.check_callable("sleep", sleep)
        _check.check_callable("async_sleep", async_sleep)
        _check.check_callable("clock", clock)
        self.max_retries = max_retries
        self.retry_delay = float(retry_delay)
        self.backoff_multiplier = float(backoff_multiplier)
        self.max_delay = float(max_delay)
        self.max_elapsed = max_elapsed
        self.jitter = jitter
        self.retry_on = retry_on
        self._types, self._predicate = _split_retry_on(retry_on)
        self.state = state
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._clock = clock
        self._random = random.Random()
        self._ledgers: _MemoryLedgers | _StateLedgers = (
            _StateLedgers(state) if state is not None else _MemoryLedgers()
        )

    def __repr__(self) -> str:
        where = f", state={self.state!r}" if self.state is not None else ""
        return (
            f"RetryHandler(max_retries={self.max_retries}, retry_delay={self.retry_delay}, "
            f"backoff_multiplier={self.backoff_multiplier}, max_delay={self.max_delay}, "
            f"max_elapsed={self.max_elapsed}, jitter={self.jitter}{where})"
        )

    # -- public API --------------------------------------------------------------------

    def call(self, operation: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)``; retry it on a matching error; return its result.

        Raises:
            RetryExhaustedError: every allowed attempt failed (``__cause__``: the last error),
                or waiting longer would pass ``max_elapsed``.
            Exception: whatever ``fn`` raised that ``retry_on`` does not match, unchanged.
        """
        _check.check_name("operation", operation)
        _check.check_callable("fn", fn)
        run, wait = self._start(operation)
        if wait > 0:
            self._sleep(wait)
        while True:
            attempt = self._begin(run)
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                verdict = self._failed(run, attempt, exc)
                if verdict.action == "reraise":
                    raise
                if verdict.error is not None:
                    raise verdict.error from exc
                if verdict.delay > 0:
                    self._sleep(verdict.delay)
                continue
            if inspect.isawaitable(result):
                # An async callable object: call() cannot await it, so it was never
                # really attempted. Refuse rather than record a false success.
                close = getattr(result, "close", None)
                if callable(close):
                    close()
                self._undo(run, attempt, _name(run.operation, attempt.number), "awaitable")
                raise TypeError(f"{fn!r} returned an awaitable; use acall() for async steps")
            self._succeeded(run, attempt)
            return result

    async def acall(
        self, operation: str, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` like :meth:`call`, sleeping with ``async_sleep``.

        The ledger writes to a state file are short blocking file operations.
        Cancellation propagates at once and is not counted.
        """
        _check.check_name("operation", operation)
        _check.check_callable("fn", fn)
        run, wait = self._start(operation)
        if wait > 0:
            await self._async_sleep(wait)
        while True:
            attempt = self._begin(run)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                verdict = self._failed(run, attempt, exc)
                if verdict.action == "reraise":
                    raise
                if verdict.error is not None:
                    raise verdict.error from exc
                if verdict.delay > 0:
                    await self._async_sleep(verdict.delay)
                continue
            self._succeeded(run, attempt)
            return result

    def wrap(self, operation: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Return a decorator that runs the function through :meth:`call` (or :meth:`acall`).

        The wrapper keeps the function's name, docstring and signature; a coroutine
        function gets a coroutine function.
        """

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(fn):
                async_fn = cast(Callable[P, Awaitable[Any]], fn)

                @functools.wraps(fn)
                async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                    return await self.acall(operation, async_fn, *args, **kwargs)

                return cast(Callable[P, R], async_wrapper)

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                return self.call(operation, fn, *args, **kwargs)

            return wrapper

        return decorate

    def attempts(self, operation: str) -> int:
        """Return the attempts counted since the last success or reset (a running one counts)."""
        return _count(self._ledgers.get(operation))

    def can_retry(self, operation: str) -> bool:
        """Return True while the ledger allows another attempt of ``operation``."""
        return self.attempts(operation) < self._max_attempts()

    def reset(self, operation: str) -> None:
        """Forget the attempts of ``operation`` (logged as ``"retry:<operation> reset"``)."""
        self._ledgers.clear(operation, f"retry:{operation} reset")

    def ledger(self, operation: str) -> dict[str, Any]:
        """Return a copy of the ledger of ``operation`` (``{}`` when nothing was tried)."""
        return self._ledgers.get(operation)

    # -- the protocol shared by call() and acall() -------------------------------------

    def _max_attempts(self) -> int:
        limit = self.max_retries + 1
        testing = _testing
        if testing.on and testing.attempts is not None:
            return min(limit, testing.attempts)
        return limit

    def _backoff(self, k: int) -> float:
        """Return the delay before retry ``k`` (0-based), capped, without jitter."""
        try:
            raw = self.retry_delay * self.backoff_multiplier**k
        except OverflowError:
            raw = math.inf if self.retry_delay else 0.0
        return min(raw, self.max_delay)

    def _jittered(self, delay: float) -> float:
        if not self.jitter:
            return delay
        # "Equal jitter": half the delay is kept, so backoff still grows and no retry comes
        # early; full jitter ([0, delay]) surprised backoff's users (litl/backoff#43, #113).
        return delay * (0.5 + 0.5 * self._random.random())

    def _start(self, operation: str) -> tuple[_Run, float]:
        """Begin a call: refuse an exhausted ledger; return the wait a restart still owes."""
        run = _Run(
            operation=operation,
            max_attempts=self._max_attempts(),
            deadline=None if self.max_elapsed is None else self._clock() + self.max_elapsed,
        )
        ledger = self._ledgers.get(operation)
        attempts = _count(ledger)
        if attempts >= run.max_attempts:
            raise RetryExhaustedError(
                operation,
                attempts,
                _text(ledger.get("last_error_type")),
                _text(ledger.get("last_error_message")),
                reason="max_retries",
                advice=f"Call reset({operation!r}) to start counting again",
            )
        wait = 0.0
        eligible = _parse_iso(ledger.get("next_eligible_at"))
        if eligible is not None and not ledger.get("in_flight"):
            wait = eligible - time.time()
            # A wall clock that jumped back must not make us wait longer than was asked.
            stored = ledger.get("delay")
            if isinstance(stored, (int, float)) and not isinstance(stored, bool):
                wait = min(wait, float(stored))
            wait = max(wait, 0.0)
        if _testing.on:
            wait = 0.0
        if wait > 0 and self._past_deadline(run, wait):
            raise RetryExhaustedError(
                operation,
                attempts,
                _text(ledger.get("last_error_type")),
                _text(ledger.get("last_error_message")),
                reason="max_elapsed",
                advice=f"The {wait:.3g} s still owed after a restart would pass "
                f"max_elapsed={self.max_elapsed}",
            )
        return run, wait

    def _past_deadline(self, run: _Run, delay: float) -> bool:
        return run.deadline is not None and self._clock() + delay > run.deadline

    def _begin(self, run: _Run) -> _Attempt:
        """Count the attempt and mark it in flight, durably, before the step runs."""
        now = time.time()
        token = _process_token
        attempt = _Attempt()
        details: dict[str, Any] = {"outcome": "started", "max_attempts": run.max_attempts}

        def mutate(ledger: dict[str, Any], record: dict[str, Any]) -> str:
            done = _count(ledger)
            if done >= run.max_attempts:
                # Another thread or process used up the budget since this call began.
                raise RetryExhaustedError(
                    run.operation,
                    done,
                    _text(ledger.get("last_error_type")),
                    _text(ledger.get("last_error_message")),
                    reason="max_retries",
                    advice=f"Call reset({run.operation!r}) to start counting again",
                )
            attempt.number = done + 1
            details["attempt"] = attempt.number
            if ledger.get("in_flight") and ledger.get("owner") != token:
                # The process that ran it died (or runs it still): that attempt counted.
                details["interrupted_attempt"] = attempt.number - 1
            if attempt.number == 1 or "first_attempt_at" not in ledger:
                ledger["first_attempt_at"] = _iso(now)
            ledger.update(
                attempts=attempt.number,
                max_attempts=run.max_attempts,
                in_flight=True,
                last_attempt_at=_iso(now),
                next_eligible_at=None,
                pid=os.getpid(),
                host=_HOST,
                owner=token,
            )
            if "status" in record:
                # The progress tracker then shows the stage as active again.
                attempt.previous_status = record["status"]
                record["status"] = "running"
            return _name(run.operation, attempt.number)

        # The record is named before the lock is taken, from a fresh read; mutate() renames
        # it if another thread or process counted an attempt in between.
        expected = _count(self._ledgers.get(run.operation)) + 1
        self._ledgers.update(run.operation, mutate, _name(run.operation, expected), details)
        return attempt

    def _succeeded(self, run: _Run, attempt: _Attempt) -> None:
        now = time.time()

        def mutate(ledger: dict[str, Any], record: dict[str, Any]) -> None:
            ledger.clear()
            ledger.update(
                attempts=0,
                in_flight=False,
                succeeded_after=attempt.number,
                last_attempt_at=_iso(now),
                last_success_at=_iso(now),
            )

        details = {"outcome": "succeeded", "attempt": attempt.number}
        self._ledgers.update(run.operation, mutate, _name(run.operation, attempt.number), details)

    def _failed(self, run: _Run, attempt: _Attempt, exc: BaseException) -> _Verdict:
        """Record a failed attempt and decide: re-raise it, retry after a delay, or give up."""
        try:
            requested = self._classify(exc)
        except BaseException as err:
            # The predicate itself failed: uncount the attempt, put the status back.
            self._undo(run, attempt, _name(run.operation, attempt.number), repr(err))
            raise
        error_type, message = _describe(exc)
        name = _name(run.operation, attempt.number)
        if requested is None:
            self._undo(run, attempt, name, f"{error_type}: {message}")
            return _Verdict("reraise")

        delay = (
            self._jittered(self._backoff(attempt.number - 1)) if requested is True else requested
        )
        effective = 0.0 if _testing.on else delay
        reason = None
        if attempt.number >= run.max_attempts:
            reason = "max_retries"
        elif self._past_deadline(run, effective):
            reason = "max_elapsed"
        now = time.time()

        def mutate(ledger: dict[str, Any], record: dict[str, Any]) -> None:
            ledger.update(
                in_flight=False,
                last_error_type=error_type,
                last_error_message=message,
                last_failure_at=_iso(now),
                delay=None if reason else delay,
                next_eligible_at=None if reason else _iso(now + delay),
            )
            if reason and record.get("status") == "running":
                record["status"] = "failed"  # unless the step already set its own status

        details: dict[str, Any] = {
            "outcome": "gave up" if reason else "failed",
            "attempt": attempt.number,
            "error": f"{error_type}: {message}",
        }
        if reason:
            details["reason"] = reason
        else:
            details["delay"] = round(delay, 6)
        self._ledgers.update(run.operation, mutate, name, details)
        if reason is None:
            return _Verdict("retry", delay=effective)
        advice = (
            f"Call reset({run.operation!r}) to start counting again"
            if reason == "max_retries"
            else f"The next wait ({effective:.3g} s) would pass max_elapsed={self.max_elapsed}"
        )
        error = RetryExhaustedError(
            run.operation, attempt.number, error_type, message, reason=reason, advice=advice
        )
        return _Verdict("give up", error=error)

    def _undo(self, run: _Run, attempt: _Attempt, name: str, error: str) -> None:
        """Uncount an attempt whose error is not retryable, and put its status back."""

        def mutate(ledger: dict[str, Any], record: dict[str, Any]) -> None:
            ledger.update(attempts=max(_count(ledger) - 1, 0), in_flight=False)
            if attempt.previous_status is not None and record.get("status") == "running":
                record["status"] = attempt.previous_status

        details = {"outcome": "not retried", "attempt": attempt.number, "error": error}
        # Undoing must never replace the caller's error; if it fails, the ledger
        # over-counts by one, which is the safe direction.
        with suppress(Exception):
            self._ledgers.update(run.operation, mutate, name, details)

    def _classify(self, exc: BaseException) -> float | bool | None:
        """Return None (not retryable), True (use the backoff) or a delay in seconds."""
        if self._types:
            return True if isinstance(exc, self._types) else None
        if self._predicate is None or not isinstance(exc, Exception):
            return None  # KeyboardInterrupt, SystemExit, CancelledError: never retried
        answer = self._predicate(exc)
        if answer is None or answer is False:
            return None
        if answer is True:
            return True
        if isinstance(answer, (int, float)) and math.isfinite(answer) and answer >= 0:
            return float(answer)
        raise ValueError(
            f"the retry_on predicate returned {answer!r} for {type(exc).__name__}; "
            "return True, False, None or a finite number of seconds >= 0"
        ) from exc


def _name(operation: str, attempt: int) -> str:
    return f"retry:{operation} attempt {attempt}"


def _split_retry_on(
    retry_on: RetryOn,
) -> tuple[tuple[type[BaseException], ...], RetryPredicate | None]:
    if isinstance(retry_on, type):
        if issubclass(retry_on, BaseException):
            return (retry_on,), None
        raise TypeError(f"retry_on must be an exception type, not {retry_on!r}")
    if isinstance(retry_on, tuple):
        if retry_on and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            return retry_on, None
        raise TypeError(f"retry_on must hold exception types only, not {retry_on!r}")
    if callable(retry_on):
        return (), retry_on
    raise TypeError(
        f"retry_on must be an exception type, a tuple of them or a predicate, not {retry_on!r}"
    )
