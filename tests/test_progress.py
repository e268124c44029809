"""ProgressTracker: the contract of issue #5, point by point."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pickle
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from pipeline_common import PipelineState, StateError, StateValidationError
from pipeline_common.progress import ProgressError, ProgressTracker

RunChild = Callable[..., Any]
SpawnChild = Callable[..., Any]


class FakeClock:
    """A clock that moves only when told to; doubles as wall clock, timer and sleep."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at a fixed epoch time."""
    return FakeClock()


@pytest.fixture
def make_tracker(
    state: PipelineState, clock: FakeClock
) -> Iterator[Callable[..., ProgressTracker]]:
    """Return a factory of trackers on ``state`` driven by the fake clock; all closed after."""
    made: list[ProgressTracker] = []

    def make(stages: Any = ("phase1", "phase2"), **kwargs: Any) -> ProgressTracker:
        kwargs.setdefault("min_interval", 0.0)
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("monotonic", clock)
        kwargs.setdefault("sleep", clock.sleep)
        tracker = ProgressTracker(state, stages, **kwargs)
        made.append(tracker)
        return tracker

    yield make
    for tracker in made:
        tracker.close()


def commits(state: PipelineState) -> int:
    """Count the log's records (the history holds at most 10,000 here)."""
    return len(state.get_transaction_history(limit=10_000))


# -- one source of truth -----------------------------------------------------------


def test_fresh_state_reports_every_stage_pending(make_tracker: Any) -> None:
    """Before anything runs, every stage is pending and only the plan is written."""
    tracker = make_tracker()
    status = tracker.status()
    assert status["status"] == "pending"
    assert status["current_stage"] is None
    assert status["overall_progress"] == 0.0
    assert status["eta_seconds"] is None
    assert set(status["stages"]) == {"phase1", "phase2"}
    stage = status["stages"]["phase1"]
    assert stage == {
        "status": "pending",
        "progress_percent": 0.0,
        "current": 0,
        "total": None,
        "message": None,
        "started_at": None,
        "updated_at": None,
        "elapsed_seconds": None,
        "eta_seconds": None,
        "rate": None,
        "retries": 0,
        "weight": 1.0,
        "requires": [],
        "attempts": 0,
        "owner": None,
        "error": None,
    }
    assert list(tracker.state.read()) == ["_pipeline"]


def test_status_and_progress_live_in_the_phase_record(
    make_tracker: Any, state: PipelineState
) -> None:
    """The phase record holds the status, with the progress details beside it."""
    state.write({"phase1": {"status": "pending", "owner": "me"}, "other": 1})
    tracker = make_tracker()
    tracker.start("phase1", total=10, message="go")
    tracker.update("phase1", 4, message="four")
    record = state.read()["phase1"]
    assert record["status"] == "running"
    assert record["owner"] == "me"
    progress = record["progress"]
    assert (progress["current"], progress["total"], progress["message"]) == (4, 10, "four")
    assert progress["started_at"].endswith("Z")
    updated = datetime.fromisoformat(progress["updated_at"].replace("Z", "+00:00"))
    assert updated.utcoffset() == timedelta(0)
    assert state.read()["other"] == 1


def test_timestamps_are_iso_8601_utc(make_tracker: Any, clock: FakeClock) -> None:
    """Timestamps are ISO 8601 in UTC, from the injected clock."""
    clock.now = 1_700_000_000.25
    tracker = make_tracker()
    tracker.start("phase1", total=1)
    assert tracker.status()["stages"]["phase1"]["started_at"] == "2023-11-14T22:13:20.250000Z"


def test_status_is_derived_from_the_file(make_tracker: Any, state: PipelineState) -> None:
    """A change written by someone else shows at once: the tracker keeps no second copy."""
    tracker = make_tracker()
    tracker.start("phase1", total=10)
    with state.transaction() as txn:
        txn.data["phase2"] = {"status": "skipped"}
    assert tracker.status()["stages"]["phase2"]["status"] == "skipped"


# -- throttling and flushing -----------------------------------------------------------


def test_tight_update_loop_is_throttled_and_complete_writes_exact_numbers(
    state: PipelineState,
) -> None:
    """10,000 updates add fewer than 100 log records; complete() leaves the exact numbers."""
    tracker = ProgressTracker(state, ["phase1"], min_interval=0.5)
    tracker.start("phase1", total=10_000)
    before = commits(state)
    for i in range(1, 10_001):
        tracker.update("phase1", i, message=f"item {i}")
    assert commits(state) - before < 100
    tracker.complete("phase1")
    progress = state.read()["phase1"]["progress"]
    assert state.read()["phase1"]["status"] == "success"
    assert (progress["current"], progress["total"], progress["message"]) == (
        10_000,
        10_000,
        "item 10000",
    )


def test_update_writes_again_after_min_interval(make_tracker: Any, clock: FakeClock) -> None:
    """A throttled update is written by the first update after min_interval."""
    tracker = make_tracker(min_interval=1.0)
    state = tracker.state
    tracker.start("phase1", total=100)
    before = commits(state)
    tracker.update("phase1", 1)
    clock.advance(0.5)
    tracker.advance("phase1", 2)
    assert commits(state) == before
    assert state.read()["phase1"]["progress"]["current"] == 0
    clock.advance(0.5)
    tracker.advance("phase1")
    assert commits(state) == before + 1
    assert state.read()["phase1"]["progress"]["current"] == 4


def test_status_shows_unflushed_progress_of_this_tracker_only(make_tracker: Any) -> None:
    """Unwritten progress shows in this tracker's status, not in another tracker's."""
    tracker = make_tracker(min_interval=60.0)
    tracker.start("phase1", total=10)
    tracker.update("phase1", 7, message="seven")
    mine = tracker.status()["stages"]["phase1"]
    assert (mine["current"], mine["message"], mine["progress_percent"]) == (7, "seven", 70.0)
    other = make_tracker(min_interval=60.0).status()["stages"]["phase1"]
    assert other["current"] == 0


def test_close_flushes_and_is_idempotent(make_tracker: Any, state: PipelineState) -> None:
    """close() (or leaving ``with tracker``) writes unwritten progress."""
    with make_tracker(min_interval=60.0) as tracker:
        tracker.start("phase1", total=10)
        tracker.update("phase1", 3)
        assert state.read()["phase1"]["progress"]["current"] == 0
    assert state.read()["phase1"]["progress"]["current"] == 3
    tracker.close()
    with pytest.raises(ProgressError, match="closed"):
        tracker.update("phase1", 4)


def test_the_exit_hook_does_not_keep_trackers_alive(state: PipelineState) -> None:
    """The atexit registry holds trackers weakly: a dropped tracker is collected."""
    tracker = ProgressTracker(state, ["phase1"])
    ref = weakref.ref(tracker)
    del tracker
    gc.collect()
    assert ref() is None


def test_a_start_that_fails_to_commit_leaves_the_stage_unstarted(tmp_path: Path) -> None:
    """If the state refuses the start (here: a strict schema), update() still says not running."""

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    state = PipelineState(tmp_path / "strict.json", schema=Strict)
    with pytest.raises(StateValidationError, match="_pipeline"):  # the plan is refused too
        ProgressTracker(state, ["phase1"])
    tracker = ProgressTracker(state, ["phase1"], declare=False)
    with pytest.raises(StateValidationError):
        tracker.start("phase1", total=3)
    with pytest.raises(ProgressError, match="not running"):
        tracker.update("phase1", 1)
    tracker.close()


def test_flush_without_changes_writes_nothing(make_tracker: Any, state: PipelineState) -> None:
    """flush() with nothing unwritten adds no log record."""
    tracker = make_tracker(min_interval=60.0)
    tracker.start("phase1", total=10)
    before = commits(state)
    tracker.flush()
    assert commits(state) == before


@pytest.mark.multiprocess
def test_unflushed_progress_is_written_at_interpreter_exit(
    run_child: RunChild, state_path: Path
) -> None:
    """The atexit hook flushes a tracker the program never closed."""
    result = run_child(
        """
        import sys
        from pipeline_common import PipelineState
        from pipeline_common.progress import ProgressTracker
        tracker = ProgressTracker(PipelineState(sys.argv[1]), ["phase1"], min_interval=3600)
        tracker.start("phase1", total=100)
        tracker.update("phase1", 42, message="left open")
        """,
        str(state_path),
    )
    assert result.returncode == 0, result.stderr
    progress = PipelineState(state_path).read()["phase1"]["progress"]
    assert (progress["current"], progress["message"]) == (42, "left open")


# -- across processes ------------------------------------------------------------------

_CHILD_PIPELINE = """
    import json, sys
    from pipeline_common import PipelineState
    from pipeline_common.progress import ProgressTracker
    tracker = ProgressTracker(
        PipelineState(sys.argv[1]), {"phase1": 1.0, "phase2": 3.0},
        min_interval=0, clock=lambda: 1_000_000.0,
    )
    tracker.start("phase1", total=10)
    tracker.update("phase1", 10)
    tracker.complete("phase1")
    tracker.start("phase2", total=8)
    tracker.update("phase2", 2, message="two")
    print(json.dumps(tracker.status()))
"""


@pytest.mark.multiprocess
def test_tracker_in_another_process_reports_the_same_status(
    run_child: RunChild, state_path: Path
) -> None:
    """A new tracker on the same file, in another process, reports the same status()."""
    result = run_child(_CHILD_PIPELINE, str(state_path))
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout)
    tracker = ProgressTracker(
        PipelineState(state_path), {"phase1": 1.0, "phase2": 3.0}, clock=lambda: 1_000_000.0
    )
    assert tracker.status() == theirs
    assert theirs["overall_progress"] == pytest.approx((100 + 3 * 25) / 4)
    assert theirs["current_stage"] == "phase2"


@pytest.mark.multiprocess
def test_start_after_sigkill_resumes_from_persisted_current(
    spawn_child: SpawnChild, state_path: Path
) -> None:
    """After a SIGKILL, start() resumes from the last written current; restart=True does not."""
    child = spawn_child(
        """
        import sys, time
        from pipeline_common import PipelineState
        from pipeline_common.progress import ProgressTracker
        tracker = ProgressTracker(PipelineState(sys.argv[1]), ["phase1"], min_interval=3600)
        tracker.start("phase1", total=100)
        tracker.update("phase1", 40)
        tracker.flush()
        tracker.update("phase1", 45)  # never written: lost with the process
        print("ready", flush=True)
        time.sleep(60)
        """,
        str(state_path),
    )
    assert child.stdout.readline().strip() == "ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    state = PipelineState(state_path)
    tracker = ProgressTracker(state, ["phase1"], min_interval=0)
    assert tracker.status()["stages"]["phase1"]["status"] == "running"
    handle = tracker.start("phase1")
    assert (handle.resumed, handle.resumed_from, handle.current, handle.total) == (
        True,
        40,
        40,
        100,
    )
    progress = state.read()["phase1"]["progress"]
    assert progress["resumed_from"] == 40
    assert progress["resumed_at"] is not None
    handle.advance(10)
    assert tracker.status()["stages"]["phase1"]["current"] == 50
    again = tracker.start("phase1", total=100, restart=True)
    assert (again.resumed, again.current) == (False, 0)
    tracker.close()


def test_resume_counts_only_new_work_in_rate_and_eta(make_tracker: Any, clock: FakeClock) -> None:
    """After a resume the rate counts only work since the resume: no ETA spike."""
    first = make_tracker(["phase1"])
    first.start("phase1", total=100)
    clock.advance(50)
    first.update("phase1", 50)
    stage = first.status()["stages"]["phase1"]
    assert stage["rate"] == pytest.approx(1.0)
    assert stage["eta_seconds"] == pytest.approx(50.0)
    # The process dies (its tracker is simply abandoned); a new one starts much later.
    clock.advance(1000)
    second = make_tracker(["phase1"])
    second.start("phase1", total=100)
    resumed = second.status()["stages"]["phase1"]
    assert (resumed["current"], resumed["rate"], resumed["eta_seconds"]) == (50, None, None)
    assert resumed["progress_percent"] == 50.0
    clock.advance(5)
    second.update("phase1", 60)
    stage = second.status()["stages"]["phase1"]
    assert stage["rate"] == pytest.approx(2.0)  # 10 items in 5 s, not 60 items in 5 s
    assert stage["eta_seconds"] == pytest.approx(20.0)
    assert stage["elapsed_seconds"] == pytest.approx(1055.0)


def test_rate_and_eta_with_injected_clock(make_tracker: Any, clock: FakeClock) -> None:
    """Rate is items per second since start; ETA is what remains at that rate."""
    tracker = make_tracker(["phase1"])
    tracker.start("phase1", total=1000)
    clock.advance(10)
    tracker.update("phase1", 250)
    clock.advance(5)
    stage = tracker.status()["stages"]["phase1"]
    assert stage["rate"] == pytest.approx(25.0)
    assert stage["eta_seconds"] == pytest.approx(30.0)
    assert stage["elapsed_seconds"] == pytest.approx(15.0)
    assert tracker.status()["eta_seconds"] == pytest.approx(30.0)
    tracker.complete("phase1")
    done = tracker.status()["stages"]["phase1"]
    assert (done["eta_seconds"], done["elapsed_seconds"]) == (0.0, pytest.approx(15.0))


# -- overall progress ---------------------------------------------------------------


def test_overall_progress_is_weighted(make_tracker: Any) -> None:
    """Overall progress weighs stages; success and skipped count as 100."""
    tracker = make_tracker({"phase1": 1.0, "phase2": 3.0, "phase3": 4.0})
    tracker.start("phase1", total=10)
    tracker.update("phase1", 5)
    assert tracker.status()["overall_progress"] == pytest.approx(50 / 8)
    tracker.complete("phase1")
    tracker.start("phase2", total=4)
    tracker.update("phase2", 1)
    assert tracker.status()["overall_progress"] == pytest.approx((100 + 3 * 25) / 8)
    tracker.skip("phase3", reason="not needed")
    status = tracker.status()
    assert status["overall_progress"] == pytest.approx((100 + 3 * 25 + 4 * 100) / 8)
    assert status["stages"]["phase3"]["progress_percent"] == 100.0
    assert status["stages"]["phase3"]["message"] == "not needed"


def test_a_list_of_stages_weighs_them_equally(make_tracker: Any) -> None:
    """A list of stages gives each the weight 1."""
    tracker = make_tracker(["phase1", "phase2", "phase3", "phase4"])
    tracker.start("phase1", total=2)
    tracker.complete("phase1")
    assert tracker.status()["overall_progress"] == 25.0
    assert tracker.weights == {f"phase{i}": 1.0 for i in range(1, 5)}


def test_pipeline_status_follows_the_stages(make_tracker: Any) -> None:
    """pending, then running (with current_stage), failed if any failed, success at the end."""
    tracker = make_tracker(["phase1", "phase2"])
    assert tracker.status()["status"] == "pending"
    tracker.start("phase1", total=1)
    assert (tracker.status()["status"], tracker.status()["current_stage"]) == ("running", "phase1")
    tracker.complete("phase1")
    assert (tracker.status()["status"], tracker.status()["current_stage"]) == ("running", None)
    tracker.start("phase2")
    tracker.fail("phase2", RuntimeError("disk full"))
    status = tracker.status()
    assert status["status"] == "failed"
    assert status["eta_seconds"] is None
    assert tracker.state.read()["phase2"]["progress"]["error"] == "RuntimeError: disk full"
    tracker.start("phase2")
    tracker.complete("phase2")
    assert tracker.status()["status"] == "success"
    assert tracker.status()["overall_progress"] == 100.0
    assert tracker.status()["eta_seconds"] == 0.0


def test_complete_with_unknown_total_uses_the_final_current(make_tracker: Any) -> None:
    """A stage of unknown size gets total = current when it completes."""
    tracker = make_tracker(["phase1"], min_interval=60.0)
    tracker.start("phase1")
    for _ in range(7):
        tracker.advance("phase1")
    assert tracker.status()["stages"]["phase1"]["progress_percent"] == 0.0
    tracker.complete("phase1", message="done")
    progress = tracker.state.read()["phase1"]["progress"]
    assert (progress["current"], progress["total"], progress["message"]) == (7, 7, "done")


def test_update_can_set_the_total_on_the_way(make_tracker: Any) -> None:
    """update(total=...) sets a total learnt later."""
    tracker = make_tracker(["phase1"])
    tracker.start("phase1")
    tracker.update("phase1", 5, total=20)
    assert tracker.status()["stages"]["phase1"]["progress_percent"] == 25.0


def test_overall_eta_extrapolates_pending_stages_by_weight(
    make_tracker: Any, clock: FakeClock
) -> None:
    """A pending stage is assumed to take as long per unit of weight as the running one."""
    tracker = make_tracker({"phase1": 1.0, "phase2": 2.0})
    tracker.start("phase1", total=100)
    clock.advance(10)
    tracker.update("phase1", 50)
    # phase1: 10 s left of a 20 s stage; phase2 weighs twice as much: 40 s.
    assert tracker.status()["eta_seconds"] == pytest.approx(50.0)


# -- the stage's life ----------------------------------------------------------------


def test_stage_block_completes_on_clean_exit(make_tracker: Any) -> None:
    """``with tracker.stage()`` starts the stage and completes it on exit."""
    tracker = make_tracker(min_interval=60.0)
    with tracker.stage("phase1", total=3) as st:
        assert tracker.status()["stages"]["phase1"]["status"] == "running"
        for _ in range(3):
            st.advance()
        assert st.current == 3
    record = tracker.state.read()["phase1"]
    assert (record["status"], record["progress"]["current"]) == ("success", 3)


def test_stage_block_fails_on_exception_and_reraises_it(make_tracker: Any) -> None:
    """An exception fails the stage with its text and propagates unchanged."""
    tracker = make_tracker()
    error = KeyError("missing")

    def run() -> None:
        with tracker.stage("phase1", total=3) as st:
            st.update(2)
            raise error

    with pytest.raises(KeyError) as caught:
        run()
    assert caught.value is error
    record = tracker.state.read()["phase1"]
    assert record["status"] == "failed"
    assert record["progress"]["error"] == "KeyError: 'missing'"
    assert record["progress"]["current"] == 2


def test_stage_block_interrupted_stays_running_for_a_resume(make_tracker: Any) -> None:
    """KeyboardInterrupt flushes and leaves the stage running, to be resumed."""
    tracker = make_tracker(min_interval=60.0)

    def run() -> None:
        with tracker.stage("phase1", total=10) as st:
            st.update(6)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run()
    record = tracker.state.read()["phase1"]
    assert (record["status"], record["progress"]["current"]) == ("running", 6)


def test_track_counts_items_and_completes(make_tracker: Any) -> None:
    """track() takes its total from len(), advances per item and completes at the end."""
    tracker = make_tracker(["phase1"], min_interval=60.0)
    seen = []
    for item in tracker.track(["a", "b", "c"], "phase1"):
        seen.append(item)
        assert tracker.status()["stages"]["phase1"]["current"] == len(seen) - 1
    assert seen == ["a", "b", "c"]
    record = tracker.state.read()["phase1"]
    assert (record["status"], record["progress"]["current"], record["progress"]["total"]) == (
        "success",
        3,
        3,
    )


def test_track_of_a_resumed_stage_skips_done_items(make_tracker: Any) -> None:
    """A resumed stage's track() skips the items done before the restart."""
    first = make_tracker(["phase1"])
    first.start("phase1", total=5)
    first.update("phase1", 3)
    second = make_tracker(["phase1"])
    assert list(second.track(range(5), "phase1")) == [3, 4]
    assert second.status()["stages"]["phase1"]["current"] == 5


def test_track_inside_a_running_stage_only_advances(make_tracker: Any) -> None:
    """track() on a stage this tracker runs already joins it: no start, no complete."""
    tracker = make_tracker(["phase1"])
    with tracker.stage("phase1", total=4):
        list(tracker.track(range(2), "phase1"))
        list(tracker.track(range(2), "phase1"))
        assert tracker.status()["stages"]["phase1"]["status"] == "running"
    assert tracker.status()["stages"]["phase1"]["current"] == 4


def test_track_fails_the_stage_when_the_iterable_raises(make_tracker: Any) -> None:
    """An error from the iterable itself fails the stage."""

    def items() -> Iterator[int]:
        yield 1
        raise OSError("source gone")

    tracker = make_tracker(["phase1"])
    with pytest.raises(OSError, match="source gone"):
        list(tracker.track(items(), "phase1"))
    assert tracker.state.read()["phase1"]["progress"]["error"] == "OSError: source gone"


def test_track_left_early_leaves_the_stage_running(make_tracker: Any) -> None:
    """Breaking out of track() flushes and leaves the stage running."""
    tracker = make_tracker(["phase1"], min_interval=60.0)
    gen = tracker.track(range(10), "phase1")
    for item in gen:
        if item == 4:
            break
    gen.close()
    record = tracker.state.read()["phase1"]
    assert (record["status"], record["progress"]["current"]) == ("running", 4)


def test_reset_puts_stages_back_to_pending_and_keeps_the_retry_ledger(
    make_tracker: Any, state: PipelineState
) -> None:
    """reset(stage) and reset() forget progress; the retry ledger stays."""
    tracker = make_tracker()
    tracker.start("phase1", total=2)
    tracker.complete("phase1")
    tracker.start("phase2", total=2)
    with state.transaction() as txn:
        txn.data["phase2"]["retry"] = {"attempts": 3}
    tracker.reset("phase1")
    assert state.read()["phase1"] == {"status": "pending"}
    tracker.start("phase1", total=5)  # allowed again, fresh
    tracker.reset()
    assert state.read()["phase2"] == {"status": "pending", "retry": {"attempts": 3}}
    assert tracker.status()["status"] == "pending"
    with pytest.raises(ProgressError, match="not running"):
        tracker.update("phase1", 1)


def test_skip_and_fail_from_pending(make_tracker: Any) -> None:
    """A stage can be skipped or failed without being started."""
    tracker = make_tracker()
    tracker.skip("phase1")
    tracker.fail("phase2", "precondition not met")
    status = tracker.status()
    assert status["stages"]["phase1"]["status"] == "skipped"
    assert status["stages"]["phase2"]["status"] == "failed"
    assert tracker.state.read()["phase2"]["progress"]["error"] == "precondition not met"


# -- retries ---------------------------------------------------------------------


def test_retries_come_from_the_retry_ledger(make_tracker: Any, state: PipelineState) -> None:
    """retries = attempts - 1 from data[stage]['retry']; a stage set back to running shows so."""
    tracker = make_tracker()
    assert tracker.status()["stages"]["phase1"]["retries"] == 0
    with tracker.stage("phase1", total=10) as st:
        st.update(4)

    def attempt() -> None:
        with tracker.stage("phase2", total=10) as st:
            st.update(6)
            raise RuntimeError("flaky")

    with pytest.raises(RuntimeError):
        attempt()
    # What RetryHandler does before the next attempt.
    with state.transaction() as txn:
        txn.data["phase2"]["retry"] = {"attempts": 2, "last_error": "flaky"}
        txn.data["phase2"]["status"] = "running"
    stage = tracker.status()["stages"]["phase2"]
    assert (stage["status"], stage["retries"]) == ("running", 1)
    handle = tracker.start("phase2")
    assert handle.current == 6
    tracker.complete("phase2")
    assert tracker.status()["stages"]["phase2"]["retries"] == 1
    assert state.read()["phase2"]["retry"]["last_error"] == "flaky"


def test_a_real_retry_handler_and_the_tracker_agree(
    make_tracker: Any, state: PipelineState
) -> None:
    """Each retry resumes the stage's progress and shows the retry count; success keeps it."""
    retry = pytest.importorskip("pipeline_common.retry")
    tracker = make_tracker()
    handler = retry.RetryHandler(
        max_retries=3, retry_delay=0.01, jitter=False, state=state, sleep=lambda s: None
    )
    seen: list[tuple[float, int]] = []

    def step() -> None:
        with tracker.stage("phase1", total=10) as st:
            seen.append((st.current, tracker.status()["stages"]["phase1"]["retries"]))
            st.update(4)
            if len(seen) < 3:
                raise ConnectionError("flaky")
            st.update(10)

    handler.call("phase1", step)
    assert seen == [(0, 0), (4, 1), (4, 2)]
    stage = tracker.status()["stages"]["phase1"]
    assert (stage["status"], stage["current"], stage["retries"]) == ("success", 10, 2)


def test_a_stage_finished_by_another_writer_refuses_further_updates(
    make_tracker: Any, state: PipelineState
) -> None:
    """If another writer finishes the stage, a flush says so instead of overwriting it."""
    tracker = make_tracker()
    tracker.start("phase1", total=10)
    with state.transaction() as txn:
        txn.data["phase1"]["status"] = "failed"
    with pytest.raises(ProgressError, match="another writer"):
        tracker.update("phase1", 5)
    assert state.read()["phase1"]["status"] == "failed"
    assert state.read()["phase1"]["progress"]["current"] == 0


# -- events ----------------------------------------------------------------------


def test_events_come_in_order_with_a_status_snapshot(make_tracker: Any) -> None:
    """Each change gives one event: its name, its stage and the status after it."""
    tracker = make_tracker()
    events: list[dict[str, Any]] = []
    tracker.subscribe(events.append)
    tracker.start("phase1", total=2)
    tracker.update("phase1", 1)
    tracker.complete("phase1")
    tracker.start("phase2", total=1)
    tracker.fail("phase2", ValueError("bad row"))
    tracker.skip("phase2", reason="optional")
    assert [(e["event"], e["stage"]) for e in events] == [
        ("stage_started", "phase1"),
        ("progress", "phase1"),
        ("stage_completed", "phase1"),
        ("stage_started", "phase2"),
        ("stage_failed", "phase2"),
        ("stage_skipped", "phase2"),
        ("pipeline_completed", None),
    ]
    assert events[0]["status"]["stages"]["phase1"]["status"] == "running"
    assert events[1]["status"]["stages"]["phase1"]["current"] == 1
    assert events[2]["status"]["stages"]["phase1"]["status"] == "success"
    assert events[4]["error"] == "ValueError: bad row"
    assert events[4]["status"]["status"] == "failed"
    assert events[-1]["status"]["status"] == "success"
    assert events[-1]["status"]["overall_progress"] == 100.0


def test_throttled_updates_give_progress_events_only_when_written(make_tracker: Any) -> None:
    """A progress event means progress was written; throttled updates give none."""
    tracker = make_tracker(["phase1"], min_interval=60.0)
    events: list[str] = []
    tracker.subscribe(lambda e: events.append(e["event"]))
    tracker.start("phase1", total=100)
    for i in range(100):
        tracker.update("phase1", i)
    tracker.flush()
    assert events == ["stage_started", "progress"]


def test_a_raising_callback_is_logged_and_never_breaks_the_pipeline(
    make_tracker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback error is logged; the change stands and other callbacks still run."""
    tracker = make_tracker(["phase1"])
    seen: list[str] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("callback bug")

    tracker.subscribe(broken)
    tracker.subscribe(lambda e: seen.append(e["event"]))
    with caplog.at_level(logging.ERROR, logger="pipeline_common.progress"):
        tracker.start("phase1", total=1)
        tracker.complete("phase1")
    assert seen == ["stage_started", "stage_completed", "pipeline_completed"]
    assert tracker.state.read()["phase1"]["status"] == "success"
    assert "callback bug" in caplog.text


def test_unsubscribe_stops_events(make_tracker: Any) -> None:
    """The function subscribe() returns removes the callback."""
    tracker = make_tracker()
    events: list[str] = []
    unsubscribe = tracker.subscribe(lambda e: events.append(e["event"]))
    tracker.start("phase1")
    unsubscribe()
    unsubscribe()
    tracker.complete("phase1")
    assert events == ["stage_started"]


# -- watch -----------------------------------------------------------------------


def test_watch_parses_only_when_the_file_changes_and_times_out(
    make_tracker: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watch() stats the file each interval, reads it only on change, stops at the timeout."""
    tracker = make_tracker()
    tracker.start("phase1", total=10)
    reads: list[int] = []
    real_read: Callable[[], dict[str, Any]] = tracker.state.read

    def counting_read() -> dict[str, Any]:
        reads.append(1)
        return real_read()

    monkeypatch.setattr(tracker.state, "read", counting_read)
    snapshots = list(tracker.watch(interval=1.0, timeout=10.0))
    assert len(snapshots) == 1
    assert len(reads) == 1
    assert clock.sleeps == [1.0] * 10


def test_watch_yields_each_change_and_ends_on_completion(
    make_tracker: Any, clock: FakeClock
) -> None:
    """A change between polls yields a new status; a finished pipeline ends the watch."""
    writer = make_tracker()
    steps: Iterator[Callable[[], object]] = iter(
        [
            lambda: writer.start("phase1", total=2),
            lambda: writer.update("phase1", 1),
            lambda: None,
            lambda: writer.complete("phase1"),
            lambda: writer.skip("phase2"),
        ]
    )

    def sleep(seconds: float) -> None:
        next(steps)()  # one writer step per poll

    tracker = make_tracker(sleep=sleep)
    seen = [s["overall_progress"] for s in tracker.watch(interval=0.01)]
    assert seen == [0.0, 0.0, 25.0, 50.0, 100.0]


def test_watch_sees_a_commit_that_keeps_the_files_stat(make_tracker: Any, clock: FakeClock) -> None:
    """A commit whose file keeps inode, size and mtime (a reused inode in one tick) is seen."""
    writer = make_tracker()
    writer.start("phase1", total=10)
    writer.update("phase1", 3)
    path = writer.state.path
    done: list[int] = []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if done:
            return
        done.append(1)
        before = os.stat(path)
        raw = path.read_bytes()
        with open(path, "r+b") as f:  # same inode, same size, new bytes
            f.write(raw.replace(b'"current": 3', b'"current": 4'))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        with contextlib.suppress(RuntimeError), writer.state.transaction():
            raise RuntimeError("refused: only the log grows")

    tracker = make_tracker(sleep=sleep)
    seen = [s["stages"]["phase1"]["current"] for s in tracker.watch(interval=1.0, timeout=3.0)]
    assert seen == [3, 4]


def test_watch_ends_on_a_failed_pipeline(make_tracker: Any, clock: FakeClock) -> None:
    """A failed pipeline is finished too: watch() yields it and stops without sleeping."""
    tracker = make_tracker()
    tracker.fail("phase1", "broken input")
    assert [s["status"] for s in tracker.watch(interval=1.0)] == ["failed"]
    assert clock.sleeps == []


@pytest.mark.multiprocess
def test_watch_follows_a_pipeline_in_another_process(
    spawn_child: SpawnChild, state_path: Path
) -> None:
    """watch() in this process follows a pipeline run by a child until it completes."""
    child = spawn_child(
        """
        import sys, time
        from pipeline_common import PipelineState
        from pipeline_common.progress import ProgressTracker
        tracker = ProgressTracker(PipelineState(sys.argv[1]), ["phase1", "phase2"], min_interval=0)
        sys.stdin.readline()
        for stage in ("phase1", "phase2"):
            with tracker.stage(stage, total=5) as st:
                for _ in range(5):
                    time.sleep(0.02)
                    st.advance()
        """,
        str(state_path),
    )
    tracker = ProgressTracker(PipelineState(state_path), ["phase1", "phase2"])
    seen: list[dict[str, Any]] = []
    for snapshot in tracker.watch(interval=0.005, timeout=30):
        if not seen:
            child.stdin.write("go\n")
            child.stdin.flush()
        seen.append(snapshot)
    assert child.wait(timeout=30) == 0
    percents = [s["overall_progress"] for s in seen]
    assert seen[0]["status"] == "pending"
    assert seen[-1]["status"] == "success"
    assert percents == sorted(percents)
    assert len(set(percents)) >= 4


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t.update("phase1", -1), "negative"),
        (lambda t: t.update("phase1", 11), "exceed its total: 11 > 10"),
        (lambda t: t.advance("phase1", 11), "exceed"),
        (lambda t: t.advance("phase1", -3), "negative"),
        (lambda t: t.update("phase1", "3"), "must be a number"),
        (lambda t: t.update("phase1", True), "must be a number"),
        (lambda t: t.update("phase1", float("nan")), "must be a number"),
        (lambda t: t.update("phase1", 5, total=-1), "total"),
        (lambda t: t.update("phase1", 5, total=4), "exceed"),
        (lambda t: t.update("nope", 1), "unknown stage 'nope'"),
        (lambda t: t.update("phase2", 1), r"not running .* start\('phase2'\)"),
        (lambda t: t.advance("phase2"), "not running"),
        (lambda t: t.complete("phase2"), r"it is pending; call start\('phase2'\) first"),
        (lambda t: t.start("phase1"), "already running"),
        (lambda t: t.start("phase2", total=-5), "total"),
        (lambda t: t.start("phase9"), "unknown stage"),
        (lambda t: t.skip("phase9"), "unknown stage"),
        (lambda t: t.reset("phase9"), "unknown stage"),
    ],
)
def test_bad_calls_raise_progress_error_and_change_nothing(
    make_tracker: Any, state: PipelineState, call: Callable[[Any], None], match: str
) -> None:
    """Bad numbers, unknown stages and calls out of order raise a clear ProgressError."""
    tracker = make_tracker(min_interval=60.0)
    tracker.start("phase1", total=10)
    tracker.update("phase1", 2)
    tracker.flush()
    before = state.read()
    with pytest.raises(ProgressError, match=match):
        call(tracker)
    assert state.read() == before
    assert tracker.status()["stages"]["phase1"]["current"] == 2


def test_finished_stages_refuse_to_run_or_finish_again(make_tracker: Any) -> None:
    """complete/fail/skip of a finished stage, or start without restart, are refused."""
    tracker = make_tracker()
    tracker.start("phase1", total=1)
    tracker.complete("phase1")
    calls: list[Callable[[], object]] = [
        lambda: tracker.start("phase1"),
        lambda: tracker.complete("phase1"),
        lambda: tracker.fail("phase1", "late"),
        lambda: tracker.skip("phase1"),
    ]
    for call in calls:
        with pytest.raises(ProgressError, match=r"already success|it is success"):
            call()
    assert tracker.start("phase1", total=3, restart=True).current == 0
    assert tracker.state.read()["phase1"]["status"] == "running"


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "at least one stage"),
        ("phase1", "not the string"),
        (["phase1", "phase1"], "listed twice"),
        ([""], "non-empty string"),
        ({"phase1": 0}, "weight"),
        ({"phase1": -1.0}, "weight"),
        ({"phase1": float("inf")}, "weight"),
        ({"phase1": "heavy"}, "weight"),
    ],
)
def test_bad_stage_lists_are_refused(state: PipelineState, stages: Any, match: str) -> None:
    """The constructor checks the stage names and weights."""
    with pytest.raises(ProgressError, match=match):
        ProgressTracker(state, stages)


def test_bad_min_interval_is_refused(state: PipelineState) -> None:
    """min_interval must be a number >= 0."""
    with pytest.raises(ProgressError, match="min_interval"):
        ProgressTracker(state, ["phase1"], min_interval=-1)


def test_a_foreign_value_under_a_stage_name_is_never_overwritten(
    make_tracker: Any, state: PipelineState
) -> None:
    """A non-object under a stage's key is reported, not replaced."""
    state.write({"stage_a": [1, 2, 3], "stage_b": {"status": "weird"}})
    tracker = make_tracker(["stage_a", "stage_b"])
    with pytest.raises(ProgressError, match=r"data\['stage_a'\] is a list"):
        tracker.start("stage_a")
    with pytest.raises(ProgressError, match="stage_a"):
        tracker.status()
    assert state.read()["stage_a"] == [1, 2, 3]
    state.write({"stage_b": {"status": "weird"}})
    with pytest.raises(ProgressError, match="'weird'"):
        tracker.status()


def test_progress_error_is_a_value_error_and_pickles(state: PipelineState) -> None:
    """ProgressError subclasses StateError and ValueError and keeps its facts when pickled."""
    tracker = ProgressTracker(state, ["phase1"])
    with pytest.raises(ProgressError) as caught:
        tracker.update("phase1", 1)
    err = caught.value
    assert isinstance(err, StateError)
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.stage, copy.path, str(copy)) == ("phase1", state.path, str(err))


# -- transactions and threads -------------------------------------------------------


def test_calls_inside_an_outer_transaction_join_it(make_tracker: Any, state: PipelineState) -> None:
    """Inside state.transaction() the tracker joins it: one commit for everything."""
    tracker = make_tracker()
    before = commits(state)
    with state.transaction(operation="batch") as txn:
        tracker.start("phase1", total=3)
        tracker.update("phase1", 3)
        tracker.complete("phase1")
        txn.data["note"] = "together"
    history = state.get_transaction_history(limit=10)
    assert commits(state) == before + 1
    assert history[0]["operation"] == "batch"
    assert state.read()["phase1"]["status"] == "success"


def test_an_outer_rollback_undoes_the_trackers_changes(
    make_tracker: Any, state: PipelineState
) -> None:
    """If the outer transaction fails, the stage is as before and can be started again."""
    tracker = make_tracker()

    def run() -> None:
        with state.transaction():
            tracker.start("phase1", total=3)
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        run()
    assert tracker.status()["stages"]["phase1"]["status"] == "pending"
    tracker.start("phase1", total=3)
    assert tracker.status()["stages"]["phase1"]["status"] == "running"


def test_threads_update_concurrently_without_losing_counts(state: PipelineState) -> None:
    """Several threads advance stages (one shared) while another holds transactions."""
    tracker = ProgressTracker(state, ["phase1", "phase2", "phase3"], min_interval=0.02)
    tracker.start("phase1", total=4000)
    tracker.start("phase2", total=1000)
    errors: list[BaseException] = []

    def work(stage: str, n: int) -> None:
        try:
            for _ in range(n):
                tracker.advance(stage)
        except BaseException as exc:
            errors.append(exc)

    def outer() -> None:
        try:
            for _ in range(20):
                with state.transaction() as txn:
                    txn.data["counter"] = txn.data.get("counter", 0) + 1
                    tracker.flush()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=("phase1", 1000)) for _ in range(4)]
    threads.append(threading.Thread(target=work, args=("phase2", 1000)))
    threads.append(threading.Thread(target=outer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    tracker.complete("phase1")
    tracker.complete("phase2")
    data = state.read()
    assert data["phase1"]["progress"]["current"] == 4000
    assert data["phase2"]["progress"]["current"] == 1000
    assert data["counter"] == 20
    tracker.close()
