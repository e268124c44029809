"""Eight deliberately broken protocols; each must be caught by at least one check.

Each bug is switched on with monkeypatch only, then the checks run against it: the
call-order checker, the power-loss model, a three-process concurrency run and a
corrupt-file read. The table of which check caught which bug is printed.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateReadError, _fs, _lock
from pipeline_common import state as state_module
from pipeline_common._backup import BackupManager
from pipeline_common.testing import record_calls

from ._order import order_violations
from ._scenarios import SCENARIOS, state_file
from .test_power_loss import WORKLOADS, run_model

Patch = Callable[[pytest.MonkeyPatch], None]


def _no_temp_fsync(m: pytest.MonkeyPatch) -> None:
    real = _fs.fsync
    m.setattr(_fs, "fsync", lambda fd, path: None if path.endswith(".tmp") else real(fd, path))


def _no_folder_fsync(m: pytest.MonkeyPatch) -> None:
    real = _fs.fsync_dir

    def fsync_dir(path: str) -> None:
        if os.path.basename(path) not in (".pipeline", "backups"):
            return
        real(path)

    m.setattr(_fs, "fsync_dir", fsync_dir)


def _log_before_replace(m: pytest.MonkeyPatch) -> None:
    import hashlib

    from pipeline_common._log import TransactionLog

    real = state_module.atomic_replace

    def replace(target: Path, data: bytes, *args: Any, **kwargs: Any) -> Any:
        log = TransactionLog(target.parent / f".{target.stem}" / "transactions.log", 0o644)
        log.append(
            {
                "operation": "transaction",
                "success": True,
                "commits": True,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        return real(target, data, *args, **kwargs)

    m.setattr(state_module, "atomic_replace", replace)


def _backup_after_replace(m: pytest.MonkeyPatch) -> None:
    real_link = BackupManager.link_current
    real_replace = state_module.atomic_replace
    pending: list[BackupManager] = []

    def link_current(self: BackupManager, **kwargs: Any) -> Any:
        pending.append(self)
        return None

    def replace(*args: Any, **kwargs: Any) -> Any:
        result = real_replace(*args, **kwargs)
        while pending:
            real_link(pending.pop())
        return result

    m.setattr(BackupManager, "link_current", link_current)
    m.setattr(state_module, "atomic_replace", replace)


def _lock_file_deleted_on_release(m: pytest.MonkeyPatch) -> None:
    real = _lock.ProcessLock.release

    def release(self: _lock.ProcessLock) -> None:
        real(self)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    m.setattr(_lock.ProcessLock, "release", release)


def _lock_on_state_file(m: pytest.MonkeyPatch) -> None:
    real = state_module.get_process_lock
    m.setattr(
        state_module,
        "get_process_lock",
        lambda path, mode: real(Path(str(path).removesuffix(".lock")), mode),
    )


def _prune_before_commit(m: pytest.MonkeyPatch) -> None:
    real = BackupManager.link_current

    def link_current(self: BackupManager, **kwargs: Any) -> Any:
        made = real(self, **kwargs)
        self.prune()
        return made

    m.setattr(BackupManager, "link_current", link_current)


def _corrupt_read_as_empty(m: pytest.MonkeyPatch) -> None:
    real = PipelineState._decode

    def decode(self: PipelineState, raw: bytes | None, **kwargs: Any) -> dict[str, Any]:
        try:
            return real(self, raw, **kwargs)
        except StateReadError:
            return {}

    m.setattr(PipelineState, "_decode", decode)


BUGS: dict[str, Patch] = {
    "no temp fsync": _no_temp_fsync,
    "no folder fsync": _no_folder_fsync,
    "log before replace": _log_before_replace,
    "backup after replace": _backup_after_replace,
    "lock file deleted on release": _lock_file_deleted_on_release,
    "lock taken on the state file": _lock_on_state_file,
    "pruning before the commit": _prune_before_commit,
    "corrupt file read as {}": _corrupt_read_as_empty,
}


# -- the checks ---------------------------------------------------------------------


def check_call_order(tmp: Path, m: pytest.MonkeyPatch) -> bool:
    """True when the call-order checker flags any transaction kind."""
    for scenario in SCENARIOS:
        path = state_file(tmp / "order" / scenario.name)
        try:
            scenario.setup(path)
            with record_calls() as calls:
                scenario.run(path)
        except Exception:
            return True
        if order_violations(calls, path):
            return True
    return False


def _strip(problem: str) -> str:
    return re.sub(r"crash point \d+", "crash point N", problem)


def check_power_loss(tmp: Path, m: pytest.MonkeyPatch, baseline: set[str], bug: Patch) -> bool:
    """True when the power-loss model finds a violation the unbroken library does not have."""
    workloads = [w for w in WORKLOADS if w.name == "three_commits_with_pruning"]
    try:
        _, violations = run_model(workloads, tmp / "power", m, bug=bug)
    except Exception:
        return True
    return bool({_strip(v) for v in violations} - baseline)


def _increment(path: Path, times: int) -> None:
    state = PipelineState(path, max_backups=2, timeout=10)
    for _ in range(times):
        with state.transaction() as txn:
            txn.data["n"] = txn.data.get("n", 0) + 1


def check_concurrency(tmp: Path, m: pytest.MonkeyPatch) -> bool:
    """True when three processes incrementing a counter lose an update or fail."""
    path = state_file(tmp / "concurrency")
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                _increment(path, 25)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    failed = any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in pids)
    try:
        n = PipelineState(path).read().get("n")
    except Exception:
        return True
    return failed or n != 75


def check_corrupt_read(tmp: Path, m: pytest.MonkeyPatch) -> bool:
    """True when a corrupt state file is not answered with StateReadError."""
    path = state_file(tmp / "corrupt")
    path.write_bytes(b'{"n": 1, "pha')
    try:
        PipelineState(path).read()
    except StateReadError:
        return path.read_bytes() != b'{"n": 1, "pha'
    except Exception:
        return True
    return True


def test_unbroken_library_passes_every_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks do not cry wolf: the real library passes all four."""
    assert not check_call_order(tmp_path, monkeypatch)
    assert not check_concurrency(tmp_path, monkeypatch)
    assert not check_corrupt_read(tmp_path, monkeypatch)


def test_eight_seeded_bugs_are_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every seeded protocol bug is caught by at least one check (8 of 8)."""
    _, base = run_model(
        [w for w in WORKLOADS if w.name == "three_commits_with_pruning"],
        tmp_path / "baseline",
        monkeypatch,
    )
    baseline = {_strip(v) for v in base}
    table: dict[str, list[str]] = {}
    for i, (bug, patch) in enumerate(BUGS.items()):
        tmp = tmp_path / f"bug{i}"
        caught: list[str] = []
        with monkeypatch.context() as m:
            # applied by the recorder itself, on top of its wrappers
            if check_power_loss(tmp, m, baseline, patch):
                caught.append("power loss")
        for name, check in (
            ("call order", check_call_order),
            ("concurrency", check_concurrency),
            ("bad input", check_corrupt_read),
        ):
            with monkeypatch.context() as m:
                patch(m)
                if check(tmp / name.replace(" ", "_"), m):
                    caught.append(name)
            _lock._registry.clear()  # locks opened under a patched get_process_lock
        table[bug] = caught
    with capsys.disabled():
        print("\nseeded bugs caught:")
        for bug, caught in table.items():
            print(f"  {bug:32} {', '.join(caught) or 'NOT CAUGHT'}")
        print(f"  {sum(bool(c) for c in table.values())} of {len(table)}")
    assert all(table.values()), {b: c for b, c in table.items() if not c}
    assert len(table) == 8
