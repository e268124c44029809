"""From one committed version of the state to what the page and the API show.

:func:`build_snapshot` is the only place that turns a state into a snapshot, so the
page, ``/api/status`` and every event agree. :func:`classify` names the event that
takes one snapshot to the next.
"""

from __future__ import annotations

import time
from typing import Any

from .._time import iso
from ..progress import ProgressTracker
from ..state import PipelineState

__all__ = ["LOG_RECORDS", "PinnedState", "build_snapshot", "classify", "record_json"]

LOG_RECORDS = 20  # the page's log table

# Most significant first: a commit that completes one stage and starts the next is a
# stage_completed event (the transitions list carries both).
_PRIORITY = ("stage_failed", "stage_completed", "stage_skipped", "stage_started")
_EVENT_OF = {
    "failed": "stage_failed",
    "success": "stage_completed",
    "skipped": "stage_skipped",
    "running": "stage_started",
}


class PinnedState(PipelineState):
    """A state whose :meth:`read` answers with one version parsed already.

    The watcher parses each commit once; the tracker that derives the status reads this
    pinned copy instead of the file, however many times it asks.
    """

    pinned: dict[str, Any] | None = None
    decodes = 0  # how many times bytes were parsed (for tests and benchmarks)
    _last: tuple[bytes, dict[str, Any]] | None = None

    def read(self, validate: bool | None = None) -> dict[str, Any]:
        """The pinned version, or the file when nothing is pinned."""
        if self.pinned is not None:
            return self.pinned
        return super().read(validate)

    def _decode(self, raw: bytes | None, *, trusted: bool = False) -> dict[str, Any]:
        """Parse ``raw``, unless it is the very bytes parsed last time.

        Keyed by the bytes themselves, not by the file's stat: a file rewritten in place
        (or a new file on a reused inode within one timestamp tick) keeps inode, size
        and mtime, and a stat-keyed parse would show the old version. Comparing the
        bytes costs a memcmp, far less than the parse it saves.
        """
        last = self._last
        if raw is not None and last is not None and last[0] == raw:
            return last[1]
        data = super()._decode(raw, trusted=trusted)
        if raw is not None:
            self._last = (raw, data)
            self.decodes += 1
        return data


def _empty_status() -> dict[str, Any]:
    return {
        "status": "pending",
        "current_stage": None,
        "stages": {},
        "overall_progress": 0.0,
        "eta_seconds": None,
    }


def record_json(raw: dict[str, Any]) -> dict[str, Any]:
    """One log record as the API shows it: the fields a reader needs, nothing private."""
    details = raw.get("details")
    error = details.get("error") if isinstance(details, dict) else None
    return {
        "seq": raw.get("seq"),
        "generation": raw.get("generation"),
        "timestamp": raw.get("timestamp"),
        "operation": raw.get("operation"),
        "success": bool(raw.get("success", False)),
        "changes": raw.get("changes"),
        "error": error,
        "duration_ms": raw.get("duration_ms"),
        "pid": raw.get("pid"),
        "host": raw.get("host"),
    }


def _stage_json(stage: dict[str, Any]) -> dict[str, Any]:
    """Every field the page shows, present with or without the stage plan."""
    return {
        **stage,
        "weight": stage.get("weight", 1.0),
        "requires": stage.get("requires", []),
        "attempts": stage.get(
            "attempts",
            (stage.get("retries") or 0) + (0 if stage.get("status") == "pending" else 1),
        ),
        "owner": stage.get("owner"),
        "error": stage.get("error"),
    }


def build_snapshot(
    state: PinnedState,
    data: dict[str, Any],
    generation: int,
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The full snapshot of one committed version: status, generation, newest log records.

    Args:
        state: The watched state; ``data`` is pinned on it while the status is derived.
        data: The committed version, parsed once by the caller.
        generation: Its generation (commits so far).
        now: The time the snapshot is taken (epoch seconds).

    Raises:
        ProgressError: a stage record is not an object, or has an unknown status.
        StateSidecarError: the transaction log cannot be read.
    """
    state.pinned = data
    try:
        # No stages given: the tracker follows the plan stored in the state (or, in an
        # older state, its phase* keys), read from the pinned version.
        with ProgressTracker(state) as tracker:
            status = tracker.status() if tracker.stages else _empty_status()
    finally:
        state.pinned = None
    status["stages"] = {name: _stage_json(s) for name, s in status["stages"].items()}
    log = [record_json(r) for r in state.get_transaction_history(LOG_RECORDS)]
    taken = time.time() if now is None else now
    return {
        "path": str(state.path),
        "generation": generation,
        **status,
        "log": log,
        "snapshot_at": iso(taken),
    }


def classify(
    before: dict[str, Any] | None, after: dict[str, Any]
) -> tuple[list[str], str | None, list[dict[str, Any]]]:
    """Name the change from ``before`` to ``after``: ``(events, stage, transitions)``.

    ``transitions`` lists every stage whose status changed (``stage``, ``from``, ``to``).
    The first event is the most significant of them (``stage_failed``, then
    ``stage_completed``, ``stage_skipped``, ``stage_started``), else ``progress``; when the
    whole pipeline just ended, ``pipeline_completed`` or ``pipeline_failed`` follows it,
    as :meth:`ProgressTracker.subscribe` reports them.
    """
    if before is None:
        return ["snapshot"], after.get("current_stage"), []
    old = before.get("stages") or {}
    transitions = []
    for name, stage in (after.get("stages") or {}).items():
        was = (old.get(name) or {}).get("status", "pending")
        if stage.get("status") != was:
            transitions.append({"stage": name, "from": was, "to": stage.get("status")})
    found = {_EVENT_OF.get(t["to"], "progress"): t["stage"] for t in reversed(transitions)}
    event, stage = next(
        ((e, found[e]) for e in _PRIORITY if e in found), ("progress", after.get("current_stage"))
    )
    events = [event]
    ended = after.get("status") if after.get("status") != before.get("status") else None
    if ended == "success":
        events.append("pipeline_completed")
    elif ended == "failed":
        events.append("pipeline_failed")
    return events, stage, transitions
