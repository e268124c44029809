"""Generated power-loss crash states (ALICE-like model): acknowledged commits are durable."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline_common import PipelineState
from pipeline_common.testing import InvariantViolation, check_invariants

from ._powerloss import Workload, choices, expected_at, materialize, record
from ._scenarios import version


def _commit(n: int, size: int = 300, max_backups: int = 1):  # type: ignore[no-untyped-def]
    def step(path: Path) -> None:
        with PipelineState(path, max_backups=max_backups).transaction() as txn:
            txn.data.clear()
            txn.data.update(version(n, size))

    return step


def _fail(path: Path) -> None:
    try:
        with PipelineState(path, max_backups=1).transaction() as txn:
            txn.data["n"] = -1
            raise RuntimeError("phase failed")
    except RuntimeError:
        pass


def _restore(path: Path) -> None:
    state = PipelineState(path, max_backups=1)
    state.restore_backup(state.list_backups()[0])


def _backup(path: Path) -> None:
    PipelineState(path, max_backups=1).backup_manager.create_backup()


WORKLOADS = [
    Workload("first_commit_multiblock", [_commit(1, 9000)], 1),
    Workload("three_commits_with_pruning", [_commit(1), _commit(2, 5000), _commit(3)], 1),
    Workload("commit_commit_restore", [_commit(1), _commit(2), _restore], 1),
    Workload("commit_fail_backup", [_commit(1), _fail, _backup], 1),
    Workload("big_commits", [_commit(1, 20000, 2), _commit(2, 20000, 2)], 2),
    Workload("commit_backup_commit", [_commit(1), _backup, _commit(2, 12000)], 1),
    Workload(
        "no_backups_big",
        [_commit(1, 16000, 0), _commit(2, 16000, 0), _commit(3, 16000, 0)],
        0,
    ),
    Workload("commit_big_then_fail", [_commit(1), _commit(2, 30000), _fail], 1),
    Workload("restore_big", [_commit(1, 12000), _commit(2), _restore], 1),
]


def run_model(
    workloads: list[Workload],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limit: int = 0,
    bug: Callable[[pytest.MonkeyPatch], None] | None = None,
) -> tuple[int, list[str]]:
    """Generate, materialize and check crash states; return (count, violations)."""
    checked = 0
    violations: list[str] = []
    seen: set[str] = set()
    for w in workloads:
        ops, versions = record(w, tmp_path / "rec" / w.name, monkeypatch, bug)
        history = [v for v in versions if v is not None]
        # tmpfs when there is one: the model checks logic, real fsyncs only cost time
        folder = _scratch(tmp_path) / w.name
        for c in range(len(ops) + 1):
            acked, flight = expected_at(ops, c, versions)
            for keep in choices(ops, c):
                for fill in (b"\0", b"\xa5"):
                    digest = materialize(ops, keep, folder, fill)
                    key = f"{w.name}:{digest}:{acked is None}:{len(flight)}"
                    if key in seen:
                        continue
                    seen.add(key)
                    checked += 1
                    problem = _check_state(folder / "pipeline.json", acked, flight, history, w)
                    if problem:
                        violations.append(f"{w.name} crash point {c}: {problem}")
                    if limit and checked >= limit:
                        return checked, violations
    return checked, violations


def _scratch(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(dir=shm, prefix="pipeline-powerloss-"))
    return tmp_path / "crash"


def _check_state(
    path: Path, acked: bytes | None, flight: list[bytes], history: list[bytes], w: Workload
) -> str | None:
    try:
        found = check_invariants(
            path,
            acknowledged=acked,
            in_flight=flight,
            history=history,
            max_backups=w.max_backups,
            after_crash=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PipelineState(path, max_backups=w.max_backups, timeout=1).transaction(
                validate=False
            ):
                pass
        check_invariants(
            path,
            acknowledged=found.state if found.state is not None else {},
            history=[*history, b"{}\n"],
            max_backups=w.max_backups,
            after_crash=False,
        )
    except InvariantViolation as exc:
        return "; ".join(exc.problems)
    except Exception as exc:  # the library must open every crash state
        return f"{type(exc).__name__}: {exc}"
    return None


def test_generated_power_loss_states_keep_the_invariants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """At least 500 generated crash states, each opened, checked and recovered: 0 violations."""
    try:
        checked, violations = run_model(WORKLOADS, tmp_path, monkeypatch)
    finally:
        for leftover in Path("/dev/shm").glob("pipeline-powerloss-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    with capsys.disabled():
        print(f"\npower-loss states checked: {checked}, violations: {len(violations)}")
    assert checked >= 500
    assert violations == []
