"""Backups (pipeline_common._backup): naming, rotation, create_backup and restore_backup."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import (
    PipelineState,
    StateBackupError,
    StateError,
    StateSidecarError,
    StateValidationError,
)

_NAME = re.compile(r"^pipeline_\d{8}_\d{6}_\d{6}\.json\.bak$")


def _commit_versions(state: PipelineState, count: int) -> None:
    for n in range(1, count + 1):
        with state.transaction() as txn:
            txn.data["n"] = n


def _snapshot(state: PipelineState) -> tuple[bytes, list[Path], int]:
    """What a refused restore must leave alone: state bytes, backups and log length."""
    return (
        state.path.read_bytes(),
        state.list_backups(limit=1000),
        len(state.get_transaction_history(limit=10_000)),
    )


def test_backups_are_named_by_stem_and_utc_timestamp(state: PipelineState) -> None:
    """Each backup is <dir>/.<stem>/backups/<stem>_<YYYYmmdd_HHMMSS_ffffff>.json.bak."""
    _commit_versions(state, 3)
    backups = state.list_backups()
    assert len(backups) == 2
    for path in backups:
        assert path.parent == state.path.parent / ".pipeline" / "backups"
        assert _NAME.match(path.name), path.name


def test_list_backups_is_newest_first_and_each_is_an_earlier_commit(
    state: PipelineState,
) -> None:
    """list_backups() returns the replaced versions, newest first, each parsing as a commit."""
    _commit_versions(state, 6)
    backups = state.list_backups()
    assert [json.loads(p.read_bytes()) for p in backups] == [{"n": n} for n in (5, 4, 3, 2, 1)]
    assert [p.name for p in backups] == sorted((p.name for p in backups), reverse=True)


def test_list_backups_honours_limit(state: PipelineState) -> None:
    """limit caps the number of paths returned, newest kept."""
    _commit_versions(state, 6)
    assert [json.loads(p.read_bytes()) for p in state.list_backups(limit=2)] == [
        {"n": 5},
        {"n": 4},
    ]
    assert state.list_backups(limit=0) == []


def test_no_backups_before_the_second_commit(state: PipelineState) -> None:
    """The first commit has nothing to back up; list_backups() is empty."""
    assert state.list_backups() == []
    state.write({"a": 1})
    assert state.list_backups() == []


@pytest.mark.parametrize("max_backups", [0, 1, 3])
def test_never_more_than_max_backups(state_path: Path, max_backups: int) -> None:
    """Rotation keeps the newest max_backups backups and no more."""
    state = PipelineState(state_path, max_backups=max_backups)
    for n in range(1, 8):
        state.write({"n": n})
        assert len(os.listdir(state.backups_dir)) <= max_backups
    kept = [json.loads(p.read_bytes()) for p in state.list_backups(limit=100)]
    assert kept == [{"n": n} for n in range(6, 6 - max_backups, -1)]


def test_backup_before_write_false_keeps_no_backups(state_path: Path) -> None:
    """backup_before_write=False commits without backing up the replaced version."""
    state = PipelineState(state_path, backup_before_write=False)
    _commit_versions(state, 3)
    assert state.list_backups() == []
    assert state.read() == {"n": 3}


def test_backups_survive_later_commits_unchanged(state: PipelineState) -> None:
    """A backup's bytes never change after it is made, whatever is committed next."""
    _commit_versions(state, 2)
    (backup,) = state.list_backups()
    before = backup.read_bytes()
    _commit_versions(state, 4)
    assert backup.read_bytes() == before


def test_create_backup_copies_the_current_state(state: PipelineState) -> None:
    """backup_manager.create_backup() returns a new backup equal to the current file."""
    state.write({"v": 1})
    path = state.backup_manager.create_backup()
    assert isinstance(path, Path)
    assert _NAME.match(path.name)
    assert path.read_bytes() == state.path.read_bytes()
    assert state.list_backups()[0] == path
    assert state.read() == {"v": 1}


def test_create_backup_is_independent_of_an_in_place_rewrite(state: PipelineState) -> None:
    """A manual backup is a copy: a legacy script that rewrites the state file in place
    (``open(path, "w")``) cannot change it (a hard link would share the live inode)."""
    state.write({"precious": "v1"})
    path = state.backup_manager.create_backup()
    assert os.stat(path).st_ino != os.stat(state.path).st_ino
    with open(state.path, "w") as fh:  # the very code this library replaces
        fh.write('{"precious": "torn by an edit')
    assert json.loads(path.read_bytes()) == {"precious": "v1"}
    assert state.restore_backup(path) is True
    assert state.read() == {"precious": "v1"}


@pytest.mark.parametrize("compress", [False, True])
def test_commit_backups_keep_their_version_after_an_in_place_rewrite(
    state_path: Path, compress: bool
) -> None:
    """A commit's backup (a link to the version the rename replaced, or a compressed copy)
    keeps that version when the new live file is later rewritten in place."""
    state = PipelineState(state_path, compress_backups=compress)
    state.write({"v": 1})
    state.write({"v": 2})
    (backup,) = state.list_backups()
    assert os.stat(backup).st_ino != os.stat(state_path).st_ino
    with open(state_path, "w") as fh:
        fh.write('{"v": "edited in place"}')
    assert json.loads(state.backup_manager.load(backup)) == {"v": 1}


def test_every_kind_of_backup_keeps_its_version_after_an_in_place_rewrite(
    state_path: Path,
) -> None:
    """A restore's backup of the state it replaces, a migration's, and the copy of a
    corrupt file kept aside: each keeps its bytes when the live file is then rewritten
    in place (each was linked just before a rename, or copied)."""
    state = PipelineState(state_path)
    state.write({"v": 1})
    state.write({"v": 2})
    first = state.list_backups()[0]
    state.restore_backup(first)  # backs up {"v": 2}, then commits {"v": 1}
    migrated = PipelineState(state_path, schema_version=2, migrations={1: lambda d: {**d, "m": 1}})
    with migrated.transaction():  # backs up {"v": 1} as the migration replaces it
        pass
    state_path.write_text("{not json")
    state.write({"v": 3})  # keeps the corrupt file aside, linked, then replaces it
    corrupt = [p for p in state.backups_dir.iterdir() if p.name.endswith(".corrupt")]
    expected = {p: p.read_bytes() for p in [*state.list_backups(100), *corrupt]}
    assert len(corrupt) == 1
    assert len(expected) == 5
    with open(state_path, "w") as fh:
        fh.write('{"v": "edited in place"}')
    assert {p: p.read_bytes() for p in expected} == expected


def test_new_backups_follow_the_states_mode_and_older_ones_are_narrowed(
    state: PipelineState, umask: Any
) -> None:
    """After ``chmod 600`` on the state, the next commit's backups are 0600 and the older
    ones (made while it was 0644) are narrowed to 0600; bits are never added back."""
    umask(0o022)
    for n in range(4):
        state.write({"n": n})
    state.backup_manager.create_backup()
    assert {os.stat(p).st_mode & 0o777 for p in state.list_backups(100)} == {0o644}
    os.chmod(state.path, 0o600)
    manual = state.backup_manager.create_backup()  # a copy made now follows the mode
    assert os.stat(manual).st_mode & 0o777 == 0o600
    state.write({"n": 9})
    assert {os.stat(p).st_mode & 0o777 for p in state.list_backups(100)} == {0o600}
    # A fresh object (another process) narrows too, and never widens.
    os.chmod(state.path, 0o640)
    PipelineState(state.path).write({"n": 10})
    assert {os.stat(p).st_mode & 0o777 for p in state.list_backups(100)} == {0o600, 0o640}
    os.chmod(state.path, 0o400)
    PipelineState(state.path, compress_backups=True).write({"n": 11})
    assert {os.stat(p).st_mode & 0o777 for p in state.list_backups(100)} == {0o400}


def test_a_corrupt_state_kept_aside_is_narrowed_too(state: PipelineState, umask: Any) -> None:
    """The ``.json.corrupt`` copy of a broken state holds data as well: narrowed alike."""
    umask(0o022)
    state.write({"n": 1})
    state.path.write_text("{broken")
    state.write({"n": 2})
    (corrupt,) = [p for p in state.backups_dir.iterdir() if p.name.endswith(".corrupt")]
    assert os.stat(corrupt).st_mode & 0o777 == 0o644
    os.chmod(state.path, 0o600)
    state.write({"n": 3})
    assert os.stat(corrupt).st_mode & 0o777 == 0o600


def test_narrowing_also_reaches_backups_made_by_another_process(
    state: PipelineState, run_child: Any
) -> None:
    """The state narrowed after another process's backups were made: this process's
    next commit narrows them, though it had narrowed to this very mode before."""
    state.write({"n": 0})
    os.chmod(state.path, 0o600)
    state.write({"n": 1})  # narrowed to 0600 in this process
    os.chmod(state.path, 0o644)
    result = run_child(
        "from pipeline_common import PipelineState\n"
        f"s = PipelineState({str(state.path)!r})\n"
        "for n in range(3): s.write({'n': n})\n"
    )
    assert result.returncode == 0, result.stderr
    os.chmod(state.path, 0o600)
    state.write({"n": 2})
    assert {os.stat(p).st_mode & 0o777 for p in state.list_backups(100)} == {0o600}


def test_create_backup_without_a_state_raises(state: PipelineState) -> None:
    """create_backup() with no state file raises StateBackupError naming the file."""
    with pytest.raises(StateBackupError) as info:
        state.backup_manager.create_backup()
    assert str(state.path) in str(info.value)


def test_create_backup_respects_max_backups(state_path: Path) -> None:
    """Manual backups count toward max_backups too."""
    state = PipelineState(state_path, max_backups=2)
    state.write({"v": 1})
    for _ in range(5):
        state.backup_manager.create_backup()
    assert len(state.list_backups(limit=100)) == 2


def test_backup_names_stay_ordered_when_made_in_quick_succession(state: PipelineState) -> None:
    """Many backups within one clock tick get distinct, increasing names."""
    state.write({"v": 1})
    made = [state.backup_manager.create_backup() for _ in range(20)]
    assert len(set(made)) == 20
    assert [p.name for p in made] == sorted(p.name for p in made)


# -- restore_backup ------------------------------------------------------------------------------


def test_restore_makes_the_backup_current_and_returns_true(state: PipelineState) -> None:
    """restore_backup() returns True and the state then equals the backup."""
    _commit_versions(state, 3)
    oldest = state.list_backups()[-1]
    assert state.restore_backup(oldest) is True
    assert state.read() == {"n": 1}
    assert state.path.read_bytes() == oldest.read_bytes()


def test_restore_accepts_a_bare_backup_name_and_a_str(state: PipelineState) -> None:
    """A backup may be named by its file name alone, or given as a str path."""
    _commit_versions(state, 3)
    newest, oldest = state.list_backups()
    state.restore_backup(oldest.name)
    assert state.read() == {"n": 1}
    state.restore_backup(str(newest))
    assert state.read() == {"n": 2}


def test_restore_is_a_logged_transaction(state: PipelineState) -> None:
    """A restore is logged as a successful 'restore' naming the backup it used."""
    _commit_versions(state, 2)
    (backup,) = state.list_backups()
    state.restore_backup(backup)
    record = state.get_transaction_history(1)[0]
    assert record["operation"] == "restore"
    assert record["success"] is True
    assert record["details"]["restored_from"] == backup.name
    assert record["sha256"] == hashlib.sha256(state.path.read_bytes()).hexdigest()


def test_restore_backs_up_the_state_it_replaces_so_it_can_be_undone(
    state: PipelineState,
) -> None:
    """The version a restore replaces becomes the newest backup; restoring it undoes the restore."""
    _commit_versions(state, 3)
    oldest = state.list_backups()[-1]
    state.restore_backup(oldest)
    undo = state.list_backups()[0]
    assert json.loads(undo.read_bytes()) == {"n": 3}
    state.restore_backup(undo)
    assert state.read() == {"n": 3}


def test_restore_leaves_the_backup_itself_unchanged(state: PipelineState) -> None:
    """Restoring copies the backup's bytes; the backup file keeps its content."""
    _commit_versions(state, 2)
    (backup,) = state.list_backups()
    before = backup.read_bytes()
    state.restore_backup(backup)
    _commit_versions(state, 1)
    assert backup.read_bytes() == before


def test_restore_of_a_schema_invalid_backup_needs_validate_false(state: PipelineState) -> None:
    """A backup that fails the schema raises StateValidationError unless validate=False."""
    state.write({"phase1": "not an object"}, validate=False)
    state.write({"ok": True})
    (backup,) = state.list_backups()
    before = _snapshot(state)
    with pytest.raises(StateValidationError):
        state.restore_backup(backup)
    assert state.path.read_bytes() == before[0]
    assert state.list_backups(limit=1000) == before[1]
    assert state.restore_backup(backup, validate=False) is True
    assert state.read() == {"phase1": "not an object"}


def _outside(state: PipelineState, tmp_path: Path) -> Path:
    copy = tmp_path / state.list_backups()[0].name
    shutil.copy(state.list_backups()[0], copy)
    return copy


def _dotdot(state: PipelineState, tmp_path: Path) -> Path:
    backup = state.list_backups()[0]
    return backup.parent / ".." / "backups" / backup.name


def _dotdot_escape(state: PipelineState, tmp_path: Path) -> Path:
    return state.backups_dir / ".." / ".." / "pipeline.json"


def _symlink(state: PipelineState, tmp_path: Path) -> Path:
    link = state.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    link.symlink_to(state.list_backups()[0])
    return link


def _symlink_outside(state: PipelineState, tmp_path: Path) -> Path:
    target = tmp_path / "planted.json"
    target.write_text('{"planted": true}')
    link = state.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    link.symlink_to(target)
    return link


def _directory(state: PipelineState, tmp_path: Path) -> Path:
    folder = state.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    folder.mkdir()
    return folder


def _fifo(state: PipelineState, tmp_path: Path) -> Path:
    fifo = state.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    os.mkfifo(fifo)
    return fifo


def _corrupt(state: PipelineState, tmp_path: Path) -> Path:
    bad = state.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    bad.write_bytes(b'{"n": ')
    return bad


def _not_an_object(state: PipelineState, tmp_path: Path) -> Path:
    bad = state.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    bad.write_bytes(b"[1, 2]")
    return bad


def _badly_named(state: PipelineState, tmp_path: Path) -> Path:
    other = state.backups_dir / "notes.json"
    other.write_text('{"n": 0}')
    return other


def _missing(state: PipelineState, tmp_path: Path) -> Path:
    return state.backups_dir / "pipeline_20000101_000000_000000.json.bak"


def _state_file_itself(state: PipelineState, tmp_path: Path) -> Path:
    return state.path


def _other_states_backup(state: PipelineState, tmp_path: Path) -> Path:
    other = PipelineState(tmp_path / "other.json")
    other.write({"other": 1})
    other.write({"other": 2})
    return other.list_backups()[0]


def _same_stem_elsewhere(state: PipelineState, tmp_path: Path) -> Path:
    sub = tmp_path / "sub"
    sub.mkdir()
    twin = PipelineState(sub / "pipeline.json")
    twin.write({"twin": 1})
    twin.write({"twin": 2})
    return twin.list_backups()[0]


def _nul_in_path(state: PipelineState, tmp_path: Path) -> Path:
    return Path(str(state.list_backups()[0]) + "\x00")


_REFUSED = {
    "outside-the-folder": _outside,
    "dotdot-inside": _dotdot,
    "dotdot-escape": _dotdot_escape,
    "symlink-to-a-backup": _symlink,
    "symlink-outside": _symlink_outside,
    "directory": _directory,
    "fifo": _fifo,
    "corrupt": _corrupt,
    "not-an-object": _not_an_object,
    "not-named-like-a-backup": _badly_named,
    "missing": _missing,
    "the-state-file": _state_file_itself,
    "another-states-backup": _other_states_backup,
    "same-stem-other-folder": _same_stem_elsewhere,
    "nul-in-path": _nul_in_path,
}


@pytest.mark.parametrize("make", list(_REFUSED.values()), ids=list(_REFUSED))
def test_restore_refuses_what_is_not_one_of_this_states_backups(
    state: PipelineState, tmp_path: Path, make: Any
) -> None:
    """A path that is not a good backup of this state raises StateBackupError; nothing changes."""
    _commit_versions(state, 3)
    candidate = make(state, tmp_path)
    before = _snapshot(state)
    with pytest.raises(StateBackupError) as info:
        state.restore_backup(candidate)
    assert isinstance(info.value, StateError)
    assert _snapshot(state) == before
    assert state.read() == {"n": 3}


def test_states_sharing_a_stem_never_mix_backups(tmp_path: Path) -> None:
    """pipeline.json and pipeline.yaml in one folder never list each other's backups."""
    mine = PipelineState(tmp_path / "pipeline.json")
    theirs = PipelineState(tmp_path / "pipeline.yaml")
    mine.write({"mine": 1})
    mine.write({"mine": 2})
    try:
        theirs.write({"theirs": 1})
        theirs.write({"theirs": 2})
    except StateSidecarError:
        pass  # refusing the second state is an acceptable way to keep them apart
    assert [json.loads(p.read_bytes()) for p in mine.list_backups()] == [{"mine": 1}]
