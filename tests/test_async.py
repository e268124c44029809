"""atransaction() and aread(): no lost update under concurrent tasks, nesting joins,
rollback and expect_version behave as in the synchronous API. Driven by asyncio.run."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from pipeline_common import PipelineState, StateConflictError


def test_fifty_concurrent_tasks_lose_no_update(state_path: Path) -> None:
    """50 tasks each read-modify-write with an await inside: the counter ends at 50."""
    state = PipelineState(state_path, timeout=30.0)
    state.write({"count": 0, "by": []})

    async def bump(n: int) -> None:
        async with state.atransaction(operation=f"task {n}") as txn:
            count = txn.data["count"]
            await asyncio.sleep(0)  # let the other tasks run while this one holds the lock
            txn.data["count"] = count + 1
            txn.data["by"].append(n)

    async def main() -> None:
        await asyncio.gather(*(bump(n) for n in range(50)))

    asyncio.run(main())
    data, version = state.read_versioned()
    assert data["count"] == 50
    assert sorted(data["by"]) == list(range(50))
    assert version == 51
    assert not state.lock_info().held


def test_the_event_loop_keeps_running_while_a_task_waits_for_the_lock(
    state: PipelineState,
) -> None:
    """While another thread holds the lock, a waiting atransaction does not block the loop."""
    state.write({"n": 0})
    locked, release = threading.Event(), threading.Event()

    def holder() -> None:
        with state.transaction(operation="holder") as txn:
            locked.set()
            release.wait(10)
            txn.data["n"] = 1

    thread = threading.Thread(target=holder)
    thread.start()
    assert locked.wait(10)
    ticks = 0

    async def main() -> None:
        nonlocal ticks

        async def waiter() -> None:
            async with state.atransaction() as txn:
                txn.data["n"] += 1

        task = asyncio.create_task(waiter())
        for _ in range(5):
            await asyncio.sleep(0.001)
            ticks += 1
        assert not task.done()
        release.set()
        await task

    asyncio.run(main())
    thread.join(10)
    assert ticks == 5
    assert state.read_versioned() == ({"n": 2}, 3)


def test_a_nested_transaction_in_the_same_task_joins_the_async_one(
    state: PipelineState,
) -> None:
    """state.transaction() inside an atransaction of the same task joins it: one commit."""
    state.write({"n": 0})

    async def main() -> None:
        async with state.atransaction(operation="outer") as outer:
            outer.data["n"] = 1
            with state.transaction(operation="inner") as inner:
                assert inner.nested
                assert inner.data is outer.data
                inner.data["inner"] = True
            async with state.atransaction() as again:
                assert again.nested
                again.data["again"] = True
            assert state.read() == {"n": 0}  # nothing committed before the outer exit

    asyncio.run(main())
    assert state.read_versioned() == ({"n": 1, "inner": True, "again": True}, 2)
    assert [r.operation for r in state.history(2)] == ["outer", "write"]


def test_a_failing_nested_block_undoes_only_its_own_changes(state: PipelineState) -> None:
    """An exception escaping the nested block rolls back its part; the outer one commits."""
    state.write({"n": 0})

    def inner_fails() -> None:
        with state.transaction() as inner:
            inner.data["bad"] = True
            raise RuntimeError("inner fails")

    async def main() -> None:
        async with state.atransaction() as outer:
            outer.data["n"] = 1
            with pytest.raises(RuntimeError):
                inner_fails()

    asyncio.run(main())
    assert state.read() == {"n": 1}


def test_an_exception_in_an_async_transaction_rolls_back_and_unlocks(
    state: PipelineState,
) -> None:
    """The error propagates unchanged, the file is untouched and the lock is free."""
    state.write({"n": 0})
    before = state.path.read_bytes()

    async def main() -> None:
        async with state.atransaction(operation="doomed") as txn:
            txn.data["n"] = 99
            raise LookupError("no such chapter")

    with pytest.raises(LookupError, match="no such chapter"):
        asyncio.run(main())
    assert state.path.read_bytes() == before
    assert not state.lock_info().held
    record = state.history(1)[0]
    assert (record.operation, record.success) == ("doomed", False)


def test_async_expect_version_conflict(state: PipelineState) -> None:
    """A stale expect_version raises StateConflictError from the async with, too."""
    state.write({"n": 0})
    state.write({"n": 1})

    async def main() -> None:
        async with state.atransaction(expect_version=1) as txn:
            txn.data["n"] = 2

    with pytest.raises(StateConflictError) as info:
        asyncio.run(main())
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert state.read() == {"n": 1}


def test_a_cancelled_task_leaves_the_lock_free(state: PipelineState) -> None:
    """Cancelling a task inside an atransaction rolls it back and releases the lock."""
    state.write({"n": 0})

    async def main() -> None:
        entered = asyncio.Event()

        async def slow() -> None:
            async with state.atransaction() as txn:
                txn.data["n"] = 5
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(slow())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with state.atransaction() as txn:
            txn.data["n"] += 1

    asyncio.run(main())
    assert state.read_versioned() == ({"n": 1}, 2)


def test_aread_returns_the_committed_state(state: PipelineState) -> None:
    """aread() reads on a worker thread and gives the same dict as read()."""
    state.write({"phase1": {"status": "success"}})
    assert asyncio.run(state.aread()) == state.read()
