"""A Hypothesis state machine drives PipelineState against an in-memory model of it."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pipeline_common import (
    PHASE_STATUSES,
    PipelineState,
    StateSerializationError,
    StateValidationError,
)

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.integers(min_value=2**64 + 1, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
_FREE_KEYS = st.sampled_from(["a", "b", "count", "clé", "notes"])
_PHASES = st.sampled_from(["phase1", "phase2"])
_FREE_STATES = st.dictionaries(_FREE_KEYS, _VALUES, max_size=4)
_NOT_JSON = st.sampled_from([float("nan"), float("inf"), {1, 2}, b"bytes", object()])


def _exact(value: Any) -> str:
    """A spelling that tells 1 from 1.0 and a big int from its float, unlike ==."""
    return json.dumps(value, sort_keys=True)


class _Boom(Exception):
    """The caller's own failure inside a block."""


class PipelineStateMachine(RuleBasedStateMachine):
    """Commits, failures, writes, restores and reopens, checked against a model after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="pc-stateful-"))
        self.path = self.folder / "pipeline.json"
        self.max_backups = 0
        self.state = PipelineState(self.path)
        self.model: dict[str, Any] | None = None  # None: never committed, read() is {}
        self.backups: list[dict[str, Any]] = []  # oldest first, as the rotation keeps them
        self.last: tuple[str, bool] | None = None  # the newest log record's operation, success

    @initialize(max_backups=st.integers(min_value=0, max_value=4))
    def open_state(self, max_backups: int) -> None:
        self.max_backups = max_backups
        self.state = PipelineState(self.path, max_backups=max_backups, timeout=5)

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- model helpers ---------------------------------------------------------------------

    def _committed(self, new: dict[str, Any], operation: str) -> None:
        if self.model is not None:
            self.backups.append(self.model)
            self._trim()
        self.model = copy.deepcopy(new)
        self.last = (operation, True)

    def _trim(self) -> None:
        del self.backups[: max(len(self.backups) - self.max_backups, 0)]

    def _current(self) -> dict[str, Any]:
        return copy.deepcopy(self.model) if self.model is not None else {}

    # -- rules -------------------------------------------------------------------------------

    @rule(key=_FREE_KEYS, value=_VALUES)
    def commit_free_key(self, key: str, value: Any) -> None:
        with self.state.transaction() as txn:
            txn.data[key] = copy.deepcopy(value)
        self._committed({**self._current(), key: value}, "transaction")

    @rule(phase=_PHASES, status=st.sampled_from(PHASE_STATUSES), extra=_VALUES)
    def commit_phase(self, phase: str, status: str, extra: Any) -> None:
        record = {"status": status, "extra": extra}
        with self.state.transaction(operation="phase") as txn:
            txn.data[phase] = copy.deepcopy(record)
        self._committed({**self._current(), phase: record}, "phase")

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete_a_key(self, data: st.DataObject) -> None:
        assert self.model is not None
        key = data.draw(st.sampled_from(sorted(self.model)))
        with self.state.transaction() as txn:
            del txn.data[key]
        new = self._current()
        del new[key]
        self._committed(new, "transaction")

    @rule(key=_FREE_KEYS, value=_VALUES)
    def failing_block_changes_nothing(self, key: str, value: Any) -> None:
        try:
            with self.state.transaction(operation="fails") as txn:
                txn.data[key] = copy.deepcopy(value)
                raise _Boom
        except _Boom:
            pass
        self.last = ("fails", False)

    @rule(phase=_PHASES, status=st.text(max_size=5).filter(lambda s: s not in PHASE_STATUSES))
    def invalid_status_is_refused(self, phase: str, status: str) -> None:
        try:
            with self.state.transaction(operation="invalid") as txn:
                txn.data[phase] = {"status": status}
        except StateValidationError:
            pass
        else:
            raise AssertionError("an unknown phase status was committed")
        self.last = ("invalid", False)

    @rule(key=_FREE_KEYS, bad=_NOT_JSON)
    def non_json_is_refused(self, key: str, bad: Any) -> None:
        try:
            with self.state.transaction(validate=False, operation="not-json") as txn:
                txn.data[key] = {"inner": [bad]}
        except StateSerializationError:
            pass
        else:
            raise AssertionError("data that is not strict JSON was committed")
        self.last = ("not-json", False)

    @rule(new=_FREE_STATES)
    def write_replaces_everything(self, new: dict[str, Any]) -> None:
        self.state.write(copy.deepcopy(new))
        self._committed(new, "write")

    @precondition(lambda self: bool(self.backups))
    @rule(data=st.data())
    def restore_a_backup(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(min_value=0, max_value=len(self.backups) - 1))
        chosen = self.state.list_backups(limit=1000)[index]
        assert self.state.restore_backup(chosen) is True
        self._committed(self.backups[-1 - index], "restore")

    @precondition(lambda self: self.model is not None)
    @rule()
    def manual_backup(self) -> None:
        self.state.backup_manager.create_backup()
        assert self.model is not None
        self.backups.append(copy.deepcopy(self.model))
        self._trim()
        self.last = ("create_backup", True)

    @rule()
    def reopen(self) -> None:
        self.state = PipelineState(self.path, max_backups=self.max_backups, timeout=5)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def read_equals_the_model(self) -> None:
        expected = self.model if self.model is not None else {}
        assert _exact(self.state.read()) == _exact(expected)

    @invariant()
    def backups_match_the_model_and_respect_the_cap(self) -> None:
        paths = self.state.list_backups(limit=1000)
        assert len(paths) <= self.max_backups
        assert [_exact(json.loads(p.read_bytes())) for p in paths] == [
            _exact(b) for b in self.backups[::-1]
        ]

    @invariant()
    def history_is_ordered_and_ends_with_the_last_operation(self) -> None:
        history = self.state.get_transaction_history(limit=10_000)
        seqs = [r["seq"] for r in history]
        assert seqs == sorted(seqs, reverse=True)
        assert len(set(seqs)) == len(seqs)
        if self.last is None:
            assert history == []
        else:
            assert (history[0]["operation"], history[0]["success"]) == self.last


TestPipelineStateMatchesItsModel = PipelineStateMachine.TestCase
TestPipelineStateMatchesItsModel.settings = settings(
    max_examples=30, stateful_step_count=20, deadline=None
)
TestPipelineStateMatchesItsModel.__doc__ = (
    "Random sequences of operations keep read(), backups and history equal to the model."
)
