"""The backups listing: made afresh at every commit, never remembered across holds.

A commit lists the backups folder to name the new backup and prune the oldest. A
listing remembered from the previous hold was removed (issue 12): its guard, the
folder's timestamps, cannot show a change made within one timestamp tick. Each test
below changes the folder between commits in one way and checks the backups stay right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateWarning
from pipeline_common._backup import BackupManager

_MAX = 3


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real listings of a backups folder (calls of BackupManager.names)."""
    calls: list[int] = []
    real = BackupManager.names

    def counting(self: BackupManager) -> list[str]:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(BackupManager, "names", counting)
    return calls


@pytest.fixture(params=["fine", "frozen"])
def folder_clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test twice: with real folder timestamps, and with the folder's mtime set
    back after each commit (a file system whose timestamps are too coarse to show a
    change): the listing must stay right without them."""
    if request.param == "frozen":
        real = BackupManager.prune

        def prune_then_freeze(self: BackupManager, state_mode: int | None = None) -> list[str]:
            st = os.stat(self.backups_dir)
            try:
                return real(self, state_mode)
            finally:
                os.utime(self.backups_dir, ns=(st.st_atime_ns, st.st_mtime_ns))

        monkeypatch.setattr(BackupManager, "prune", prune_then_freeze)
    return str(request.param)


def _backup_contents(state: PipelineState) -> list[Any]:
    """The ``n`` of every backup, oldest first, from a fresh look at the folder."""
    names = sorted(
        n for n in os.listdir(state.backups_dir) if n.endswith(".json.bak") and "\n" not in n
    )
    return [json.loads((state.backups_dir / n).read_bytes())["n"] for n in names]


def _commit(state: PipelineState, n: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", StateWarning)  # a failed prune warns: fail instead
        with state.transaction() as txn:
            txn.data["n"] = n


def test_the_listing_is_made_afresh_at_every_commit_and_stays_right(
    tmp_path: Path, listings: list[int]
) -> None:
    """200 commits list the folder once each (the link and the prune share it), and
    after each one the folder holds exactly the newest max_backups replaced versions."""
    state = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    state.write({"n": 0})
    listings.clear()
    for n in range(1, 201):
        _commit(state, n)
        assert _backup_contents(state) == list(range(max(n - _MAX, 0), n))
    assert len(listings) == 200


def test_two_states_of_one_process_on_one_file_never_share_a_stale_listing(
    tmp_path: Path, folder_clock: str
) -> None:
    """Two PipelineState objects on one path share the lock: each commit of one makes
    the other's remembered listing useless, and it lists afresh."""
    a = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    b = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    a.write({"n": 0})
    for n in range(1, 41):
        _commit(a if n % 3 else b, n)
        assert _backup_contents(a) == list(range(max(n - _MAX, 0), n))


def _commit_in_child(path: Path, first: int, count: int) -> None:
    code = (
        "import sys; from pipeline_common import PipelineState\n"
        f"s = PipelineState({str(path)!r}, max_backups={_MAX})\n"
        f"for n in range({first}, {first + count}):\n"
        "    with s.transaction() as t: t.data['n'] = n\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_commits_of_another_process_in_between_are_seen(
    tmp_path: Path, listings: list[int], folder_clock: str
) -> None:
    """Another process that commits between two of ours changes the lock file's mark,
    so our next commit lists the folder instead of pruning by a stale listing."""
    state = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    state.write({"n": 0})
    n = 0
    for _ in range(4):
        for _ in range(3):
            n += 1
            _commit(state, n)
        _commit_in_child(state.path, n + 1, 2)
        n += 2
        listings.clear()
        n += 1
        _commit(state, n)
        assert listings, "the commit after another process's must list the folder"
        assert _backup_contents(state) == list(range(n - _MAX, n))


def test_a_change_made_by_hand_in_the_backups_folder_is_seen(
    tmp_path: Path, listings: list[int]
) -> None:
    """Deleting or adding a backup by hand changes the folder's signature: the next
    commit lists afresh (no prune of a missing name, no forgotten extra backup)."""
    state = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    state.write({"n": 0})
    for n in range(1, 6):
        _commit(state, n)
    time.sleep(0.05)  # past any coarse timestamp tick of the file system
    oldest = min(state.backups_dir.iterdir())
    oldest.unlink()
    listings.clear()
    _commit(state, 6)
    assert listings
    assert _backup_contents(state) == [3, 4, 5]

    time.sleep(0.05)
    extra = state.backups_dir / "pipeline_20000101_000000_000000.json.bak"
    extra.write_text('{"n": -1}\n')
    listings.clear()
    _commit(state, 7)
    assert listings
    assert not extra.exists(), "the hand-made oldest backup is pruned first"
    assert _backup_contents(state) == [4, 5, 6]


def test_a_released_lock_file_names_no_holder(tmp_path: Path) -> None:
    """Release blanks the holder record: nobody is reported as holding a free lock."""
    from pipeline_common._lock import read_holder

    state = PipelineState(tmp_path / "pipeline.json")
    state.write({"n": 1})
    assert state.lock_path.read_bytes().strip() == b""
    assert read_holder(state.lock_path) is None
    assert state.lock_info().held is False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_lists_afresh_and_so_does_its_parent_after_it(
    tmp_path: Path, listings: list[int]
) -> None:
    """A child inherits the parent's remembered listing but never trusts it, and the
    parent sees the child's commit through the lock file."""
    state = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    state.write({"n": 0})
    for n in range(1, 5):
        _commit(state, n)
    listings.clear()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            _commit(state, 5)
            ok = bool(listings) and _backup_contents(state) == [2, 3, 4]
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    listings.clear()
    _commit(state, 6)
    assert listings
    assert _backup_contents(state) == [3, 4, 5]


def test_a_change_by_another_object_inside_our_hold_is_seen(
    tmp_path: Path, folder_clock: str
) -> None:
    """create_backup() of a second PipelineState joins the first one's transaction and
    changes the folder inside the same lock hold: neither object then trusts its
    remembered listing (the lock counts every change to the folder)."""
    a = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    b = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    a.write({"n": 0})
    for n in range(1, 5):
        _commit(a, n)
    b.backup_manager.create_backup()  # b remembers a listing too
    with warnings.catch_warnings():
        warnings.simplefilter("error", StateWarning)
        with a.transaction() as txn:
            b.backup_manager.create_backup()  # inside a's hold
            txn.data["n"] = 5
        b.backup_manager.create_backup()  # the next hold: b's listing is stale by a's commit
    names = sorted(n for n in os.listdir(a.backups_dir) if n.endswith(".json.bak"))
    assert len(names) == _MAX
    assert json.loads((a.backups_dir / names[-1]).read_bytes()) == {"n": 5}


def test_a_name_with_a_newline_is_never_taken_for_a_backup(tmp_path: Path) -> None:
    """POSIX names may hold a newline; one that looks like a backup on its second line
    is not listed, and commits go on without warnings."""
    state = PipelineState(tmp_path / "pipeline.json", max_backups=_MAX)
    state.write({"n": 0})
    _commit(state, 1)
    odd = state.backups_dir / "junk\npipeline_20000101_000000_000000.json.bak"
    odd.write_text("{}")
    assert all("\n" not in n for n in state.backup_manager.names())
    assert len(state.backup_manager.names()) == 1
    for n in range(2, 8):
        _commit(state, n)
    assert odd.exists()  # not ours: left alone
    assert _backup_contents(state) == [4, 5, 6]
