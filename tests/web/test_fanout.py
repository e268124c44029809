"""The watcher's pieces on their own: naming a change, and a slow client's bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from pipeline_common import PipelineState
from pipeline_common.web._snapshot import PinnedState, classify
from pipeline_common.web._watcher import QUEUE_SIZE, Client, StateWatcher, _make_view


def snap(status: str, **stages: str) -> dict[str, Any]:
    return {
        "status": status,
        "current_stage": None,
        "stages": {n: {"status": s} for n, s in stages.items()},
    }


def test_a_first_snapshot_is_a_snapshot_event() -> None:
    """With nothing shown before, the event is ``snapshot``."""
    assert classify(None, snap("running", a="running")) == (["snapshot"], None, [])


def test_the_most_significant_transition_names_the_event() -> None:
    """A failure outranks a completion, which outranks a start; all are listed."""
    events, stage, transitions = classify(
        snap("running", a="running", b="pending", c="running"),
        snap("running", a="success", b="running", c="running"),
    )
    assert (events, stage) == (["stage_completed"], "a")
    assert [t["stage"] for t in transitions] == ["a", "b"]


def test_the_end_of_the_pipeline_follows_its_stage_event() -> None:
    """The commit that ends the pipeline gives the stage event, then the pipeline's."""
    ok = classify(snap("running", a="running"), snap("success", a="success"))
    assert ok[0] == ["stage_completed", "pipeline_completed"]
    failed = classify(snap("running", a="running"), snap("failed", a="failed"))
    assert failed[:2] == (["stage_failed", "pipeline_failed"], "a")
    quiet = classify(snap("running", a="running"), snap("running", a="running"))
    assert quiet[0] == ["progress"]


def test_a_slow_client_keeps_the_newest_views_in_bounded_memory() -> None:
    """A client that never reads holds at most QUEUE_SIZE views: the newest ones."""

    async def flood() -> list[int]:
        client = Client(asyncio.get_running_loop())
        for seq in range(1, 1001):
            client.offer(_make_view(seq, ["progress"], seq, snap("running"), None))
        assert client.dropped == 1000 - QUEUE_SIZE
        views = [client.queue.get_nowait() for _ in range(client.queue.qsize())]
        return [v.seq for v in views if v is not None]

    assert asyncio.run(flood()) == list(range(1001 - QUEUE_SIZE, 1001))


def test_an_idle_watcher_stops_and_a_request_restarts_it(state: PipelineState) -> None:
    """With no client for idle_after seconds the thread ends; the next look restarts it."""
    state.write({"phase1": {"status": "running"}})
    watcher = StateWatcher(PinnedState(state.path), poll_interval=0.02, idle_after=0.2)
    assert watcher.ensure_started().generation == 1
    deadline = time.monotonic() + 5
    while watcher._running():
        assert time.monotonic() < deadline, "the idle watcher never stopped"
        time.sleep(0.05)
    state.write({"phase1": {"status": "success"}})
    view = watcher.ensure_started()
    assert view.generation == 2
    assert view.snapshot is not None
    assert view.snapshot["status"] == "success"
    watcher.close()


def test_a_change_that_keeps_the_files_stat_is_not_missed(state: PipelineState) -> None:
    """Same inode, size and mtime (rewritten in place, mtime set back), new bytes: shown."""
    state.write({"phase1": {"status": "running", "progress": {"current": 3, "total": 9}}})
    watcher = StateWatcher(PinnedState(state.path), poll_interval=3600)
    try:
        view = watcher.ensure_started()
        assert view.snapshot is not None
        assert view.snapshot["stages"]["phase1"]["current"] == 3
        before = os.stat(state.path)
        raw = state.path.read_bytes()
        changed = raw.replace(b'"current": 3', b'"current": 4')
        assert changed != raw
        assert len(changed) == len(raw)
        with open(state.path, "r+b") as f:  # another program, in place
            f.write(changed)
        os.utime(state.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(state.path)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )
        with contextlib.suppress(RuntimeError), state.transaction():
            raise RuntimeError("a refused transaction: only the log grows")
        with watcher._work:
            watcher._refresh(watcher._key())
        latest = watcher.latest
        assert latest is not None
        assert latest.snapshot is not None
        assert latest.snapshot["stages"]["phase1"]["current"] == 4
    finally:
        watcher.close()
