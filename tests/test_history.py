"""Generations, expect_version, history(), backups(), at(), dry-run restores, lock_info(),
wait_for_change(), on_commit hooks, durability levels and compressed backups."""

from __future__ import annotations

import doctest
import gzip
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import (
    BackupInfo,
    HistoryRecord,
    PipelineState,
    StateBackupError,
    StateConflictError,
    _fs,
)

ROOT = Path(__file__).resolve().parents[1]
FSYNC_OPS = {"fsync", "fsync_dir", "fdatasync"}


def commit(state: PipelineState, operation: str, **changes: Any) -> None:
    """Commit ``changes`` as one transaction named ``operation``."""
    with state.transaction(operation=operation) as txn:
        txn.data.update(changes)


def fail(state: PipelineState, operation: str, exc: BaseException, **changes: Any) -> None:
    """Open a transaction named ``operation``, make ``changes``, then raise ``exc``."""
    with state.transaction(operation=operation) as txn:
        txn.data.update(changes)
        raise exc


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (sidecars included) and its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture
def fs_calls() -> Iterator[list[tuple[str, str, str]]]:
    """Record every ``(when, op, path)`` of the write path through the ``_fs`` seam."""
    calls: list[tuple[str, str, str]] = []
    previous = _fs.set_hook(lambda when, op, path: calls.append((when, op, path)))
    yield calls
    _fs.set_hook(previous)


# -- generations and expect_version ---------------------------------------------------


def test_version_counts_commits_and_read_versioned_pairs_data_with_it(
    state: PipelineState,
) -> None:
    """version is 0 before the first commit and grows by one per commit, not per record."""
    assert state.version == 0
    assert state.read_versioned() == ({}, 0)
    commit(state, "a", n=1)
    with pytest.raises(RuntimeError):
        fail(state, "rolled back", RuntimeError("rolled back"), n=99)
    commit(state, "b", n=2)
    assert state.version == 2
    assert state.read_versioned() == ({"n": 2}, 2)


def test_expect_version_mismatch_raises_before_the_block_and_changes_nothing(
    state: PipelineState,
) -> None:
    """A stale expect_version raises StateConflictError with both versions; the file stays."""
    commit(state, "a", n=1)
    _, version = state.read_versioned()
    commit(state, "b", n=2)
    before = state.path.read_bytes()
    ran: list[bool] = []

    def stale_write() -> None:
        with state.transaction(expect_version=version) as txn:
            ran.append(True)
            txn.data["n"] = 3

    with pytest.raises(StateConflictError) as info:
        stale_write()
    assert ran == []
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert info.value.path == state.path
    assert state.path.read_bytes() == before
    with state.transaction(expect_version=2) as txn:
        txn.data["n"] = 3
    assert state.read_versioned() == ({"n": 3}, 3)


_RACER = """
import sys
from pipeline_common import PipelineState, StateConflictError

path, expect, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
state = PipelineState(path, timeout=30)
print("ready", flush=True)
sys.stdin.readline()  # the start signal: both racers go at once
try:
    with state.transaction(expect_version=expect, operation=name) as txn:
        txn.data["winner"] = name
except StateConflictError as exc:
    print("conflict", exc.expected, exc.actual, flush=True)
else:
    print("won", flush=True)
"""


@pytest.mark.multiprocess
def test_two_processes_racing_with_expect_version_exactly_one_wins(
    state: PipelineState, spawn_child: Any
) -> None:
    """Both read version 1 and commit with expect_version=1: one wins, one gets a conflict."""
    commit(state, "setup", winner=None)
    racers = [spawn_child(_RACER, str(state.path), "1", name) for name in ("left", "right")]
    for proc in racers:
        assert proc.stdout.readline().strip() == "ready"
    for proc in racers:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = {}
    for name, proc in zip(("left", "right"), racers, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs[name] = out.strip()
    assert sorted(outputs.values()) == ["conflict 1 2", "won"]
    winner = next(name for name, out in outputs.items() if out == "won")
    assert state.read_versioned() == ({"winner": winner}, 2)
    records = state.history(5)
    assert next(r for r in records if r.success).operation == winner
    # The loser's refusal is in the audit trail, and it committed nothing.
    loser = [r for r in records if not r.success]
    assert len(loser) == 1
    assert "StateConflictError" in loser[0].details["error"]


# -- history() ------------------------------------------------------------------------


def test_history_records_are_newest_first_with_one_line_reprs(state: PipelineState) -> None:
    """history() gives HistoryRecords, newest first; each repr is one line."""
    commit(state, "first", a=1)
    with pytest.raises(ValueError):
        fail(state, "broken", ValueError("no good"), a=2)
    commit(state, "second", b=2)
    records = state.history()
    assert all(isinstance(r, HistoryRecord) for r in records)
    assert [(r.seq, r.generation, r.operation, r.success) for r in records] == [
        (3, 2, "second", True),
        (2, 1, "broken", False),
        (1, 1, "first", True),
    ]
    assert [r.commits for r in records] == [True, False, True]
    assert records[1].details["error"] == "ValueError: no good"
    assert records[0].pid == os.getpid()
    assert records[0].host
    assert records[0].duration_ms is not None
    assert records[0].duration_ms >= 0
    for record in records:
        text = repr(record)
        assert "\n" not in text
        assert text.startswith(f"<#{record.seq} gen {record.generation} ")
    assert "'broken' FAILED" in repr(records[1])
    assert "error: ValueError: no good" in repr(records[1])
    assert repr(records[0]).endswith("changed /b>")
    assert len(state.history(limit=1)) == 1


def test_history_repr_stays_one_line_for_a_multi_line_error(state: PipelineState) -> None:
    """An exception message with newlines (tracebacks, subprocess output) still gives one line."""
    with pytest.raises(RuntimeError), state.transaction(operation="tts"):
        raise RuntimeError("engine crashed:\n  stderr: out of memory\n  exit 137")
    (record,) = state.history(1)
    assert "\n" not in repr(record), repr(record)
    assert "engine crashed:" in repr(record)


def test_commit_record_changes_lists_changed_top_level_keys(state: PipelineState) -> None:
    """The ``changes`` field of a commit names the top-level keys added, changed or removed."""
    commit(state, "one", keep=1, edit={"deep": [1, 2]}, drop="x")
    assert sorted(state.history(1)[0].changes or []) == ["/drop", "/edit", "/keep"]
    with state.transaction(operation="two") as txn:
        txn.data["edit"]["deep"].append(3)
        del txn.data["drop"]
        txn.data["new/key"] = True
    record = state.history(1)[0]
    assert sorted(record.changes or []) == ["/drop", "/edit", "/new~1key"]
    assert record.raw["changes"] == record.changes
    with state.transaction(operation="noop"):
        pass
    assert state.history(1)[0].changes == []


# -- backups() and at() -----------------------------------------------------------------


def test_backups_carry_the_generation_and_operation_they_hold(state: PipelineState) -> None:
    """Each BackupInfo names the generation it holds and the operation that committed it."""
    for n, op in enumerate(("extract", "transcribe", "render"), start=1):
        commit(state, op, n=n)
    infos = state.backups()
    assert all(isinstance(i, BackupInfo) for i in infos)
    assert [(i.generation, i.operation) for i in infos] == [(2, "transcribe"), (1, "extract")]
    assert [i.path for i in infos] == state.list_backups()
    for info in infos:
        assert json.loads(info.path.read_bytes()) == {"n": info.generation}
        assert info.size == info.path.stat().st_size
        assert not info.compressed
        assert "\n" not in repr(info)
        assert f"gen {info.generation} {info.operation!r}" in repr(info)
    state.restore_backup(infos[-1])
    assert [(i.generation, i.operation) for i in state.backups(limit=2)] == [
        (3, "render"),
        (2, "transcribe"),
    ]


def test_at_returns_each_retained_generation_and_refuses_a_pruned_one(
    state_path: Path,
) -> None:
    """at(g) reads the file or a backup; a generation whose backup was pruned raises."""
    state = PipelineState(state_path, max_backups=2)
    for n in range(1, 6):
        commit(state, f"step{n}", n=n)
    assert state.at(5) == {"n": 5}
    assert state.at(4) == {"n": 4}
    assert state.at(3) == {"n": 3}
    for pruned in (1, 2):
        with pytest.raises(StateBackupError, match=f"holds generation {pruned}"):
            state.at(pruned)
    with pytest.raises(StateBackupError):
        state.at(99)


def test_dry_run_restore_returns_the_diff_and_changes_nothing(
    state: PipelineState, tmp_path: Path
) -> None:
    """restore_backup(b, dry_run=True) returns the Diff to the backup and writes no byte."""
    commit(state, "a", phase1={"status": "success"}, n=1)
    commit(state, "b", n=2, extra=True)
    backup = state.backups()[0]
    before = tree_bytes(tmp_path)
    diff = state.restore_backup(backup, dry_run=True)
    assert [(c.pointer, c.kind) for c in diff] == [("/n", "changed"), ("/extra", "removed")]
    assert tree_bytes(tmp_path) == before
    assert state.version == 2
    assert state.restore_backup(backup.path.name, dry_run=True) == diff


# -- lock_info() ------------------------------------------------------------------------

_HOLDER = """
import sys
from pipeline_common import PipelineState

state = PipelineState(sys.argv[1])
with state.transaction(operation="render chapters"):
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


@pytest.mark.multiprocess
def test_lock_info_names_a_live_child_holding_the_lock(
    state: PipelineState, spawn_child: Any
) -> None:
    """lock_info() reports the child's pid and operation while it holds the lock, then free."""
    commit(state, "setup", n=1)
    assert not state.lock_info().held
    child = spawn_child(_HOLDER, str(state.path))
    assert child.stdout.readline().strip() == "locked"
    info = state.lock_info()
    assert info.held
    assert info.holder is not None
    assert info.holder["pid"] == child.pid
    assert info.holder["operation"] == "render chapters"
    assert f"held by pid {child.pid}" in repr(info)
    child.stdin.write("\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == "released"
    assert not state.lock_info().held


def test_lock_info_inside_own_transaction_reports_this_process(state: PipelineState) -> None:
    """Asked from inside a transaction, lock_info() names this process and operation."""
    with state.transaction(operation="mine"):
        info = state.lock_info()
    assert info.held
    assert info.holder is not None
    assert (info.holder["pid"], info.holder["operation"]) == (os.getpid(), "mine")


# -- wait_for_change() ------------------------------------------------------------------

_WATCHER = """
import sys
from pipeline_common import PipelineState

state = PipelineState(sys.argv[1])
since = state.version
print("ready", since, flush=True)
print(state.wait_for_change(since, timeout=30, interval=0.01), flush=True)
"""


@pytest.mark.multiprocess
def test_wait_for_change_sees_a_commit_from_another_process(
    state: PipelineState, spawn_child: Any
) -> None:
    """A child blocked in wait_for_change() returns the new version when the parent commits."""
    commit(state, "setup", n=1)
    child = spawn_child(_WATCHER, str(state.path))
    assert child.stdout.readline().split() == ["ready", "1"]
    commit(state, "next", n=2)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == "2"


def test_wait_for_change_returns_at_once_when_already_newer_and_none_on_timeout(
    state: PipelineState,
) -> None:
    """An already-passed version returns immediately; no change within the timeout is None."""
    commit(state, "a", n=1)
    commit(state, "b", n=2)
    assert state.wait_for_change(0, timeout=0) == 2
    assert state.wait_for_change(2, timeout=0.02, interval=0.005) is None


# -- on_commit() ------------------------------------------------------------------------


def test_on_commit_runs_after_the_commit_is_durable_and_visible(
    state: PipelineState, fs_calls: list[tuple[str, str, str]]
) -> None:
    """In the hook, a fresh object reads the new data, the log has the record, the lock is free."""
    seen: list[tuple[Any, ...]] = []

    def hook(generation: int, operation: str, changes: list[str] | None) -> None:
        fresh = PipelineState(state.path)
        last = fresh.history(1)[0]
        syncs_so_far = sum(1 for c in fs_calls if c[0] == "after" and c[1] in FSYNC_OPS)
        seen.append(
            (
                generation,
                operation,
                changes,
                fresh.read(),
                (last.generation, last.operation),
                fresh.lock_info().held,
                syncs_so_far,
            )
        )

    state.on_commit(hook)
    commit(state, "first", n=1)
    syncs_at_end = sum(1 for c in fs_calls if c[0] == "after" and c[1] in FSYNC_OPS)
    assert seen == [(1, "first", ["/n"], {"n": 1}, (1, "first"), False, syncs_at_end)]
    # Among the fsyncs done before the hook ran is the log's: the record is durable too.
    syncs = [c[1:] for c in fs_calls if c[0] == "after" and c[1] in FSYNC_OPS]
    assert ("fdatasync", str(state.log_path)) in syncs
    assert ("fsync_dir", str(state.path.parent)) in syncs


def test_a_raising_hook_is_logged_and_never_breaks_the_commit(
    state: PipelineState, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged with its traceback; the commit stands, later hooks run."""
    later: list[int] = []

    def broken(generation: int, operation: str, changes: list[str] | None) -> None:
        raise RuntimeError("webhook down")

    state.on_commit(broken)
    state.on_commit(lambda generation, *_: later.append(generation))
    with caplog.at_level(logging.ERROR, logger="pipeline_common"):
        commit(state, "a", n=1)
    assert state.read_versioned() == ({"n": 1}, 1)
    assert later == [1]
    (record,) = [r for r in caplog.records if r.name == "pipeline_common"]
    assert record.levelno == logging.ERROR
    assert "on_commit callback" in record.getMessage()
    assert str(state.path) in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


def test_hooks_fire_only_for_commits_and_stop_after_unsubscribe(state: PipelineState) -> None:
    """Rollbacks fire nothing; restores fire; the returned function unsubscribes."""
    seen: list[tuple[int, str]] = []
    unsubscribe = state.on_commit(lambda g, op, _changes: seen.append((g, op)))
    commit(state, "a", n=1)
    with pytest.raises(KeyError), state.transaction(operation="rolled back"):
        raise KeyError("x")
    commit(state, "b", n=2)
    state.restore_backup(state.backups()[0])
    unsubscribe()
    unsubscribe()  # twice is harmless
    commit(state, "c", n=3)
    assert seen == [(1, "a"), (2, "b"), (3, "restore")]


# -- durability levels --------------------------------------------------------------------


def _exercise(state: PipelineState) -> None:
    for n in range(1, 4):
        commit(state, f"step{n}", n=n)
    state.backup_manager.create_backup()
    state.restore_backup(state.backups()[-1])
    state.repair()


def test_durability_full_fsyncs_file_folders_and_log(
    state: PipelineState, fs_calls: list[tuple[str, str, str]]
) -> None:
    """The default level fsyncs the temp file, both folders and the log (the hook sees it)."""
    _exercise(state)
    synced = {(op, path) for when, op, path in fs_calls if when == "after" and op in FSYNC_OPS}
    assert ("fsync", str(state.path.parent / f".{state.path.name}.tmp")) in synced
    assert ("fsync_dir", str(state.path.parent)) in synced
    assert ("fsync_dir", str(state.backups_dir)) in synced
    assert ("fdatasync", str(state.log_path)) in synced


def test_durability_atomic_makes_no_fsync_yet_replaces_atomically(
    state_path: Path, fs_calls: list[tuple[str, str, str]]
) -> None:
    """durability="atomic": not one fsync, and the state is still swapped in by one rename."""
    state = PipelineState(state_path, durability="atomic")
    seen_before_replace: list[tuple[bytes, bytes]] = []

    def spy(when: str, op: str, path: str) -> None:
        fs_calls.append((when, op, path))
        if when == "before" and op == "replace" and path == str(state_path):
            old = state_path.read_bytes() if state_path.exists() else b""
            temp = state_path.with_name(f".{state_path.name}.tmp")
            seen_before_replace.append((old, temp.read_bytes()))

    _fs.set_hook(spy)
    _exercise(state)
    assert [c for c in fs_calls if c[1] in FSYNC_OPS] == []
    # Right before each rename the old version is whole and the temp holds the whole new one.
    assert len(seen_before_replace) == 4
    for old, new in seen_before_replace:
        assert old == b"" or isinstance(json.loads(old), dict)
        assert isinstance(json.loads(new), dict)
    assert state.read_versioned() == ({"n": 1}, 4)
    assert state.verify(), state.verify()


# -- compressed backups ----------------------------------------------------------------


def test_compressed_backups_work_like_plain_ones(state_path: Path) -> None:
    """compress_backups=True stores .json.gz; backups, diff, at, restore and verify all work."""
    state = PipelineState(state_path, compress_backups=True)
    for n, op in enumerate(("a", "b", "c"), start=1):
        commit(state, op, n=n, **{f"k{n}": [n] * 3})
    infos = state.backups()
    assert [(i.generation, i.operation, i.compressed) for i in infos] == [
        (2, "b", True),
        (1, "a", True),
    ]
    assert all(i.path.name.endswith(".json.gz") for i in infos)
    assert state.list_backups() == [i.path for i in infos]
    assert json.loads(gzip.decompress(infos[-1].path.read_bytes())) == {"n": 1, "k1": [1, 1, 1]}
    assert state.at(1) == {"n": 1, "k1": [1, 1, 1]}
    assert [c.pointer for c in state.diff(infos[-1])] == ["/n", "/k2", "/k3"]
    assert state.diff(1) == state.diff(infos[-1], "current")
    dry = state.restore_backup(infos[-1], dry_run=True)
    assert [c.pointer for c in dry] == ["/n", "/k2", "/k3"]
    assert state.version == 3
    assert state.verify(), state.verify()
    assert state.restore_backup(infos[-1]) is True
    assert state.read_versioned() == ({"n": 1, "k1": [1, 1, 1]}, 4)
    assert state.backups()[0].generation == 3
    assert state.backups()[0].compressed
    report = state.verify()
    assert report, report


# -- the REPL transcript ---------------------------------------------------------------


def test_repl_restore_transcript_runs_as_a_doctest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/repl_restore.md is a real session: every >>> line gives the output shown."""
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(
        str(ROOT / "examples" / "repl_restore.md"),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=True,
    )
    assert result.attempted > 15
    assert result.failed == 0, "see the captured stdout for the failing examples"
