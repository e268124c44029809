"""ProgressTracker: per-stage progress of a pipeline, kept in its crash-safe state file.

One source of truth: a stage's status is the phase record's ``status`` in the state
file, and its progress sits beside it::

    data["phase1"] = {
        "status": "running",
        "progress": {"current": 450, "total": 1000, "message": "chunk 450",
                     "started_at": "...Z", "updated_at": "...Z", "finished_at": None,
                     "resumed_at": None, "resumed_from": None, "error": None},
        "retry": {"attempts": 2, ...},  # RetryHandler's ledger; read, never written here
    }

The plan (stage names, order, weights, prerequisites) is part of the state too, under
the reserved key ``data["_pipeline"]`` (see docs/protocol.md): a tracker that declares
stages writes it (once, when it differs), and a tracker made without ``stages`` in any
other process reads it, so every view lists the same stages in the same order.

The tracker keeps in memory only what it has not written yet (throttled ``update()``
calls), so :meth:`ProgressTracker.status` is the file plus this tracker's unflushed
numbers, and a tracker in another process reports the same thing.

Errors::

    StateError
     +-- ProgressError    (also ValueError) a bad number, an unknown stage, a call out of order
          +-- PlanError   a plan refused: malformed, or it would orphan recorded progress
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from . import _check, _plan
from ._time import iso as _iso
from ._time import parse_iso as _parse_iso
from .errors import StateError
from .state import PipelineState

__all__ = ["PlanError", "ProgressError", "ProgressTracker", "StageProgress"]

_logger = logging.getLogger(__name__)

T = TypeVar("T")
Event = dict[str, Any]
Callback = Callable[[Event], object]

_DONE = ("success", "skipped")
_KNOWN = ("pending", "running", "success", "failed", "skipped")


class ProgressError(StateError, ValueError):
    """A progress call was refused: bad numbers, an unknown stage or a call out of order.

    Nothing was written. Attributes:
        stage: The stage concerned, if any.
    """

    def __init__(
        self, message: str, *, path: str | Path | None = None, stage: str | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.stage = stage


class PlanError(ProgressError):
    """A stage plan was refused; nothing was written.

    Raised for a malformed plan (an unknown requirement, a cycle, a bad weight, a
    corrupt stored plan) and for a new plan that would drop stages whose progress is
    recorded in the file (pass ``replace_plan=True`` to drop them on purpose).

    Attributes:
        stage: The stage concerned, if any.
        orphans: The recorded stages the new plan would drop (empty otherwise).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        stage: str | None = None,
        orphans: Sequence[str] = (),
    ) -> None:
        super().__init__(message, path=path, stage=stage)
        self.orphans = list(orphans)


@dataclass
class _Live:
    """A stage this tracker started: the numbers it may not have written yet."""

    current: float
    total: float | None
    message: str | None
    mono: float  # monotonic time of the newest update
    dirty: bool = False


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _error_text(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return str(error)


class StageProgress:
    """A handle on one running stage, returned by :meth:`ProgressTracker.start`.

    Attributes:
        name: The stage.
        resumed_from: The persisted ``current`` this run resumed from (0 when fresh).
    """

    def __init__(self, tracker: ProgressTracker, name: str, resumed_from: float) -> None:
        self.tracker = tracker
        self.name = name
        self.resumed_from = resumed_from

    def __repr__(self) -> str:
        return f"StageProgress({self.name!r}, current={self.current}, total={self.total})"

    @property
    def resumed(self) -> bool:
        """True when the stage resumed persisted progress instead of starting at 0."""
        return self.resumed_from > 0

    @property
    def current(self) -> float:
        """The newest ``current`` of this stage (flushed or not)."""
        return self.tracker._live_value(self.name).current

    @property
    def total(self) -> float | None:
        """The stage's total, if known."""
        return self.tracker._live_value(self.name).total

    def update(self, current: float, message: str | None = None) -> None:
        """Set the stage's progress; see :meth:`ProgressTracker.update`."""
        self.tracker.update(self.name, current, message)

    def advance(self, n: float = 1) -> None:
        """Add ``n`` to the stage's progress; see :meth:`ProgressTracker.advance`."""
        self.tracker.advance(self.name, n)


class ProgressTracker:
    """Track the progress of a pipeline's stages in its :class:`PipelineState`.

    Args:
        state: The pipeline's state; only its public API is used.
        stages: Stage names in order, or a mapping of name to a positive weight for
            the overall progress (a list weighs every stage 1.0). Declaring stages
            writes the plan into the state (one logged transaction, only when it
            differs from the stored one). None: follow the stored plan, re-read at
            every :meth:`status` (an old state without a plan: its ``phase*`` keys).
        requires: The prerequisites of each stage (``{"tts": ["extract"]}``), stored
            in the plan. None keeps the stored prerequisites of the stages that stay.
        replace_plan: Accept a plan that drops stages whose progress is recorded
            (their records stay in the file, outside the plan).
        declare: False: use ``stages`` for this tracker only, writing no plan (a view).
        min_interval: ``update()``/``advance()`` write at most once per this many
            seconds; ``start``, ``complete``, ``fail``, ``skip`` and ``reset`` write at once.
        clock: The wall clock (epoch seconds) for timestamps, elapsed time and ETA.
        monotonic: The timer that throttles writes.
        sleep: How :meth:`watch` waits.

    Raises:
        ProgressError: No stages, a duplicate or empty name, or a bad weight.
        PlanError: An unknown requirement or a cycle, a corrupt stored plan, or a
            new plan that would orphan recorded progress (see ``replace_plan``).
        StateReadError: The state file is corrupt (the plan is read from it).
    """

    def __init__(
        self,
        state: PipelineState,
        stages: Sequence[str] | Mapping[str, float] | None = None,
        *,
        requires: Mapping[str, Sequence[str]] | None = None,
        replace_plan: bool = False,
        declare: bool = True,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(state, PipelineState):
            raise TypeError(f"state must be a PipelineState, not {type(state).__name__} {state!r}")
        for name, value in (("clock", clock), ("monotonic", monotonic), ("sleep", sleep)):
            _check.check_callable(name, value)
        self.state = state
        self._follow = stages is None
        if stages is None:
            if requires is not None:
                raise ProgressError(
                    "requires= needs stages= (the plan it belongs to)", path=state.path
                )
            specs = self._stored_plan(state.read())
        else:
            specs = self._check_stages(stages, state.path, requires)
        self.weights = {s.name: s.weight for s in specs}
        self.requires = {s.name: list(s.requires) for s in specs}
        if not (_num(min_interval) is not None and min_interval >= 0):
            raise ProgressError(
                f"min_interval must be a number >= 0, not {min_interval!r}", path=state.path
            )
        self.min_interval = float(min_interval)
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._last_flush = -math.inf
        self._subscribers: list[Callback] = []
        self._closed = False
        if stages is not None and declare:
            self._declare(specs, keep_requires=requires is None, replace=replace_plan)
        _open_trackers.add(self)

    def __repr__(self) -> str:
        return f"ProgressTracker({str(self.state.path)!r}, stages={list(self.weights)!r})"

    def __enter__(self) -> ProgressTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def stages(self) -> list[str]:
        """The stage names, in order."""
        return list(self.weights)

    # -- lifecycle of a stage --------------------------------------------------

    def start(
        self,
        stage: str,
        total: float | None = None,
        message: str | None = None,
        *,
        restart: bool = False,
    ) -> StageProgress:
        """Mark ``stage`` running and write it at once.

        A stage the file shows as running or failed (a crash, a retry) resumes from its
        persisted ``current``; its ETA then counts only the work done since the resume.

        Args:
            stage: One of the tracker's stages.
            total: The amount of work (None: unknown; on resume, keep the persisted one).
            message: A note shown in :meth:`status`.
            restart: Start again at 0, whatever the stage's status.

        Returns:
            A :class:`StageProgress` handle; ``handle.current`` is where to continue.

        Raises:
            ProgressError: unknown stage, bad total, the stage already running in this
                tracker, or already succeeded/skipped (pass ``restart=True``).
        """
        self._check_stage(stage)
        if total is not None:
            total = self._check_total(stage, total)
        now = self._clock()
        with self.state.transaction(operation="progress.start") as txn:
            rec = self._record(txn.data, stage, create=True)
            status = rec.get("status") or "pending"
            with self._lock:
                mine = stage in self._live
            if status == "running" and mine and not restart:
                raise self._error(
                    stage,
                    f"stage {stage!r} is already running in this tracker; "
                    "call complete(), fail() or skip() before starting it again",
                )
            if status in _DONE and not restart:
                raise self._error(
                    stage,
                    f"stage {stage!r} is already {status}; pass restart=True "
                    f"or call reset({stage!r}) to run it again",
                )
            found = rec.get("progress")
            old: dict[str, Any] = found if isinstance(found, dict) else {}
            current = _num(old.get("current")) or 0
            resume = not restart and status in ("running", "failed") and current > 0
            if resume:
                if total is None:
                    total = _num(old.get("total"))
                if total is not None and current > total:
                    raise self._error(
                        stage,
                        f"stage {stage!r} resumes at current={current}, above the new "
                        f"total={total}; pass restart=True to start again at 0",
                    )
                progress = {
                    **old,
                    "total": total,
                    "message": message if message is not None else old.get("message"),
                    "updated_at": _iso(now),
                    "finished_at": None,
                    "resumed_at": _iso(now),
                    "resumed_from": current,
                    "error": None,
                }
            else:
                current = 0
                progress = {
                    "current": 0,
                    "total": total,
                    "message": message,
                    "started_at": _iso(now),
                    "updated_at": _iso(now),
                    "finished_at": None,
                    "resumed_at": None,
                    "resumed_from": None,
                    "error": None,
                }
            rec["status"] = "running"
            rec["progress"] = progress
            with self._lock:
                self._live.pop(stage, None)  # a restart forgets this tracker's old numbers
            snapshot = self._build_status(txn.data, now)
        with self._lock:  # only once the start is committed (or joined an outer transaction)
            mono = self._monotonic()
            self._live[stage] = _Live(current, total, progress["message"], mono)
            self._last_flush = mono
        self._emit("stage_started", stage, snapshot, resumed_from=current if resume else 0)
        return StageProgress(self, stage, current if resume else 0)

    def update(
        self,
        stage: str,
        current: float,
        message: str | None = None,
        *,
        total: float | None = None,
    ) -> None:
        """Set a running stage's progress; written at most once per ``min_interval``.

        Args:
            stage: A stage started by this tracker.
            current: The work done so far, from 0 to ``total``.
            message: A note (None keeps the previous one).
            total: A new total (for work whose size is learnt on the way).

        Raises:
            ProgressError: the stage is not running in this tracker, or ``current``
                is negative, above the total or not a number.
        """
        now = self._monotonic()
        with self._lock:
            live = self._live.get(stage)
            if live is None:
                raise self._not_running(stage)
            limit = live.total if total is None else self._check_total(stage, total)
            if type(current) is not int:
                current = self._check_number(stage, current)
            if current < 0 or (limit is not None and current > limit):
                raise self._out_of_range(stage, current, limit)
            live.current = current
            live.total = limit
            if message is not None:
                live.message = message
            live.mono = now
            live.dirty = True
            if now - self._last_flush < self.min_interval:
                return
            self._last_flush = now
        self.flush()

    def advance(self, stage: str, n: float = 1) -> None:
        """Add ``n`` to a running stage's progress; written like :meth:`update`.

        Raises:
            ProgressError: as :meth:`update`.
        """
        now = self._monotonic()
        with self._lock:
            live = self._live.get(stage)
            if live is None:
                raise self._not_running(stage)
            if type(n) is not int:
                n = self._check_number(stage, n)
            current = live.current + n
            if (
                not math.isfinite(current)
                or current < 0
                or (live.total is not None and current > live.total)
            ):
                raise self._out_of_range(stage, current, live.total)
            live.current = current
            live.mono = now
            live.dirty = True
            if now - self._last_flush < self.min_interval:
                return
            self._last_flush = now
        self.flush()

    def complete(self, stage: str, message: str | None = None) -> None:
        """Mark a running stage successful, with its exact final numbers, at once.

        An unknown total becomes the final ``current``.

        Raises:
            ProgressError: unknown stage, or the stage is not running (never started,
                or already finished).
        """
        self._check_stage(stage)
        self._finish(stage, "success", ("running",), message=message)

    def fail(self, stage: str, error: BaseException | str) -> None:
        """Mark a pending or running stage failed, with the error's text, at once.

        Raises:
            ProgressError: unknown stage, or the stage already finished.
        """
        self._check_stage(stage)
        # "failed" too: a RetryHandler that gave up inside stage() marked it already.
        self._finish(stage, "failed", ("pending", "running", "failed"), error=_error_text(error))

    def skip(self, stage: str, reason: str | None = None) -> None:
        """Mark a stage that has not succeeded as skipped (it counts as 100 %), at once.

        Raises:
            ProgressError: unknown stage, or the stage already succeeded or was skipped.
        """
        self._check_stage(stage)
        self._finish(stage, "skipped", ("pending", "running", "failed"), message=reason)

    def reset(self, stage: str | None = None) -> None:
        """Put one stage, or all of them, back to pending and forget their progress.

        The retry ledger (``data[stage]["retry"]``, owned by RetryHandler) is kept.

        Raises:
            ProgressError: unknown stage.
        """
        names = self.stages if stage is None else [stage]
        for name in names:
            self._check_stage(name)
        with self.state.transaction(operation="progress.reset") as txn:
            for name in names:
                rec = self._record(txn.data, name, create=False)
                if rec is None:
                    continue
                rec.pop("progress", None)
                rec["status"] = "pending"
            with self._lock:
                for name in names:
                    self._live.pop(name, None)

    @contextmanager
    def stage(
        self,
        stage: str,
        total: float | None = None,
        message: str | None = None,
        *,
        restart: bool = False,
    ) -> Iterator[StageProgress]:
        """Run a block as a stage: start it, complete it on exit, fail it on an exception.

        A ``KeyboardInterrupt`` or ``SystemExit`` leaves the stage running (flushed), so
        the next run resumes it. The original exception is re-raised unchanged.
        """
        handle = self.start(stage, total=total, message=message, restart=restart)
        try:
            yield handle
        except Exception as exc:
            try:
                self.fail(stage, exc)
            except Exception:  # never hide the caller's error behind ours
                _logger.exception("could not record the failure of stage %r", stage)
            raise
        except BaseException:
            try:
                self.flush()
            except Exception:
                _logger.exception("could not flush stage %r", stage)
            raise
        self.complete(stage)

    def track(
        self,
        iterable: Iterable[T],
        stage: str,
        total: float | None = None,
        *,
        restart: bool = False,
    ) -> Iterator[T]:
        """Yield the items of ``iterable``, advancing ``stage`` by one after each.

        If the stage is not yet running in this tracker, it is started (``total``
        defaults to ``len(iterable)``) and completed when the iterable is exhausted;
        an error raised by the iterable fails it. A resumed stage skips the first
        ``current`` items: they were done before the restart. Leaving the loop early
        (``break``, or an exception in the loop body) leaves the stage running.
        """
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        with self._lock:
            joined = stage in self._live
        if joined:
            for item in iterable:
                yield item
                self.advance(stage)
            return
        handle = self.start(stage, total=total, restart=restart)
        iterator = iter(iterable)
        done = False
        try:
            if handle.resumed_from:
                skip = int(handle.resumed_from)
                for _ in itertools.islice(iterator, skip):
                    pass
            for item in iterator:
                yield item
                self.advance(stage)
            done = True
        except GeneratorExit:
            self.flush()
            raise
        except Exception as exc:
            try:
                self.fail(stage, exc)
            except Exception:
                _logger.exception("could not record the failure of stage %r", stage)
            raise
        if done:
            self.complete(stage)

    # -- persistence -----------------------------------------------------------

    def flush(self) -> None:
        """Write every stage's unwritten progress now (one transaction; no-op if none)."""
        with self._lock:
            if not any(live.dirty for live in self._live.values()):
                return
        now = self._clock()
        flushed: list[tuple[str, _Live]] = []
        conflicts: list[tuple[str, str]] = []
        try:
            with self.state.transaction(operation="progress", backup=False) as txn:
                with self._lock:
                    mono = self._monotonic()
                    for name, live in list(self._live.items()):
                        if not live.dirty:
                            continue
                        rec = self._record(txn.data, name, create=True)
                        status = rec.get("status") or "pending"
                        if status != "running":
                            # another writer finished or reset it: its word stands
                            del self._live[name]
                            conflicts.append((name, status))
                            continue
                        live.dirty = False
                        flushed.append((name, live))
                        self._write_live(rec, live, now - (mono - live.mono))
                    self._last_flush = mono
                snapshot = self._build_status(txn.data, now) if self._subscribers else None
        except BaseException:
            with self._lock:
                for _, live in flushed:
                    live.dirty = True
            raise
        if snapshot is not None:
            for name, _ in flushed:
                self._emit("progress", name, snapshot)
        if conflicts:
            name, status = conflicts[0]
            raise self._error(
                name,
                f"stage {name!r} is {status} in {self.state.path.name}, changed by another "
                f"writer; its unwritten progress was dropped. Call start({name!r}) to run it again",
            )

    def close(self) -> None:
        """Flush unwritten progress and stop the exit-time flush; safe to call twice."""
        try:
            self.flush()
        finally:
            self._closed = True
            with self._lock:
                self._live.clear()
            _open_trackers.discard(self)

    # -- reading ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Return the pipeline's progress, derived from the state file.

        This tracker's unwritten progress is shown on top of the file. Inside an
        outer transaction, the file's committed version is read, not the open one.

        Returns:
            ``{"status", "current_stage", "stages": {name: {...}}, "overall_progress",
            "eta_seconds"}``; see docs/progress.md for every field.

        Raises:
            StateReadError: the state file is corrupt.
            ProgressError: a stage's record is not an object or has an unknown status.
        """
        return self._build_status(self.state.read(), self._clock())

    def watch(
        self, interval: float = 0.5, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield :meth:`status` now and after each change of the state file.

        Polls with ``os.stat`` of the file and of its log (inode, mtime, size), parsing
        the file only when either changed. Ends after yielding a finished (success or
        failed) status, or when ``timeout`` seconds have passed.
        """
        deadline = None if timeout is None else self._monotonic() + timeout
        seen = self._stat_key()
        snapshot = self.status()
        yield snapshot
        while snapshot["status"] not in ("success", "failed"):
            if deadline is not None:
                left = deadline - self._monotonic()
                if left <= 0:
                    return
                self._sleep(min(interval, left))
            else:
                self._sleep(interval)
            key = self._stat_key()
            if key == seen:
                continue
            seen = key
            snapshot = self.status()
            yield snapshot

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` on every change this tracker makes; return an unsubscriber.

        Events: ``stage_started``, ``progress`` (when progress is written),
        ``stage_completed``, ``stage_failed``, ``stage_skipped``, ``pipeline_completed``;
        each a dict with ``event``, ``stage`` and a ``status`` snapshot. A callback that
        raises is logged and ignored.
        """
        with self._lock:
            self._subscribers = [*self._subscribers, callback]

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [cb for cb in self._subscribers if cb is not callback]

        return unsubscribe

    # -- internals -------------------------------------------------------------

    @staticmethod
    def _check_stages(
        stages: Sequence[str] | Mapping[str, float],
        path: Path,
        requires: Mapping[str, Sequence[str]] | None = None,
    ) -> list[_plan.StageSpec]:
        try:
            return _plan.build(stages, requires)
        except _plan.PlanProblem as exc:
            text = str(exc) if str(exc).startswith("stages") else f"stages: {exc}"
            raise PlanError(f"{path.name}: {text}", path=path, stage=exc.stage) from None

    def _stored_plan(self, data: dict[str, Any]) -> list[_plan.StageSpec]:
        """The plan stored in ``data``; else the old ``phase*`` keys; else no stage."""
        try:
            specs = _plan.from_data(data)
        except _plan.PlanProblem as exc:
            raise PlanError(
                f"{self.state.path.name}: {exc}", path=self.state.path, stage=exc.stage
            ) from None
        if specs is not None:
            return specs
        return [_plan.StageSpec(name) for name in _plan.phase_names(data)]

    def _declare(self, specs: list[_plan.StageSpec], *, keep_requires: bool, replace: bool) -> None:
        """Store ``specs`` as the plan: one logged transaction, none when it is stored already."""

        def wanted(data: dict[str, Any]) -> tuple[list[_plan.StageSpec], dict[str, Any] | None]:
            stored = _plan.from_data(data)
            new = _plan.merge_requires(specs, stored) if keep_requires else specs
            return new, (None if new == stored else _plan.to_json(new))

        try:
            data = self.state.read()
            new, plan = wanted(data)
            if plan is not None:
                # Refused before the lock when possible: a refusal then leaves no log record.
                self._refuse_orphans(data, _plan.from_data(data), new, replace)
                with self.state.transaction(operation="plan") as txn:
                    old = _plan.from_data(txn.data)
                    new, plan = wanted(txn.data)
                    if plan is not None:
                        self._refuse_orphans(txn.data, old, new, replace)
                        txn.data[_plan.PLAN_KEY] = plan
                        txn.details["plan"] = [s.name for s in new]
        except _plan.PlanProblem as exc:
            raise PlanError(
                f"{self.state.path.name}: {exc}", path=self.state.path, stage=exc.stage
            ) from None
        self.requires = {s.name: list(s.requires) for s in new}

    def _refuse_orphans(
        self,
        data: dict[str, Any],
        old: list[_plan.StageSpec] | None,
        new: list[_plan.StageSpec],
        replace: bool,
    ) -> None:
        if old is None or replace:
            return
        names = {s.name for s in new}
        orphans = [
            s.name for s in old if s.name not in names and _plan.has_progress(data.get(s.name))
        ]
        if orphans:
            listed = ", ".join(repr(n) for n in orphans)
            raise PlanError(
                f"{self.state.path.name}: the new plan ({', '.join(s.name for s in new)}) drops "
                f"stage(s) {listed} whose progress is recorded in the file; keep them in the "
                "plan, reset them first, or pass replace_plan=True to drop them from the plan "
                "(their records stay in the file). Nothing was written.",
                path=self.state.path,
                stage=orphans[0],
                orphans=orphans,
            )

    def _forget(self, stage: str) -> None:
        """Drop this tracker's unwritten numbers of ``stage`` (a run of it was interrupted)."""
        with self._lock:
            self._live.pop(stage, None)

    def _error(self, stage: str | None, message: str) -> ProgressError:
        return ProgressError(message, path=self.state.path, stage=stage)

    def _check_stage(self, stage: str) -> None:
        if self._closed:
            raise self._error(
                stage, f"this tracker on {self.state.path} was closed; make a new one"
            )
        if stage not in self.weights:
            raise self._error(
                stage if isinstance(stage, str) else None,
                f"unknown stage {stage!r}; this tracker's stages are {', '.join(self.weights)}",
            )

    def _not_running(self, stage: str) -> ProgressError:
        self._check_stage(stage)
        return self._error(
            stage,
            f"stage {stage!r} is not running in this tracker; call start({stage!r}) first "
            "(it resumes persisted progress)",
        )

    def _check_number(self, stage: str, value: object) -> float:
        number = _num(value)
        if number is None or not math.isfinite(number):
            raise self._error(stage, f"progress of stage {stage!r} must be a number, not {value!r}")
        return number

    def _check_total(self, stage: str, total: object) -> float:
        number = _num(total)
        if number is None or not math.isfinite(number) or number < 0:
            raise self._error(
                stage, f"the total of stage {stage!r} must be a number >= 0, not {total!r}"
            )
        return number

    def _out_of_range(self, stage: str, current: float, total: float | None) -> ProgressError:
        if not math.isfinite(current):
            return self._error(stage, f"progress of stage {stage!r} must be finite, not {current}")
        if current < 0:
            return self._error(stage, f"progress of stage {stage!r} cannot be negative ({current})")
        return self._error(
            stage, f"progress of stage {stage!r} cannot exceed its total: {current} > {total}"
        )

    def _live_value(self, stage: str) -> _Live:
        with self._lock:
            live = self._live.get(stage)
        if live is None:
            raise self._not_running(stage)
        return live

    def _record(self, data: dict[str, Any], stage: str, *, create: bool) -> dict[str, Any]:
        rec = data.get(stage)
        if rec is None and create:
            rec = data[stage] = {}
        if rec is not None and not isinstance(rec, dict):
            raise self._error(
                stage,
                f"{self.state.path.name}: data[{stage!r}] is a {type(rec).__name__}, not the "
                "stage's record (an object); rename the key or pick another stage name",
            )
        return rec  # type: ignore[return-value]  # None only when create is False

    def _write_live(self, rec: dict[str, Any], live: _Live, updated: float) -> None:
        progress = rec.get("progress")
        if not isinstance(progress, dict):
            progress = rec["progress"] = {}
        progress["current"] = live.current
        progress["total"] = live.total
        progress["message"] = live.message
        progress["updated_at"] = _iso(updated)

    def _finish(
        self,
        stage: str,
        status: Literal["success", "failed", "skipped"],
        allowed: tuple[str, ...],
        *,
        message: str | None = None,
        error: str | None = None,
    ) -> None:
        now = self._clock()
        live: _Live | None = None
        try:
            with self.state.transaction(operation=f"progress.{status}") as txn:
                rec = self._record(txn.data, stage, create=True)
                old = rec.get("status") or "pending"
                if old not in allowed:
                    hint = (
                        f"call start({stage!r}) first"
                        if old == "pending"
                        else f"it is already {old}; call start({stage!r}, restart=True) "
                        "or reset() to run it again"
                    )
                    raise self._error(
                        stage, f"cannot mark stage {stage!r} {status}: it is {old}; {hint}"
                    )
                with self._lock:
                    mono = self._monotonic()
                    live = self._live.pop(stage, None)
                    # Not only when dirty: a flush that joined an outer transaction
                    # which then rolled back left clean-looking numbers unwritten.
                    if live is not None:
                        self._write_live(rec, live, now - (mono - live.mono))
                progress = rec.get("progress")
                if not isinstance(progress, dict):
                    progress = rec["progress"] = {"current": 0, "total": None, "message": None}
                    progress["started_at"] = _iso(now) if status == "success" else None
                if status == "success" and progress.get("total") is None:
                    progress["total"] = progress.get("current", 0)
                if message is not None:
                    progress["message"] = message
                progress["error"] = error
                progress["updated_at"] = progress["finished_at"] = _iso(now)
                rec["status"] = status
                snapshot = self._build_status(txn.data, now)
        except BaseException:
            if live is not None:
                with self._lock:
                    self._live.setdefault(stage, live)
            raise
        extra: dict[str, Any] = {}
        if error is not None:
            extra["error"] = error
        if message is not None:
            extra["message"] = message
        self._emit(
            f"stage_{'completed' if status == 'success' else status}", stage, snapshot, **extra
        )
        if status != "failed" and snapshot["status"] == "success":
            self._emit("pipeline_completed", None, snapshot)

    def _stat_key(self) -> tuple[object, object]:
        """The file's stat and the log's: every commit grows the log, even one whose new
        file keeps the old one's inode, size and mtime (a reused inode within one tick)."""
        return (_stat(self.state.path), _stat(self.state.log_path))

    def _emit(self, event: str, stage: str | None, snapshot: dict[str, Any], **extra: Any) -> None:
        subscribers = self._subscribers
        if not subscribers:
            return
        for callback in subscribers:
            payload: Event = {"event": event, "stage": stage, "status": snapshot, **extra}
            try:
                callback(payload)
            except Exception:
                _logger.exception("progress callback %r raised on %s; ignored", callback, event)

    def _build_status(self, data: dict[str, Any], now: float) -> dict[str, Any]:
        if self._follow:  # a follower shows the plan as stored now, not as it was
            specs = self._stored_plan(data)
            with self._lock:
                self.weights = {s.name: s.weight for s in specs}
                self.requires = {s.name: list(s.requires) for s in specs}
        with self._lock:
            mono = self._monotonic()
            unwritten = {
                name: (live.current, live.total, live.message, now - (mono - live.mono))
                for name, live in self._live.items()
                if live.dirty
            }
        stages: dict[str, dict[str, Any]] = {}
        for name in self.weights:
            rec = data.get(name)
            if rec is None:
                rec = {}
            elif not isinstance(rec, dict):
                raise self._error(
                    name,
                    f"{self.state.path.name}: data[{name!r}] is a {type(rec).__name__}, "
                    "not a stage record (an object)",
                )
            stages[name] = self._stage_status(name, rec, now, unwritten.get(name))
        return self._summary(stages)

    def _stage_status(
        self,
        name: str,
        rec: dict[str, Any],
        now: float,
        unwritten: tuple[float, float | None, str | None, float] | None,
    ) -> dict[str, Any]:
        status = rec.get("status") or "pending"
        if status not in _KNOWN:
            raise self._error(
                name,
                f"{self.state.path.name}: data[{name!r}]['status'] is {status!r}; "
                f"expected one of {', '.join(_KNOWN)}",
            )
        progress = rec.get("progress")
        if not isinstance(progress, dict):
            progress = {}
        current = _num(progress.get("current")) or 0
        total = _num(progress.get("total"))
        message = progress.get("message")
        updated = _parse_iso(progress.get("updated_at"))
        if unwritten is not None and status == "running":
            current, total, message, updated = unwritten
        started = _parse_iso(progress.get("started_at"))
        finished = _parse_iso(progress.get("finished_at"))
        resumed = _parse_iso(progress.get("resumed_at"))
        resumed_from = _num(progress.get("resumed_from")) or 0
        if status in _DONE:
            percent = 100.0
        elif total:
            percent = max(0.0, min(100.0, current / total * 100.0))
        else:
            percent = 0.0
        elapsed = None
        if started is not None:
            end = now if status == "running" or finished is None else finished
            elapsed = max(0.0, end - started)
        # The rate counts only work done since the last (re)start: items done before a
        # crash took no time in this run, and counting them would spike the rate.
        rate = None
        base = resumed if resumed is not None else started
        if base is not None and updated is not None and updated > base:
            done = current - resumed_from
            if done > 0:
                rate = done / (updated - base)
        eta = None
        if status in _DONE:
            eta = 0.0
        elif status == "running" and rate and total is not None:
            eta = max(0.0, (total - current) / rate)
        retry = rec.get("retry")
        attempts = None
        if isinstance(retry, dict):
            # RetryHandler zeroes attempts on success and keeps the count in succeeded_after.
            attempts = _num(retry.get("attempts")) or _num(retry.get("succeeded_after"))
        return {
            **self._stage_facts(name, rec, status, progress),
            "status": status,
            "progress_percent": percent,
            "current": current,
            "total": total,
            "message": message,
            "started_at": progress.get("started_at"),
            "updated_at": _iso(updated) if updated is not None else None,
            "elapsed_seconds": elapsed,
            "eta_seconds": eta,
            "rate": rate,
            "retries": max(int(attempts) - 1, 0) if attempts is not None else 0,
        }

    def _stage_facts(
        self,
        name: str,
        rec: dict[str, Any],
        status: str,
        progress: dict[str, Any],
    ) -> dict[str, Any]:
        """The plan's and the runner's facts about a stage: weight, requires, attempts..."""
        attempts = _plan.attempts_of(rec)
        owner = None
        found = rec.get("owner")
        if status == "running" and isinstance(found, dict):
            owner = {
                "pid": found.get("pid"),
                "host": found.get("host"),
                "since": found.get("since"),
            }
        error = None
        if status == "failed":
            err = rec.get("error")
            if isinstance(err, dict):
                kind, text = err.get("type"), err.get("message")
                error = f"{kind}: {text}" if kind and text else str(kind or text or "") or None
            elif isinstance(err, str) and err:
                error = err
            if error is None and isinstance(progress.get("error"), str):
                error = progress["error"]
        return {
            "weight": self.weights.get(name, 1.0),
            "requires": list(self.requires.get(name, ())),
            "attempts": attempts,
            "owner": owner,
            "error": error,
        }

    def _summary(self, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
        statuses = [s["status"] for s in stages.values()]
        if not statuses:
            overall = "pending"
        elif "failed" in statuses:
            overall = "failed"
        elif all(s in _DONE for s in statuses):
            overall = "success"
        elif all(s == "pending" for s in statuses):
            overall = "pending"
        else:
            overall = "running"
        current_stage = next((n for n, s in stages.items() if s["status"] == "running"), None)
        # The weights shown with each stage: the plan this snapshot was built from.
        weight_sum = sum(s["weight"] for s in stages.values())
        progress = sum(s["weight"] * s["progress_percent"] for s in stages.values())
        overall_progress = max(0.0, min(100.0, progress / weight_sum)) if weight_sum else 0.0
        return {
            "status": overall,
            "current_stage": current_stage,
            "stages": stages,
            "overall_progress": overall_progress,
            "eta_seconds": self._overall_eta(overall, stages),
        }

    def _overall_eta(self, overall: str, stages: dict[str, dict[str, Any]]) -> float | None:
        # Running stages report their own ETA; a pending stage is assumed to take as
        # long per unit of weight as the running stages are projected to take.
        if overall == "success":
            return 0.0
        if overall != "running":
            return None
        eta = 0.0
        per_weight: list[float] = []
        pending_weight = 0.0
        for s in stages.values():
            if s["status"] == "running":
                if s["eta_seconds"] is None or not s["total"] or not s["rate"]:
                    return None
                eta += s["eta_seconds"]
                per_weight.append(s["total"] / s["rate"] / s["weight"])
            elif s["status"] == "pending":
                pending_weight += s["weight"]
        if pending_weight:
            if not per_weight:
                return None
            eta += pending_weight * sum(per_weight) / len(per_weight)
        return eta


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


_open_trackers: weakref.WeakSet[ProgressTracker] = weakref.WeakSet()


def _flush_at_exit() -> None:
    """Flush every open tracker when the interpreter exits; never raise."""
    for tracker in list(_open_trackers):
        # Bounded: a daemon thread may hold a transaction that will never end, and the
        # interpreter must still exit.
        flusher = threading.Thread(target=_flush_quietly, args=(tracker,), daemon=True)
        flusher.start()
        flusher.join(2.0)


def _flush_quietly(tracker: ProgressTracker) -> None:
    try:
        tracker.flush()
    except Exception:
        _logger.exception("could not flush %r at exit", tracker)


atexit.register(_flush_at_exit)
