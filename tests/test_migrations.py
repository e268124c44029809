"""Schema versions: migrations run once, as a logged commit; newer files and broken steps
are refused with StateSchemaError and nothing changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateSchemaError


def snapshot(state: PipelineState) -> tuple[bytes, list[bytes], list[str]]:
    """The state's bytes, the log's successful records and the backup names.

    A refused transaction may append a ``success: false`` record (the audit trail of
    the refusal); it never adds or changes a successful one.
    """
    return (
        state.path.read_bytes(),
        [line for line in state.log_path.read_bytes().splitlines() if b'"success":true' in line],
        [p.name for p in state.list_backups(None)],
    )


@pytest.fixture
def v1_file(state_path: Path) -> Path:
    """A state committed by code that knew no schema versions (so it counts as version 1)."""
    old = PipelineState(state_path)
    with old.transaction(operation="v1 write") as txn:
        txn.data["chapters"] = ["a", "b"]
    return state_path


class Counting:
    """A migration step that counts its calls."""

    def __init__(self, step: Any) -> None:
        self.step = step
        self.calls = 0

    def __call__(self, data: dict[str, Any]) -> dict[str, Any] | None:
        self.calls += 1
        result: dict[str, Any] | None = self.step(data)
        return result


def to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 stores chapters as objects."""
    return {**data, "chapters": [{"name": c} for c in data["chapters"]]}


def to_v3(data: dict[str, Any]) -> None:
    """Version 3 adds a format field, changing the data in place."""
    data["format"] = 3


def test_migrations_run_once_in_order_as_one_logged_commit(v1_file: Path) -> None:
    """The first transaction migrates 1 -> 3 once, logs a 'migrate' record, then runs."""
    step2, step3 = Counting(to_v2), Counting(to_v3)
    state = PipelineState(v1_file, schema_version=3, migrations={1: step2, 2: step3})
    assert state.read() == {"chapters": ["a", "b"]}  # reading never migrates
    assert state.version == 1
    with state.transaction(operation="user") as txn:
        assert txn.data == {"chapters": [{"name": "a"}, {"name": "b"}], "format": 3}
        txn.data["done"] = True
    assert (step2.calls, step3.calls) == (1, 1)
    user, migrate = state.history(2)
    assert (migrate.operation, migrate.generation) == ("migrate", 2)
    assert migrate.details["from_schema_version"] == 1
    assert migrate.details["to_schema_version"] == 3
    assert migrate.raw["schema_version"] == 3
    assert sorted(migrate.changes or []) == ["/chapters", "/format"]
    assert (user.operation, user.generation, user.raw["schema_version"]) == ("user", 3, 3)
    assert user.details["migrated"]["to_schema_version"] == 3
    # The pre-migration version is kept as a backup, and the file holds only the data.
    assert state.at(1) == {"chapters": ["a", "b"]}
    assert state.backups()[-1].generation == 1
    assert state.read() == {
        "chapters": [{"name": "a"}, {"name": "b"}],
        "format": 3,
        "done": True,
    }
    # Later transactions, and other objects on the same file, do not migrate again.
    with state.transaction():
        pass
    again = PipelineState(v1_file, schema_version=3, migrations={1: step2, 2: step3})
    with again.transaction() as txn:
        txn.data["more"] = 1
    assert (step2.calls, step3.calls) == (1, 1)
    assert [r.operation for r in again.history(10)].count("migrate") == 1
    assert again.verify(), again.verify()


def test_a_new_file_records_the_code_version_and_needs_no_migration(
    state_path: Path,
) -> None:
    """The first commit of a new file records schema_version; no step is ever called."""
    step = Counting(to_v2)
    state = PipelineState(state_path, schema_version=2, migrations={1: step})
    with state.transaction() as txn:
        txn.data["chapters"] = []
    assert state.history(1)[0].raw["schema_version"] == 2
    with state.transaction():
        pass
    assert step.calls == 0


def test_a_file_newer_than_the_code_is_refused(v1_file: Path) -> None:
    """Code at schema 2 refuses a file last written at schema 3, and changes nothing."""
    PipelineState(v1_file, schema_version=3, migrations={1: to_v2, 2: to_v3}).write(
        {"chapters": [], "format": 3}
    )
    old_code = PipelineState(v1_file, schema_version=2, migrations={1: to_v2})
    before = snapshot(old_code)
    ran = False
    with pytest.raises(StateSchemaError) as info:
        with old_code.transaction():
            ran = True
    assert not ran
    assert (info.value.file_version, info.value.code_version) == (3, 2)
    assert "newer than this code's 2" in str(info.value)
    assert snapshot(old_code) == before
    assert not old_code.lock_info().held


def test_a_missing_migration_step_changes_nothing(v1_file: Path) -> None:
    """Steps 1 -> 2 given but 2 -> 3 missing: StateSchemaError naming the gap, no change."""
    step = Counting(to_v2)
    state = PipelineState(v1_file, schema_version=3, migrations={1: step})
    before = snapshot(state)
    with pytest.raises(StateSchemaError, match=r"no migration 2 -> 3") as info:
        with state.transaction():
            pytest.fail("the block must not run")
    assert (info.value.file_version, info.value.code_version) == (1, 3)
    assert snapshot(state) == before
    assert state.version == 1
    refusal = state.history(1)[0]
    assert not refusal.success
    assert "StateSchemaError" in refusal.details["error"]


def test_a_raising_migration_changes_nothing_and_keeps_the_cause(v1_file: Path) -> None:
    """A step that raises (after mutating its input) gives StateSchemaError; no byte changes."""

    def broken(data: dict[str, Any]) -> None:
        data["chapters"].clear()
        raise KeyError("title")

    state = PipelineState(v1_file, schema_version=3, migrations={1: to_v2, 2: broken})
    before = snapshot(state)
    with pytest.raises(StateSchemaError, match=r"migration 2 -> 3 .* failed") as info:
        with state.transaction():
            pytest.fail("the block must not run")
    assert isinstance(info.value.__cause__, KeyError)
    assert snapshot(state) == before
    assert state.read() == {"chapters": ["a", "b"]}
    # Fixed code migrates fine afterwards.
    fixed = PipelineState(v1_file, schema_version=3, migrations={1: to_v2, 2: to_v3})
    with fixed.transaction():
        pass
    assert fixed.read()["format"] == 3


def test_migrations_without_a_schema_version_are_refused(state_path: Path) -> None:
    """migrations= needs schema_version= (the version the code writes)."""
    with pytest.raises(ValueError, match="schema_version"):
        PipelineState(state_path, migrations={1: to_v2})


def test_the_migration_commit_fires_on_commit_hooks(v1_file: Path) -> None:
    """on_commit is called for each durable commit: the migration's as well as the caller's."""
    state = PipelineState(v1_file, schema_version=2, migrations={1: to_v2})
    seen: list[tuple[int, str]] = []
    state.on_commit(lambda generation, operation, _changes: seen.append((generation, operation)))
    with state.transaction(operation="user") as txn:
        txn.data["x"] = 1
    assert seen == [(2, "migrate"), (3, "user")]
