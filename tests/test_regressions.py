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
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateLockError, StateReadError, StateWriteError
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
            inject_fault("write", path=".json.gz.tmp", errno=28),
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
