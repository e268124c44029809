"""Bugs found by review, each reproduced before it was fixed; one test per bug."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import (
    PipelineState,
    StateLockError,
    StateReadError,
    StateTransaction,
    StateWriteError,
)
from pipeline_common.testing import inject_fault


@pytest.fixture
def holder(state_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process that holds the state's lock for about a second."""
    code = textwrap.dedent(
        f"""
        import time
        from pipeline_common import PipelineState
        with PipelineState({str(state_path)!r}).transaction(operation="holder"):
            print("held", flush=True)
            time.sleep(1.0)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.wait(timeout=20)
    proc.stdout.close()


def test_big_integers_stay_exact_after_an_outside_edit_and_a_recover_record(
    state: PipelineState,
) -> None:
    """A recover record for a file with integers beyond 64 bits keeps readers exact."""
    state.write({"n": 1})
    state.path.write_text(json.dumps({"n": 123456789012345678901234567890}))
    state.repair()  # logs a recover record for the outside edit
    with state.transaction() as txn:
        txn.data["c"] = 3
    assert state.read()["n"] == 123456789012345678901234567890
    assert type(state.read()["n"]) is int


@pytest.mark.multiprocess
def test_an_interrupt_while_waiting_for_the_lock_leaves_it_free(
    state: PipelineState, holder: subprocess.Popen[str]
) -> None:
    """Ctrl-C during the lock wait never leaves this process holding the lock later."""

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt), state.transaction():
            pytest.fail("the block must not run")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    holder.wait(timeout=20)
    deadline = time.monotonic() + 5
    while state.lock_info().held and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not state.lock_info().held
    with state.transaction() as txn:
        txn.data["after"] = True
    assert state.read()["after"] is True


@pytest.mark.multiprocess
def test_repeated_lock_timeouts_do_not_pile_up_waiter_threads(
    state_path: Path, holder: subprocess.Popen[str]
) -> None:
    """Timing out again and again against one holder reuses one waiting thread."""
    state = PipelineState(state_path, timeout=0.01)
    before = threading.active_count()
    for _ in range(20):
        with pytest.raises(StateLockError):
            state.write({"x": 1})
    assert threading.active_count() - before <= 1
    holder.wait(timeout=20)
    state.timeout = 5
    state.write({"x": 2})
    assert state.read() == {"x": 2}


def test_a_bad_counter_in_the_log_does_not_break_transactions(state: PipelineState) -> None:
    """A log line whose seq is not an integer is skipped, not a crash that leaks the lock."""
    state.write({"a": 1})
    with state.log_path.open("a", encoding="utf-8") as fh:
        fh.write('{"seq": null, "generation": "x", "success": true}\n')
    with state.transaction() as txn:
        txn.data["a"] = 2
    with state.transaction() as txn:
        assert not txn.nested
        txn.data["a"] = 3
    assert state.read() == {"a": 3}


def test_a_task_started_inside_an_async_transaction_does_not_join_it_later(
    state: PipelineState,
) -> None:
    """A task created in the block and run after it commits its own writes."""

    async def main() -> asyncio.Task[None]:
        async def later() -> None:
            await asyncio.sleep(0.05)
            with state.transaction() as txn:
                assert not txn.nested
                txn.data["from_task"] = True

        async with state.atransaction() as txn:
            txn.data["outer"] = True
            task = asyncio.create_task(later())
        await task
        return task

    asyncio.run(main())
    assert state.read() == {"outer": True, "from_task": True}


def test_non_json_details_never_fail_a_commit(state: PipelineState) -> None:
    """A datetime in txn.details is logged as text; the commit returns normally."""
    when = datetime(2026, 1, 2, tzinfo=timezone.utc)
    with state.transaction() as txn:
        txn.data["a"] = 1
        txn.details["when"] = when
    assert state.read() == {"a": 1}
    assert state.history(1)[0].details["when"] == str(when)


def test_a_new_dict_assigned_in_a_nested_transaction_is_kept(state: PipelineState) -> None:
    """txn.data = {...} in a joined transaction replaces the outer content, as it would alone."""
    with state.transaction() as outer:
        outer.data["outer"] = 1
        with state.transaction() as inner:
            inner.data = {"reset": True}
    assert state.read() == {"reset": True}


def test_a_failed_compressed_backup_leaves_no_temp_file(state_path: Path) -> None:
    """ENOSPC while writing a .json.gz backup: typed error, state unchanged, no temp left."""
    state = PipelineState(state_path, compress_backups=True)
    state.write({"n": 1})
    before = state_path.read_bytes()
    for _ in range(3):
        with (
            inject_fault("write", path=".backup.tmp", errno=28),
            pytest.raises(StateWriteError) as info,
        ):
            state.write({"n": 2})
        assert info.value.step == "write compressed backup"
    assert state_path.read_bytes() == before
    assert [p.name for p in state.backups_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_a_number_too_large_for_a_float_is_a_read_error(state: PipelineState) -> None:
    """1e400 in the file is a StateReadError, not an infinity that poisons later commits."""
    state.path.write_text('{"x": 1e400}')
    with pytest.raises(StateReadError, match="too large"):
        state.read()


def test_an_infinite_timeout_waits_instead_of_overflowing(state_path: Path) -> None:
    """timeout=float('inf') means wait forever, not a raw OverflowError."""
    state = PipelineState(state_path, timeout=float("inf"))
    state.write({"a": 1})
    assert state.read() == {"a": 1}
    assert os.path.exists(state.lock_path)


# -- second review: the CLI, the log reader, the test kit ----------------------------------


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline_common", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def test_cli_restore_never_prunes_backups_the_pipeline_keeps(tmp_path: Path) -> None:
    """The CLI does not know the pipeline's max_backups: it must not prune down to 50."""
    state = PipelineState(tmp_path / "p.json", max_backups=100)
    for i in range(60):
        state.write({"n": i})
    assert len(state.list_backups(None)) == 59
    result = _cli(tmp_path, "restore", "p.json", "30", "--yes")
    assert result.returncode == 0, result.stderr
    assert len(state.list_backups(None)) == 60  # the replaced version was added, none pruned
    assert _cli(tmp_path, "verify", "p.json").returncode == 0


def test_cli_takes_the_pipeline_schema_and_restores_without_revalidating(tmp_path: Path) -> None:
    """--schema MODULE:CLASS checks a custom-schema state; restore needs no schema at all."""
    (tmp_path / "mymodels.py").write_text(
        "from pydantic import BaseModel, ConfigDict\n"
        "class State(BaseModel):\n"
        "    model_config = ConfigDict(extra='allow')\n"
        "    phases: list[str]\n"
    )
    state = PipelineState(tmp_path / "p.json", schema=None)
    state.write({"phases": ["a"]}, validate=False)
    state.write({"phases": ["a", "b"]}, validate=False)
    default = _cli(tmp_path, "verify", "p.json")
    assert default.returncode == 1
    assert "phases must be an object" in default.stdout
    assert "fix the data in the transaction" not in default.stdout
    custom = _cli(tmp_path, "verify", "p.json", "--schema", "mymodels:State")
    assert custom.returncode == 0, custom.stdout + custom.stderr
    assert _cli(tmp_path, "restore", "p.json", "1", "--yes").returncode == 0
    assert state.read() == {"phases": ["a"]}
    bad = _cli(tmp_path, "verify", "p.json", "--schema", "nosuchmodule:X")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "record",
    [
        '{"seq": 9, "success": true, "sha256": "ab"}',
        '{"seq": 9, "generation": 9, "success": true, "sha256": 5}',
        '{"seq": 9, "generation": 9, "success": true, "sha256": "ab", "stat": [[1]]}',
        '{"seq": 9, "generation": 9, "success": true, "details": "oops"}',
        '{"seq": 9, "generation": 9, "success": true, "details": {"backup": ["x"]}}',
        '{"seq": 9, "generation": 9, "success": true, "duration_ms": "x"}',
        '{"seq": 9, "generation": 9, "success": true, "changes": 5}',
    ],
)
def test_a_badly_typed_log_record_is_reported_not_a_crash(tmp_path: Path, record: str) -> None:
    """verify, backups, diff, show and history survive a tampered record (verify flags it)."""
    state = PipelineState(tmp_path / "p.json")
    for i in range(3):
        state.write({"n": i})
    with state.log_path.open("a", encoding="utf-8") as fh:
        fh.write(record + "\n")
    report = state.verify()
    assert not report
    assert any(c.name == "log chain intact" and not c.ok for c in report.checks)
    for command in (["verify"], ["backups"], ["diff", "1"], ["show"], ["history"]):
        result = _cli(tmp_path, command[0], "p.json", *command[1:])
        assert result.returncode in (0, 1), (command, result.stderr)
        assert "unexpected" not in result.stderr, (command, result.stderr)


def test_cli_pointer_follows_rfc_6901(tmp_path: Path) -> None:
    """ "/" is the key "", digits must be ASCII without leading zeros."""
    state = PipelineState(tmp_path / "p.json")
    state.write({"": 5, "items": [10, 11]})
    show = ["show", "p.json", "--json", "--pointer"]
    assert json.loads(_cli(tmp_path, *show, "/").stdout)["data"] == 5
    assert json.loads(_cli(tmp_path, *show, "/items/1").stdout)["data"] == 11
    for bad in ("/items/01", "/items/\u00b2"):
        result = _cli(tmp_path, "show", "p.json", "--pointer", bad)
        assert result.returncode == 1, (bad, result.stderr)
        assert "unexpected" not in result.stderr
    assert _cli(tmp_path, "diff", "p.json", "\u00b2").returncode == 2


@pytest.mark.multiprocess
def test_random_kills_never_leaves_a_child_writing(tmp_path: Path) -> None:
    """An interrupt during random_kills' wait still kills and reaps the child."""
    from pipeline_common.testing import random_kills

    path = tmp_path / "p.json"
    state = PipelineState(path)
    state.write({"n": 0})

    def step() -> None:
        with PipelineState(path).transaction() as txn:
            txn.data["n"] += 1

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            for _ in random_kills(step, path, kills=1000, seed=1, max_delay=0.5):
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    first = path.read_bytes()
    time.sleep(0.3)
    assert path.read_bytes() == first  # nobody is writing any more


# -- third review: progress and retry ----------------------------------------------------


def test_retry_giving_up_inside_a_stage_keeps_the_real_error_and_the_progress(
    state: PipelineState,
) -> None:
    """RetryExhaustedError surfaces from tracker.stage(), and the file keeps the numbers."""
    from pipeline_common import ProgressTracker, RetryExhaustedError, RetryHandler

    retry = RetryHandler(max_retries=1, retry_delay=0, jitter=False, state=state)

    def fetch() -> None:
        raise ConnectionError("down")

    def run_stage() -> None:
        with ProgressTracker(state, ["phase1"]) as tracker, tracker.stage("phase1", total=10) as st:
            st.advance(6)
            retry.call("phase1", fetch)

    with pytest.raises(RetryExhaustedError):
        run_stage()
    record = state.read()["phase1"]
    assert record["status"] == "failed"
    assert record["progress"]["current"] == 6
    assert "RetryExhaustedError" in record["progress"]["error"]


def test_a_raising_retry_predicate_uncounts_the_attempt(state: PipelineState) -> None:
    """A predicate that raises leaves no attempt in flight and the stage as it was."""
    from pipeline_common import RetryHandler

    state.write({"phase2": {"status": "pending"}})

    def predicate(exc: BaseException) -> bool:
        raise ValueError("the predicate broke")

    retry = RetryHandler(max_retries=3, retry_delay=0, retry_on=predicate, state=state)

    def step() -> None:
        raise OSError("flaky")

    with pytest.raises(ValueError, match="predicate broke"):
        retry.call("phase2", step)
    record = state.read()["phase2"]
    assert record["status"] == "pending"
    assert record["retry"]["attempts"] == 0
    assert not record["retry"].get("in_flight")


def test_complete_writes_numbers_whose_flush_was_rolled_back(state: PipelineState) -> None:
    """A flush that joined an outer transaction that rolled back is redone by complete()."""
    from pipeline_common import ProgressTracker

    tracker = ProgressTracker(state, ["phase1"], min_interval=0)
    tracker.start("phase1", total=100)

    def update_then_roll_back() -> None:
        with state.transaction():
            tracker.update("phase1", 40)  # flushed inside the outer transaction...
            raise RuntimeError("...which rolls back")

    with pytest.raises(RuntimeError):
        update_then_roll_back()
    tracker.complete("phase1")
    assert state.read()["phase1"]["progress"]["current"] == 40
    tracker.close()


def test_progress_refuses_an_infinite_count(state: PipelineState) -> None:
    """advance() past the float range is a ProgressError, and the stage still completes."""
    from pipeline_common import ProgressError, ProgressTracker

    tracker = ProgressTracker(state, ["phase1"], min_interval=0)
    tracker.start("phase1")
    tracker.update("phase1", 1e308)
    with pytest.raises(ProgressError, match="finite"):
        tracker.advance("phase1", 1e308)
    tracker.complete("phase1")
    assert state.read()["phase1"]["status"] == "success"
    tracker.close()


def test_an_async_callable_object_is_refused_by_call(state: PipelineState) -> None:
    """call() on an object with async __call__ raises TypeError instead of a false success."""
    from pipeline_common import RetryHandler

    class Fetch:
        async def __call__(self) -> int:
            return 1

    retry = RetryHandler(max_retries=2, retry_delay=0, state=state)
    with pytest.raises(TypeError, match="acall"):
        retry.call("phase4", Fetch())
    assert state.read()["phase4"]["retry"]["attempts"] == 0


def test_zero_retry_delay_never_overflows_into_max_delay() -> None:
    """retry_delay=0 stays 0 even when the backoff power overflows."""
    from pipeline_common import RetryHandler

    slept: list[float] = []
    retry = RetryHandler(
        max_retries=4,
        retry_delay=0,
        backoff_multiplier=1e200,
        jitter=False,
        sleep=slept.append,
    )

    def step() -> None:
        raise OSError("x")

    with pytest.raises(Exception, match="gave up"):
        retry.call("op", step)
    assert all(d == 0 for d in slept)


# -- trust, round 2 (issue 12) ---------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda line: b'{"seq": 3, "operation": "edited by hand"\n', id="no-parse"),
        pytest.param(
            lambda line: line.replace(b'"prev":"', b'"prev":"0'), id="parses-but-no-chain"
        ),
    ],
)
def test_a_damaged_complete_last_log_line_is_reported_and_moved_aside_never_erased(
    tmp_path: Path, edit: Callable[[bytes], bytes]
) -> None:
    """Defect 5: a complete last line that does not parse or chain is damage, not a torn
    append: verify says so, and the next commit (another process) moves it, byte for
    byte, to transactions.log.damaged instead of deleting it."""
    s = PipelineState(tmp_path / "q.json")
    for i in range(3):
        s.write({"n": i})
    lines = s.log_path.read_bytes().splitlines(keepends=True)
    damaged = edit(lines[-1])
    assert damaged != lines[-1]
    assert damaged.endswith(b"\n")
    s.log_path.write_bytes(b"".join([*lines[:-1], damaged]))
    detail = next(c.detail for c in s.verify().checks if c.name == "log chain intact")
    assert "torn" not in detail
    assert "damaged last line is kept" in detail
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from pipeline_common import PipelineState as P\nP({str(s.path)!r}).write({{'n': 9}})",
        ],
        check=True,
    )
    aside = s.log_path.with_name("transactions.log.damaged").read_bytes()
    assert aside.splitlines(keepends=True)[-1] == damaged  # kept as it was
    ops = [json.loads(x)["operation"] for x in s.log_path.read_text().splitlines()]
    assert ops == ["write", "write", "recover", "write"]  # the commit it described is recorded
    report = s.verify()
    assert [c.name for c in report.checks if not c.ok] == ["log chain intact"]
    assert "moved aside" in repr(report)  # until an operator has read and removed it
    s.log_path.with_name("transactions.log.damaged").unlink()
    assert s.verify()


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda t: setattr(t, "details", None), id="details-None"),
        pytest.param(lambda t: setattr(t, "details", [1]), id="details-list"),
        pytest.param(lambda t: setattr(t, "operation", 123), id="operation-int"),
        pytest.param(lambda t: setattr(t, "operation", ""), id="operation-empty"),
    ],
)
def test_what_the_block_spoils_is_refused_before_the_replace(
    tmp_path: Path, spoil: Callable[[StateTransaction], None]
) -> None:
    """Defect 6: txn.details / txn.operation reassigned in the block raise before the
    replace: the file is unchanged and the error is not a lie."""
    s = PipelineState(tmp_path / "d.json")
    s.write({"n": 0})

    def block() -> None:
        with s.transaction() as t:
            t.data["n"] = 1
            spoil(t)

    with pytest.raises((TypeError, ValueError)):
        block()
    assert s.read() == {"n": 0}
    assert s.version == 1
    with s.transaction() as t:
        t.data["n"] = 2
    assert s.read() == {"n": 2}
