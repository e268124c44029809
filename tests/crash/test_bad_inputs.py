"""Bad inputs: each answered by a documented StateError subclass, files unchanged."""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import (
    PipelineState,
    StateBackupError,
    StateError,
    StateReadError,
    StateSerializationError,
    StateSidecarError,
)

from ._scenarios import commit, state_file

FILES: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b"  \n",
    "truncated": b'{"n": 1, "phase1": {"sta',
    "nul_tailed": b'{"n": 1}\n' + b"\0" * 64,
    "garbage_tailed": b'{"n": 1}\nxyz',
    "non_utf8": b'{"n": "\xff\xfe"}',
    "utf16": '{"n": 1}'.encode("utf-16"),
    "top_level_array": b"[1, 2]",
    "top_level_number": b"1",
    "top_level_null": b"null",
    "top_level_string": b'"x"',
    "deep_nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep_object_nesting": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "huge_integer": b'{"n": ' + b"9" * 5000 + b"}",
    "nan": b'{"n": NaN}',
    "infinity": b'{"n": -Infinity}',
    "duplicate_keys": b'{"n": 1, "n": 2}',
    "lone_surrogate_escape": b'{"n": "\\ud800"}',
}


@pytest.mark.parametrize("name", list(FILES))
def test_bad_state_file_is_a_read_error(name: str, tmp_path: Path) -> None:
    """A corrupt state file raises StateReadError on read and on a transaction, unchanged."""
    path = state_file(tmp_path)
    path.write_bytes(FILES[name])
    state = PipelineState(path)
    with pytest.raises(StateReadError) as info:
        state.read()
    assert str(path) in str(info.value)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(StateReadError), state.transaction() as txn:
            txn.data["n"] = 2
    assert path.read_bytes() == FILES[name]


def test_utf8_bom_is_accepted_by_documented_policy(tmp_path: Path) -> None:
    """A UTF-8 BOM is accepted (documented in _json.decode): the content reads normally."""
    path = state_file(tmp_path)
    path.write_bytes(b'\xef\xbb\xbf{"n": 1}')
    assert PipelineState(path).read() == {"n": 1}


class _Cycle(dict):  # type: ignore[type-arg]
    pass


def _cycle() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


VALUES: dict[str, Callable[[], Any]] = {
    "set": lambda: {1, 2},
    "bytes": lambda: b"x",
    "datetime": lambda: dt.datetime(2024, 1, 1),
    "nan": lambda: float("nan"),
    "infinity": lambda: float("inf"),
    "cycle": _cycle,
    "object": object,
    "lone_surrogate": lambda: "\ud800",
    "tuple_key": lambda: {(1, 2): 3},
    "int_key": lambda: {1: "a"},
}


@pytest.mark.parametrize("name", list(VALUES))
def test_unserializable_data_is_a_serialization_error(name: str, tmp_path: Path) -> None:
    """Non-JSON values in txn.data raise StateSerializationError; nothing is written."""
    path = state_file(tmp_path)
    commit(path, 1)
    before = sorted(
        (p, p.read_bytes())
        for p in tmp_path.rglob("*")
        if p.is_file() and "log" not in p.name and not p.name.endswith(".lock")  # not state
    )
    with pytest.raises(StateSerializationError), PipelineState(path).transaction() as txn:
        txn.data["bad"] = VALUES[name]()
    after = sorted(
        (p, p.read_bytes())
        for p in tmp_path.rglob("*")
        if p.is_file() and "log" not in p.name and not p.name.endswith(".lock")  # not state
    )
    assert after == before


def _backups(path: Path) -> Path:
    return path.parent / f".{path.stem}" / "backups"


RESTORES: dict[str, Callable[[Path], str]] = {
    "dotdot": lambda p: str(_backups(p) / ".." / ".." / "pipeline.json"),
    "absolute_elsewhere": lambda p: "/etc/hostname",
    "nul_in_path": lambda p: str(_backups(p) / "pipeline_20240101_000000_000000.json.bak\0x"),
    "bad_name": lambda p: str(_backups(p) / "notes.txt"),
    "missing": lambda p: str(_backups(p) / "pipeline_20200101_000000_000000.json.bak"),
}


def _plant(path: Path, kind: str) -> str:
    name = _backups(path) / "pipeline_20200101_000000_000001.json.bak"
    if kind == "fifo":
        os.mkfifo(name)
    elif kind == "symlink":
        (path.parent / "outside.json").write_text('{"n": 9}')
        os.symlink(path.parent / "outside.json", name)
    elif kind == "directory":
        name.mkdir()
    elif kind == "corrupt":
        name.write_bytes(b'{"n": ')
    elif kind == "other_state":
        other = _backups(path) / "other_20200101_000000_000001.json.bak"
        other.write_text('{"n": 7}')
        return str(other)
    return str(name)


@pytest.mark.parametrize(
    "name", [*RESTORES, "fifo", "symlink", "directory", "corrupt", "other_state"]
)
def test_bad_restore_path_is_a_backup_error(name: str, tmp_path: Path) -> None:
    """restore_backup refuses anything that is not one of this state's good backups."""
    path = state_file(tmp_path)
    commit(path, 1)
    commit(path, 2)
    target = RESTORES[name](path) if name in RESTORES else _plant(path, name)
    before = path.read_bytes()
    with pytest.raises(StateBackupError):
        PipelineState(path).restore_backup(target)
    assert path.read_bytes() == before


@pytest.mark.parametrize("which", ["sidecar", "backups"])
def test_symlinked_sidecar_folder_is_refused(which: str, tmp_path: Path) -> None:
    """A pre-planted symlink for .<stem>/ or backups/ is refused, never followed."""
    path = state_file(tmp_path / "s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if which == "sidecar":
        os.symlink(elsewhere, path.parent / ".pipeline")
    else:
        (path.parent / ".pipeline").mkdir()
        os.symlink(elsewhere, path.parent / ".pipeline" / "backups")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(StateSidecarError):
            commit(path, 1)
    assert list(elsewhere.iterdir()) == []
    assert not path.exists()


def test_lock_path_that_is_a_directory_is_a_sidecar_error(tmp_path: Path) -> None:
    """A directory where the lock file belongs is a StateError, not a raw OSError or a hang."""
    path = state_file(tmp_path)
    (path.parent / "pipeline.json.lock").mkdir()
    with pytest.raises(StateError):
        commit(path, 1)
    assert not path.exists()


def test_state_path_that_is_a_directory_is_a_read_error(tmp_path: Path) -> None:
    """A directory at the state path is a StateReadError."""
    path = state_file(tmp_path)
    path.mkdir()
    with pytest.raises(StateReadError):
        PipelineState(path).read()


@pytest.mark.parametrize("damage", ["torn_tail", "nul_tail", "corrupt_middle"])
def test_damaged_log_is_tolerated_and_repaired(damage: str, tmp_path: Path) -> None:
    """Torn or corrupt log lines are skipped by the reader; the next append starts clean."""
    from pipeline_common.testing import check_invariants

    path = state_file(tmp_path)
    for n in (1, 2, 3):
        commit(path, n)
    log = path.parent / ".pipeline" / "transactions.log"
    lines = log.read_bytes().splitlines(keepends=True)
    if damage == "torn_tail":
        log.write_bytes(b"".join(lines)[:-9])
    elif damage == "nul_tail":
        log.write_bytes(b"".join(lines) + b"\0" * 100)
    else:
        log.write_bytes(b"".join([lines[0], b"{not json\n", *lines[1:]]))
    history = PipelineState(path).get_transaction_history()
    assert all(isinstance(r, dict) for r in history)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        commit(path, 4)
    if damage != "corrupt_middle":
        check_invariants(path, max_backups=3, after_crash=False)
    assert log.read_bytes().endswith(b"\n")


def test_clock_stepping_back_keeps_backup_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backups made while the clock steps backwards still list newest first by creation."""
    from pipeline_common import _backup

    path = state_file(tmp_path)
    commit(path, 1)
    times = iter([dt.datetime(2030, 1, 1), dt.datetime(2020, 1, 1), dt.datetime(2010, 1, 1)])

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Clock:  # type: ignore[override]
            t = next(times, dt.datetime(2000, 1, 1))
            return cls.fromtimestamp(t.timestamp(), tz)

    monkeypatch.setattr(_backup, "datetime", Clock)
    for n in (2, 3, 4):
        commit(path, n)
    monkeypatch.undo()
    backups = PipelineState(path, max_backups=3).list_backups()
    import json

    ns = [json.loads(p.read_bytes())["n"] for p in backups]
    assert ns == sorted(ns, reverse=True) == [3, 2, 1]
