"""Concurrency: threads sharing a state, several objects per file, fork, and several processes."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateError, StateLockError

# A worker process: waits for "go" on stdin, then increments n the given number of times.
INCREMENTER = """
import sys
from pipeline_common import PipelineState

state = PipelineState(sys.argv[1], timeout=60, max_backups=5)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    with state.transaction(operation="increment") as txn:
        txn.data["n"] = txn.data.get("n", 0) + 1
print("done", flush=True)
"""


def _increment(state: PipelineState, times: int) -> None:
    for _ in range(times):
        with state.transaction() as txn:
            txn.data["n"] = txn.data.get("n", 0) + 1


def _run_threads(targets: list[Any]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # collected and re-checked by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a thread is stuck: deadlock?"
    return errors


def test_one_state_shared_by_8_threads_loses_no_increment(state_path: Path) -> None:
    """8 threads x 50 increments on one shared PipelineState end at exactly 400."""
    state = PipelineState(state_path, timeout=60, max_backups=5)
    errors = _run_threads([lambda: _increment(state, 50)] * 8)
    assert errors == []
    assert state.read() == {"n": 400}
    history = state.get_transaction_history(limit=None)  # type: ignore[arg-type]
    assert len(history) == 400
    assert all(r["success"] for r in history)


def test_one_state_object_per_thread_loses_no_increment(state_path: Path) -> None:
    """8 threads, each with its own PipelineState on the same path, end at exactly 400."""
    states = [PipelineState(state_path, timeout=60, max_backups=5) for _ in range(8)]
    errors = _run_threads([lambda s=s: _increment(s, 50) for s in states])
    assert errors == []
    assert states[0].read() == {"n": 400}


def test_objects_via_relative_absolute_and_symlinked_paths_share_one_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """States opened through a relative path, an absolute path and a symlinked folder serialize."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    monkeypatch.chdir(real)
    states = [
        PipelineState("pipeline.json", timeout=60, max_backups=5),
        PipelineState(real / "pipeline.json", timeout=60, max_backups=5),
        PipelineState(tmp_path / "alias" / "pipeline.json", timeout=60, max_backups=5),
    ]
    errors = _run_threads([lambda s=s: _increment(s, 40) for s in states])
    assert errors == []
    assert states[0].read() == {"n": 120}
    assert not (tmp_path / "alias" / "pipeline.json").is_symlink()


def test_readers_never_see_a_partial_state_during_writes(state_path: Path) -> None:
    """Unlocked reads during concurrent commits always parse and never go backwards."""
    state = PipelineState(state_path, timeout=60, max_backups=3)
    state.write({"n": 0, "pad": "x" * 20_000})
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        last = 0
        while not stop.is_set():
            n = state.read()["n"]
            assert n >= last
            last = n
            seen.append(n)

    def writer() -> None:
        try:
            _increment(state, 100)
        finally:
            stop.set()

    errors = _run_threads([reader, writer])
    assert errors == []
    assert state.read()["n"] == 100
    assert len(seen) > 0


def test_a_transaction_in_another_thread_does_not_join(state: PipelineState) -> None:
    """Joining is per thread: another thread's transaction waits for the lock instead."""
    other = PipelineState(state.path, timeout=0.05)
    outcome: list[type[BaseException] | None] = []

    def contend() -> None:
        try:
            with other.transaction() as txn:
                txn.data["other"] = True
            outcome.append(None)
        except StateLockError as exc:
            outcome.append(type(exc))

    with state.transaction() as txn:
        txn.data["main"] = True
        assert _run_threads([contend]) == []
    assert outcome == [StateLockError]
    assert state.read() == {"main": True}


def _lock_is_held_elsewhere(lock_path: Path) -> bool:
    """True when a fresh open file description cannot take the flock right now."""
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _fork(child: Any) -> int:
    """Fork, run ``child()`` in the child (its int is the exit status), return the status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns to pytest
        code = 99
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_child_after_fork_can_use_the_parents_state_object(state: PipelineState) -> None:
    """A PipelineState used before fork() works in the child, and in the parent afterwards."""
    _increment(state, 1)

    def child() -> int:
        _increment(state, 1)
        return 0 if state.read() == {"n": 2} else 1

    assert _fork(child) == 0
    assert state.read() == {"n": 2}
    _increment(state, 1)
    assert state.read() == {"n": 3}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_child_forked_inside_a_transaction_never_takes_or_releases_the_parents_lock(
    state: PipelineState,
) -> None:
    """A child forked mid-block can neither lock nor finish the block, and leaves the lock held."""
    state.write({"n": 0})
    with state.transaction() as txn:
        txn.data["n"] = 1

        def child() -> int:
            impatient = PipelineState(state.path, timeout=0.2)
            try:
                impatient.write({"child": True})
            except StateLockError:
                pass
            else:
                return 1
            try:
                txn.__exit__(None, None, None)
            except StateError:
                pass
            else:
                return 2
            state._lock.release()
            return 0

        assert _fork(child) == 0
        assert _lock_is_held_elsewhere(state.lock_path)
        assert state.read() == {"n": 0}
    assert state.read() == {"n": 1}
    assert not _lock_is_held_elsewhere(state.lock_path)


@pytest.mark.multiprocess
def test_four_processes_loses_no_increment(state_path: Path, spawn_child: Any) -> None:
    """4 processes x 200 increments end at exactly 800, with 800 successful log records."""
    workers = [spawn_child(INCREMENTER, str(state_path), "200") for _ in range(4)]
    for proc in workers:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in workers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out == "done\n"
    state = PipelineState(state_path)
    assert state.read() == {"n": 800}
    history = state.get_transaction_history(limit=1000)
    assert len(history) == 800
    assert [r["seq"] for r in history] == list(range(800, 0, -1))
    assert all(r["success"] and r["operation"] == "increment" for r in history)
    assert len(state.list_backups(limit=100)) == 5
