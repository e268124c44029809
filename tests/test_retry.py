"""Tests of RetryHandler: backoff, give-up rules, the ledger in the state, restarts, async."""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_common import PipelineState, StateError
from pipeline_common.retry import RetryExhaustedError, RetryHandler, is_testing, set_testing


class Transient(Exception):
    """A retryable error for the tests."""


class Killed(BaseException):
    """Raised by an injected sleep to stop a call the way a crash would."""


def failing(
    times: int, result: Any = "done", error: type[Exception] = Transient
) -> Callable[..., Any]:
    """Return a function that raises ``error`` ``times`` times, then returns ``result``."""
    calls = {"n": 0}

    def fn(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error(f"failure {calls['n']}")
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


class FakeTime:
    """A monotonic clock and a sleep that advances it, so nothing really waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def _testing_off() -> Iterator[None]:
    """Every test starts and ends outside the testing mode."""
    with set_testing(False):
        yield


# -- backoff -----------------------------------------------------------------------------


def test_delays_are_exact_without_jitter() -> None:
    """With jitter off, retry k waits retry_delay * multiplier**k."""
    slept: list[float] = []
    retry = RetryHandler(max_retries=3, retry_delay=1.0, jitter=False, sleep=slept.append)
    assert retry.call("phase4", failing(3)) == "done"
    assert slept == [1.0, 2.0, 4.0]


def test_delays_are_capped_at_max_delay() -> None:
    """No delay is longer than max_delay."""
    slept: list[float] = []
    retry = RetryHandler(
        max_retries=4,
        retry_delay=0.5,
        backoff_multiplier=10.0,
        max_delay=7.0,
        jitter=False,
        sleep=slept.append,
    )
    retry.call("op", failing(4))
    assert slept == [0.5, 5.0, 7.0, 7.0]


def test_many_retries_do_not_overflow_the_backoff() -> None:
    """A multiplier**k too large for a float is simply max_delay."""
    slept: list[float] = []
    retry = RetryHandler(
        max_retries=1200, retry_delay=1.0, max_delay=3.0, jitter=False, sleep=slept.append
    )
    retry.call("op", failing(1200))
    assert slept[-1] == 3.0
    assert len(slept) == 1200


def test_jitter_stays_within_half_to_full_delay() -> None:
    """Jittered delays fall in [0.5, 1.0] of the capped delay and do spread out."""
    slept: list[float] = []
    retry = RetryHandler(
        max_retries=2000, retry_delay=2.0, backoff_multiplier=1.0, max_delay=2.0, sleep=slept.append
    )
    retry.call("op", failing(2000))
    assert len(slept) == 2000
    assert all(1.0 <= s <= 2.0 for s in slept)
    assert min(slept) < 1.1
    assert max(slept) > 1.9
    assert len(set(slept)) > 1900


def test_jitter_follows_the_growing_cap() -> None:
    """Each jittered delay stays within the band of its own retry number."""
    for _ in range(200):
        slept: list[float] = []
        retry = RetryHandler(max_retries=4, retry_delay=1.0, max_delay=5.0, sleep=slept.append)
        retry.call("op", failing(4))
        for delay, cap in zip(slept, [1.0, 2.0, 4.0, 5.0], strict=True):
            assert cap / 2 <= delay <= cap


@settings(max_examples=200, deadline=None)
@given(
    retry_delay=st.one_of(st.just(0.0), st.floats(1e-6, 100.0)),
    multiplier=st.floats(1.0, 10.0),
    max_delay=st.one_of(st.just(0.0), st.floats(1e-6, 1000.0)),
    retries=st.integers(0, 8),
    jitter=st.booleans(),
)
def test_every_delay_follows_the_formula(
    retry_delay: float, multiplier: float, max_delay: float, retries: int, jitter: bool
) -> None:
    """Delay k is min(retry_delay * multiplier**k, max_delay), or within [0.5, 1] of it."""
    slept: list[float] = []
    retry = RetryHandler(
        max_retries=retries,
        retry_delay=retry_delay,
        backoff_multiplier=multiplier,
        max_delay=max_delay,
        jitter=jitter,
        sleep=slept.append,
    )
    retry.call("op", failing(retries))
    caps = [min(retry_delay * multiplier**k, max_delay) for k in range(retries)]
    caps = [cap for cap in caps if cap > 0]  # a zero delay is not slept at all
    assert len(slept) == len(caps)
    for cap, delay in zip(caps, slept, strict=True):
        if jitter:
            assert cap * 0.5 <= delay <= cap
        else:
            assert delay == cap


# -- giving up ---------------------------------------------------------------------------


def test_max_elapsed_gives_up_instead_of_sleeping_past_it() -> None:
    """The handler never starts a sleep that would end after max_elapsed."""
    fake = FakeTime()
    retry = RetryHandler(
        max_retries=10,
        retry_delay=1.0,
        jitter=False,
        max_elapsed=5.0,
        sleep=fake.sleep,
        clock=fake.clock,
    )
    fn = failing(10)
    with pytest.raises(RetryExhaustedError) as info:
        retry.call("op", fn)
    assert fake.slept == [1.0, 2.0]  # the next 4.0 s would end at 7 s > 5 s
    assert sum(fake.slept) <= 5.0
    assert info.value.reason == "max_elapsed"
    assert info.value.attempts == 3
    assert fn.calls["n"] == 3  # type: ignore[attr-defined]
    assert "max_elapsed" in str(info.value)


def test_max_elapsed_counts_the_time_spent_in_the_step() -> None:
    """Time spent inside fn counts toward max_elapsed, not only the sleeps."""
    fake = FakeTime()

    def slow() -> None:
        fake.now += 4.0
        raise Transient("slow and failing")

    retry = RetryHandler(
        max_retries=10,
        retry_delay=0.5,
        jitter=False,
        max_elapsed=10.0,
        sleep=fake.sleep,
        clock=fake.clock,
    )
    with pytest.raises(RetryExhaustedError) as info:
        retry.call("op", slow)
    assert info.value.attempts == 3  # 4 + 0.5 + 4 + 1 + 4 = 13.5: the third wait would pass 10
    assert fake.slept == [0.5, 1.0]


def test_exhausted_error_names_operation_attempts_and_last_error() -> None:
    """The give-up error says what failed, how often and why; its cause is the last error."""
    retry = RetryHandler(max_retries=2, retry_delay=0.0, sleep=lambda s: None)
    with pytest.raises(RetryExhaustedError) as info:
        retry.call("phase4", failing(5))
    err = info.value
    assert isinstance(err.__cause__, Transient)
    assert str(err.__cause__) == "failure 3"
    assert (err.operation, err.attempts, err.reason) == ("phase4", 3, "max_retries")
    assert (err.last_error_type, err.last_error_message) == ("Transient", "failure 3")
    assert re.search(r"phase4 .*3 attempts.*Transient: failure 3", str(err))
    assert "reset('phase4')" in str(err)


def test_exhausted_error_pickles_with_its_attributes() -> None:
    """RetryExhaustedError survives pickling, so it can cross process boundaries."""
    err = RetryExhaustedError("phase4", 3, "Transient", "boom", reason="max_elapsed", advice="x")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RetryExhaustedError
    assert str(copy) == str(err)
    assert copy.args == err.args
    for name in ("operation", "attempts", "last_error_type", "last_error_message", "reason"):
        assert getattr(copy, name) == getattr(err, name)


def test_exhausted_error_is_not_a_state_error() -> None:
    """Exhaustion is about the step, not the state file, so StateError handlers skip it."""
    assert issubclass(RetryExhaustedError, Exception)
    assert not issubclass(RetryExhaustedError, StateError)


def test_zero_retries_means_one_attempt() -> None:
    """max_retries=0 calls fn once and gives up on its first failure."""
    retry = RetryHandler(max_retries=0, sleep=lambda s: pytest.fail("must not sleep"))
    with pytest.raises(RetryExhaustedError) as info:
        retry.call("op", failing(1))
    assert info.value.attempts == 1


def test_call_after_exhaustion_fails_fast_until_reset() -> None:
    """An exhausted ledger refuses new calls without running fn; reset() starts over."""
    retry = RetryHandler(max_retries=1, retry_delay=0.0, sleep=lambda s: None)
    with pytest.raises(RetryExhaustedError):
        retry.call("op", failing(5))
    assert not retry.can_retry("op")
    fn = failing(0)
    with pytest.raises(RetryExhaustedError) as info:
        retry.call("op", fn)
    assert fn.calls["n"] == 0  # type: ignore[attr-defined]
    assert info.value.__cause__ is None
    assert info.value.last_error_message == "failure 2"
    retry.reset("op")
    assert retry.can_retry("op")
    assert retry.call("op", fn) == "done"


# -- what is retried ---------------------------------------------------------------------


def test_unmatched_exception_propagates_unchanged_and_uncounted() -> None:
    """An error retry_on does not match is the very same object, and no attempt is counted."""
    retry = RetryHandler(retry_on=(ConnectionError,), sleep=lambda s: pytest.fail("slept"))
    original = KeyError("nope")

    def fn() -> None:
        raise original

    with pytest.raises(KeyError) as info:
        retry.call("op", fn)
    assert info.value is original
    assert info.value.__cause__ is None
    assert retry.attempts("op") == 0
    assert retry.ledger("op")["in_flight"] is False


def test_a_single_exception_type_is_accepted() -> None:
    """retry_on may be one exception class instead of a tuple."""
    retry = RetryHandler(retry_on=Transient, retry_delay=0.0, sleep=lambda s: None)
    assert retry.call("op", failing(2)) == "done"
    with pytest.raises(ValueError, match="failure 1"):
        retry.call("op", failing(1, error=ValueError))


def test_keyboard_interrupt_is_never_retried() -> None:
    """BaseExceptions such as KeyboardInterrupt pass straight through by default."""
    retry = RetryHandler(sleep=lambda s: pytest.fail("slept"))

    def fn() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        retry.call("op", fn)
    assert retry.attempts("op") == 0


def test_predicate_decides_what_is_retried() -> None:
    """A predicate returning False or None makes the error propagate at once."""
    retry = RetryHandler(
        retry_on=lambda exc: "retry" in str(exc) or None, retry_delay=0.0, sleep=lambda s: None
    )
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        raise Transient("retry me" if calls["n"] == 1 else "fatal")

    with pytest.raises(Transient, match="fatal"):
        retry.call("op", fn)
    assert calls["n"] == 2
    assert retry.attempts("op") == 1  # the fatal attempt is not counted


def test_predicate_number_is_the_exact_delay() -> None:
    """A number from the predicate (a Retry-After) is slept as is: no jitter, no cap."""
    slept: list[float] = []

    def retry_after(exc: Exception) -> float:
        return 90.0

    retry = RetryHandler(retry_on=retry_after, max_delay=5.0, sleep=slept.append)
    retry.call("op", failing(2))
    assert slept == [90.0, 90.0]


def test_predicate_returning_nonsense_is_an_error() -> None:
    """A negative or non-finite delay from the predicate raises ValueError chained to fn's error."""
    retry = RetryHandler(retry_on=lambda exc: -1.0, sleep=lambda s: None)
    with pytest.raises(ValueError, match=r"retry_on predicate returned -1\.0") as info:
        retry.call("op", failing(1))
    assert isinstance(info.value.__cause__, Transient)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_retries": -1}, ValueError),
        ({"max_retries": 1.5}, TypeError),
        ({"retry_delay": -0.1}, ValueError),
        ({"max_delay": float("nan")}, ValueError),
        ({"backoff_multiplier": 0.5}, ValueError),
        ({"max_elapsed": 0}, ValueError),
        ({"retry_on": int}, TypeError),
        ({"retry_on": (ValueError, "x")}, TypeError),
        ({"retry_on": 3}, TypeError),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Nonsense settings fail at construction, not at the first failure."""
    with pytest.raises(error):
        RetryHandler(**kwargs)


# -- the in-memory ledger ----------------------------------------------------------------


def test_attempts_and_can_retry_follow_the_ledger() -> None:
    """attempts() counts failed attempts; can_retry() is False once the budget is used."""
    retry = RetryHandler(max_retries=2, retry_delay=0.0, sleep=lambda s: None)
    seen: list[tuple[int, bool]] = []

    def fn() -> None:
        seen.append((retry.attempts("op"), retry.can_retry("op")))
        raise Transient("x")

    with pytest.raises(RetryExhaustedError):
        retry.call("op", fn)
    assert seen == [(1, True), (2, True), (3, False)]  # the running attempt counts
    assert retry.attempts("op") == 3
    assert retry.attempts("other") == 0


def test_success_resets_the_count() -> None:
    """After a success attempts() is 0 and the ledger keeps how many attempts it took."""
    retry = RetryHandler(retry_delay=0.0, sleep=lambda s: None)
    retry.call("op", failing(2))
    ledger = retry.ledger("op")
    assert retry.attempts("op") == 0
    assert ledger["succeeded_after"] == 3
    assert ledger["in_flight"] is False
    assert "last_success_at" in ledger


# -- the ledger in the state file ----------------------------------------------------------


def test_ledger_lives_in_the_operation_record(state: PipelineState) -> None:
    """The ledger is data[operation]['retry'], next to the caller's own fields."""
    state.write({"phase4": {"status": "failed", "output": "x.csv"}})
    retry = RetryHandler(retry_delay=5.0, jitter=False, state=state, sleep=lambda s: None)
    seen: list[dict[str, Any]] = []

    def fn() -> str:
        seen.append(state.read()["phase4"])
        if len(seen) == 1:
            raise Transient("flaky")
        return "ok"

    assert retry.call("phase4", fn) == "ok"
    first = seen[0]
    assert first["status"] == "running"
    assert first["output"] == "x.csv"
    assert first["retry"]["attempts"] == 1
    assert first["retry"]["in_flight"] is True
    assert first["retry"]["pid"] == os.getpid()
    second = seen[1]["retry"]
    assert second["attempts"] == 2
    assert second["last_error_type"] == "Transient"
    assert second["last_error_message"] == "flaky"
    assert second["first_attempt_at"] == first["retry"]["first_attempt_at"]
    final = state.read()["phase4"]["retry"]
    assert final["attempts"] == 0
    assert final["succeeded_after"] == 2


def test_ledger_creates_a_missing_record(state: PipelineState) -> None:
    """A missing data[operation] is created as an object holding only the ledger."""
    retry = RetryHandler(state=state)
    retry.call("phase2", lambda: None)
    assert set(state.read()["phase2"]) == {"retry"}


def test_ledger_refuses_a_non_object_record(state: PipelineState) -> None:
    """A record that is not an object is reported, and fn is not called."""
    state.write({"count": 3})
    retry = RetryHandler(state=state)
    fn = failing(0)
    with pytest.raises(TypeError, match=r"data\['count'\].*int"):
        retry.call("count", fn)
    assert fn.calls["n"] == 0  # type: ignore[attr-defined]
    assert state.read() == {"count": 3}


def test_history_shows_each_attempt_and_outcome(state: PipelineState) -> None:
    """get_transaction_history() holds a started and an outcome record per attempt."""
    retry = RetryHandler(retry_delay=0.25, jitter=False, state=state, sleep=lambda s: None)
    retry.call("phase4", failing(2))
    records = [
        (r["operation"], r["details"]["outcome"], r["details"].get("attempt"))
        for r in reversed(state.get_transaction_history(50))
        if r["operation"].startswith("retry:")
    ]
    assert records == [
        ("retry:phase4 attempt 1", "started", 1),
        ("retry:phase4 attempt 1", "failed", 1),
        ("retry:phase4 attempt 2", "started", 2),
        ("retry:phase4 attempt 2", "failed", 2),
        ("retry:phase4 attempt 3", "started", 3),
        ("retry:phase4 attempt 3", "succeeded", 3),
    ]
    failed = [
        r for r in state.get_transaction_history(50) if r["details"].get("outcome") == "failed"
    ]
    assert [r["details"]["delay"] for r in reversed(failed)] == [0.25, 0.5]
    assert failed[0]["details"]["error"] == "Transient: failure 2"
    assert all(r["success"] for r in failed)


def test_give_up_marks_the_stage_failed_and_is_logged(state: PipelineState) -> None:
    """Giving up sets a running status to failed and logs the reason."""
    state.write({"phase4": {"status": "pending"}})
    retry = RetryHandler(max_retries=1, retry_delay=0.0, state=state, sleep=lambda s: None)
    with pytest.raises(RetryExhaustedError):
        retry.call("phase4", failing(9))
    assert state.read()["phase4"]["status"] == "failed"
    last = state.get_transaction_history(1)[0]
    assert last["operation"] == "retry:phase4 attempt 2"
    assert last["details"]["outcome"] == "gave up"
    assert last["details"]["reason"] == "max_retries"


def test_unretried_error_restores_the_status(state: PipelineState) -> None:
    """A non-retryable error uncounts its attempt and puts the status back."""
    state.write({"phase4": {"status": "pending"}})
    retry = RetryHandler(retry_on=(ConnectionError,), state=state)
    with pytest.raises(KeyError):
        retry.call("phase4", failing(1, error=KeyError))
    record = state.read()["phase4"]
    assert record["status"] == "pending"
    assert record["retry"]["attempts"] == 0
    assert record["retry"]["in_flight"] is False
    last = state.get_transaction_history(1)[0]
    assert last["details"]["outcome"] == "not retried"
    assert last["details"]["error"].startswith("KeyError")


def test_step_that_sets_its_own_status_keeps_it(state: PipelineState) -> None:
    """A status the step itself committed is not overwritten by the handler."""
    state.write({"phase4": {"status": "pending"}})
    retry = RetryHandler(retry_on=(ConnectionError,), state=state)

    def fn() -> None:
        with state.transaction(operation="phase4 fails") as txn:
            txn.data["phase4"]["status"] = "skipped"
        raise KeyError("give up")

    with pytest.raises(KeyError):
        retry.call("phase4", fn)
    assert state.read()["phase4"]["status"] == "skipped"


def test_reset_clears_the_ledger_and_is_logged(state: PipelineState) -> None:
    """reset() removes data[operation]['retry'] in a logged transaction."""
    retry = RetryHandler(max_retries=0, state=state)
    with pytest.raises(RetryExhaustedError):
        retry.call("phase4", failing(1))
    retry.reset("phase4")
    assert state.read()["phase4"] == {}
    assert retry.attempts("phase4") == 0
    assert state.get_transaction_history(1)[0]["operation"] == "retry:phase4 reset"


def test_new_handler_continues_the_count(state: PipelineState) -> None:
    """A second handler on the same file sees the first one's attempts."""
    first = RetryHandler(max_retries=2, retry_delay=0.0, state=state, sleep=lambda s: None)
    with pytest.raises(RetryExhaustedError):
        first.call("phase4", failing(9))
    second = RetryHandler(max_retries=2, state=PipelineState(state.path))
    assert second.attempts("phase4") == 3
    assert not second.can_retry("phase4")
    bigger = RetryHandler(max_retries=5, retry_delay=0.0, state=state, sleep=lambda s: None)
    assert bigger.call("phase4", failing(0)) == "done"
    assert state.read()["phase4"]["retry"]["succeeded_after"] == 4


def test_restart_waits_until_next_eligible(state: PipelineState) -> None:
    """After a crash during the backoff, a new handler sleeps only the remaining delay."""

    def crash(seconds: float) -> None:
        raise Killed

    first = RetryHandler(retry_delay=30.0, jitter=False, state=state, sleep=crash)
    with pytest.raises(Killed):
        first.call("phase4", failing(1))
    assert state.read()["phase4"]["retry"]["delay"] == 30.0
    slept: list[float] = []
    second = RetryHandler(retry_delay=30.0, jitter=False, state=state, sleep=slept.append)
    assert second.call("phase4", failing(0)) == "done"
    assert len(slept) == 1
    assert 25.0 < slept[0] <= 30.0


def test_restart_wait_counts_toward_max_elapsed(state: PipelineState) -> None:
    """A wait still owed after a restart that passes max_elapsed gives up at once."""

    def crash(seconds: float) -> None:
        raise Killed

    with pytest.raises(Killed):
        RetryHandler(retry_delay=30.0, state=state, sleep=crash).call("op", failing(1))
    second = RetryHandler(max_elapsed=1.0, state=state, sleep=lambda s: pytest.fail("slept"))
    with pytest.raises(RetryExhaustedError) as info:
        second.call("op", failing(0))
    assert info.value.reason == "max_elapsed"


CHILD = """
import sys, time
from pathlib import Path
from pipeline_common import PipelineState
from pipeline_common.retry import RetryHandler

state = PipelineState(sys.argv[1])
retry = RetryHandler(max_retries=3, state=state)

def step():
    Path(sys.argv[2]).write_text("running")
    time.sleep(60)

retry.call("phase4", step)
"""


@pytest.mark.multiprocess
def test_attempt_in_flight_at_sigkill_counts(
    state: PipelineState, tmp_path: Path, spawn_child: Callable[..., Any]
) -> None:
    """A real child SIGKILLed during an attempt leaves it counted; the next run is attempt 2."""
    marker = tmp_path / "marker"
    child = spawn_child(CHILD, str(state.path), str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child never started its attempt"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    ledger = state.read()["phase4"]["retry"]
    assert ledger["attempts"] == 1
    assert ledger["in_flight"] is True
    assert ledger["pid"] == child.pid

    retry = RetryHandler(max_retries=3, state=PipelineState(state.path), sleep=lambda s: None)
    assert retry.attempts("phase4") == 1
    assert retry.call("phase4", failing(0)) == "done"
    started = [
        r["details"]
        for r in state.get_transaction_history(20)
        if r["details"].get("outcome") == "started"
    ]
    assert started[0]["attempt"] == 2
    assert started[0]["interrupted_attempt"] == 1
    assert state.read()["phase4"]["retry"]["succeeded_after"] == 2


def test_concurrent_handlers_share_one_budget_in_the_state(state: PipelineState) -> None:
    """Threads retrying one operation through the state never exceed max_retries + 1 in all."""
    retry = RetryHandler(max_retries=11, retry_delay=0.0, state=state, sleep=lambda s: None)
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise Transient("x")

    def worker() -> None:
        with pytest.raises(RetryExhaustedError):
            retry.call("phase4", fn)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 12
    assert retry.attempts("phase4") == 12


# -- threads -------------------------------------------------------------------------------


def test_in_memory_ledger_is_thread_safe() -> None:
    """Many threads retrying one operation use exactly the shared budget, no more."""
    retry = RetryHandler(max_retries=399, retry_delay=0.0, sleep=lambda s: None)
    calls: list[int] = []
    errors: list[BaseException] = []

    def fn() -> None:
        calls.append(1)
        raise Transient("x")

    def worker() -> None:
        try:
            retry.call("shared", fn)
        except RetryExhaustedError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 8
    assert len(calls) == 400
    assert retry.attempts("shared") == 400


def test_threads_on_separate_operations_do_not_interfere() -> None:
    """Each operation keeps its own count when threads run them at once."""
    retry = RetryHandler(max_retries=5, retry_delay=0.0, sleep=lambda s: None)
    results: dict[str, Any] = {}

    def worker(n: int) -> None:
        results[f"op{n}"] = retry.call(f"op{n}", failing(n % 5, result=n))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {f"op{n}": n for n in range(16)}
    assert all(retry.ledger(f"op{n}")["succeeded_after"] == n % 5 + 1 for n in range(16))


# -- async ---------------------------------------------------------------------------------


def test_acall_retries_with_the_async_sleep() -> None:
    """acall awaits the injected async sleep with the same delays as call."""
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    calls = {"n": 0}

    async def fetch(x: int) -> int:
        calls["n"] += 1
        if calls["n"] < 3:
            raise Transient("later")
        return x + 1

    retry = RetryHandler(
        retry_delay=0.5, jitter=False, async_sleep=fake_sleep, sleep=lambda s: pytest.fail("sync")
    )
    assert asyncio.run(retry.acall("op", fetch, 41)) == 42
    assert slept == [0.5, 1.0]


def test_acall_gives_up_with_the_cause() -> None:
    """acall raises RetryExhaustedError chained to the last error."""

    async def fake_sleep(seconds: float) -> None:
        return None

    async def broken() -> None:
        raise Transient("always")

    retry = RetryHandler(max_retries=1, async_sleep=fake_sleep)
    with pytest.raises(RetryExhaustedError) as info:
        asyncio.run(retry.acall("op", broken))
    assert isinstance(info.value.__cause__, Transient)


def test_acall_cancellation_is_not_counted() -> None:
    """A cancelled attempt propagates CancelledError and is not an attempt."""
    retry = RetryHandler()

    async def hang() -> None:
        await asyncio.sleep(60)

    async def main() -> None:
        task = asyncio.create_task(retry.acall("op", hang))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert retry.attempts("op") == 0


def test_wrap_of_a_coroutine_function_stays_async() -> None:
    """wrap() on an async def gives an async def that retries through acall."""

    async def no_sleep(seconds: float) -> None:
        return None

    retry = RetryHandler(async_sleep=no_sleep)
    calls = {"n": 0}

    @retry.wrap("op")
    async def fetch(x: int) -> int:
        """Fetch x."""
        calls["n"] += 1
        if calls["n"] == 1:
            raise Transient("once")
        return x

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(fetch(7)) == 7
    assert fetch.__doc__ == "Fetch x."


# -- the decorator -------------------------------------------------------------------------


def test_wrap_preserves_name_doc_and_signature() -> None:
    """The decorated function looks like the original to help(), inspect and type checkers."""
    retry = RetryHandler(retry_delay=0.0, sleep=lambda s: None)

    def load(path: str, *, limit: int = 10) -> list[str]:
        """Load up to limit lines."""
        return [path] * limit

    wrapped = retry.wrap("phase1")(load)
    assert wrapped.__name__ == "load"
    assert wrapped.__doc__ == "Load up to limit lines."
    assert inspect.signature(wrapped) == inspect.signature(load)
    assert wrapped("a", limit=2) == ["a", "a"]


def test_wrap_retries_under_the_operation_name() -> None:
    """The decorated function's attempts are counted under the given operation."""
    retry = RetryHandler(retry_delay=0.0, sleep=lambda s: None)
    fn = failing(1)
    wrapped = retry.wrap("phase1")(fn)
    assert wrapped() == "done"
    assert retry.ledger("phase1")["succeeded_after"] == 2


# -- the testing switch --------------------------------------------------------------------


def test_testing_mode_never_sleeps() -> None:
    """set_testing(True) removes every sleep, even long real ones."""
    retry = RetryHandler(retry_delay=3600.0, sleep=lambda s: pytest.fail(f"slept {s}"))
    set_testing(True)
    try:
        assert is_testing()
        assert retry.call("op", failing(3)) == "done"
    finally:
        set_testing(False)
    assert not is_testing()


def test_testing_mode_caps_attempts() -> None:
    """set_testing(True, attempts=2) stops each call after two attempts."""
    retry = RetryHandler(max_retries=10)
    fn = failing(5)
    with set_testing(True, attempts=2), pytest.raises(RetryExhaustedError) as info:
        retry.call("op", fn)
    assert info.value.attempts == 2
    assert fn.calls["n"] == 2  # type: ignore[attr-defined]


def test_testing_mode_cap_keeps_a_lower_limit() -> None:
    """The testing cap never raises the handler's own, lower, limit."""
    retry = RetryHandler(max_retries=1)
    with set_testing(True, attempts=5), pytest.raises(RetryExhaustedError) as info:
        retry.call("op", failing(5))
    assert info.value.attempts == 2


def test_testing_context_manager_restores_the_previous_mode() -> None:
    """Leaving `with set_testing(...)` puts back whatever mode was on before."""
    with set_testing(True, attempts=3):
        with set_testing(False):
            assert not is_testing()
        assert is_testing()
    assert not is_testing()


def test_testing_mode_skips_the_wait_after_a_restart(state: PipelineState) -> None:
    """The testing mode also skips the wait a restart still owes."""

    def crash(seconds: float) -> None:
        raise Killed

    with pytest.raises(Killed):
        RetryHandler(retry_delay=30.0, state=state, sleep=crash).call("op", failing(1))
    retry = RetryHandler(state=state, sleep=lambda s: pytest.fail("slept"))
    with set_testing(True):
        assert retry.call("op", failing(0)) == "done"


def test_testing_attempts_must_be_positive() -> None:
    """set_testing refuses a cap below one attempt."""
    with pytest.raises(ValueError, match="at least 1"):
        set_testing(True, attempts=0)


# -- the documentation -----------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "retry.md"
DOC_BLOCKS = [
    # Pad with blank lines so a failure points at the right line of the page.
    "\n" * match.string.count("\n", 0, match.start(1)) + match.group(1)
    for match in re.finditer(r"^```python\n(.*?)^```", DOC.read_text(), re.DOTALL | re.MULTILINE)
]


@pytest.mark.parametrize("code", DOC_BLOCKS, ids=[f"block{i}" for i in range(len(DOC_BLOCKS))])
def test_doc_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python block of docs/retry.md runs as it is, on its own."""
    monkeypatch.chdir(tmp_path)
    # dont_inherit: this module's `from __future__ import annotations` must not leak in.
    exec(compile(code, str(DOC), "exec", dont_inherit=True), {"__name__": "docs_retry"})
    assert not is_testing()


def test_docs_have_examples() -> None:
    """The docs page was found and has its examples."""
    assert len(DOC_BLOCKS) >= 8
