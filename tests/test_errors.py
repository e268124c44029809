"""The exception tree (pipeline_common.errors): hierarchy, builtin bases, pickling, messages."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

import pipeline_common
from pipeline_common import (
    PipelineState,
    StateBackupError,
    StateDurabilityError,
    StateError,
    StateLockError,
    StateReadError,
    StateSerializationError,
    StateSidecarError,
    StateValidationError,
    StateWarning,
    StateWriteError,
)

_SUBCLASSES = [
    StateReadError,
    StateValidationError,
    StateLockError,
    StateSerializationError,
    StateWriteError,
    StateDurabilityError,
    StateBackupError,
    StateSidecarError,
]


@pytest.mark.parametrize("cls", _SUBCLASSES)
def test_every_error_is_a_state_error(cls: type[StateError]) -> None:
    """Each public error subclasses StateError, so one except clause catches them all."""
    assert issubclass(cls, StateError)
    assert issubclass(StateError, Exception)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (StateValidationError, ValueError),
        (StateSerializationError, ValueError),
        (StateLockError, TimeoutError),
    ],
)
def test_errors_also_subclass_the_builtin_they_resemble(
    cls: type[StateError], builtin: type[Exception]
) -> None:
    """Validation errors are ValueErrors and lock timeouts are TimeoutErrors."""
    assert issubclass(cls, builtin)


def test_state_warning_is_a_user_warning() -> None:
    """StateWarning subclasses UserWarning and is not an error."""
    assert issubclass(StateWarning, UserWarning)
    assert not issubclass(StateWarning, StateError)


def test_every_error_is_exported() -> None:
    """The package re-exports the whole tree."""
    for cls in [StateError, *_SUBCLASSES, StateWarning]:
        assert getattr(pipeline_common, cls.__name__) is cls


_INSTANCES: list[StateError] = [
    StateError("base", path="/x/state.json"),
    StateReadError("read", path="/x/state.json", backup=Path("/x/.state/backups/b.json.bak")),
    StateValidationError(
        "invalid", path="/x/state.json", errors=[{"loc": ["phase1"], "msg": "bad", "type": "t"}]
    ),
    StateSerializationError("not json", path="/x/state.json"),
    StateLockError(
        "locked",
        path="/x/state.json",
        lock_file="/x/state.json.lock",
        timeout=0.2,
        holder={"pid": 7, "host": "h", "since": "now", "operation": "op"},
    ),
    StateWriteError("write", path="/x/state.json", step="fsync temp file", errno=5),
    StateDurabilityError("durable", path="/x/state.json", step="fsync state folder", errno=5),
    StateBackupError("backup", path="/x/b.json.bak"),
    StateSidecarError("sidecar", path="/x/.state"),
]


@pytest.mark.parametrize("err", _INSTANCES, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_attributes(err: StateError) -> None:
    """An error survives pickling with its type, message and every attribute."""
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.args == err.args
    assert vars(back) == vars(err)


def test_lock_error_attributes_are_kept() -> None:
    """StateLockError stores lock_file as a Path, the timeout and the holder."""
    err = _INSTANCES[4]
    assert isinstance(err, StateLockError)
    assert err.lock_file == Path("/x/state.json.lock")
    assert err.timeout == 0.2
    assert err.holder == {"pid": 7, "host": "h", "since": "now", "operation": "op"}
    assert err.path == Path("/x/state.json")


def test_path_is_optional_and_stored_as_a_path() -> None:
    """path defaults to None and a str path becomes a Path."""
    assert StateError("x").path is None
    assert StateError("x", path="a/b.json").path == Path("a/b.json")


def _raise_read(state: PipelineState) -> None:
    state.path.write_bytes(b"{")
    state.read()


def _raise_validation(state: PipelineState) -> None:
    state.write({"phase1": 1})


def _raise_serialization(state: PipelineState) -> None:
    state.write({"x": {1, 2}}, validate=False)


def _raise_backup(state: PipelineState) -> None:
    state.write({"a": 1})
    state.restore_backup(state.path.parent / "elsewhere.json.bak")


def _raise_no_backup(state: PipelineState) -> None:
    state.backup_manager.create_backup()


def _raise_sidecar(state: PipelineState) -> None:
    state.sidecar_dir.write_text("a file, not a folder")
    state.write({"a": 1})


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        (_raise_read, StateReadError),
        (_raise_validation, StateValidationError),
        (_raise_serialization, StateSerializationError),
        (_raise_backup, StateBackupError),
        (_raise_no_backup, StateBackupError),
        (_raise_sidecar, StateSidecarError),
    ],
    ids=["read", "validation", "serialization", "backup", "no-backup", "sidecar"],
)
def test_raised_errors_name_the_file_and_pickle(
    state: PipelineState, trigger: Any, expected: type[StateError]
) -> None:
    """Errors raised by the library name the file in the message and pickle intact."""
    with pytest.raises(expected) as info:
        trigger(state)
    err = info.value
    assert err.path is not None
    assert str(err.path) in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert vars(back) == vars(err)


def test_lock_error_from_the_library_names_the_file_and_pickles(state: PipelineState) -> None:
    """A real lock timeout names the state and lock files and pickles with its holder."""
    other = PipelineState(state.path, timeout=0.05)
    caught: list[BaseException] = []

    def contend() -> None:
        try:
            other.write({"a": 1})
        except StateLockError as exc:
            caught.append(exc)

    with state.transaction(operation="holding"):
        thread = threading.Thread(target=contend)
        thread.start()
        thread.join(timeout=10)
    (err,) = caught
    assert isinstance(err, StateLockError)
    assert str(state.path) in str(err)
    assert str(state.lock_path) in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, TimeoutError)
    assert back.lock_file == err.lock_file
    assert back.holder == err.holder
    assert back.timeout == 0.05


def test_module_docstring_draws_the_whole_tree() -> None:
    """The errors module's docstring names every class in the tree."""
    doc = pipeline_common.errors.__doc__ or ""
    for cls in [StateError, *_SUBCLASSES, StateWarning]:
        assert cls.__name__ in doc


_EVERY_ERROR = [
    cls
    for name in pipeline_common.errors.__all__
    if isinstance(cls := getattr(pipeline_common.errors, name), type)
    and issubclass(cls, StateError)
]


@pytest.mark.parametrize("cls", _EVERY_ERROR, ids=lambda c: c.__name__)
def test_every_error_class_pickles_and_is_exported(cls: type[StateError]) -> None:
    """Every StateError subclass in errors.__all__ is re-exported and pickles with its path."""
    assert getattr(pipeline_common, cls.__name__) is cls
    err = cls("/x/state.json is in trouble", path="/x/state.json")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.path == Path("/x/state.json")
    assert vars(back) == vars(err)
    assert str(back) == str(err)
