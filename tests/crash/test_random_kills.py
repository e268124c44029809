"""Random SIGKILLs of children that commit in a loop; crashes accumulate in one folder."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from pipeline_common import PipelineState
from pipeline_common.testing import check_invariants, random_kills

from ._scenarios import MAX_BACKUPS, state_file

KIB = 1024


def _one_commit(path: Path) -> None:
    """One transaction of a random size between 0 and 256 KiB."""
    rng = random.Random(os.getpid() * 1000 + int(time.monotonic_ns() % 1000))
    state = PipelineState(path, max_backups=MAX_BACKUPS, timeout=5)
    with state.transaction() as txn:
        txn.data["n"] = txn.data.get("n", 0) + 1
        txn.data["payload"] = "p" * rng.randrange(0, 256 * KIB)


def _kill_run(tmp_path: Path, kills: int, seed: int) -> tuple[int, int]:
    path = state_file(tmp_path)
    results = list(
        random_kills(
            lambda: _one_commit(path),
            path,
            kills=kills,
            max_delay=0.015,
            seed=seed,
            max_backups=MAX_BACKUPS,
            recover_every=50,
        )
    )
    final = check_invariants(path, max_backups=MAX_BACKUPS, backup_slack=None, after_crash=True)
    acked = results[-1].acknowledged
    n = final.state["n"] if final.state else 0
    # Every acknowledged commit is in n; at most the one in flight at each kill on top.
    assert acked <= n <= acked + kills
    return kills, acked


def test_1000_random_kills_lose_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1,000 kills (one child each) at random times: no corruption, no lost acknowledged commit."""
    kills, acked = _kill_run(tmp_path, 1000, seed=4)
    with capsys.disabled():
        print(f"\nrandom kills survived: {kills}, acknowledged commits: {acked}")
    assert acked > 100


@pytest.mark.slow
def test_20000_random_kills_lose_nothing(tmp_path: Path) -> None:
    """The nightly size of the test above."""
    _kill_run(tmp_path, 20_000, seed=5)


def _writer(path: Path, report: Path) -> None:
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    state = PipelineState(path, max_backups=MAX_BACKUPS, timeout=30)
    while True:
        with state.transaction() as txn:
            n = txn.data.get("n", 0) + 1
            txn.data["n"] = n
            txn.data["payload"] = "w" * (n * 7919 % (64 * KIB))
        os.write(fd, f"{n}\n".encode())


def _reader(path: Path, report: Path) -> None:
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    state = PipelineState(path, max_backups=MAX_BACKUPS)
    seen = 0
    reads = 0
    while True:
        try:
            n = state.read().get("n", 0)
        except Exception as exc:  # a torn read is exactly what this test looks for
            os.write(fd, f"ERROR {exc!r}\n".encode())
            continue
        reads += 1
        if n < seen:
            os.write(fd, f"BACKWARDS {seen} -> {n}\n".encode())
        seen = n
        if reads % 200 == 0:
            os.write(fd, f"READS {reads}\n".encode())


def _spawn(target, *args: Path) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            target(*args)
        finally:
            os._exit(1)
    return pid


def _two_writers_one_reader(tmp_path: Path, kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    path = state_file(tmp_path / "state")
    reports = [tmp_path / f"r{i}.txt" for i in range(3)]
    targets = [_writer, _writer, _reader]
    pids = [_spawn(t, path, r) for t, r in zip(targets, reports, strict=False)]
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0, 0.02))
            victim = rng.randrange(3)
            os.kill(pids[victim], signal.SIGKILL)
            os.waitpid(pids[victim], 0)
            report = (
                check_invariants(path, max_backups=None, after_crash=True, lock_timeout=5.0)
                if victim == 2
                else None
            )
            del report
            pids[victim] = _spawn(targets[victim], path, reports[victim])
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    acks = [int(x) for r in reports[:2] for x in r.read_text().split()]
    reader = reports[2].read_text().splitlines() if reports[2].exists() else []
    problems = [line for line in reader if not line.startswith("READS")]
    reads = max((int(line.split()[1]) for line in reader if line.startswith("READS")), default=0)
    final = check_invariants(path, max_backups=MAX_BACKUPS, backup_slack=kills, after_crash=True)
    n = final.state["n"] if final.state else 0
    assert not problems, problems[:5]
    # Two writers never acknowledge the same n: that would be a lost update.
    assert len(acks) == len(set(acks)), "two writers acknowledged the same version"
    assert not acks or n >= max(acks), "an acknowledged commit was lost"
    # The log records are a clean, increasing sequence after one clean commit.
    with PipelineState(path, max_backups=MAX_BACKUPS).transaction(validate=False):
        pass
    check_invariants(path, max_backups=MAX_BACKUPS, after_crash=False)
    history = PipelineState(path).get_transaction_history(limit=None)  # type: ignore[arg-type]
    assert all(isinstance(json.dumps(r), str) for r in history)
    return {"kills": kills, "acks": len(acks), "reads": reads}


def test_two_writers_one_reader_under_random_kills(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two writers and a lock-free reader, killed at random: reads parse and never go back."""
    counts = _two_writers_one_reader(tmp_path, 200, seed=7)
    with capsys.disabled():
        print(f"\ntwo writers + reader: {counts}")
    assert counts["acks"] > 50


@pytest.mark.slow
def test_two_writers_one_reader_nightly(tmp_path: Path) -> None:
    """The nightly size of the test above."""
    _two_writers_one_reader(tmp_path, 5000, seed=8)
