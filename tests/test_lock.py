"""The cross-process lock (pipeline_common._lock): exclusion, timeouts, holder records."""

from __future__ import annotations

import os
import select
import socket
import stat
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateLockError, StateSidecarError
from pipeline_common._lock import read_holder

# A child that holds the lock inside a transaction until its stdin gets a line.
HOLDER = """
import sys
from pipeline_common import PipelineState

state = PipelineState(sys.argv[1])
with state.transaction(operation="child-holds") as txn:
    txn.data["holder"] = "child"
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""

# A child that takes the lock once and reports how long that took.
TAKER = """
import sys, time
from pipeline_common import PipelineState

state = PipelineState(sys.argv[1], timeout=float(sys.argv[2]))
t0 = time.monotonic()
with state.transaction(operation="taker") as txn:
    txn.data["taker"] = True
print(f"{time.monotonic() - t0:.3f}", flush=True)
"""


def _hold_in_child(spawn_child: Any, path: Path) -> subprocess.Popen[str]:
    proc = spawn_child(HOLDER, str(path))
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "the child did not take the lock within 30 s"
    line = proc.stdout.readline()
    assert line == "locked\n", proc.stderr.read() if proc.stderr else line
    return proc


def _release_child(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err
    return out


@pytest.mark.multiprocess
def test_timeout_names_lock_file_wait_and_child_holder(state_path: Path, spawn_child: Any) -> None:
    """A lock held by another process times out with a StateLockError describing the holder."""
    proc = _hold_in_child(spawn_child, state_path)
    state = PipelineState(state_path, timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(StateLockError) as info, state.transaction() as txn:
        txn.data["parent"] = True
    waited = time.monotonic() - t0
    err = info.value
    assert isinstance(err, TimeoutError)
    assert 0.15 <= waited < 3.0
    assert err.lock_file == state.lock_path
    assert err.timeout == 0.2
    assert err.path == state.path
    assert err.holder is not None
    assert err.holder["pid"] == proc.pid
    assert err.holder["host"] == socket.gethostname()
    assert err.holder["operation"] == "child-holds"
    assert datetime.fromisoformat(err.holder["since"]).utcoffset() is not None
    message = str(err)
    for fact in (str(state.lock_path), "0.2", str(proc.pid), socket.gethostname(), "child-holds"):
        assert fact in message
    assert err.holder["since"] in message
    assert _release_child(proc) == "released\n"
    assert state.read() == {"holder": "child"}


@pytest.mark.multiprocess
def test_readers_take_no_lock(state_path: Path, spawn_child: Any) -> None:
    """read() returns at once while another process holds the lock."""
    PipelineState(state_path).write({"n": 1})
    proc = _hold_in_child(spawn_child, state_path)
    state = PipelineState(state_path, timeout=0.2)
    t0 = time.monotonic()
    assert state.read() == {"n": 1}
    assert time.monotonic() - t0 < 0.2
    _release_child(proc)
    assert state.read() == {"n": 1, "holder": "child"}


@pytest.mark.multiprocess
def test_waiter_gets_the_lock_as_soon_as_the_holder_releases(
    state_path: Path, spawn_child: Any
) -> None:
    """A waiter with a long timeout proceeds once the child holder commits."""
    proc = _hold_in_child(spawn_child, state_path)
    state = PipelineState(state_path, timeout=30)
    results: list[dict[str, Any]] = []

    def wait_and_commit() -> None:
        with state.transaction() as txn:
            txn.data["waiter"] = True
            results.append(dict(txn.data))

    thread = threading.Thread(target=wait_and_commit)
    thread.start()
    thread.join(timeout=0.1)
    assert thread.is_alive(), "the waiter must block while the child holds the lock"
    _release_child(proc)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert results == [{"holder": "child", "waiter": True}]
    assert state.read() == {"holder": "child", "waiter": True}


@pytest.mark.multiprocess
def test_a_timed_out_wait_does_not_leak_the_lock(
    state_path: Path, spawn_child: Any, run_child: Any
) -> None:
    """After a waiter gives up, the lock still passes to the next process when the holder ends."""
    proc = _hold_in_child(spawn_child, state_path)
    state = PipelineState(state_path, timeout=0.1)
    with pytest.raises(StateLockError):
        state.write({"lost": True})
    _release_child(proc)
    taker = run_child(TAKER, str(state_path), "5")
    assert taker.returncode == 0, taker.stderr
    assert float(taker.stdout) < 2.0
    assert state.read() == {"holder": "child", "taker": True}


def test_lock_is_held_for_the_whole_transaction(state: PipelineState) -> None:
    """Another thread cannot enter while a block is open, and can right after it closes."""
    other = PipelineState(state.path, timeout=0.05)
    outcomes: list[str] = []

    def try_commit() -> None:
        try:
            with other.transaction() as txn:
                txn.data["other"] = True
            outcomes.append("committed")
        except StateLockError as exc:
            outcomes.append(str(exc))

    with state.transaction(operation="main-holds") as txn:
        txn.data["main"] = True
        thread = threading.Thread(target=try_commit)
        thread.start()
        thread.join(timeout=10)
    assert len(outcomes) == 1
    assert "main-holds" in outcomes[0]
    assert str(os.getpid()) in outcomes[0]
    assert state.read() == {"main": True}
    try_commit()
    assert outcomes[-1] == "committed"


def test_timeout_none_waits_until_the_lock_is_free(state: PipelineState) -> None:
    """timeout=None blocks until the holder finishes instead of failing."""
    patient = PipelineState(state.path, timeout=None)
    started = threading.Event()

    def wait_forever() -> None:
        started.set()
        with patient.transaction() as txn:
            txn.data["patient"] = True

    with state.transaction() as txn:
        txn.data["first"] = True
        thread = threading.Thread(target=wait_forever)
        thread.start()
        started.wait(timeout=10)
        thread.join(timeout=0.05)
        assert thread.is_alive()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert state.read() == {"first": True, "patient": True}


def test_holder_record_is_written_while_held_and_cleared_after(state: PipelineState) -> None:
    """The lock file names this process while held and is empty once released."""
    with state.transaction(operation="recorded"):
        holder = read_holder(state.lock_path)
        assert holder is not None
        assert holder["pid"] == os.getpid()
        assert holder["operation"] == "recorded"
    assert read_holder(state.lock_path) is None
    assert state.lock_path.exists()


def test_lock_is_released_after_a_failed_block(state: PipelineState) -> None:
    """An exception in the block releases the lock for the next transaction."""
    other = PipelineState(state.path, timeout=0.05)
    with pytest.raises(OSError), state.transaction():
        raise OSError("caller's failure")
    result: list[str] = []
    thread = threading.Thread(target=lambda: (other.write({"ok": 1}), result.append("ok")))
    thread.start()
    thread.join(timeout=10)
    assert result == ["ok"]


def test_lock_is_released_after_a_validation_failure(state: PipelineState) -> None:
    """A commit refused by the schema releases the lock."""
    with pytest.raises(ValueError), state.transaction() as txn:
        txn.data["phase1"] = "bad"
    other = PipelineState(state.path, timeout=0.05)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (other.write({"ok": 1}), done.set()))
    thread.start()
    thread.join(timeout=10)
    assert done.is_set()


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_unusable_lock_path_raises_sidecar_error_without_hanging(
    state: PipelineState, tmp_path: Path, kind: str
) -> None:
    """A lock path that is a folder, a symlink or a FIFO raises StateSidecarError at once."""
    if kind == "directory":
        state.lock_path.mkdir()
    elif kind == "fifo":
        os.mkfifo(state.lock_path)
    else:
        target = tmp_path / "target"
        target.write_text("")
        state.lock_path.symlink_to(target)
    t0 = time.monotonic()
    with pytest.raises(StateSidecarError) as info:
        state.write({"a": 1})
    assert time.monotonic() - t0 < 2.0
    assert str(state.lock_path) in str(info.value)
    assert not state.path.exists()


def test_lock_file_mode_has_no_world_write(state: PipelineState, umask: Any) -> None:
    """The lock file is created without the world-write bit even under umask 0."""
    umask(0)
    fresh = PipelineState(state.path.with_name("other.json"))
    fresh.write({"a": 1})
    assert stat.S_IMODE(os.stat(fresh.lock_path).st_mode) & 0o002 == 0
