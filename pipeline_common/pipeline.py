"""Pipeline: declare stages with prerequisites, run each once, resume after a crash.

The plan (names, order, weights, prerequisites) is stored in the state (see
:mod:`pipeline_common._plan`); each stage's record stays at ``data[<stage>]``::

    data["tts"] = {
        "status": "running",              # pending, running, success, failed, skipped
        "progress": {...},                # ProgressTracker's numbers
        "owner": {"pid": 4242, "host": "build-1", "since": "...Z", "proc_start": 123},
        "attempts": 2, "attempts_base": 0,
        "retry": {...},                   # RetryHandler's ledger (stages with retries)
        "error": None,                    # failed: {"type", "message", "traceback", ...}
        "interruptions": [{"at": "...Z", "attempt": 1, "reason": "...", "owner": {...}}],
        "voices": ["en-1"],               # the stage's own record (ctx.record)
    }

A stage run is two commits: the claim (prerequisites checked, owner written, status
running) and the outcome (success with ``ctx.record``, failed with the error, or
skipped). Both go through ``state.transaction()``; the tracker's and the runner's
changes of one state change share one commit.

Errors::

    StateError
     +-- PrerequisiteError  (also RuntimeError) a stage's requires have not all succeeded
     +-- StageBusyError     (also RuntimeError) a live process (or another host) runs it
     +-- StageFailedError   (also RuntimeError) run() stopped at a failed stage;
                            its __cause__ is the stage's own error
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from . import _owner, _plan
from ._time import now_iso
from .errors import StateError
from .progress import PlanError, ProgressError, ProgressTracker, StageProgress
from .retry import RetryExhaustedError, RetryHandler, RetryOn
from .state import PipelineState, StateTransaction

__all__ = [
    "Pipeline",
    "PrerequisiteError",
    "RunResult",
    "StageBusyError",
    "StageContext",
    "StageFailedError",
    "reset_stages",
]

_logger = logging.getLogger(__name__)

T = TypeVar("T")
StageFn = Callable[["StageContext"], Any]
F = TypeVar("F", bound=StageFn)  # the decorated function, returned with its own type
Event = dict[str, Any]

_DONE = ("success", "skipped")
# Keys of a stage record the runner and the tracker own; ctx.record may not use them.
_RESERVED = frozenset(
    {
        "status",
        "progress",
        "retry",
        "owner",
        "attempts",
        "attempts_base",
        "error",
        "interruptions",
        "skipped_reason",
    }
)
_MAX_INTERRUPTIONS = 20
_MAX_TRACEBACK = 4000


class PrerequisiteError(StateError, RuntimeError):
    """A stage was asked to run before the stages it requires succeeded; nothing was written.

    Attributes:
        stage: The stage that was asked to run.
        missing: ``{required stage: its status}`` for each requirement not done.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        stage: str | None = None,
        missing: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.stage = stage
        self.missing = dict(missing or {})


class StageBusyError(StateError, RuntimeError):
    """Another runner holds the stage: a live process here, or a process on another host.

    Attributes:
        stage: The stage.
        owner: The owner's record (``pid``, ``host``, ``since``).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        stage: str | None = None,
        owner: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.stage = stage
        self.owner = dict(owner or {})


class StageFailedError(StateError, RuntimeError):
    """:meth:`Pipeline.run` stopped because a stage failed; the failure is recorded.

    Attributes:
        stage: The failed stage.
        error_type: The type name of the stage's error.
        error_message: Its message.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        stage: str | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.stage = stage
        self.error_type = error_type
        self.error_message = error_message


class _Skip(BaseException):
    """Raised by ctx.skip(); a BaseException so neither retries nor ``except Exception`` eat it."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


class _Abort(Exception):
    """Leave a claim transaction without committing (the stage was done meanwhile)."""


@dataclass(frozen=True)
class _StageDef:
    name: str
    fn: StageFn
    weight: float
    requires: tuple[str, ...]
    retries: int
    retry_on: RetryOn
    retry_delay: float
    backoff: float
    max_delay: float
    jitter: bool

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)


@dataclass
class RunResult:
    """What :meth:`Pipeline.run` did.

    Attributes:
        ran: The stages this call ran to success, in order.
        skipped: The stages that skipped themselves (``ctx.skip``) during this call.
        already_done: The stages found success or skipped and not called.
        status: :meth:`Pipeline.status` after the run.
    """

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


class StageContext:
    """What a stage function gets: its record, progress, transactions, and a way to skip.

    Attributes:
        stage: The stage's name.
        record: The stage's own record: keys you set here are committed with its success
            (starts as what the last run committed). Reserved keys (``status``,
            ``progress``, ``owner``, ...) are refused.
        attempt: The attempt number (1 for the first run of the stage since its reset).
        resumed_from: The persisted progress an interrupted run resumes from (0 if none).
        log: A logger named ``pipeline_common.pipeline.<stage>``.
    """

    def __init__(  # noqa: PLR0917 - built by the runner only
        self,
        pipeline: Pipeline,
        stage: str,
        handle: StageProgress,
        record: dict[str, Any],
        attempt: int,
        owner: dict[str, Any],
    ) -> None:
        self.pipeline = pipeline
        self.stage = stage
        self.record = record
        self.attempt = attempt
        self.resumed_from = handle.resumed_from
        self.log = logging.getLogger(f"{__name__}.{stage}")
        self._handle = handle
        self._owner = owner
        self._skip_pending = int(handle.resumed_from)
        self._before = attempt - 1  # attempts started before this run
        self._calls = 0  # calls of the stage function in this run (retries included)
        self._initial_keys = set(record)

    def __repr__(self) -> str:
        return f"StageContext({self.stage!r}, attempt={self.attempt})"

    @property
    def state(self) -> PipelineState:
        """The pipeline's state."""
        return self.pipeline.state

    @property
    def data(self) -> dict[str, Any]:
        """The committed state now (a fresh read: other stages' records, your own keys)."""
        return self.pipeline.state.read()

    def track(self, iterable: Iterable[T], total: float | None = None) -> Iterator[T]:
        """Yield the items, advancing the stage's progress by one after each (throttled).

        ``total`` defaults to ``len(iterable)``. Each call counts from 0, except the
        first one after an interruption: it skips the first ``resumed_from`` items, which
        were done before the crash.
        """
        tracker = self.pipeline._tracker()
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        # Each loop counts from 0 (a retried attempt does the work again), except the
        # first one after an interruption, which continues where the crash left it.
        skip, self._skip_pending = self._skip_pending, 0
        if total is not None:
            skip = int(min(skip, total))
        tracker.update(self.stage, skip, total=total)
        iterator = iter(iterable)
        if skip:
            for _ in itertools.islice(iterator, skip):
                pass
        for item in iterator:
            yield item
            tracker.advance(self.stage)

    def progress(self, current: float, total: float | None = None) -> None:
        """Set the stage's progress (throttled like :meth:`ProgressTracker.update`)."""
        self.pipeline._tracker().update(self.stage, current, total=total)

    def message(self, text: str) -> None:
        """Set the stage's progress message, shown by ``status()`` (throttled)."""
        self.pipeline._tracker().update(self.stage, self._handle.current, text)

    def transaction(self, **options: Any) -> StateTransaction:
        """Open a transaction on the pipeline's state, named after the stage."""
        options.setdefault("operation", f"stage {self.stage}: transaction")
        return self.pipeline.state.transaction(**options)

    def skip(self, reason: str | None = None) -> None:
        """End the stage now as skipped (it counts as done); never returns."""
        raise _Skip(reason)


class Pipeline:
    """Stages with prerequisites, run once each, on a crash-safe state file.

    Args:
        path_or_state: The state file, or a :class:`PipelineState`.
        replace_plan: Accept a plan that drops stages whose progress is recorded.
        min_interval: How often progress (``ctx.track``) is written, at most.
        sleep: How retries wait (tests inject a recorder).
        **state_options: Passed to :class:`PipelineState` (``timeout``, ``durability``, ...)
            when a path is given.

    Stages run in the order they were declared. The plan is written to the state at the
    first :meth:`run`, :meth:`status` or :meth:`reset` (once; only when it changed).
    """

    def __init__(
        self,
        path_or_state: str | os.PathLike[str] | PipelineState,
        *,
        replace_plan: bool = False,
        min_interval: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        **state_options: Any,
    ) -> None:
        if isinstance(path_or_state, PipelineState):
            if state_options:
                raise TypeError(
                    "PipelineState options "
                    f"({', '.join(sorted(state_options))}) need a path, not a PipelineState"
                )
            self.state = path_or_state
        else:
            self.state = PipelineState(path_or_state, **state_options)
        self.replace_plan = replace_plan
        self.min_interval = min_interval
        self._sleep = sleep
        self._stages: dict[str, _StageDef] = {}
        self._tracker_obj: ProgressTracker | None = None
        self._subscribers: list[Callable[[Event], object]] = []
        self._held = threading.local()
        self._guard = threading.RLock()

    def __repr__(self) -> str:
        return f"Pipeline({str(self.state.path)!r}, stages={list(self._stages)!r})"

    @property
    def stages(self) -> list[str]:
        """The declared stage names, in order."""
        return list(self._stages)

    # -- declaring ------------------------------------------------------------------------

    @overload
    def stage(self, fn: F, /) -> F: ...

    @overload
    def stage(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        requires: Sequence[str] = (),
        weight: float = 1.0,
        retries: int = 0,
        retry_on: RetryOn = (Exception,),
        retry_delay: float = 1.0,
        backoff: float = 2.0,
        max_delay: float = 60.0,
        jitter: bool = True,
    ) -> Callable[[F], F]: ...

    def stage(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        requires: Sequence[str] = (),
        weight: float = 1.0,
        retries: int = 0,
        retry_on: RetryOn = (Exception,),
        retry_delay: float = 1.0,
        backoff: float = 2.0,
        max_delay: float = 60.0,
        jitter: bool = True,
    ) -> F | Callable[[F], F]:
        """Declare a stage: ``@pipeline.stage()`` or ``@pipeline.stage(name=..., requires=...)``.

        Args:
            fn: The stage function, ``fn(ctx)`` or ``async def fn(ctx)``.
            name: The stage's name (default: the function's name).
            requires: Stages that must have succeeded (or been skipped) first; they must
                be declared before this one.
            weight: The stage's share of the overall progress.
            retries: Retries after a failed attempt, through :class:`RetryHandler`
                (attempts persisted in the stage record's ``retry`` ledger).
            retry_on: Exception types to retry, or a predicate (see RetryHandler).
            retry_delay: Delay before the first retry, in seconds.
            backoff: Each further retry waits this many times longer.
            max_delay: No retry waits longer than this.
            jitter: Randomize delays (equal jitter), so runners do not retry together.

        Returns:
            The function unchanged (so it stays callable and testable on its own).

        Raises:
            PlanError: an empty, reserved or duplicate name, a bad weight, or a
                requirement that is not a stage declared before this one.
        """

        def decorate(func: F) -> F:
            stage_name = name if name is not None else func.__name__
            specs = {**{n: d.weight for n, d in self._stages.items()}, stage_name: weight}
            reqs = {n: list(d.requires) for n, d in self._stages.items()}
            reqs[stage_name] = list(requires)
            if stage_name in self._stages:
                raise PlanError(
                    f"{self.state.path.name}: stage {stage_name!r} is declared twice",
                    path=self.state.path,
                    stage=stage_name,
                )
            try:
                _plan.build(specs, reqs)
            except _plan.PlanProblem as exc:
                raise PlanError(
                    f"{self.state.path.name}: {exc}", path=self.state.path, stage=exc.stage
                ) from None
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                raise ValueError(f"retries must be an int >= 0, not {retries!r}")
            RetryHandler(  # checks the retry options now, not at the first failure
                max_retries=retries,
                retry_delay=retry_delay,
                backoff_multiplier=backoff,
                max_delay=max_delay,
                retry_on=retry_on,
            )
            with self._guard:
                self._stages[stage_name] = _StageDef(
                    stage_name,
                    func,
                    float(weight),
                    tuple(requires),
                    retries,
                    retry_on,
                    float(retry_delay),
                    float(backoff),
                    float(max_delay),
                    jitter,
                )
                self._tracker_obj = None  # the plan changed: declare it again at first use
            return func

        if fn is not None:
            return decorate(fn)
        return decorate

    # -- running --------------------------------------------------------------------------

    def run(self, *stages: str, force: bool | Iterable[str] = False) -> RunResult:
        """Run the given stages (default: all) in plan order; skip those already done.

        Args:
            *stages: Stage names; each must have its prerequisites done (or be run by
                this call before it).
            force: True re-runs the selected stages even when done; or the names of
                the stages to re-run.

        Returns:
            A :class:`RunResult`.

        Raises:
            StageFailedError: a stage failed (recorded in the state, with its error and
                a short traceback); later stages were not run. ``__cause__`` is the
                stage's own exception.
            PrerequisiteError: a selected stage's prerequisites are not done; nothing
                was written for it.
            StageBusyError: another runner holds a selected stage.
            KeyboardInterrupt: propagated after the stage was recorded as failed
                (interrupted).
        """
        names, forced = self._select(stages, force)
        result = RunResult()
        for name in names:
            definition = self._stages[name]
            if definition.is_async:
                _refuse_running_loop(name)
                outcome = asyncio.run(self._arun_stage(definition, name in forced))
            else:
                outcome = self._run_stage(definition, name in forced)
            self._note(result, name, outcome)
        result.status = self.status()
        return result

    async def arun(self, *stages: str, force: bool | Iterable[str] = False) -> RunResult:
        """Like :meth:`run`, awaiting ``async def`` stages (sync stages run inline).

        A cancelled stage is recorded as failed (interrupted), and the cancellation
        propagates.
        """
        names, forced = self._select(stages, force)
        result = RunResult()
        for name in names:
            definition = self._stages[name]
            if definition.is_async:
                outcome = await self._arun_stage(definition, name in forced)
            else:
                outcome = self._run_stage(definition, name in forced)
            self._note(result, name, outcome)
        result.status = self.status()
        return result

    def reset(self, stage: str, *, downstream: bool = False) -> list[str]:
        """Put a stage (and, with ``downstream``, every stage that depends on it) back to pending.

        One logged transaction, with a backup of the replaced version. The stages'
        records are replaced by ``{"status": "pending"}`` (progress, attempts, errors
        and ``ctx.record`` are forgotten; the backup keeps them).

        Returns:
            The stages reset, in plan order.

        Raises:
            StageBusyError: a stage to reset is running in a live process on this host.
            ProgressError: an unknown stage.
        """
        tracker = self._tracker()  # declares the plan the reset follows
        self._check_names([stage])
        with self._events_held(), self.state.transaction(operation=f"reset {stage}") as txn:
            names = reset_stages(self.state, stage, downstream=downstream)  # joins txn
            for name in names:
                tracker.reset(name)  # forgets this tracker's unwritten numbers; joins too
            txn.details["reset"] = names
        return names

    def status(self) -> dict[str, Any]:
        """The pipeline's status: :meth:`ProgressTracker.status` over the whole plan."""
        return self._tracker().status()

    def subscribe(self, callback: Callable[[Event], object]) -> Callable[[], None]:
        """Call ``callback(event)`` after each committed change; return an unsubscriber.

        Events: the tracker's (``stage_started``, ``progress``, ``stage_completed``,
        ``stage_failed``, ``stage_skipped``, ``pipeline_completed``), delivered once the
        commit that made them is done, plus ``pipeline_failed`` (with ``error``) when a
        stage fails.
        """
        with self._guard:
            self._subscribers = [*self._subscribers, callback]

        def unsubscribe() -> None:
            with self._guard:
                self._subscribers = [cb for cb in self._subscribers if cb is not callback]

        return unsubscribe

    def close(self) -> None:
        """Write unwritten progress and release the tracker; safe to call twice."""
        with self._guard:
            tracker, self._tracker_obj = self._tracker_obj, None
        if tracker is not None:
            tracker.close()

    # -- one stage ------------------------------------------------------------------------

    def _run_stage(self, definition: _StageDef, force: bool) -> str:
        # Registered before the claim can commit and released whatever happens, so a
        # Ctrl-C anywhere from the claim to the outcome leaves a claim this process
        # judges "gone": the next run here takes the stage over (see _owner).
        owner = _owner.claim()
        try:
            return self._run_claimed(definition, force, owner)
        finally:
            _owner.release(owner)

    def _run_claimed(self, definition: _StageDef, force: bool, owner: dict[str, Any]) -> str:
        ctx = self._claim(definition, force, owner)
        if ctx is None:
            return "already_done"

        def attempt(c: StageContext) -> Any:
            c._calls += 1
            return definition.fn(c)

        try:
            if definition.retries:
                self._retry_handler(definition).call(definition.name, attempt, ctx)
            else:
                result = attempt(ctx)
                if inspect.isawaitable(result):
                    close = getattr(result, "close", None)
                    if callable(close):
                        close()
                    raise TypeError(
                        f"stage {definition.name!r} returned an awaitable; declare it "
                        "with async def (run() then awaits it) or call arun()"
                    )
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised by _failed
            return self._failed(definition, ctx, exc)
        return self._succeeded(definition, ctx)

    async def _arun_stage(self, definition: _StageDef, force: bool) -> str:
        owner = _owner.claim()  # as in _run_stage
        try:
            return await self._arun_claimed(definition, force, owner)
        finally:
            _owner.release(owner)

    async def _arun_claimed(self, definition: _StageDef, force: bool, owner: dict[str, Any]) -> str:
        ctx = self._claim(definition, force, owner)
        if ctx is None:
            return "already_done"
        fn: Callable[[StageContext], Awaitable[Any]] = definition.fn

        async def attempt(c: StageContext) -> Any:
            c._calls += 1
            return await fn(c)

        try:
            if definition.retries:
                await self._retry_handler(definition).acall(definition.name, attempt, ctx)
            else:
                await attempt(ctx)
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised by _failed
            return self._failed(definition, ctx, exc)
        return self._succeeded(definition, ctx)

    def _claim(
        self, definition: _StageDef, force: bool, owner: dict[str, Any]
    ) -> StageContext | None:
        """Check, then mark the stage running with this process as owner: one commit."""
        name = definition.name
        tracker = self._tracker()
        # Checked first without the lock, so a refusal writes nothing, not even a log record.
        data = self.state.read()
        if self._status(data, name) in _DONE and not force:
            return None
        self._check_ready(definition, data)
        found: dict[str, Any] = {}
        try:
            with (
                self._events_held(),
                self.state.transaction(operation=f"stage {name}: start") as txn,
            ):
                found = self._claim_locked(definition, txn, force, tracker, owner)
        except _Abort:
            return None
        ctx = StageContext(
            self, name, found["handle"], found["record"], found["attempt"], found["owner"]
        )
        ctx._before = found["attempt"] - 1
        return ctx

    def _claim_locked(
        self,
        definition: _StageDef,
        txn: StateTransaction,
        force: bool,
        tracker: ProgressTracker,
        owner: dict[str, Any],
    ) -> dict[str, Any]:
        name = definition.name
        data = txn.data
        status = self._status(data, name)
        if status in _DONE and not force:
            raise _Abort(f"stage {name!r} was finished by another runner meanwhile")
        self._check_ready(definition, data)
        rec = data.setdefault(name, {})
        interruption = None
        if status == "running":
            previous = rec.get("owner")
            verdict = _owner.judge(previous) if isinstance(previous, dict) else "gone"
            if verdict in ("alive", "unknown"):
                raise self._busy(name, previous if isinstance(previous, dict) else {}, verdict)
            interruption = {
                "at": now_iso(),
                "attempt": _plan.attempts_of(rec),
                "reason": _interruption_reason(previous, verdict),
                "owner": _public_owner(previous),
            }
        before = _plan.attempts_of(rec)
        if interruption is not None:
            # An interrupted run of this very tracker left its numbers behind: the
            # file's progress is what the resume continues from.
            tracker._forget(name)
        handle = tracker.start(name, restart=status in _DONE)
        # A series of retries continues after a crash; a new run after a finished
        # failure (or a forced re-run) starts a new series.
        if not (definition.retries and status == "running" and isinstance(rec.get("retry"), dict)):
            rec.pop("retry", None)
            rec["attempts_base"] = before
        rec["attempts"] = before + 1
        rec["owner"] = owner
        rec["error"] = None
        rec.pop("skipped_reason", None)
        if interruption is not None:
            history = rec.get("interruptions")
            history = history if isinstance(history, list) else []
            rec["interruptions"] = [*history, interruption][-_MAX_INTERRUPTIONS:]
        txn.details.update(stage=name, attempt=before + 1)
        if interruption is not None:
            txn.details["interrupted"] = interruption["reason"]
        record = {k: v for k, v in rec.items() if k not in _RESERVED}
        return {"handle": handle, "record": record, "attempt": before + 1, "owner": owner}

    def _succeeded(self, definition: _StageDef, ctx: StageContext) -> str:
        bad = sorted(k for k in ctx.record if not isinstance(k, str) or k in _RESERVED)
        try:
            if bad:
                raise ProgressError(
                    f"ctx.record of stage {definition.name!r} uses reserved key(s) "
                    f"{', '.join(map(str, bad))}; pick other names",
                    path=self.state.path,
                    stage=definition.name,
                )
            self._finish(definition, ctx, "success")
        except Exception as exc:  # noqa: BLE001 - the outcome did not commit: a failure
            return self._failed(definition, ctx, exc)
        return "ran"

    def _failed(self, definition: _StageDef, ctx: StageContext, exc: BaseException) -> str:
        if isinstance(exc, _Skip):
            self._finish(definition, ctx, "skipped", reason=exc.reason)
            return "skipped"
        cause = exc
        if isinstance(exc, RetryExhaustedError) and exc.__cause__ is not None:
            cause = exc.__cause__
        interrupted = not isinstance(exc, Exception)
        try:
            self._finish(definition, ctx, "failed", error=exc, cause=cause, interrupted=interrupted)
        except Exception:  # never hide the stage's own error behind ours
            _logger.exception("could not record the failure of stage %r", definition.name)
        if interrupted:
            raise exc
        kind, text = type(cause).__name__, _message(cause)
        attempts = f" after {exc.attempts} attempts" if isinstance(exc, RetryExhaustedError) else ""
        error = StageFailedError(
            f"{self.state.path.name}: stage {definition.name!r} failed{attempts}: {kind}: {text}. "
            "Its record holds the error and a traceback (pipeline-state status "
            f"{self.state.path}); stages that depend on it were not run. Fix the cause and "
            "run again: the stages already done are skipped.",
            path=self.state.path,
            stage=definition.name,
            error_type=kind,
            error_message=text,
        )
        self._emit(
            {
                "event": "pipeline_failed",
                "stage": definition.name,
                "status": self._quiet_status(),
                "error": f"{kind}: {text}",
            }
        )
        raise error from exc

    def _finish(
        self,
        definition: _StageDef,
        ctx: StageContext,
        outcome: str,
        *,
        reason: str | None = None,
        error: BaseException | None = None,
        cause: BaseException | None = None,
        interrupted: bool = False,
    ) -> None:
        """Record the outcome of a run: one commit, tracker and runner fields together."""
        name = definition.name
        tracker = self._tracker()
        with (
            self._events_held(),
            self.state.transaction(operation=f"stage {name}: {outcome}") as txn,
        ):
            rec = txn.data.get(name)
            owner = rec.get("owner") if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or owner != ctx._owner:
                raise StageBusyError(
                    f"{self.state.path.name}: stage {name!r} is no longer owned by this run "
                    f"({_owner.describe(ctx._owner)}); it was reset or taken over meanwhile, "
                    f"so its {outcome} was not recorded",
                    path=self.state.path,
                    stage=name,
                    owner=owner if isinstance(owner, dict) else None,
                )
            if outcome == "success":
                tracker.complete(name)
                # Keys the stage removed from ctx.record go; keys it added elsewhere
                # (through ctx.transaction()) stay.
                for key in ctx._initial_keys - set(ctx.record):
                    rec.pop(key, None)
                rec.update(ctx.record)
            elif outcome == "skipped":
                tracker.skip(name, reason)
                rec["skipped_reason"] = reason
            else:
                assert error is not None
                assert cause is not None
                tracker.fail(name, cause)
                rec["error"] = {
                    "type": type(cause).__name__,
                    "message": _message(cause),
                    "traceback": _short_traceback(cause),
                    "at": now_iso(),
                    "attempt": rec.get("attempts"),
                    "interrupted": interrupted,
                }
                if isinstance(error, RetryExhaustedError):
                    rec["error"]["gave_up_after"] = error.attempts
                if interrupted:
                    history = rec.get("interruptions")
                    history = history if isinstance(history, list) else []
                    rec["interruptions"] = [
                        *history,
                        {
                            "at": now_iso(),
                            "attempt": rec.get("attempts"),
                            "reason": type(cause).__name__,
                            "owner": _public_owner(owner),
                        },
                    ][-_MAX_INTERRUPTIONS:]
            rec["owner"] = None
            # The exact count: RetryHandler uncounts an error it does not retry, but the
            # attempt was started. attempts_of() reads base + the ledger's count.
            total = ctx._before + ctx._calls
            rec["attempts"] = total
            series = _plan.attempts_of({"retry": rec.get("retry")})
            rec["attempts_base"] = total - series if series else total
            txn.details.update(stage=name, attempt=total)

    # -- helpers --------------------------------------------------------------------------

    def _tracker(self) -> ProgressTracker:
        """The tracker over the declared plan; the first call writes the plan if it changed."""
        with self._guard:
            if self._tracker_obj is None:
                if not self._stages:
                    raise PlanError(
                        f"{self.state.path.name}: this Pipeline has no stages; declare them "
                        "with @pipeline.stage()",
                        path=self.state.path,
                    )
                tracker = ProgressTracker(
                    self.state,
                    {n: d.weight for n, d in self._stages.items()},
                    requires={n: list(d.requires) for n, d in self._stages.items()},
                    replace_plan=self.replace_plan,
                    min_interval=self.min_interval,
                )
                tracker.subscribe(self._on_event)
                self._tracker_obj = tracker
            return self._tracker_obj

    def _retry_handler(self, definition: _StageDef) -> RetryHandler:
        return RetryHandler(
            max_retries=definition.retries,
            retry_delay=definition.retry_delay,
            backoff_multiplier=definition.backoff,
            max_delay=definition.max_delay,
            jitter=definition.jitter,
            retry_on=definition.retry_on,
            state=self.state,
            sleep=self._sleep,
        )

    def _select(
        self, stages: Sequence[str], force: bool | Iterable[str]
    ) -> tuple[list[str], set[str]]:
        self._tracker()  # declares the plan (and refuses a bad one) before anything runs
        self._check_names(stages)
        wanted = set(stages) if stages else set(self._stages)
        names = [n for n in self._stages if n in wanted]
        if force is True:
            forced = set(names)
        elif force is False:
            forced = set()
        else:
            forced = set(force)
            self._check_names(sorted(forced))
        return names, forced

    def _check_names(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._stages:
                raise ProgressError(
                    f"{self.state.path.name}: unknown stage {name!r}; this pipeline's stages "
                    f"are {', '.join(self._stages)}",
                    path=self.state.path,
                    stage=name if isinstance(name, str) else None,
                )

    @staticmethod
    def _status(data: Mapping[str, Any], name: str) -> str:
        rec = data.get(name)
        status = rec.get("status") if isinstance(rec, dict) else None
        return status if isinstance(status, str) else "pending"

    def _check_ready(self, definition: _StageDef, data: Mapping[str, Any]) -> None:
        """Refuse a stage whose requires are not done, or that a live owner holds."""
        missing = {
            r: self._status(data, r)
            for r in definition.requires
            if self._status(data, r) not in _DONE
        }
        if missing:
            listed = ", ".join(f"{r!r} ({s})" for r, s in missing.items())
            raise PrerequisiteError(
                f"{self.state.path.name}: stage {definition.name!r} requires {listed} to "
                "succeed first; run them first (pipeline.run() runs every stage in order). "
                "Nothing was written.",
                path=self.state.path,
                stage=definition.name,
                missing=missing,
            )
        rec = data.get(definition.name)
        if isinstance(rec, dict) and rec.get("status") == "running":
            owner = rec.get("owner")
            if isinstance(owner, dict):
                verdict = _owner.judge(owner)
                if verdict in ("alive", "unknown"):
                    raise self._busy(definition.name, owner, verdict)

    def _busy(self, name: str, owner: Mapping[str, Any], verdict: str) -> StageBusyError:
        return _busy_error(self.state.path, name, owner, verdict)

    @staticmethod
    def _note(result: RunResult, name: str, outcome: str) -> None:
        if outcome == "ran":
            result.ran.append(name)
        elif outcome == "skipped":
            result.skipped.append(name)
        else:
            result.already_done.append(name)

    # -- events: delivered only once the commit that made them is done -----------------

    @contextmanager
    def _events_held(self) -> Iterator[None]:
        held: list[Event] | None = getattr(self._held, "events", None)
        if held is not None:  # nested: the outer level delivers
            yield
            return
        self._held.events = []
        try:
            yield
        except BaseException:
            self._held.events = None  # rolled back: those events never happened
            raise
        events, self._held.events = self._held.events, None
        for event in events:
            self._emit(event)

    def _on_event(self, event: Event) -> None:
        held: list[Event] | None = getattr(self._held, "events", None)
        if held is not None:
            held.append(event)
        else:
            self._emit(event)

    def _emit(self, event: Event) -> None:
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                _logger.exception("pipeline callback %r raised on %s; ignored", callback, event)

    def _quiet_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except Exception:  # noqa: BLE001 - an event must not hide the failure being reported
            return None


def reset_stages(state: PipelineState, stage: str, *, downstream: bool = False) -> list[str]:
    """Put ``stage`` (and, with ``downstream``, its dependents) back to pending, by the stored plan.

    What :meth:`Pipeline.reset` and ``pipeline-state reset`` do: one logged transaction
    (joined when one is open), with a backup. Works without the pipeline's code: the
    dependents come from the plan stored in the state (a state without a plan resets
    the one stage).

    Returns:
        The stages reset, in plan order.

    Raises:
        ProgressError: ``stage`` is neither in the plan nor a record of the state.
        StageBusyError: a stage to reset is running in a live process on this host. A
            stage run by another host is reset: that is the way to take it over.
    """
    with state.transaction(operation=f"reset {stage}") as txn:
        try:
            specs = _plan.from_data(txn.data) or []
        except _plan.PlanProblem as exc:
            raise PlanError(f"{state.path.name}: {exc}", path=state.path) from None
        order = [s.name for s in specs]
        if stage not in order and not isinstance(txn.data.get(stage), dict):
            known = ", ".join(order) or "none"
            raise ProgressError(
                f"{state.path.name}: unknown stage {stage!r}; the plan's stages are {known}",
                path=state.path,
                stage=stage,
            )
        names = [stage]
        if downstream:
            for spec in specs:
                if any(r in names for r in spec.requires) and spec.name not in names:
                    names.append(spec.name)
        if stage in order:
            names = [n for n in order if n in names]
        for name in names:
            rec = txn.data.get(name)
            owner = rec.get("owner") if isinstance(rec, dict) else None
            running = isinstance(rec, dict) and rec.get("status") == "running"
            if running and isinstance(owner, dict) and _owner.judge(owner) == "alive":
                raise _busy_error(state.path, name, owner, "alive")
        for name in names:
            if name in txn.data:
                txn.data[name] = {"status": "pending"}
        txn.details["reset"] = names
    return names


def _busy_error(path: Path, name: str, owner: Mapping[str, Any], verdict: str) -> StageBusyError:
    who = _owner.describe(owner)
    if verdict == "unknown":
        message = (
            f"{path.name}: stage {name!r} is running on another host ({who}); this host "
            "cannot tell whether that process is alive, so the stage is not taken over. If "
            f"that runner is gone, reset the stage: pipeline-state reset {path} {name} "
            f"(or pipeline.reset({name!r}))"
        )
    else:
        message = (
            f"{path.name}: stage {name!r} is already running ({who}); a stage never runs "
            f"twice at once. Wait for it (pipeline-state status {path}) and run again"
        )
    return StageBusyError(message, path=path, stage=name, owner=owner)


def _refuse_running_loop(stage: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"stage {stage!r} is async and an event loop is running here; "
        "use `await pipeline.arun()` instead of pipeline.run()"
    )


def _interruption_reason(previous: object, verdict: str) -> str:
    if not isinstance(previous, dict):
        return "left running with no owner recorded"
    if verdict == "reused":
        return "the owner's pid was reused by another process"
    if _owner.is_this_process(previous):
        return "the run in this process that claimed it ended without recording its outcome"
    return "the owner process is gone"


def _public_owner(owner: object) -> dict[str, Any] | None:
    if not isinstance(owner, dict):
        return None
    return {k: owner.get(k) for k in ("pid", "host", "since")}


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        text = f"<unprintable {type(exc).__name__}>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 1000 else text[:997] + "..."


def _short_traceback(exc: BaseException) -> str:
    """The last frames of the traceback, cut to a few KB for the state file."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8)
    text = "".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _MAX_TRACEBACK else "..." + text[-(_MAX_TRACEBACK - 3) :]
