"""The transaction kinds every crash, ordering and fault test runs through.

Each scenario prepares a folder, then performs exactly one operation: the one that
is crashed, traced or failed. States carry a counter ``n`` so versions can be told
apart, and a payload so writes span several 4 KiB blocks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_common import PipelineState, StateValidationError

MAX_BACKUPS = 3


def version(n: int, size: int = 300) -> dict[str, Any]:
    """The state of commit number ``n`` (deterministic, so a backup can be checked)."""
    return {"n": n, "phase1": {"status": "running"}, "payload": chr(97 + n % 26) * size}


def commit(path: Path, n: int, size: int = 300) -> None:
    """Commit version ``n`` with a transaction."""
    state = PipelineState(path, max_backups=MAX_BACKUPS, timeout=2)
    with state.transaction() as txn:
        txn.data.clear()
        txn.data.update(version(n, size))


def _prepare(path: Path, commits: int) -> None:
    for n in range(1, commits + 1):
        commit(path, n)


def _fail_block(path: Path) -> None:
    state = PipelineState(path, max_backups=MAX_BACKUPS, timeout=2)
    try:
        with state.transaction() as txn:
            txn.data["n"] = -1
            raise ValueError("the phase failed")
    except ValueError:
        pass


def _invalid(path: Path) -> None:
    state = PipelineState(path, max_backups=MAX_BACKUPS, timeout=2)
    try:
        with state.transaction() as txn:
            txn.data["phase1"] = {"status": "bogus"}
    except StateValidationError:
        pass


def _restore(path: Path) -> None:
    state = PipelineState(path, max_backups=MAX_BACKUPS, timeout=2)
    state.restore_backup(state.list_backups()[0])


def _create_backup(path: Path) -> None:
    PipelineState(path, max_backups=MAX_BACKUPS, timeout=2).backup_manager.create_backup()


def tear_log_and_leave_temp(path: Path) -> None:
    """Cut the log in the middle of its last line and leave an orphan temp file."""
    log = path.parent / f".{path.stem}" / "transactions.log"
    data = log.read_bytes()
    log.write_bytes(data[: len(data) - 7])
    (path.parent / f".{path.name}.tmp").write_bytes(b'{"n": 99, "half')


@dataclass(frozen=True)
class Scenario:
    """A named operation on a prepared folder."""

    name: str
    setup: Callable[[Path], None]
    run: Callable[[Path], None]
    commits: bool  # whether the operation changes the state


def _setup_torn(path: Path) -> None:
    _prepare(path, 2)
    tear_log_and_leave_temp(path)


SCENARIOS = [
    Scenario("first_commit", lambda p: None, lambda p: commit(p, 1), True),
    Scenario("first_commit_big", lambda p: None, lambda p: commit(p, 1, 20_000), True),
    Scenario("steady_commit", lambda p: _prepare(p, 2), lambda p: commit(p, 3), True),
    Scenario(
        "rotation_boundary",
        lambda p: _prepare(p, MAX_BACKUPS + 1),
        lambda p: commit(p, MAX_BACKUPS + 2),
        True,
    ),
    Scenario("failing_block", lambda p: _prepare(p, 2), _fail_block, False),
    Scenario("validation_failure", lambda p: _prepare(p, 2), _invalid, False),
    Scenario("restore_backup", lambda p: _prepare(p, 3), _restore, True),
    Scenario("create_backup", lambda p: _prepare(p, 2), _create_backup, False),
    Scenario("torn_log_recovery", _setup_torn, lambda p: commit(p, 3), True),
]


def state_file(folder: Path) -> Path:
    """The state file used in ``folder`` (a fresh subfolder per test)."""
    os.makedirs(folder, exist_ok=True)
    return folder / "pipeline.json"
