"""Readers under load: every read API and CLI read command, looping while writers commit.

Two writer processes commit (2,000 commits in all by default; 10,000 in the ``slow``
variant) with ``max_backups=5``, so backups are linked, copied (``create_backup``) and
pruned all the time. Meanwhile each reader below loops in its own thread of this
process (the CLI commands share one thread, since they redirect stdout). Every answer
is checked against an oracle the writers keep true: each commit adds one to ``n``, so
the version at generation ``g`` holds ``n == g - 1``. A reader may say "that backup
was pruned" only when it was (the generation asked for is no longer current); any other
problem, false report or raw exception fails the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, ProgressTracker, StateBackupError
from pipeline_common.cli import main

pytestmark = pytest.mark.multiprocess

_WRITER = """
import sys
from pipeline_common import PipelineState

state = PipelineState(sys.argv[1], max_backups=5, timeout=60)
who, commits = sys.argv[2], int(sys.argv[3])
for i in range(commits):
    with state.transaction(operation=f"load: writer {who}") as txn:
        txn.data["n"] += 1
        txn.data["phase1"]["by"] = who
    if who == "b" and i % 50 == 0:
        state.backup_manager.create_backup()  # a copy, pruned like the others
print("done", flush=True)
"""


def _n_at(data: dict[str, Any]) -> int:
    return int(data["n"])


def _read_versioned(state: PipelineState, seen: Counter[str]) -> None:
    data, version = state.read_versioned()
    assert _n_at(data) == version - 1, (data, version)


def _verify(state: PipelineState, seen: Counter[str]) -> None:
    report = state.verify()
    assert report, report


def _history(state: PipelineState, seen: Counter[str]) -> None:
    records = state.history(30)
    seqs = [r.seq for r in records]
    assert seqs == list(range(seqs[0], seqs[0] - len(seqs), -1)), seqs
    generations = [r.generation for r in records if r.commits]
    assert generations == sorted(generations, reverse=True), generations
    assert all(r.success for r in records), records


def _backups(state: PipelineState, seen: Counter[str]) -> None:
    for info in state.backups():
        assert info.generation is not None, info
        try:
            data = info.read()
        except FileNotFoundError:
            seen["pruned while read"] += 1
            continue
        assert _n_at(data) == info.generation - 1, (info, data)


def _expect_pruned(state: PipelineState, generation: int, seen: Counter[str]) -> None:
    """A StateBackupError for ``generation`` is true only when no backup can hold it: it
    is 0 (before the first commit), or enough newer backups were made since to prune
    its own (made by commit ``generation + 1``; five newer ones prune it, and at most
    one of those is a create_backup() within any four commits here)."""
    lag = state.version - generation
    assert generation < 1 or lag >= 4, f"generation {generation} not found, {lag} behind"
    seen["pruned (true answer)"] += 1


def _at(state: PipelineState, seen: Counter[str]) -> None:
    generation = state.version
    try:
        data = state.at(generation)
    except StateBackupError:
        _expect_pruned(state, generation, seen)
        return
    assert _n_at(data) == generation - 1, (generation, data)


def _diff(state: PipelineState, seen: Counter[str]) -> None:
    generation = state.version - 1
    try:
        changes = state.diff(generation, "current")
    except StateBackupError:
        _expect_pruned(state, generation, seen)
        return
    (n_change,) = [c for c in changes if c.pointer == "/n"]
    assert n_change.old == generation - 1, changes


def _status(state: PipelineState, seen: Counter[str]) -> None:
    with ProgressTracker(state) as tracker:  # a view: follows the stored plan, writes nothing
        status = tracker.status()
    assert status["status"] == "running", status
    assert status["stages"]["phase1"]["status"] == "running", status


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _cli_commands(state: PipelineState, seen: Counter[str]) -> None:
    path = str(state.path)
    for args in (["verify", path], ["history", path, "-n", "20"], ["lock", path]):
        code, out, err = _cli(args)
        assert code == 0, (args, code, out, err)
    code, out, err = _cli(["show", path, "--json"])
    assert code == 0, (code, err)
    shown = json.loads(out)
    assert _n_at(shown["data"]) == shown["generation"] - 1, shown
    code, out, err = _cli(["status", path, "--json"])
    assert code == 0, (code, err)
    assert json.loads(out)["status"] == "running"
    code, out, err = _cli(["backups", path, "--json"])
    assert code == 0, (code, err)
    for backup in json.loads(out)["backups"]:
        assert backup["generation"] is not None, backup
    generation = state.version - 1
    code, out, err = _cli(["diff", path, str(generation), "--json"])
    if code in (1, 2) and "no backup" in err:  # 2: gone before the lookup, 1: during it
        _expect_pruned(state, generation, seen)
    else:
        assert code == 0, (code, out, err)
        (n_change,) = [c for c in json.loads(out)["changes"] if c["pointer"] == "/n"]
        assert n_change["old"] == generation - 1, out


_READERS: dict[str, Callable[[PipelineState, Counter[str]], None]] = {
    "state.read_versioned()": _read_versioned,
    "state.verify()": _verify,
    "state.history()": _history,
    "state.backups()": _backups,
    "state.at()": _at,
    "state.diff()": _diff,
    "ProgressTracker.status()": _status,
    "CLI verify/history/lock/show/status/backups/diff": _cli_commands,
}


def _run_under_load(tmp_path: Path, spawn_child: Any, commits_each: int) -> dict[str, int]:
    """Loop every reader while two writers commit; return each reader's loop count."""
    path = tmp_path / "pipeline.json"
    PipelineState(path, max_backups=5).write({"n": 0, "phase1": {"status": "running"}})
    writers = [spawn_child(_WRITER, str(path), who, str(commits_each)) for who in ("a", "b")]
    done = threading.Event()
    loops: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    failures: list[str] = []

    def loop(name: str, reader: Callable[[PipelineState, Counter[str]], None]) -> None:
        state = PipelineState(path, max_backups=5, timeout=60)
        while not done.is_set():
            try:
                reader(state, seen)
            except BaseException as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}"[:2000])
                return
            loops[name] += 1
            time.sleep(0.001)  # leave the writers some CPU: this box may have two cores

    threads = [
        threading.Thread(target=loop, args=(name, reader), daemon=True)
        for name, reader in _READERS.items()
    ]
    for thread in threads:
        thread.start()
    try:
        for writer in writers:
            out, err = writer.communicate(timeout=600)
            assert writer.returncode == 0, err
            assert out.strip() == "done", (out, err)
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures, "\n".join(failures)
    final = PipelineState(path, max_backups=5)
    assert final.read()["n"] == 2 * commits_each
    assert final.verify(), final.verify()
    counts = dict(loops)
    sys.stderr.write(f"\nreader loops during {2 * commits_each} commits: {counts}; {dict(seen)}\n")
    for name in _READERS:
        assert counts.get(name, 0) >= 3, (name, counts)  # each really overlapped the writers
    return counts


def test_readers_never_report_a_false_problem_while_two_writers_commit(
    tmp_path: Path, spawn_child: Any
) -> None:
    """2,000 commits by two processes; every reader loops meanwhile, always right."""
    start = time.monotonic()
    _run_under_load(tmp_path, spawn_child, commits_each=1000)
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_readers_never_report_a_false_problem_over_ten_thousand_commits(
    tmp_path: Path, spawn_child: Any
) -> None:
    """The long variant: 10,000 commits by two processes."""
    _run_under_load(tmp_path, spawn_child, commits_each=5000)
