"""The call-order checker applied to every transaction kind, and fsyncs never retried."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pipeline_common import StateDurabilityError, StateWarning, StateWriteError
from pipeline_common.testing import Call, inject_fault, record_calls, sidecar_paths

from ._order import order_violations, replaced_state
from ._scenarios import SCENARIOS, Scenario, commit, state_file


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_trace_follows_the_protocol(scenario: Scenario, tmp_path: Path) -> None:
    """Each transaction kind's seam trace obeys every ordering rule."""
    path = state_file(tmp_path)
    scenario.setup(path)
    with record_calls() as calls:
        scenario.run(path)
    assert calls, "no file-system call recorded"
    assert order_violations(calls, path) == []
    assert replaced_state(calls, path) == scenario.commits


def _attempts(calls: list[Call], op: str, path: str) -> int:
    return sum(1 for c in calls if c.when == "before" and c.op == op and c.path == path)


def test_failed_temp_fsync_is_not_retried(tmp_path: Path) -> None:
    """An fsync error on the temp file fails the commit at once; no second fsync, no rename."""
    path = state_file(tmp_path)
    commit(path, 1)
    before = path.read_bytes()
    temp = str(sidecar_paths(path).temp)
    with record_calls() as calls, inject_fault("fsync", path=temp) as fault:
        with pytest.raises(StateWriteError) as info:
            commit(path, 2)
    assert fault.fired == 1
    assert info.value.step == "fsync temp file"
    assert _attempts(calls, "fsync", temp) == 1
    assert not replaced_state(calls, path)
    assert path.read_bytes() == before


def test_failed_folder_fsync_after_replace_is_not_retried(tmp_path: Path) -> None:
    """A folder fsync error after the rename surfaces as StateDurabilityError, tried once."""
    path = state_file(tmp_path)
    commit(path, 1)
    folder = str(sidecar_paths(path).state.parent)
    with record_calls() as calls, inject_fault("fsync_dir", path=folder, nth=1) as fault:
        with pytest.raises(StateDurabilityError):
            commit(path, 2)
    assert fault.fired == 1
    state = str(sidecar_paths(path).state)
    replace_at = next(i for i, c in enumerate(calls) if c.op == "replace" and c.path == state)
    assert _attempts(calls[replace_at:], "fsync_dir", folder) == 1


def test_failed_log_fsync_is_not_retried(tmp_path: Path) -> None:
    """A failed fdatasync of the log is a StateWarning, never a second, trusted fdatasync."""
    path = state_file(tmp_path)
    commit(path, 1)
    log = str(sidecar_paths(path).log)
    with record_calls() as calls, inject_fault("fdatasync", path=log, errno=errno.EIO):
        with pytest.warns(StateWarning):
            commit(path, 2)
    assert _attempts(calls, "fdatasync", log) == 1


def test_failed_backups_folder_fsync_is_not_retried(tmp_path: Path) -> None:
    """A failed fsync of the backups folder fails the commit before the replace."""
    path = state_file(tmp_path)
    commit(path, 1)
    backups = str(sidecar_paths(path).backups_dir)
    with record_calls() as calls, inject_fault("fsync_dir", path=backups):
        with pytest.raises(StateWriteError):
            commit(path, 2)
    assert _attempts(calls, "fsync_dir", backups) == 1
    assert not replaced_state(calls, path)
