"""The cross-host lock on a real Redis server: exclusion, diagnostics, failures, fencing.

Each test starts its own ``redis-server`` on a free loopback port (no fakeredis, no
mocks). Several hosts are simulated by processes with different ``PIPELINE_STATE_HOST``
values sharing one folder: each host has its own flock file, so only Redis orders them.
Without ``redis-server`` the tests skip (``apt-get install redis-server``), except in CI
(``CI`` set), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import (
    PipelineState,
    ProgressTracker,
    RedisLock,
    StateLockError,
    StateLockLostError,
    StateLockUnavailableError,
    StateWriteError,
)
from pipeline_common import _log as log_module
from pipeline_common.cli import main as cli_main

pytestmark = pytest.mark.multiprocess

CHILD_TIMEOUT = 180.0


def _missing(what: str) -> None:
    message = (
        f"{what}; install it: apt-get install -y redis-server "
        "(and the redis extra: pip install 'pipeline-common[redis]')"
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Redis tests: {message}")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """A real redis-server on a loopback port, started and stopped by the test."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *_NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL the server: every connection drops, every key is gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test; stopped afterwards."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server is not installed")
    try:
        import portalocker.redis  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        _missing(f"the redis extra is not installed ({exc})")
    assert binary is not None
    server = RedisServer(binary, _free_port())
    server.start()
    yield server
    server.kill()


# A simulated host: waits for "go", increments n the given number of times through the
# Redis lock, retrying a transaction the lock refused (nothing was committed then).
WORKER = """
import json, sys, time
from pipeline_common import PipelineState, StateLockError

state = PipelineState(sys.argv[1], lock=sys.argv[2], timeout=60, max_backups=5)
sys.stdin.readline()
done = retries = 0
while done < int(sys.argv[3]):
    try:
        with state.transaction(operation="increment") as txn:
            txn.data["n"] = txn.data.get("n", 0) + 1
    except StateLockError as exc:
        retries += 1
        print("retry", type(exc).__name__, file=sys.stderr, flush=True)
        time.sleep(0.05)
        continue
    done += 1
print(json.dumps({"done": done, "retries": retries}), flush=True)
"""

# Holds the lock in a transaction named "long-step" until stdin says otherwise.
HOLDER = """
import sys
from pipeline_common import PipelineState

state = PipelineState(sys.argv[1], lock=sys.argv[2], timeout=30)
with state.transaction(operation="long-step") as txn:
    txn.data["held"] = True
    print("holding", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def _spawn(code: str, *args: str, host: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PIPELINE_STATE_HOST": host}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes to reap at teardown (killed if still running)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.communicate(timeout=CHILD_TIMEOUT)


def _wait_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != expected:
        _, err = proc.communicate(timeout=CHILD_TIMEOUT)
        raise AssertionError(f"child said {line!r}, not {expected!r}; stderr: {err}")


def _fences(state: PipelineState) -> list[int]:
    records = state.get_transaction_history(limit=None)  # type: ignore[arg-type]
    return [r["fence"] for r in reversed(records) if r.get("sha256") and "fence" in r]


def _host(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("PIPELINE_STATE_HOST", name)


def test_four_hosts_x_200_increments_lose_nothing(
    tmp_path: Path, redis_server: RedisServer, children: list[subprocess.Popen[str]]
) -> None:
    """4 processes on 4 simulated hosts x 200 increments through Redis end at exactly 800."""
    path = tmp_path / "pipeline.json"
    workers = [
        _spawn(WORKER, str(path), redis_server.url, "200", host=f"host{i}", cwd=tmp_path)
        for i in range(4)
    ]
    children.extend(workers)
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=CHILD_TIMEOUT)
        assert worker.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["done"] for r in results] == [200] * 4
    assert sum(r["retries"] for r in results) == 0
    state = PipelineState(path, lock=redis_server.url)
    assert state.read() == {"n": 800}
    fences = _fences(state)
    assert len(fences) == 800
    assert fences == sorted(set(fences)), "fencing tokens must strictly grow"
    assert len(list(tmp_path.glob("pipeline.json.lock.host*"))) == 4  # one flock per host
    report = state.verify()
    assert report, repr(report)
    assert "fencing tokens grow" in repr(report)


def test_waiter_and_cli_name_the_holder_read_from_redis(
    tmp_path: Path,
    redis_server: RedisServer,
    children: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A waiter's StateLockError and `pipeline-state lock --lock URL` name pid, host, op."""
    path = tmp_path / "pipeline.json"
    holder = _spawn(HOLDER, str(path), redis_server.url, host="alpha", cwd=tmp_path)
    children.append(holder)
    _wait_line(holder, "holding")
    _host(monkeypatch, "beta")
    waiter = PipelineState(path, lock=redis_server.url, timeout=0.5)
    with pytest.raises(StateLockError) as caught:
        with waiter.transaction():
            pass
    err = caught.value
    assert not isinstance(err, StateLockUnavailableError)
    assert err.holder is not None
    assert err.holder["pid"] == holder.pid
    assert err.holder["host"] == "alpha"
    assert err.holder["operation"] == "long-step"
    assert err.holder["since"].endswith("Z")
    assert f"pid {holder.pid} on alpha" in str(err)
    assert "'long-step'" in str(err)

    info = waiter.lock_info()
    assert info.held
    assert info.holder is not None
    assert info.holder["pid"] == holder.pid

    assert cli_main(["lock", str(path), "--lock", redis_server.url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["held"] is True
    assert shown["holder"]["pid"] == holder.pid
    assert shown["holder"]["host"] == "alpha"
    monkeypatch.setenv("PIPELINE_STATE_LOCK", redis_server.url)
    assert cli_main(["lock", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"pid {holder.pid} on alpha" in text
    assert "'long-step'" in text

    assert holder.stdin is not None
    holder.stdin.write("go\n")
    holder.stdin.flush()
    _wait_line(holder, "released")
    assert waiter.lock_info().held is False
    assert cli_main(["lock", str(path)]) == 0
    assert "free" in capsys.readouterr().out


def test_sigkilled_holder_frees_the_lock_within_a_bounded_time(
    tmp_path: Path,
    redis_server: RedisServer,
    children: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 of the holder: a waiter on another host gets the lock within 1 s (measured)."""
    path = tmp_path / "pipeline.json"
    PipelineState(path, lock=redis_server.url).write({"n": 1})
    holder = _spawn(HOLDER, str(path), redis_server.url, host="alpha", cwd=tmp_path)
    children.append(holder)
    _wait_line(holder, "holding")
    _host(monkeypatch, "beta")
    waiter = PipelineState(path, lock=redis_server.url, timeout=10)
    holder.kill()
    killed = time.monotonic()
    with waiter.transaction() as txn:
        waited = time.monotonic() - killed
        txn.data["n"] += 1
    print(f"SIGKILLed holder: lock free after {waited * 1000:.0f} ms")
    # Bound (docs/multi-host.md): the server drops the dead connection at once; a waiter
    # sees it at its next attempt (check_interval 0.05 s, jittered) plus a confirm probe.
    assert waited < 1.0
    assert waiter.read() == {"n": 2}  # the killed holder's change was never committed
    assert waiter.verify()


def _data_files(folder: Path) -> dict[Path, bytes]:
    """Every file's bytes except this host's flock file (it holds no data)."""
    return {
        p: p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith("pipeline.json.lock")
    }


def test_redis_unreachable_at_acquire_is_a_typed_error_and_writes_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis down: StateLockUnavailableError names the URL and what to check; no byte written."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url, timeout=2)
    state.write({"n": 1})
    before = _data_files(tmp_path)
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(StateLockUnavailableError) as caught:
        with state.transaction() as txn:
            txn.data["n"] = 2
    assert time.monotonic() - started < 2.0  # no waiting out the timeout
    err = caught.value
    assert isinstance(err, StateLockError)
    assert err.url == redis_server.url
    assert redis_server.url in str(err)
    assert "Check that Redis runs" in str(err)
    assert "Nothing was written" in str(err)
    assert _data_files(tmp_path) == before
    # A fresh state object on a port where nothing listens: the same error.
    other = PipelineState(path, lock=f"redis://127.0.0.1:{_free_port()}/0", timeout=1)
    with pytest.raises(StateLockUnavailableError):
        other.write({"n": 3})
    assert _data_files(tmp_path) == before


def test_redis_killed_during_a_transaction_refuses_the_commit(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis dies while the lock is held: the commit is refused before the replace."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    state.write({"n": 1})
    before = path.read_bytes()
    log_before = state.log_path.read_bytes()

    def change_while_redis_dies() -> None:
        with state.transaction() as txn:
            txn.data["n"] = 2
            redis_server.kill()

    with pytest.raises(StateLockLostError) as caught:
        change_while_redis_dies()
    assert "refused to commit" in str(caught.value)
    assert caught.value.token is not None
    assert path.read_bytes() == before
    assert state.log_path.read_bytes() == log_before  # nothing logged by a lost holder
    assert not list(tmp_path.glob(".pipeline.json.tmp"))
    assert len(state.list_backups()) == 0  # the backup made for it was discarded
    assert PipelineState(path).read() == {"n": 1}


def test_redis_killed_right_before_the_rename_refuses_the_commit(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis dies after the temp file and backup are durable: the last check refuses."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    state.write({"n": 1})
    before = path.read_bytes()
    log_before = state.log_path.read_bytes()
    sync = state.backup_manager.sync

    def sync_then_kill_redis() -> None:  # the last step before the fencing check
        sync()
        redis_server.kill()

    monkeypatch.setattr(state.backup_manager, "sync", sync_then_kill_redis)
    with pytest.raises(StateLockLostError) as caught:
        state.write({"n": 2})
    assert type(caught.value) is StateLockLostError  # not wrapped in a StateWriteError
    assert path.read_bytes() == before
    assert state.log_path.read_bytes() == log_before
    assert not (tmp_path / ".pipeline.json.tmp").exists()
    assert state.list_backups() == []  # the backup made for it was discarded


def test_a_failing_block_after_the_lock_was_lost_logs_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The block's own error propagates unchanged; a lost holder appends no failure record."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    state.write({"n": 1})
    log_before = state.log_path.read_bytes()

    def fail_after_redis_died() -> None:
        with state.transaction() as txn:
            txn.data["n"] = 2
            redis_server.kill()
            raise KeyError("the block's own error")

    with pytest.raises(KeyError, match="own error"):
        fail_after_redis_died()
    assert state.log_path.read_bytes() == log_before
    assert PipelineState(path).read() == {"n": 1}


# Increments n once, but stops itself (SIGSTOP) inside the transaction; after SIGCONT
# it reports how its commit ended.
PAUSED = """
import os, signal, sys
from pipeline_common import PipelineState, StateLockLostError

state = PipelineState(sys.argv[1], lock=sys.argv[2], timeout=30)
try:
    with state.transaction(operation="paused") as txn:
        txn.data["n"] = txn.data.get("n", 0) + 1
        print("holding", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
except StateLockLostError as exc:
    print("refused", exc.token, flush=True)
else:
    print("committed", flush=True)
"""


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.01)
    raise AssertionError("the holder did not stop")


def test_paused_holder_that_lost_the_lock_cannot_commit(
    tmp_path: Path,
    redis_server: RedisServer,
    children: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGSTOP the holder; another host takes the lock and commits; SIGCONT: refused."""
    path = tmp_path / "pipeline.json"
    PipelineState(path, lock=redis_server.url).write({"n": 0})
    paused = _spawn(PAUSED, str(path), redis_server.url, host="alpha", cwd=tmp_path)
    children.append(paused)
    _wait_line(paused, "holding")
    _wait_stopped(paused.pid)
    _host(monkeypatch, "beta")
    other = PipelineState(path, lock=redis_server.url, timeout=15)
    started = time.monotonic()
    for _ in range(3):
        with other.transaction() as txn:
            txn.data["n"] += 1
    # The waiter gave the silent holder unavailable_timeout (1 s) before cutting it off.
    assert time.monotonic() - started < 10
    os.kill(paused.pid, signal.SIGCONT)
    out, err = paused.communicate(timeout=CHILD_TIMEOUT)
    assert out.strip().splitlines()[-1].startswith("refused"), (out, err)
    assert other.read() == {"n": 3}  # exact: the paused writer's +1 never landed
    fences = _fences(other)
    assert fences == sorted(set(fences))
    assert other.verify()


def test_redis_restarted_mid_run_keeps_the_counter_exact(
    tmp_path: Path, redis_server: RedisServer, children: list[subprocess.Popen[str]]
) -> None:
    """Kill and restart Redis twice while 3 hosts write: no lost or doubled increment."""
    path = tmp_path / "pipeline.json"
    workers = [
        _spawn(WORKER, str(path), redis_server.url, "50", host=f"host{i}", cwd=tmp_path)
        for i in range(3)
    ]
    children.extend(workers)
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    watcher = PipelineState(path)  # reads the log's version, takes no lock
    for at_least in (10, 60):  # restart while writers are busy, twice
        deadline = time.monotonic() + CHILD_TIMEOUT
        while watcher.version < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        redis_server.kill()  # every key gone: the counter restarts from the log's token
        time.sleep(0.3)
        redis_server.start()
    done = retries = 0
    for worker in workers:
        out, err = worker.communicate(timeout=CHILD_TIMEOUT)
        assert worker.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        done += result["done"]
        retries += result["retries"]
    assert done == 150
    assert retries > 0, "the restarts must have hit running writers"
    state = PipelineState(path, lock=redis_server.url)
    assert state.read() == {"n": 150}
    fences = _fences(state)
    assert fences == sorted(set(fences)), "two holders committed with one token order"
    assert state.verify(), repr(state.verify())


def test_verify_flags_fencing_tokens_that_go_backwards(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A log whose commit tokens go backwards (a stale writer committed) fails verify()."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    for n in range(3):
        state.write({"n": n})
    assert state.verify()
    # Rewrite the log with the second commit's token smaller than the first's, chained
    # again line by line, so only the fencing check can object.
    lines = log_module.read_lines(state.log_path)
    records = [json.loads(line) for line in lines]
    records[1]["fence"] = records[0]["fence"] - 1
    out, prev = [], None
    for record in records:
        record["prev"] = prev
        raw = json.dumps(record, separators=(",", ":")).encode()
        out.append(raw)
        prev = log_module.line_hash(raw)
    state.log_path.write_bytes(b"\n".join(out) + b"\n")
    report = PipelineState(path, lock=redis_server.url).verify()
    assert not report
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == ["fencing tokens grow"]
    assert f"token {records[1]['fence']} after {records[0]['fence']}" in failed[0].detail


def test_progress_tracker_and_threads_work_unchanged_through_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """ProgressTracker and 4 threads sharing one state work through the Redis lock as before."""
    state = PipelineState(tmp_path / "pipeline.json", lock=RedisLock(redis_server.url))
    tracker = ProgressTracker(state, stages=["load", "train"])
    tracker.start("load", total=3)
    tracker.advance("load", 3)
    tracker.complete("load")
    tracker.flush()
    assert state.read()["load"]["status"] == "success"

    def bump() -> None:
        for _ in range(10):
            with state.transaction() as txn:
                txn.data["n"] = txn.data.get("n", 0) + 1

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert state.read()["n"] == 40
    assert state.verify()


def test_bad_lock_argument_is_a_value_error(tmp_path: Path) -> None:
    """lock= takes 'flock', a redis:// URL or a RedisLock; anything else is refused."""
    with pytest.raises(ValueError, match="redis://"):
        PipelineState(tmp_path / "p.json", lock="http://example.com")
    with pytest.raises(ValueError, match="lock must be"):
        PipelineState(tmp_path / "p.json", lock=42)  # type: ignore[arg-type]


def test_redis_lock_without_the_extra_names_the_install_command(run_child: Any) -> None:
    """Without the redis extra the core imports and flock works; a Redis lock names the fix."""
    result = run_child(
        """
        import sys
        sys.modules["redis"] = None  # as if the extra were not installed
        sys.modules["portalocker"] = None
        from pipeline_common import PipelineState
        PipelineState("p.json").write({"n": 1})
        try:
            PipelineState("p.json", lock="redis://127.0.0.1:6379/0")
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'pipeline-common[redis]'" in result.stdout


def test_password_is_never_shown(tmp_path: Path) -> None:
    """A password in the URL does not appear in repr or error messages."""
    lock = RedisLock(f"redis://user:s3cret@127.0.0.1:{_free_port()}/0")
    assert "s3cret" not in repr(lock)
    state = PipelineState(tmp_path / "p.json", lock=lock, timeout=1)
    with pytest.raises(StateLockUnavailableError) as caught:
        state.write({"n": 1})
    assert "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)


def test_cli_commands_that_lock_go_through_redis(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`repair` and `restore --yes` with --lock take the Redis lock and commit fenced."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    state.write({"n": 1})
    state.write({"n": 2})
    assert cli_main(["repair", str(path), "--lock", redis_server.url]) == 0
    backup = state.list_backups()[0]
    assert cli_main(["restore", str(path), backup.name, "--yes", "--lock", redis_server.url]) == 0
    capsys.readouterr()
    assert state.read() == {"n": 1}
    newest = state.get_transaction_history(1)[0]
    assert newest["operation"] == "restore"
    assert newest["fence"] > _fences(state)[-2]
    assert state.verify()


def test_cli_bad_lock_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--lock` that is neither flock nor a Redis URL: exit 2 with one line."""
    path = tmp_path / "pipeline.json"
    PipelineState(path).write({"n": 1})
    assert cli_main(["lock", str(path), "--lock", "http://nowhere"]) == 2
    assert "redis://" in capsys.readouterr().err


def test_new_lock_errors_pickle_with_their_facts() -> None:
    """The two new errors cross process boundaries with url, token and holder."""
    import pickle

    lost = StateLockLostError("m", path="p.json", url="redis://h/0", token=7, holder={"pid": 1})
    back = pickle.loads(pickle.dumps(lost))
    assert (back.url, back.token, back.holder, back.path) == (
        "redis://h/0",
        7,
        {"pid": 1},
        Path("p.json"),
    )
    down = StateLockUnavailableError("m", path="p.json", url="redis://h/0", timeout=2.0)
    back_down = pickle.loads(pickle.dumps(down))
    assert (back_down.url, back_down.timeout) == ("redis://h/0", 2.0)
    assert isinstance(back_down, TimeoutError)


def test_a_recovery_record_in_the_same_hold_does_not_fence_out_the_commit(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A file changed outside the library is recorded (recover, this hold's token), and the
    transaction's own commit with that same token goes through; verify stays healthy."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    state.write({"n": 1})
    path.write_text('{"n": 5}')  # an outside write (or a crash before the log record)
    with state.transaction() as txn:
        txn.data["n"] += 1
    assert state.read() == {"n": 6}
    newest = state.get_transaction_history(2)
    assert [r["operation"] for r in newest] == ["transaction", "recover"]
    assert newest[0]["fence"] == newest[1]["fence"]
    report = state.verify()
    assert report, repr(report)


def test_a_migration_in_the_same_hold_does_not_fence_out_the_commit(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A migrate commit and the transaction's commit share one hold's token: both land."""
    path = tmp_path / "pipeline.json"
    PipelineState(path, lock=redis_server.url).write({"n": 1})
    state = PipelineState(
        path, lock=redis_server.url, schema_version=2, migrations={1: lambda d: {**d, "m": 1}}
    )
    with state.transaction() as txn:
        txn.data["n"] += 1
    assert state.read() == {"n": 2, "m": 1}
    assert state.verify(), repr(state.verify())


def _rewrite_log(log_path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` as the log, chained again line by line."""
    out, prev = [], None
    for record in records:
        record["prev"] = prev
        raw = json.dumps(record, separators=(",", ":")).encode()
        out.append(raw)
        prev = log_module.line_hash(raw)
    log_path.write_bytes(b"\n".join(out) + b"\n")


def test_verify_flags_one_token_used_by_two_writers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The same token twice is fine from one hold, not from two writers."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    for n in range(3):
        state.write({"n": n})
    records = [json.loads(line) for line in log_module.read_lines(state.log_path)]
    records[1]["fence"] = records[0]["fence"]  # same token, same pid and host: one hold
    _rewrite_log(state.log_path, records)
    assert PipelineState(path).verify()
    records[1]["pid"] = records[0]["pid"] + 1  # another writer with that token
    _rewrite_log(state.log_path, records)
    report = PipelineState(path).verify()
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == ["fencing tokens grow"]


class _Interrupter:
    """A trace function that raises KeyboardInterrupt at the entry of the ``target``-th
    call of a ``pipeline_common`` function (as tests/test_interrupts.py does)."""

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.calls = 0
        self.fired: str | None = None

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        import inspect

        if event != "call" or not frame.f_code.co_filename.startswith(_PACKAGE):
            return
        if frame.f_code.co_flags & inspect.CO_GENERATOR and frame.f_lasti > 0:
            return
        self.calls += 1
        if self.target is not None and self.calls == self.target + 1:
            sys.settrace(None)
            self.fired = f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_qualname}"
            raise KeyboardInterrupt


_PACKAGE = str(Path(__import__("pipeline_common").__file__).parent)


def test_ctrl_c_at_every_call_of_a_redis_transaction_leaves_no_lock_held(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at the entry of each package call of a transaction in turn (acquire, commit,
    a release half done): another host then gets the Redis lock at once and the next
    transaction commits (a release cut short used to keep the subscription, and the next
    transaction failed with 'This lock is already active')."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url, durability="atomic")
    state.write({"n": 0})
    _host(monkeypatch, "other")
    other = PipelineState(path, lock=redis_server.url, timeout=2)
    monkeypatch.delenv("PIPELINE_STATE_HOST")

    def bump(target: int | None) -> _Interrupter:
        tracer = _Interrupter(target)
        sys.settrace(tracer)
        try:
            with state.transaction() as txn:
                txn.data["n"] += 1
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        return tracer

    calls = bump(None).calls
    assert calls > 50
    for target in range(calls):
        fired = bump(target).fired
        if fired is None:
            continue
        if not fired.endswith("StateTransaction.__exit__"):  # healed by the next one
            other._lock.acquire(2, "probe", other.path)  # another host: free at once
            other._lock.release()
        token = os.urandom(4).hex()
        with state.transaction() as txn:
            txn.data["token"] = token
        assert state.read()["token"] == token, fired
        other._lock.acquire(2, "probe", other.path)
        other._lock.release()
    assert state.verify(), repr(state.verify())


def test_auth_failure_and_a_missing_database_say_what_to_check(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A refused password and a database the server lacks: typed errors that name the URL
    (password hidden) and the part of it to check; nothing written."""
    path = tmp_path / "pipeline.json"
    port = redis_server.port
    import redis

    with redis.Redis(port=port) as admin:
        admin.config_set("requirepass", "s3cret")
    bad_password = PipelineState(path, lock=f"redis://:wrong@127.0.0.1:{port}/0", timeout=2)
    with pytest.raises(StateLockUnavailableError) as caught:
        bad_password.write({"n": 1})
    message = str(caught.value)
    assert "wrong" not in message
    assert f"redis://:***@127.0.0.1:{port}/0" in message
    assert "credentials" in message
    assert "password" in message
    no_db = PipelineState(path, lock=f"redis://:s3cret@127.0.0.1:{port}/99", timeout=2)
    with pytest.raises(StateLockUnavailableError) as caught:
        no_db.write({"n": 1})
    assert "no such database" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert not path.exists()


def test_a_database_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    """redis-py would quietly use database 0 for /abc; the lock refuses the URL."""
    for url in ("redis://127.0.0.1:6379/abc", "redis://127.0.0.1:6379/0?db=x"):
        with pytest.raises(ValueError, match="database"):
            RedisLock(url)
    RedisLock("redis://127.0.0.1:6379/3")
    RedisLock("redis://127.0.0.1:6379?db=2")
    RedisLock("unix:///run/redis.sock?db=1")


def test_tokens_keep_growing_after_a_flock_commit_and_a_redis_restart(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis commits, one commit under flock (no token), Redis restarted empty: the next
    token is still above every logged one, so verify() reports nothing false."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    for n in range(3):
        state.write({"n": n})
    PipelineState(path).write({"n": 3})  # e.g. a maintenance window without Redis
    redis_server.kill()
    redis_server.start()  # every key gone, the counter with them
    state.write({"n": 4})
    fences = _fences(state)
    assert fences[-1] > max(fences[:-1]), fences
    report = state.verify()
    assert report, repr(report)


def test_verify_on_a_host_that_never_wrote_takes_the_lock_for_its_last_pass(
    tmp_path: Path,
    redis_server: RedisServer,
    children: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A problem every lock-free pass sees: verify() on a host with no flock file of its
    own still tries the Redis lock for a quiet pass (it used to skip it), waits for the
    holder on another host up to its timeout, and reports what it found."""
    path = tmp_path / "pipeline.json"
    _host(monkeypatch, "alpha")
    PipelineState(path, lock=redis_server.url).write({"n": 0})
    holder = _spawn(HOLDER, str(path), redis_server.url, host="alpha", cwd=tmp_path)
    children.append(holder)
    _wait_line(holder, "holding")
    (tmp_path / ".pipeline.json.tmp").write_bytes(b"{}")  # a problem every pass sees
    _host(monkeypatch, "reader")
    reader = PipelineState(path, lock=redis_server.url, timeout=1.0)
    started = time.monotonic()
    report = reader.verify()
    assert time.monotonic() - started >= 0.9  # it waited for the lock: a locked pass
    assert not report
    assert holder.stdin is not None
    holder.stdin.write("go\n")
    holder.stdin.flush()
    _wait_line(holder, "released")
    assert reader.verify()  # the holder's commit reused the orphan's name


def test_a_refused_writer_leaves_the_new_holders_temp_file_alone(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that lost the lock while paused after writing its temp file finds, at the
    temp name, the file of the holder that took over (which removed ours as an orphan).
    Its refusal must not remove that file: the new holder's rename would then fail."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    state.write({"n": 1})
    tmp = tmp_path / ".pipeline.json.tmp"
    sync = state.backup_manager.sync

    def paused_while_another_host_took_over() -> None:  # the last step before the check
        sync()
        if not tmp.exists():  # not the sync right before the replace
            return
        redis_server.kill()  # the lock is lost
        time.sleep(0.02)  # paused: file times move on by more than one clock tick
        tmp.unlink()  # what the new holder does with our temp file ...
        tmp.write_bytes(b'{"n": 2, "by": "the new holder"}')  # ... then writes its own

    monkeypatch.setattr(state.backup_manager, "sync", paused_while_another_host_took_over)
    with pytest.raises(StateLockLostError):
        state.write({"n": 99})
    assert tmp.read_bytes() == b'{"n": 2, "by": "the new holder"}'
    assert json.loads(path.read_bytes()) == {"n": 1}


def test_cli_usage_errors_never_show_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --lock URL with a password: the usage error names it with the password hidden."""
    path = tmp_path / "pipeline.json"
    PipelineState(path).write({"n": 1})
    for url in ("http://:hunter2@nowhere/0", "redis://:hunter2@127.0.0.1:6379/abc"):
        assert cli_main(["lock", str(path), "--lock", url]) == 2
        err = capsys.readouterr().err
        assert "hunter2" not in err
        assert ":***@" in err


def test_a_writer_paused_past_its_fence_check_never_renames_the_new_holders_temp_file(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window fencing leaves: the writer passed its check, then paused; the holder
    that took over replaced the temp file with its own unfinished one. The writer must
    not rename that file over the state (a torn state): it checks the temp file is still
    its own right before the rename."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, lock=redis_server.url)
    state.write({"n": 1})
    tmp = tmp_path / ".pipeline.json.tmp"
    lock = state._lock
    real_check = lock.check

    def checked_then_paused(*args: Any, **kwargs: Any) -> None:
        real_check(*args, **kwargs)  # passes: the lock is not lost yet
        if tmp.exists():  # the check right before the replace
            time.sleep(0.02)  # file times move on by more than one clock tick
            tmp.unlink()  # the new holder removes our temp file as an orphan ...
            tmp.write_bytes(b'{"n": 2, "by": "the new hol')  # ... and is writing its own

    monkeypatch.setattr(lock, "check", checked_then_paused)
    with pytest.raises(StateWriteError, match="no longer this writer's"):
        state.write({"n": 99})
    assert json.loads(path.read_bytes()) == {"n": 1}
    assert tmp.read_bytes() == b'{"n": 2, "by": "the new hol'
