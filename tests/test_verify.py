"""verify() finds tampering with the log, a backup or the state; repair() fixes what it can."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pipeline_common import Check, PipelineState, RepairReport, VerifyReport


def commit(state: PipelineState, operation: str, **changes: object) -> None:
    """Commit ``changes`` as one transaction named ``operation``."""
    with state.transaction(operation=operation) as txn:
        txn.data.update(changes)


def failed(report: VerifyReport) -> dict[str, str]:
    """The failed checks of a report, as ``{name: detail}``."""
    return {c.name: c.detail for c in report.problems}


@pytest.fixture
def history(state: PipelineState) -> PipelineState:
    """A state with three commits, so there are middle records and two backups."""
    for n, op in enumerate(("extract", "transcribe", "render"), start=1):
        commit(state, op, n=n, phase={"status": "success", "step": n})
    return state


def test_a_healthy_state_verifies_with_every_check_listed(history: PipelineState) -> None:
    """A state written only by the library passes every check; the repr lists them all."""
    report = history.verify()
    assert isinstance(report, VerifyReport)
    assert report
    assert report.problems == []
    assert all(isinstance(c, Check) and c.ok for c in report.checks)
    names = [c.name for c in report.checks]
    assert names == [
        "state parses",
        "state validates",
        "state matches log",
        "log chain intact",
        "backups parse and match commits",
        "no orphan temp files",
        "lock file sane",
    ]
    text = repr(report)
    assert text.splitlines()[0] == f"<VerifyReport {history.path}: healthy>"
    assert "[ok  ] log chain intact: 3 records" in text
    assert str(report) == text


def test_a_state_never_written_verifies(state: PipelineState) -> None:
    """No file, no log, no backups yet: healthy."""
    report = state.verify()
    assert report, report


def test_an_edited_middle_log_record_breaks_the_chain(history: PipelineState) -> None:
    """Changing record 2 (still valid JSON) is found: record 3 no longer chains to it."""
    lines = history.log_path.read_bytes().splitlines(keepends=True)
    assert b'"operation":"transcribe"' in lines[1]
    lines[1] = lines[1].replace(b'"operation":"transcribe"', b'"operation":"transcrib3"')
    history.log_path.write_bytes(b"".join(lines))
    report = history.verify()
    assert not report
    problems = failed(report)
    assert list(problems) == ["log chain intact"]
    assert "line 3: seq 3 does not chain to the line before" in problems["log chain intact"]
    assert "1 problem(s)" in repr(report)
    assert "[FAIL] log chain intact" in repr(report)
    # repair() cannot undo an edit without a choice: the problem is reported as remaining.
    repaired = history.repair()
    assert not repaired
    assert [c.name for c in repaired.remaining] == ["log chain intact"]


def test_a_deleted_middle_log_record_shows_as_a_gap(history: PipelineState) -> None:
    """Removing record 2 leaves a seq gap and a broken chain."""
    lines = history.log_path.read_bytes().splitlines(keepends=True)
    history.log_path.write_bytes(lines[0] + lines[2])
    detail = failed(history.verify())["log chain intact"]
    assert "seq 3 after 1 (a record is missing)" in detail


def test_a_backup_edited_in_place_is_reported(history: PipelineState) -> None:
    """A backup rewritten in place (same inode, valid JSON) no longer matches its commit."""
    backup = history.backups()[-1]
    with open(backup.path, "r+b") as fh:
        original = fh.read()
        forged = original.replace(b'"n": 1', b'"n": 7')
        assert forged != original
        fh.seek(0)
        fh.write(forged)
        fh.truncate()
    detail = failed(history.verify())["backups parse and match commits"]
    assert f"{backup.path.name} changed after it was made" in detail


def test_a_corrupt_backup_is_reported(history: PipelineState) -> None:
    """A backup that no longer parses is named as corrupt."""
    backup = history.backups()[0]
    backup.path.unlink()
    backup.path.write_bytes(b'{"n": ')
    detail = failed(history.verify())["backups parse and match commits"]
    assert f"{backup.path.name} is unreadable or corrupt" in detail


def test_a_state_file_changed_outside_the_library_is_reported_then_recorded(
    history: PipelineState,
) -> None:
    """A hand edit of the state shows as a mismatch; repair() records it as a recover commit."""
    data = json.loads(history.path.read_bytes())
    data["n"] = 42
    history.path.write_text(json.dumps(data))
    problems = failed(history.verify())
    assert list(problems) == ["state matches log"]
    assert "changed outside the library" in problems["state matches log"]
    report = history.repair()
    assert isinstance(report, RepairReport)
    assert report, report
    assert report.actions == ("recorded a commit whose log record was missing",)
    assert history.verify(), history.verify()
    assert history.read_versioned() == (data, 4)
    assert [r.operation for r in history.history(2)] == ["recover", "recover"]


def test_a_corrupt_state_file_is_reported(history: PipelineState) -> None:
    """A state that does not parse fails 'state parses' and names a backup to restore."""
    history.path.write_bytes(b'{"n": 3,')
    detail = failed(history.verify())["state parses"]
    assert "restore_backup" in detail


def test_repair_cuts_garbage_after_the_last_record(history: PipelineState) -> None:
    """A torn append (half a record, no newline) fails verify; repair cuts it; the chain holds."""
    clean = history.log_path.read_bytes()
    torn = b'{"seq":4,"timestamp":"2026-01-01T00:00:00Z","operati'
    history.log_path.write_bytes(clean + torn)
    detail = failed(history.verify())["log chain intact"]
    assert "the last line is torn" in detail
    assert history.version == 3  # readers skip the torn line
    report = history.repair()
    assert report, report
    assert report.actions == (f"cut a torn tail of {len(torn)} bytes from transactions.log",)
    assert "fixed: cut a torn tail" in repr(report)
    assert history.log_path.read_bytes().startswith(clean)
    assert history.verify(), history.verify()
    commit(history, "after repair", n=4)
    assert history.read_versioned()[1] == 4
    assert history.verify(), history.verify()


def test_repair_after_a_crash_that_tore_the_commits_own_record(history: PipelineState) -> None:
    """The commit landed but its record was cut in half: repair records it; nothing is lost."""
    lines = history.log_path.read_bytes().splitlines(keepends=True)
    half = lines[-1][: len(lines[-1]) // 2]
    history.log_path.write_bytes(b"".join(lines[:-1]) + half)
    problems = failed(history.verify())
    assert set(problems) == {"state matches log", "log chain intact"}
    assert history.version == 2  # the newest complete record
    report = history.repair()
    assert report, report
    assert "recorded a commit whose log record was missing" in report.actions
    assert history.verify(), history.verify()
    data, version = history.read_versioned()
    assert data["n"] == 3
    assert version == 3


def test_repair_removes_an_orphan_temp_file(history: PipelineState) -> None:
    """A temp file left by a crash before the rename fails verify; repair removes it."""
    orphan = history.path.with_name(f".{history.path.name}.tmp")
    orphan.write_bytes(b'{"half": ')
    assert "no orphan temp files" in failed(history.verify())
    report = history.repair()
    assert report.actions == (f"removed orphan temp file {orphan}",)
    assert not orphan.exists()
    assert history.verify(), history.verify()
    assert history.read()["n"] == 3


def test_repair_on_a_healthy_state_does_nothing(history: PipelineState) -> None:
    """Nothing to fix: no actions, a truthy report, the data and version unchanged."""
    before = history.path.read_bytes()
    report = history.repair()
    assert report.actions == ()
    assert report
    assert "nothing to fix" in repr(report)
    assert history.path.read_bytes() == before
    assert history.version == 3


def test_verify_checks_compressed_backups_too(state_path: Path) -> None:
    """With compress_backups=True, a healthy history verifies and a forged .gz is found."""
    state = PipelineState(state_path, compress_backups=True)
    for n in range(1, 4):
        commit(state, f"step{n}", n=n)
    assert state.verify(), state.verify()
    backup = state.backups()[-1].path
    assert backup.name.endswith(".json.gz")
    backup.write_bytes(gzip.compress(b'{\n  "n": 9\n}'))
    detail = failed(state.verify())["backups parse and match commits"]
    assert backup.name in detail
    backup.write_bytes(b"not gzip at all")
    detail = failed(state.verify())["backups parse and match commits"]
    assert f"{backup.name} is unreadable or corrupt" in detail


def test_a_world_writable_lock_file_is_reported(history: PipelineState) -> None:
    """The lock file must not be world-writable: anyone could then block every writer."""
    history.lock_path.chmod(0o666)
    assert "world-writable" in failed(history.verify())["lock file sane"]


def test_verify_waits_out_a_commit_in_flight_instead_of_reporting_it(
    history: PipelineState,
) -> None:
    """A temp file seen while another thread's commit holds the lock is not an orphan:
    verify looks again under the lock, after that commit reused it, and says healthy."""
    import threading

    from pipeline_common._atomic import temp_path_for

    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        other = PipelineState(history.path)
        with other.transaction(operation="slow") as txn:
            temp_path_for(history.path).write_bytes(b'{"n": ')  # as if mid-write
            txn.data["n"] = 99
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    threading.Timer(0.3, release.set).start()
    report = history.verify()  # three lock-free passes see the temp; the locked one does not
    thread.join(10)
    assert report, report
    assert history.read()["n"] == 99


def test_a_real_orphan_is_still_reported_after_the_locked_pass(history: PipelineState) -> None:
    """With no writer at all, the problem found lock-free is confirmed and reported."""
    from pipeline_common._atomic import temp_path_for

    temp_path_for(history.path).write_bytes(b"{")
    assert "no orphan temp files" in failed(history.verify())


def test_a_backup_pruned_between_listing_and_reading_is_no_problem(
    history: PipelineState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listed backup that is gone when read (pruned by a writer in between) is not
    reported, and never raises FileNotFoundError (verify, backups)."""
    manager = history.backup_manager
    listed = manager.list_paths
    gone = manager.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    monkeypatch.setattr(manager, "list_paths", lambda limit=10: [*listed(limit), gone])
    assert history.verify(), history.verify()
    assert gone not in [b.path for b in history.backups()]


def test_an_unreadable_log_is_a_failed_check_not_a_raw_oserror(history: PipelineState) -> None:
    """verify() reports what it cannot read as a failed check naming the file."""
    history.log_path.unlink()
    history.log_path.mkdir()  # reading it raises IsADirectoryError
    problems = failed(history.verify())
    assert "cannot read" in problems["log chain intact"]
    assert str(history.log_path) in problems["log chain intact"]
