"""Pipeline: prerequisites, one runner per stage, resume after kill -9, failures, retries, reset."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import (
    Pipeline,
    PipelineState,
    PlanError,
    PrerequisiteError,
    ProgressError,
    StageBusyError,
    StageContext,
    StageFailedError,
)
from pipeline_common._owner import proc_start
from pipeline_common.pipeline import reset_stages

TIMEOUT = 60.0


def log_ops(state: PipelineState) -> list[str]:
    """The operations of the log, oldest first."""
    return [r["operation"] for r in reversed(state.get_transaction_history(limit=10_000))]


def effects(path: Path) -> list[str]:
    """The side effects the stages appended to ``path``, one per line."""
    return path.read_text(encoding="utf-8").split() if path.exists() else []


def three_stages(path: Path, calls: list[str]) -> Pipeline:
    """extract -> tts -> mix, each noting its call."""
    pipeline = Pipeline(path, durability="atomic", sleep=lambda s: None)

    @pipeline.stage()
    def extract(ctx: StageContext) -> None:
        calls.append("extract")
        ctx.record["files"] = ["book.txt"]

    @pipeline.stage(requires=["extract"], weight=3)
    def tts(ctx: StageContext) -> None:
        calls.append("tts")
        for _ in ctx.track(range(4)):
            pass

    @pipeline.stage(requires=["tts"])
    def mix(ctx: StageContext) -> None:
        calls.append("mix")

    return pipeline


# -- the runner in one process ----------------------------------------------------------


def test_run_runs_every_stage_once_with_one_commit_per_state_change(tmp_path: Path) -> None:
    """A run is the plan commit, then a start and an outcome commit per stage; a rerun skips."""
    calls: list[str] = []
    pipeline = three_stages(tmp_path / "p.json", calls)
    result = pipeline.run()
    assert result.ran == ["extract", "tts", "mix"]
    assert calls == ["extract", "tts", "mix"]
    assert log_ops(pipeline.state) == [
        "plan",
        "stage extract: start",
        "stage extract: success",
        "stage tts: start",
        "stage tts: success",
        "stage mix: start",
        "stage mix: success",
    ]
    data = pipeline.state.read()
    assert data["extract"]["files"] == ["book.txt"]
    assert data["tts"]["progress"]["current"] == 4
    status = pipeline.status()
    assert status["status"] == "success"
    assert [s["attempts"] for s in status["stages"].values()] == [1, 1, 1]
    assert all(s["owner"] is None for s in status["stages"].values())

    again = three_stages(tmp_path / "p.json", calls).run()
    assert again.already_done == ["extract", "tts", "mix"]
    assert calls == ["extract", "tts", "mix"]  # nothing called twice
    assert len(log_ops(pipeline.state)) == 7  # and nothing written


def test_prerequisites_are_refused_with_nothing_written(tmp_path: Path) -> None:
    """run('tts') before extract: PrerequisiteError naming it; file bytes and log unchanged."""
    calls: list[str] = []
    pipeline = three_stages(tmp_path / "p.json", calls)
    pipeline.status()  # declares the plan
    raw = pipeline.state.path.read_bytes()
    log = pipeline.state.log_path.read_bytes()
    with pytest.raises(PrerequisiteError, match=r"'extract' \(pending\)") as caught:
        pipeline.run("tts")
    assert caught.value.missing == {"extract": "pending"}
    assert caught.value.stage == "tts"
    assert pipeline.state.path.read_bytes() == raw
    assert pipeline.state.log_path.read_bytes() == log
    assert calls == []
    pipeline.run("extract")
    pipeline.run("tts")
    assert calls == ["extract", "tts"]


def test_a_bad_plan_is_refused_when_declared(tmp_path: Path) -> None:
    """An unknown requirement, a duplicate name: PlanError at the decorator."""
    pipeline = Pipeline(tmp_path / "p.json")
    with pytest.raises(PlanError, match="'nope'"):

        @pipeline.stage(requires=["nope"])
        def a(ctx: StageContext) -> None: ...

    @pipeline.stage()
    def b(ctx: StageContext) -> None: ...

    with pytest.raises(PlanError, match="twice"):
        pipeline.stage(name="b")(b)
    assert not pipeline.state.path.exists()


def test_a_failed_stage_is_recorded_and_its_dependents_do_not_run(tmp_path: Path) -> None:
    """StageFailedError names the stage; the record has type, message, traceback."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic")
    events: list[str] = []
    pipeline.subscribe(lambda e: events.append(e["event"]))

    @pipeline.stage()
    def load(ctx: StageContext) -> None:
        raise KeyError("chapter 3")

    @pipeline.stage(requires=["load"])
    def mix(ctx: StageContext) -> None:
        raise AssertionError("must not run")

    with pytest.raises(StageFailedError, match=r"stage 'load' failed: KeyError") as caught:
        pipeline.run()
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.stage == "load"
    record = pipeline.state.read()["load"]
    assert record["status"] == "failed"
    assert record["owner"] is None
    assert record["error"]["type"] == "KeyError"
    assert "chapter 3" in record["error"]["message"]
    assert "in load" in record["error"]["traceback"]
    status = pipeline.status()
    assert status["stages"]["load"]["error"] == "KeyError: 'chapter 3'"
    assert status["stages"]["mix"]["status"] == "pending"
    assert events[-2:] == ["stage_failed", "pipeline_failed"]


def test_retries_go_through_the_retry_handler_and_show_in_status(tmp_path: Path) -> None:
    """A flaky stage succeeds on its 3rd attempt; a hopeless one gives up after 3."""
    sleeps: list[float] = []
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic", sleep=sleeps.append)
    tries = {"flaky": 0, "hopeless": 0}

    @pipeline.stage(retries=2, retry_on=(OSError,), retry_delay=0.5, jitter=False)
    def flaky(ctx: StageContext) -> None:
        tries["flaky"] += 1
        if tries["flaky"] < 3:
            raise OSError("network down")

    @pipeline.stage(retries=2, retry_on=(OSError,), retry_delay=0.5, jitter=False)
    def hopeless(ctx: StageContext) -> None:
        tries["hopeless"] += 1
        raise OSError("disk gone")

    with pytest.raises(StageFailedError, match="after 3 attempts: OSError: disk gone"):
        pipeline.run()
    assert tries == {"flaky": 3, "hopeless": 3}
    assert sleeps == [0.5, 1.0, 0.5, 1.0]
    status = pipeline.status()["stages"]
    assert (status["flaky"]["status"], status["flaky"]["attempts"]) == ("success", 3)
    assert status["flaky"]["retries"] == 2
    assert (status["hopeless"]["status"], status["hopeless"]["attempts"]) == ("failed", 3)
    assert pipeline.state.read()["hopeless"]["error"]["gave_up_after"] == 3
    # a new run after a finished failure is a new series of attempts
    with pytest.raises(StageFailedError):
        pipeline.run()
    assert tries["hopeless"] == 6
    assert pipeline.status()["stages"]["hopeless"]["attempts"] == 6


def test_a_non_retryable_error_is_not_retried(tmp_path: Path) -> None:
    """retry_on=(OSError,) lets a ValueError through at once."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic", sleep=lambda s: None)
    tries: list[int] = []

    @pipeline.stage(retries=3, retry_on=(OSError,))
    def parse(ctx: StageContext) -> None:
        tries.append(1)
        raise ValueError("bad input")

    with pytest.raises(StageFailedError, match="ValueError: bad input"):
        pipeline.run()
    assert tries == [1]


def test_keyboard_interrupt_marks_the_stage_failed_and_propagates(tmp_path: Path) -> None:
    """Ctrl-C: the stage is failed (interrupted), the interrupt goes on; a rerun runs it."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic")
    stop = [True]

    @pipeline.stage()
    def work(ctx: StageContext) -> None:
        if stop[0]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run()
    record = pipeline.state.read()["work"]
    assert record["status"] == "failed"
    assert record["error"]["interrupted"] is True
    assert record["interruptions"][-1]["reason"] == "KeyboardInterrupt"
    stop[0] = False
    assert pipeline.run().ran == ["work"]
    assert pipeline.status()["stages"]["work"]["attempts"] == 2


def test_skip_record_and_force(tmp_path: Path) -> None:
    """ctx.skip ends a stage as skipped; force re-runs a done stage; reserved keys refused."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic")
    runs: list[str] = []

    @pipeline.stage()
    def optional(ctx: StageContext) -> None:
        runs.append("optional")
        ctx.skip("no subtitles in this book")

    @pipeline.stage(requires=["optional"])
    def final(ctx: StageContext) -> None:
        runs.append("final")
        ctx.record["n"] = len(runs)

    result = pipeline.run()
    assert (result.skipped, result.ran) == (["optional"], ["final"])
    assert pipeline.state.read()["optional"]["skipped_reason"] == "no subtitles in this book"
    assert pipeline.run(force=["final"]).ran == ["final"]
    assert pipeline.state.read()["final"]["n"] == 3

    @pipeline.stage()
    def sneaky(ctx: StageContext) -> None:
        ctx.record["status"] = "success"

    with pytest.raises(StageFailedError, match="reserved key"):
        pipeline.run("sneaky")
    assert pipeline.state.read()["sneaky"]["status"] == "failed"


def test_reset_downstream_is_one_logged_backed_up_commit(tmp_path: Path) -> None:
    """reset('extract', downstream=True) resets extract, tts, mix; an unrelated stage stays."""
    calls: list[str] = []
    pipeline = three_stages(tmp_path / "p.json", calls)

    @pipeline.stage()
    def cover(ctx: StageContext) -> None:
        calls.append("cover")

    pipeline.run()
    backups = len(pipeline.state.backups())
    assert pipeline.reset("tts") == ["tts"]
    assert pipeline.reset("extract", downstream=True) == ["extract", "tts", "mix"]
    assert log_ops(pipeline.state)[-2:] == ["reset tts", "reset extract"]
    assert len(pipeline.state.backups()) == backups + 2
    data = pipeline.state.read()
    assert data["tts"] == {"status": "pending"}
    assert data["cover"]["status"] == "success"
    calls.clear()
    assert pipeline.run().ran == ["extract", "tts", "mix"]
    assert calls == ["extract", "tts", "mix"]


def test_plan_changes_are_refused_or_accepted(tmp_path: Path) -> None:
    """Renaming a stage with progress: PlanError; replace_plan=True accepts; adding is fine."""
    path = tmp_path / "p.json"
    first = Pipeline(path, durability="atomic")

    @first.stage()
    def extract(ctx: StageContext) -> None: ...

    first.run()
    renamed = Pipeline(path, durability="atomic")
    renamed.stage(name="extract_text")(extract)
    raw = path.read_bytes()
    with pytest.raises(PlanError, match="'extract'"):
        renamed.run()
    assert path.read_bytes() == raw
    grown = Pipeline(path, durability="atomic")
    grown.stage()(extract)
    grown.stage(name="tts", requires=["extract"])(extract)
    assert grown.run().ran == ["tts"]
    forced = Pipeline(path, durability="atomic", replace_plan=True)
    forced.stage(name="extract_text")(extract)
    assert forced.run().ran == ["extract_text"]
    assert [s["name"] for s in forced.state.read()["_pipeline"]["stages"]] == ["extract_text"]


def test_async_stages_run_with_arun_and_run(tmp_path: Path) -> None:
    """async def stages are awaited by arun(), and by run() through asyncio.run."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic")
    seen: list[str] = []

    @pipeline.stage()
    async def fetch(ctx: StageContext) -> None:
        await asyncio.sleep(0)
        seen.append("fetch")

    @pipeline.stage(requires=["fetch"])
    def store(ctx: StageContext) -> None:
        seen.append("store")

    assert asyncio.run(pipeline.arun()).ran == ["fetch", "store"]
    assert pipeline.run(force=True).ran == ["fetch", "store"]
    assert seen == ["fetch", "store", "fetch", "store"]


def test_unknown_stage_names_are_refused(tmp_path: Path) -> None:
    """run('nope') names the known stages."""
    pipeline = three_stages(tmp_path / "p.json", [])
    with pytest.raises(ProgressError, match="extract, tts, mix"):
        pipeline.run("nope")


# -- owners: busy, another host, a reused pid ----------------------------------------


def running_record(owner: dict[str, Any]) -> dict[str, Any]:
    """A stage left running by ``owner``."""
    return {"status": "running", "owner": owner, "attempts": 1, "progress": {"current": 0}}


def test_a_stage_owned_by_another_host_is_never_taken_over(tmp_path: Path) -> None:
    """Another host's running stage: StageBusyError saying how to take it over; reset does."""
    calls: list[str] = []
    pipeline = three_stages(tmp_path / "p.json", calls)
    pipeline.status()
    owner = {"pid": 1, "host": "other-host", "since": "2026-01-01T00:00:00Z"}
    with pipeline.state.transaction() as txn:
        txn.data["extract"] = running_record(owner)
    with pytest.raises(StageBusyError, match=r"another host.*pipeline-state reset") as caught:
        pipeline.run()
    assert caught.value.owner["host"] == "other-host"
    assert calls == []
    pipeline.reset("extract")
    assert pipeline.run().ran == ["extract", "tts", "mix"]


def test_a_reused_pid_counts_as_interrupted(tmp_path: Path) -> None:
    """Our own pid with another start time: the recorded owner is gone, the stage re-runs."""
    calls: list[str] = []
    pipeline = three_stages(tmp_path / "p.json", calls)
    pipeline.status()
    me = os.getpid()
    started = proc_start(me)
    assert started is not None
    owner = {"pid": me, "host": os.uname().nodename, "since": "x", "proc_start": started - 1}
    with pipeline.state.transaction() as txn:
        txn.data["extract"] = running_record(owner)
    assert pipeline.run().ran == ["extract", "tts", "mix"]
    interruption = pipeline.state.read()["extract"]["interruptions"][0]
    assert "reused" in interruption["reason"]
    assert interruption["attempt"] == 1
    assert pipeline.status()["stages"]["extract"]["attempts"] == 2


def test_a_live_owner_in_this_process_makes_the_stage_busy(tmp_path: Path) -> None:
    """A stage may not be run again from inside itself: StageBusyError naming this pid."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic")
    seen: list[BaseException] = []

    @pipeline.stage()
    def outer(ctx: StageContext) -> None:
        status = pipeline.status()["stages"]["outer"]
        assert status["owner"]["pid"] == os.getpid()
        try:
            pipeline.run("outer", force=True)
        except StageBusyError as exc:
            seen.append(exc)

    pipeline.run()
    assert len(seen) == 1
    assert f"pid {os.getpid()}" in str(seen[0])


# -- real processes: kill -9, two runners --------------------------------------------

BOOK = """
import os, sys, time
from pathlib import Path
from pipeline_common import Pipeline

HERE = Path(__file__).parent
EFFECTS = HERE / "effects.txt"
pipeline = Pipeline(HERE / "pipeline.json", min_interval=0)


def note(text):
    with open(EFFECTS, "a") as f:
        f.write(text + "\\n")
        f.flush()
        os.fsync(f.fileno())


@pipeline.stage()
def extract(ctx):
    note("extract")
    time.sleep(float(os.environ.get("STAGE_SLEEP", "0")))


@pipeline.stage(requires=["extract"])
def tts(ctx):
    for i in ctx.track(range(10)):
        note(f"tts{i}")
        if i == 5 and os.environ.get("HANG_AT_5"):
            (HERE / "ready").write_text("now")
            time.sleep(60)
    time.sleep(float(os.environ.get("STAGE_SLEEP", "0")))


@pipeline.stage(requires=["tts"])
def mix(ctx):
    note("mix")
    time.sleep(float(os.environ.get("STAGE_SLEEP", "0")))
"""

RUNNER = """
import sys
from pipeline_common import StageBusyError
import book
try:
    result = book.pipeline.run()
except StageBusyError as exc:
    print("busy", exc.stage)
    sys.exit(3)
print("ran", *result.ran)
"""


def start_runner(tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    """A child process running book.pipeline.run() in ``tmp_path``."""
    (tmp_path / "book.py").write_text(BOOK, encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RUNNER)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    """Wait until ``path`` exists (the child reached its hang point)."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.02)


@pytest.mark.multiprocess
def test_kill_9_mid_stage_then_run_again_reruns_only_that_stage(tmp_path: Path) -> None:
    """SIGKILL in tts: it stays running, owned by a dead pid; the next run resumes it."""
    child = start_runner(tmp_path, HANG_AT_5="1")
    wait_for(tmp_path / "ready", child)
    state = PipelineState(tmp_path / "pipeline.json")
    # while the owner lives, a second runner is refused, naming it
    busy = start_runner(tmp_path)
    out, err = busy.communicate(timeout=TIMEOUT)
    assert busy.returncode == 3, (out, err)
    assert "busy tts" in out
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=TIMEOUT)
    assert child.returncode == -signal.SIGKILL

    before = state.read()
    assert before["tts"]["status"] == "running"
    assert before["tts"]["owner"]["pid"] == child.pid
    assert before["tts"]["progress"]["current"] == 5
    again = start_runner(tmp_path)
    out, err = again.communicate(timeout=TIMEOUT)
    assert again.returncode == 0, (out, err)
    assert out.split() == ["ran", "tts", "mix"]
    after = state.read()
    assert after["extract"] == before["extract"]  # untouched
    tts = after["tts"]
    assert tts["status"] == "success"
    assert tts["attempts"] == 2
    assert tts["interruptions"][0]["attempt"] == 1
    assert tts["interruptions"][0]["owner"]["pid"] == child.pid
    assert tts["interruptions"][0]["reason"] == "the owner process is gone"
    assert tts["progress"]["resumed_from"] == 5
    seen = effects(tmp_path / "effects.txt")
    assert seen.count("extract") == 1
    assert [seen.count(f"tts{i}") for i in range(10)] == [1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert seen.count("mix") == 1
    assert state.verify(), state.verify().problems


@pytest.mark.multiprocess
def test_two_runners_started_at_once_run_each_stage_exactly_once(tmp_path: Path) -> None:
    """Two processes run the same plan at once: every side effect happens once."""
    for round_ in range(3):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        runners = [start_runner(folder, STAGE_SLEEP="0.2") for _ in range(2)]
        outputs = [r.communicate(timeout=TIMEOUT) for r in runners]
        codes = sorted(r.returncode for r in runners)
        assert codes in ([0, 0], [0, 3]), outputs
        seen = effects(folder / "effects.txt")
        assert seen.count("extract") == 1
        assert seen.count("mix") == 1
        assert all(seen.count(f"tts{i}") == 1 for i in range(10))
        state = PipelineState(folder / "pipeline.json")
        data = state.read()
        assert [data[s]["status"] for s in ("extract", "tts", "mix")] == ["success"] * 3
        ops = [r.operation for r in state.history(limit=1000) if r.success]
        for stage in ("extract", "tts", "mix"):
            assert ops.count(f"stage {stage}: start") == 1
            assert ops.count(f"stage {stage}: success") == 1
        assert state.verify(), state.verify().problems


def test_errors_pickle_with_their_attributes(tmp_path: Path) -> None:
    """The runner's errors cross process boundaries intact."""
    import pickle

    errors = [
        PrerequisiteError("m", path=tmp_path, stage="tts", missing={"extract": "failed"}),
        StageBusyError("m", path=tmp_path, stage="tts", owner={"pid": 1, "host": "h"}),
        StageFailedError("m", stage="tts", error_type="OSError", error_message="x"),
        PlanError("m", stage="a", orphans=["a"]),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert copy.__dict__ == error.__dict__
    assert isinstance(errors[0], RuntimeError)


def test_record_keys_merge_and_run_refuses_a_running_loop(tmp_path: Path) -> None:
    """ctx.record replaces only its own keys; run() inside an event loop points to arun()."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic")

    @pipeline.stage()
    def stage(ctx: StageContext) -> None:
        ctx.record.pop("old", None)
        ctx.record["new"] = 1
        with ctx.transaction() as txn:
            txn.data["stage"]["side"] = "kept"

    pipeline.status()
    with pipeline.state.transaction() as txn:
        txn.data["stage"] = {"status": "pending", "old": 0, "other": 2}
    pipeline.run()
    record = pipeline.state.read()["stage"]
    assert (record.get("old"), record["new"], record["other"], record["side"]) == (
        None,
        1,
        2,
        "kept",
    )

    @pipeline.stage()
    async def later(ctx: StageContext) -> None: ...

    async def inside_a_loop() -> None:
        with pytest.raises(RuntimeError, match="arun"):
            pipeline.run("later")

    asyncio.run(inside_a_loop())
    assert asyncio.run(pipeline.arun("later")).ran == ["later"]


def test_an_interrupt_between_claim_and_outcome_does_not_wedge_this_process(
    tmp_path: Path,
) -> None:
    """Ctrl-C after the claim committed (here: in a subscriber): the next run takes it over."""
    pipeline = Pipeline(tmp_path / "p.json", durability="atomic")
    runs: list[int] = []

    @pipeline.stage()
    def work(ctx: StageContext) -> None:
        runs.append(1)

    def interrupt(event: dict[str, Any]) -> None:
        if event["event"] == "stage_started" and not runs:
            raise KeyboardInterrupt

    unsubscribe = pipeline.subscribe(interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run()
    unsubscribe()
    left = pipeline.state.read()["work"]
    assert left["status"] == "running"
    assert left["owner"]["pid"] == os.getpid()
    assert pipeline.run().ran == ["work"]  # was StageBusyError naming this very pid
    record = pipeline.state.read()["work"]
    assert record["status"] == "success"
    assert "ended without recording" in record["interruptions"][-1]["reason"]
    assert runs == [1]


def test_a_second_pipeline_in_this_process_sees_a_running_stage_busy(tmp_path: Path) -> None:
    """Another Pipeline object on the same file, while the stage runs: StageBusyError."""
    path = tmp_path / "p.json"
    pipeline = Pipeline(path, durability="atomic")
    seen: list[BaseException] = []

    @pipeline.stage()
    def work(ctx: StageContext) -> None:
        other = Pipeline(path, durability="atomic")
        other.stage(work, name="work")
        try:
            other.run()
        except StageBusyError as exc:
            seen.append(exc)
        with pytest.raises(StageBusyError):
            reset_stages(other.state, "work")

    assert pipeline.run().ran == ["work"]
    assert len(seen) == 1
