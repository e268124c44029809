"""The public contract of PipelineState and StateTransaction, point by point (issue #2)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from pipeline_common import (
    PHASE_STATUSES,
    PipelineState,
    StateError,
    StateReadError,
    StateSerializationError,
    StateSidecarError,
    StateTransaction,
    StateValidationError,
)


def _commit(state: PipelineState, **changes: Any) -> None:
    with state.transaction() as txn:
        txn.data.update(changes)


def _fail_in_block(state: PipelineState, error: BaseException, **changes: Any) -> None:
    with state.transaction() as txn:
        txn.data.update(changes)
        raise error


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- construction, paths and sidecars ---------------------------------------------------------


def test_constructor_defaults_match_the_contract(state_path: Path) -> None:
    """A state built with only a path has the documented defaults."""
    state = PipelineState(state_path)
    assert state.validate_on_read is False
    assert state.max_backups == 50
    assert state.backup_before_write is True
    assert state.timeout == 10.0
    assert state.path == state_path.resolve()


@pytest.mark.parametrize("kind", [str, Path], ids=["str", "pathlike"])
def test_path_may_be_str_or_pathlike(state_path: Path, kind: type) -> None:
    """The path is accepted as a str or as an os.PathLike and stored as a Path."""
    state = PipelineState(kind(state_path))
    state.write({"a": 1})
    assert isinstance(state.path, Path)
    assert json.loads(state_path.read_bytes()) == {"a": 1}


def test_sidecars_live_at_the_documented_paths(state: PipelineState, tmp_path: Path) -> None:
    """The lock, backups and log sit at <path>.lock and <dir>/.<stem>/{backups,transactions.log}."""
    _commit(state, n=1)
    _commit(state, n=2)
    assert (tmp_path / "pipeline.json.lock").is_file()
    assert (tmp_path / ".pipeline" / "backups").is_dir()
    assert (tmp_path / ".pipeline" / "transactions.log").is_file()
    (backup,) = state.list_backups()
    assert backup.parent == tmp_path / ".pipeline" / "backups"


def test_state_file_holds_exactly_the_callers_json(state: PipelineState) -> None:
    """The file parses to exactly the committed dict: no keys are injected."""
    data = {"phase1": {"status": "running", "n": 3}, "free": [1, "two", None, True, 2.5]}
    state.write(data)
    _commit(state, extra="x")
    assert json.loads(state.path.read_bytes()) == {**data, "extra": "x"}


def test_lock_file_is_never_deleted(state: PipelineState) -> None:
    """The lock file stays on disk, with the same inode, across transactions."""
    _commit(state, n=1)
    inode = os.stat(state.lock_path).st_ino
    _commit(state, n=2)
    with pytest.raises(RuntimeError), state.transaction():
        raise RuntimeError("boom")
    assert os.stat(state.lock_path).st_ino == inode


# -- read ----------------------------------------------------------------------------------------


def test_read_of_a_missing_file_returns_an_empty_dict(state: PipelineState) -> None:
    """Reading before the first commit returns {} and creates nothing."""
    assert state.read() == {}
    assert not state.path.exists()


def test_read_returns_a_fresh_object_each_time(state: PipelineState) -> None:
    """Mutating what read() returned changes neither the file nor the next read."""
    state.write({"a": {"b": 1}})
    first = state.read()
    first["a"]["b"] = 99
    assert state.read() == {"a": {"b": 1}}


_BAD_FILES = {
    "empty": b"",
    "whitespace": b"  \n\t ",
    "truncated": b'{"a": [1, 2',
    "trailing-garbage": b'{"a": 1} x',
    "trailing-nul": b'{"a": 1}\x00\x00',
    "array": b"[1, 2]",
    "number": b"42",
    "null": b"null",
    "string": b'"text"',
    "boolean": b"true",
    "nan": b'{"a": NaN}',
    "infinity": b'{"a": -Infinity}',
    "duplicate-keys": b'{"a": 1, "a": 2}',
    "invalid-utf8": b'{"a": "\xff\xfe"}',
    "utf16": '{"a": 1}'.encode("utf-16"),
    "deep-nesting": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "5000-digit-int": b'{"a": ' + b"7" * 5000 + b"}",
}


@pytest.mark.parametrize("raw", list(_BAD_FILES.values()), ids=list(_BAD_FILES))
def test_read_of_a_bad_file_raises_state_read_error_naming_it(
    state: PipelineState, raw: bytes
) -> None:
    """A file that is not one strict JSON object raises StateReadError naming the file."""
    state.path.write_bytes(raw)
    with pytest.raises(StateReadError) as info:
        state.read()
    assert str(state.path) in str(info.value)
    assert info.value.path == state.path
    assert state.path.read_bytes() == raw


def test_read_error_names_the_newest_good_backup_to_restore(state: PipelineState) -> None:
    """A corrupt file's error names the newest backup that parses, as text and attribute."""
    _commit(state, n=1)
    _commit(state, n=2)
    _commit(state, n=3)
    newest = state.list_backups()[0]
    tmp = state.path.with_name("corrupt.tmp")
    tmp.write_bytes(b'{"n": 4')
    os.replace(tmp, state.path)
    with pytest.raises(StateReadError) as info:
        state.read()
    assert info.value.backup == newest
    assert newest.name in str(info.value)
    assert json.loads(newest.read_bytes()) == {"n": 2}


def test_read_error_without_backups_says_there_is_none(state: PipelineState) -> None:
    """A corrupt file with no backup yields a StateReadError whose backup is None."""
    state.path.write_bytes(b"{")
    with pytest.raises(StateReadError) as info:
        state.read()
    assert info.value.backup is None
    assert "no backup" in str(info.value)


def test_transaction_on_a_corrupt_file_raises_and_changes_nothing(state: PipelineState) -> None:
    """Opening a transaction on a corrupt file raises StateReadError; the file is left alone."""
    state.path.write_bytes(b"[]")
    with pytest.raises(StateReadError), state.transaction() as txn:
        txn.data["a"] = 1
    assert state.path.read_bytes() == b"[]"


def test_write_over_a_corrupt_file_keeps_the_corrupt_bytes_aside(state: PipelineState) -> None:
    """A full replacement of a corrupt file succeeds and the corrupt bytes survive in backups/."""
    state.path.write_bytes(b'{"half": ')
    state.write({"fresh": True})
    assert state.read() == {"fresh": True}
    kept = [p.read_bytes() for p in state.backups_dir.iterdir()]
    assert b'{"half": ' in kept


def test_utf8_bom_is_accepted_on_read_and_never_written(state: PipelineState) -> None:
    """A file starting with a UTF-8 BOM reads fine, and the next commit writes no BOM."""
    state.path.write_bytes(b"\xef\xbb\xbf" + b'{"a": "\xc3\xa9"}')
    assert state.read() == {"a": "é"}
    _commit(state, b=1)
    assert not state.path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert state.read() == {"a": "é", "b": 1}


@pytest.mark.parametrize("value", [2**64 + 1, -(2**63) - 1, 2**200 + 1, -(3**150)])
def test_integers_beyond_64_bits_round_trip_exactly(state: PipelineState, value: int) -> None:
    """An integer outside the 64-bit range is written and read back exactly, as an int."""
    state.write({"big": value, "nested": [{"v": value}]})
    assert json.loads(state.path.read_bytes())["big"] == value
    for data in (state.read(), PipelineState(state.path).read()):
        assert data == {"big": value, "nested": [{"v": value}]}
        assert type(data["big"]) is int
    with state.transaction() as txn:
        assert txn.data["big"] == value
        assert type(txn.data["big"]) is int
        txn.data["other"] = 1
    assert state.read()["big"] == value


def test_non_ascii_text_round_trips_as_utf8(state: PipelineState) -> None:
    """Non-ASCII keys and values survive a commit and are stored as UTF-8."""
    data = {"clé": "日本語 ✓", "emoji": "\U0001f600"}
    state.write(data)
    assert state.read() == data
    assert "日本語".encode() in state.path.read_bytes()


# -- validation ------------------------------------------------------------------------------

_VALID = [
    {},
    {"anything": [1, {"x": None}], "count": 3},
    {"phase1": {}},
    *({"phase1": {"status": s}} for s in PHASE_STATUSES),
    {"phase_load": {"status": "running", "progress": 0.5, "extra": [1]}},
    {"myphase": "not a phase key, so free"},
]
_INVALID = [
    {"phase1": "running"},
    {"phase1": []},
    {"phase1": 3},
    {"phase2": {"status": "done"}},
    {"phase2": {"status": 1}},
    {"phases": {"status": "finished"}},
]


@pytest.mark.parametrize("data", _VALID)
def test_default_schema_accepts_valid_pipelines(state: PipelineState, data: dict[str, Any]) -> None:
    """Unknown keys and phases with a known status (or none) pass the default schema."""
    state.write(data)
    assert state.read(validate=True) == data


@pytest.mark.parametrize("data", _INVALID)
def test_default_schema_rejects_bad_phases_and_writes_nothing(
    state: PipelineState, data: dict[str, Any]
) -> None:
    """A phase* key that is not an object, or an unknown status, fails before any write."""
    state.write({"keep": 1})
    before = state.path.read_bytes()
    with pytest.raises(StateValidationError) as info:
        state.write(data)
    assert str(state.path) in str(info.value)
    assert info.value.errors
    assert state.path.read_bytes() == before


def test_validation_failure_in_a_transaction_leaves_the_file_untouched(
    state: PipelineState,
) -> None:
    """A block that leaves invalid data raises StateValidationError; bytes and backups unchanged."""
    state.write({"phase1": {"status": "pending"}})
    before = state.path.read_bytes()
    backups = state.list_backups()
    with pytest.raises(StateValidationError), state.transaction() as txn:
        txn.data["phase1"]["status"] = "bogus"
    assert state.path.read_bytes() == before
    assert state.list_backups() == backups
    assert state.get_transaction_history(1)[0]["success"] is False


def test_validate_false_commits_data_the_schema_rejects(state: PipelineState) -> None:
    """transaction(validate=False) skips the schema check."""
    with state.transaction(validate=False) as txn:
        txn.data["phase1"] = "free text"
    assert state.read() == {"phase1": "free text"}


def test_read_validates_only_when_asked(state_path: Path) -> None:
    """read() skips the schema unless validate=True or validate_on_read=True asks for it."""
    state_path.write_text(json.dumps({"phase1": "not an object"}))
    lax = PipelineState(state_path)
    assert lax.read() == {"phase1": "not an object"}
    with pytest.raises(StateValidationError):
        lax.read(validate=True)
    strict = PipelineState(state_path, validate_on_read=True)
    with pytest.raises(StateValidationError) as info:
        strict.read()
    assert str(strict.path) in str(info.value)
    assert strict.read(validate=False) == {"phase1": "not an object"}


class _Counter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int
    label: str = "default label"


def test_custom_schema_is_enforced(state_path: Path) -> None:
    """schema= takes any Pydantic model class and commits are checked against it."""
    state = PipelineState(state_path, schema=_Counter)
    state.write({"count": 1})
    with pytest.raises(StateValidationError):
        state.write({"count": "many"})
    with pytest.raises(StateValidationError):
        state.write({"count": 2, "unknown": True})
    assert state.read() == {"count": 1}


def test_custom_schema_defaults_are_not_written_into_the_file(state_path: Path) -> None:
    """Validation checks the data; the file keeps the caller's JSON without model defaults."""
    state = PipelineState(state_path, schema=_Counter)
    state.write({"count": 5})
    assert json.loads(state_path.read_bytes()) == {"count": 5}


# -- write --------------------------------------------------------------------------------------


def test_write_replaces_the_whole_state(state: PipelineState) -> None:
    """write() is a full replacement: keys absent from the new dict are gone."""
    state.write({"a": 1, "b": 2})
    state.write({"c": 3})
    assert state.read() == {"c": 3}


def test_write_is_committed_like_a_transaction(state: PipelineState) -> None:
    """write() backs up the old version and logs a successful 'write' record."""
    state.write({"v": 1})
    state.write({"v": 2})
    (backup,) = state.list_backups()
    assert json.loads(backup.read_bytes()) == {"v": 1}
    record = state.get_transaction_history(1)[0]
    assert record["operation"] == "write"
    assert record["success"] is True
    assert record["sha256"] == hashlib.sha256(state.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bad", [[1, 2], "text", None, 3])
def test_write_of_a_non_dict_raises_and_writes_nothing(state: PipelineState, bad: Any) -> None:
    """write() of anything but a dict raises StateSerializationError and creates no file."""
    with pytest.raises(StateSerializationError) as info:
        state.write(bad)
    assert str(state.path) in str(info.value)
    assert not state.path.exists()


def test_write_does_not_keep_a_reference_to_the_callers_dict(state: PipelineState) -> None:
    """Mutating a dict after write() does not change the stored state."""
    data = {"a": [1]}
    state.write(data)
    data["a"].append(2)
    assert state.read() == {"a": [1]}


# -- transaction ------------------------------------------------------------------------------


def test_clean_exit_commits(state: PipelineState) -> None:
    """Leaving the block without an exception commits txn.data."""
    with state.transaction() as txn:
        assert isinstance(txn, StateTransaction)
        txn.data["phase1"] = {"status": "running"}
    assert state.read() == {"phase1": {"status": "running"}}


def test_txn_data_is_a_private_copy_until_commit(state: PipelineState) -> None:
    """Changes to txn.data are invisible to readers until the block exits."""
    state.write({"n": 1, "nested": {"k": [1]}})
    with state.transaction() as txn:
        txn.data["n"] = 2
        txn.data["nested"]["k"].append(2)
        assert state.read() == {"n": 1, "nested": {"k": [1]}}
    assert state.read() == {"n": 2, "nested": {"k": [1, 2]}}


def test_seed_data_is_copied_not_aliased(state: PipelineState) -> None:
    """seed_data starts txn.data from a deep copy; the caller's dict is not mutated."""
    state.write({"old": True})
    seed = {"phase1": {"status": "pending"}, "items": [1]}
    with state.transaction(seed_data=seed) as txn:
        assert txn.data == seed
        assert txn.data is not seed
        txn.data["items"].append(2)
    assert seed == {"phase1": {"status": "pending"}, "items": [1]}
    assert state.read() == {"phase1": {"status": "pending"}, "items": [1, 2]}


def test_txn_data_may_be_replaced_by_another_dict(state: PipelineState) -> None:
    """Assigning a new dict to txn.data commits that dict."""
    state.write({"a": 1})
    with state.transaction() as txn:
        txn.data = {"b": 2}
    assert state.read() == {"b": 2}


def test_txn_data_replaced_by_a_non_dict_raises_serialization_error(state: PipelineState) -> None:
    """Assigning a non-dict to txn.data fails the commit with StateSerializationError."""
    state.write({"a": 1})
    before = state.path.read_bytes()
    with pytest.raises(StateSerializationError), state.transaction() as txn:
        txn.data = [1, 2]  # type: ignore[assignment]
    assert state.path.read_bytes() == before


def test_exception_is_reraised_unchanged_and_file_is_byte_identical(state: PipelineState) -> None:
    """An exception in the block propagates as the same object and nothing is written."""
    state.write({"n": 1})
    before = state.path.read_bytes()
    backups = state.list_backups()
    error = LookupError("the caller's own error")
    with pytest.raises(LookupError) as info:
        _fail_in_block(state, error, n=2)
    assert info.value is error
    assert state.path.read_bytes() == before
    assert state.list_backups() == backups


def test_failed_block_is_logged_with_success_false(state: PipelineState) -> None:
    """A failing block leaves a success: false record naming the error in the log."""
    with pytest.raises(ZeroDivisionError), state.transaction(operation="divide"):
        _ = 1 / 0
    record = state.get_transaction_history(1)[0]
    assert record["operation"] == "divide"
    assert record["success"] is False
    assert "ZeroDivisionError" in record["details"]["error"]


def test_keyboard_interrupt_in_the_block_rolls_back(state: PipelineState) -> None:
    """KeyboardInterrupt in the block propagates, nothing is written, and the lock is free."""
    state.write({"n": 1})
    before = state.path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        _fail_in_block(state, KeyboardInterrupt(), n=2)
    assert state.path.read_bytes() == before
    _commit(state, n=3)
    assert state.read() == {"n": 3}


def test_read_inside_a_transaction_sees_the_last_commit(state: PipelineState) -> None:
    """read() takes no lock, so it works inside a block and returns the committed version."""
    state.write({"n": 1})
    with state.transaction() as txn:
        txn.data["n"] = 5
        assert state.read() == {"n": 1}


def test_a_transaction_object_can_be_entered_only_once(state: PipelineState) -> None:
    """Re-entering a finished StateTransaction raises StateError instead of reusing it."""
    txn = state.transaction()
    with txn:
        txn.data["a"] = 1
    with pytest.raises(StateError), txn:
        pass
    assert state.read() == {"a": 1}


def test_operation_name_is_recorded(state: PipelineState) -> None:
    """transaction(operation=...) names the log record."""
    with state.transaction(operation="phase3-start") as txn:
        txn.data["phase3"] = {"status": "running"}
    assert state.get_transaction_history(1)[0]["operation"] == "phase3-start"


def test_txn_details_are_stored_in_the_log_record(state: PipelineState) -> None:
    """Entries put in txn.details appear in the record's details."""
    with state.transaction() as txn:
        txn.data["a"] = 1
        txn.details["why"] = "test"
    assert state.get_transaction_history(1)[0]["details"]["why"] == "test"


# -- nested transactions ----------------------------------------------------------------------


def test_nested_transaction_joins_the_outer_one(state: PipelineState) -> None:
    """An inner transaction shares the outer data and commits only when the outer exits."""
    state.write({"n": 0})
    with state.transaction() as outer:
        outer.data["outer"] = True
        with state.transaction() as inner:
            assert inner.nested
            assert inner.data is outer.data
            inner.data["inner"] = True
        assert state.read() == {"n": 0}
    assert state.read() == {"n": 0, "outer": True, "inner": True}


def test_exception_in_the_inner_block_undoes_only_inner_changes(state: PipelineState) -> None:
    """An exception escaping the inner block rolls back the inner changes, not the outer ones."""
    state.write({"n": 0})
    with state.transaction() as outer:
        outer.data["before"] = 1
        with pytest.raises(ValueError, match="inner fails"):
            _fail_in_block(state, ValueError("inner fails"), inner=1, before=999)
        assert outer.data == {"n": 0, "before": 1}
        outer.data["after"] = 2
    assert state.read() == {"n": 0, "before": 1, "after": 2}


def test_exception_in_the_outer_block_undoes_the_inner_changes_too(state: PipelineState) -> None:
    """When the outer block fails, nothing of the inner block is committed either."""
    state.write({"n": 0})

    def outer_fails_after_inner() -> None:
        with state.transaction() as outer:
            with state.transaction() as inner:
                inner.data["inner"] = 1
            outer.data["outer"] = 1
            raise RuntimeError("outer fails")

    with pytest.raises(RuntimeError):
        outer_fails_after_inner()
    assert state.read() == {"n": 0}


def test_nested_transaction_on_a_second_object_for_the_same_file_joins(
    state: PipelineState,
) -> None:
    """A second PipelineState on the same file, used inside a block, joins rather than deadlocks."""
    other = PipelineState(state.path, timeout=0.5)
    with state.transaction() as outer:
        outer.data["a"] = 1
        with other.transaction() as inner:
            inner.data["b"] = 2
    assert state.read() == {"a": 1, "b": 2}


# -- strict JSON on commit --------------------------------------------------------------------


def _cyclic() -> dict[str, Any]:
    data: dict[str, Any] = {}
    data["self"] = data
    return data


def _list_cycle() -> dict[str, Any]:
    items: list[Any] = []
    items.append(items)
    return {"x": items}


def _deep(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["d"] = {}
        node = node["d"]
    return root


_NOT_JSON = {
    "nan": {"x": float("nan")},
    "infinity": {"x": [float("inf")]},
    "neg-infinity": {"x": {"y": float("-inf")}},
    "int-key": {1: "one"},
    "tuple-key": {(1, 2): "pair"},
    "set": {"x": {1, 2}},
    "bytes": {"x": b"raw"},
    "datetime": {"x": datetime(2024, 1, 1, tzinfo=timezone.utc)},
    "object": {"x": object()},
    "cycle": _cyclic(),
    "list-cycle": _list_cycle(),
    "lone-surrogate": {"x": "\ud800"},
    "lone-surrogate-key": {"\udc00": 1},
    "deep-nesting": _deep(100_000),
    "big-int-and-set": {"big": 2**70, "x": {1}},
    "big-int-and-nan": {"big": 2**70, "x": float("nan")},
    "big-int-and-surrogate": {"big": 2**70, "x": "\ud800"},
    "big-int-and-int-key": {"big": 2**70, 1: "one"},
    "big-int-and-colliding-keys": {"big": 2**70, 1: "int", "1": "str"},
}


@pytest.mark.parametrize("data", list(_NOT_JSON.values()), ids=list(_NOT_JSON))
def test_non_json_data_raises_serialization_error_before_any_file_is_touched(
    state: PipelineState, data: dict[Any, Any]
) -> None:
    """Data that is not strict JSON raises StateSerializationError; no file changes."""
    state.write({"keep": 1})
    before = state.path.read_bytes()
    backups = state.list_backups(limit=100)
    with pytest.raises(StateSerializationError) as info:
        state.write(data, validate=False)
    assert str(state.path) in str(info.value)
    assert state.path.read_bytes() == before
    assert state.list_backups(limit=100) == backups
    assert sorted(os.listdir(state.path.parent)) == sorted(
        [state.path.name, state.lock_path.name, state.sidecar_dir.name]
    )
    assert state.read() == {"keep": 1}


@pytest.mark.parametrize(
    "data",
    [{1: "one"}, {"\udc00": 1}, {"phase1": {"status": "running"}, 2: "x"}],
    ids=["int-key", "surrogate-key", "int-key-beside-a-phase"],
)
def test_non_string_keys_raise_serialization_error_with_validation_on(
    state: PipelineState, data: dict[Any, Any]
) -> None:
    """With validate=True (the default), non-string keys still raise StateSerializationError."""
    with pytest.raises(StateSerializationError), state.transaction() as txn:
        txn.data.update(data)
    assert not state.path.exists()


# -- file modes and links -----------------------------------------------------------------------


def test_new_state_file_gets_0o666_minus_umask(state_path: Path, umask: Any) -> None:
    """A state file created by the library has mode 0o666 & ~umask."""
    umask(0o027)
    PipelineState(state_path).write({"a": 1})
    assert _mode(state_path) == 0o640


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o664])
def test_existing_state_file_keeps_its_mode(state_path: Path, umask: Any, mode: int) -> None:
    """Committing over an existing file keeps its permission bits, whatever the umask."""
    umask(0o077)
    state_path.write_text("{}")
    os.chmod(state_path, mode)
    state = PipelineState(state_path)
    state.write({"a": 1})
    state.write({"a": 2})
    assert _mode(state_path) == mode


@pytest.mark.parametrize(("mode", "mask"), [(0o600, 0o000), (0o640, 0o000), (0o644, 0o022)])
def test_sidecars_are_never_more_open_than_the_state_file(
    state_path: Path, umask: Any, mode: int, mask: int
) -> None:
    """Lock, log, backups and sidecar folders grant no read/write bit the state file lacks."""
    umask(mask)
    state_path.write_text("{}")
    os.chmod(state_path, mode)
    state = PipelineState(state_path)
    state.write({"a": 1})
    state.write({"a": 2})
    files = [state.lock_path, state.log_path, *state.list_backups()]
    for path in files:
        assert _mode(path) & ~mode == 0, f"{path} is {oct(_mode(path))}, state is {oct(mode)}"
    for folder in (state.sidecar_dir, state.backups_dir):
        assert _mode(folder) & 0o666 & ~mode == 0, f"{folder} is {oct(_mode(folder))}"


def test_lock_file_is_not_world_writable(state_path: Path, umask: Any) -> None:
    """Even with umask 0 the lock file has no world-write bit."""
    umask(0)
    state = PipelineState(state_path)
    state.write({"a": 1})
    assert _mode(state.lock_path) & 0o002 == 0
    assert _mode(state_path) == 0o666


def test_symlinked_state_path_is_resolved_once(tmp_path: Path) -> None:
    """Through a symlink the link survives and its target receives the new state."""
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "state.json"
    target.write_text('{"v": 0}')
    link = tmp_path / "link.json"
    link.symlink_to(target)
    state = PipelineState(link)
    state.write({"v": 1})
    state.write({"v": 2})
    assert link.is_symlink()
    assert os.readlink(link) == str(target)
    assert json.loads(target.read_bytes()) == {"v": 2}
    assert state.read() == {"v": 2}


@pytest.mark.parametrize("which", ["sidecar", "backups"])
def test_symlinked_sidecar_folder_is_refused(tmp_path: Path, which: str) -> None:
    """A .<stem>/ or backups/ folder that is a symlink raises StateSidecarError; nothing changes."""
    state_path = tmp_path / "pipeline.json"
    state_path.write_text('{"v": 0}')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if which == "sidecar":
        (tmp_path / ".pipeline").symlink_to(elsewhere, target_is_directory=True)
    else:
        (tmp_path / ".pipeline").mkdir()
        (tmp_path / ".pipeline" / "backups").symlink_to(elsewhere, target_is_directory=True)
    state = PipelineState(state_path)
    with pytest.raises(StateSidecarError) as info:
        state.write({"v": 1})
    assert "symlink" in str(info.value)
    assert state_path.read_text() == '{"v": 0}'
    assert list(elsewhere.iterdir()) == []


def test_sidecar_folder_that_is_a_file_is_refused(state_path: Path, tmp_path: Path) -> None:
    """A regular file where the .<stem>/ folder belongs raises StateSidecarError."""
    (tmp_path / ".pipeline").write_text("not a folder")
    state = PipelineState(state_path)
    with pytest.raises(StateSidecarError):
        state.write({"v": 1})
    assert not state_path.exists()


def test_negative_max_backups_is_rejected(state_path: Path) -> None:
    """max_backups below zero is a ValueError at construction."""
    with pytest.raises(ValueError, match="max_backups"):
        PipelineState(state_path, max_backups=-1)


def test_commit_never_writes_a_file_that_read_rejects(state: PipelineState) -> None:
    """An int key colliding with a str key (beside a big int) must not commit duplicate keys."""
    state.write({"keep": 1})
    with pytest.raises(StateSerializationError):
        state.write({"big": 2**70, 1: "int", "1": "str"}, validate=False)
    assert state.read() == {"keep": 1}


@pytest.mark.parametrize("name", ["my state.json", "état ✓.json", "new\nline.json", "a+b[1].json"])
def test_unusual_file_names_work_end_to_end(tmp_path: Path, name: str) -> None:
    """Names with spaces, non-ASCII, newlines or regex characters commit, back up and restore."""
    state = PipelineState(tmp_path / name)
    state.write({"v": 1})
    state.write({"v": 2})
    (backup,) = state.list_backups()
    state.restore_backup(backup)
    assert state.read() == {"v": 1}
    assert [r["operation"] for r in state.get_transaction_history()] == [
        "restore",
        "write",
        "write",
    ]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_state_path_that_is_not_a_regular_file_raises_read_error(
    state: PipelineState, kind: str
) -> None:
    """A folder or FIFO at the state path raises StateReadError at once instead of hanging."""
    if kind == "directory":
        state.path.mkdir()
    else:
        os.mkfifo(state.path)
    with pytest.raises(StateReadError) as info:
        state.read()
    assert str(state.path) in str(info.value)


def test_write_inside_a_transaction_joins_it(state: PipelineState) -> None:
    """write() inside an open block replaces the block's data and commits with the block."""
    state.write({"old": True})
    with state.transaction() as txn:
        state.write({"replaced": True})
        assert txn.data == {"replaced": True}
        assert state.read() == {"old": True}
        txn.data["after"] = 1
    assert state.read() == {"replaced": True, "after": 1}
