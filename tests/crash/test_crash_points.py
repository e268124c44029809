"""Crash-point enumeration: die before and after every file-system call of each operation."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest

from pipeline_common import PipelineState
from pipeline_common.testing import (
    InvariantViolation,
    check_invariants,
    crash_points,
    inject_fault,
    record_calls,
)

from ._scenarios import MAX_BACKUPS, SCENARIOS, Scenario, commit, state_file, version

SURVIVED: dict[str, int] = {}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_crash_point_keeps_the_invariants(scenario: Scenario, tmp_path: Path) -> None:
    """A child killed before or after the k-th seam call leaves old-or-new, and recovers."""
    path = state_file(tmp_path)
    scenario.setup(path)
    points = list(crash_points(lambda: scenario.run(path), path, max_backups=MAX_BACKUPS))
    crashed = [p for p in points if not p.completed]
    SURVIVED[scenario.name] = len(crashed)
    assert crashed, "the operation made no file-system call"
    assert points[-1].completed
    assert points[-1].error is None, points[-1].error
    # Every seam call of the operation was reached both before and after.
    assert {p.when for p in crashed} == {"before", "after"}
    if scenario.commits:
        ops = {p.op for p in crashed}
        assert {"write", "fsync", "replace", "fsync_dir", "unlock"} <= ops, ops


def test_crash_points_total_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Report how many crash points were survived (runs after the scenarios above)."""
    total = sum(SURVIVED.values())
    with capsys.disabled():
        print(f"\ncrash points survived: {total} {SURVIVED}")
    assert total == 0 or total >= 8 * 20


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_keyboard_interrupt_at_every_call(scenario: Scenario, tmp_path: Path) -> None:
    """KeyboardInterrupt at the k-th call propagates, releases the lock, leaves old-or-new."""
    k = 1
    violations: list[str] = []
    while True:
        folder = tmp_path / f"k{k}"
        path = state_file(folder)
        scenario.setup(path)
        before = path.read_bytes() if path.exists() else None
        with record_calls() as calls, inject_fault(nth=k, exception=KeyboardInterrupt()) as fault:
            with warnings.catch_warnings(record=True), contextlib.suppress(KeyboardInterrupt):
                warnings.simplefilter("always")
                scenario.run(path)
        if not fault.fired:
            break
        where = f"KeyboardInterrupt before {fault.calls[0].op} {fault.calls[0].path}"
        try:
            report = check_invariants(path, max_backups=MAX_BACKUPS, after_crash=True)
            after = path.read_bytes() if path.exists() else None
            if not scenario.commits and after != before:
                violations.append(f"{where}: the state changed")
            assert report.state is None or "n" in report.state
            # The next transaction gets the lock at once and cleans up.
            commit(path, 50)
            check_invariants(
                path, acknowledged=version(50), max_backups=MAX_BACKUPS, after_crash=False
            )
        except InvariantViolation as exc:
            violations.append(f"{where}: {'; '.join(exc.problems)}")
        del calls
        k += 1
    assert k > 5
    assert not violations, violations


def test_consecutive_crashes_keep_backups_bounded(tmp_path: Path) -> None:
    """Two crashes in a row between backup and pruning leave at most max_backups + 1 backups.

    Invariant I5: "at most max_backups (one more right after a crash)".
    """
    path = state_file(tmp_path)
    for n in range(1, MAX_BACKUPS + 2):
        commit(path, n)
    for n in (MAX_BACKUPS + 2, MAX_BACKUPS + 3):
        # Crash just after the backups folder is fsynced: a new backup, no pruning yet.
        _crash_after_backup(path, n)
    state = PipelineState(path, max_backups=MAX_BACKUPS)
    assert len(state.backup_manager.names()) <= MAX_BACKUPS + 1


def _crash_after_backup(path: Path, n: int) -> None:
    import os

    from pipeline_common import _fs

    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:

            def hook(when: str, op: str, p: str) -> None:
                if when == "after" and op == "fsync_dir" and p.endswith("backups"):
                    os._exit(77)

            _fs.set_hook(hook)
            commit(path, n)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 77
