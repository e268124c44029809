"""diff(): JSON-pointer changes between generations, backups, dicts and the current state,
with a readable repr; and the log's top-level ``changes`` summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_common import MISSING, Change, Diff, PipelineState, StateBackupError, _diff, _json


def commit(state: PipelineState, operation: str, **changes: Any) -> None:
    """Commit ``changes`` as one transaction named ``operation``."""
    with state.transaction(operation=operation) as txn:
        txn.data.update(changes)


def test_diff_of_two_dicts_lists_pointers_in_document_order() -> None:
    """Changed, removed and added values, nested in objects and lists, as JSON pointers."""
    old = {"a": 1, "nested": {"x": [1, 2, 3], "gone": None}, "same": "s"}
    new = {"a": 2, "nested": {"x": [1, 5]}, "same": "s", "added": {"k": True}}
    changes = _diff.diff(old, new)
    assert changes == [
        Change("/a", 1, 2),
        Change("/nested/x/1", 2, 5),
        Change("/nested/x/2", 3, MISSING),
        Change("/nested/gone", None, MISSING),
        Change("/added", MISSING, {"k": True}),
    ]
    assert [c.kind for c in changes] == ["changed", "changed", "removed", "removed", "added"]


def test_diff_repr_is_readable() -> None:
    """The repr has a header line, then one ``~``/``-``/``+`` line per change."""
    changes = _diff.diff({"a": 1, "b": [1]}, {"a": "one", "c": {"d": None}})
    assert repr(changes) == (
        "<Diff: 3 changes>\n  ~ /a: 1 -> 'one'\n  - /b: [1]\n  + /c: {'d': None}"
    )
    assert str(changes) == repr(changes)
    assert repr(_diff.diff({"a": 1}, {"a": 2})) == "<Diff: 1 change>\n  ~ /a: 1 -> 2"
    assert repr(_diff.diff({"a": 1}, {"a": 1})) == "<Diff: identical>"
    assert repr(MISSING) == "<missing>"


def test_long_values_are_shortened_in_the_repr() -> None:
    """A big value is cut to 60 characters with an ellipsis, so each change stays one line."""
    changes = _diff.diff({}, {"log": "x" * 500})
    line = repr(changes).splitlines()[1]
    assert line.startswith("  + /log: 'xxx")
    assert line.endswith("...")
    assert len(line) < 80


def test_pointers_escape_slash_and_tilde() -> None:
    """RFC 6901: ``~`` becomes ``~0`` and ``/`` becomes ``~1``."""
    changes = _diff.diff({"a/b": 1, "m~n": 1, "": 1}, {"a/b": 2, "m~n": 2, "": 2})
    assert [c.pointer for c in changes] == ["/a~1b", "/m~0n", "/"]
    assert _diff.pointer(["x", 0, "~/"]) == "/x/0/~0~1"


def test_type_changes_are_changes_even_when_equal_in_python() -> None:
    """1 -> 1.0 and 1 -> True are different JSON, so they are reported."""
    assert [c.pointer for c in _diff.diff({"a": 1, "b": 1}, {"a": 1.0, "b": True})] == [
        "/a",
        "/b",
    ]


@pytest.fixture
def history(state: PipelineState) -> PipelineState:
    """Three generations: n=1; n=2 plus a key; n=3 with that key removed."""
    commit(state, "one", n=1, phase1={"status": "success"})
    commit(state, "two", n=2, extra=[1, 2])
    with state.transaction(operation="three") as txn:
        txn.data["n"] = 3
        del txn.data["extra"]
    return state


def test_state_diff_between_generations_backups_dicts_and_current(
    history: PipelineState,
) -> None:
    """Every kind of operand works, and equal operands give the same Diff."""
    assert history.diff(1, 2) == [Change("/n", 1, 2), Change("/extra", MISSING, [1, 2])]
    assert history.diff(2) == [Change("/n", 2, 3), Change("/extra", [1, 2], MISSING)]
    assert history.diff(2, "current") == history.diff(2)
    newest = history.backups()[0]
    assert newest.generation == 2
    assert history.diff(newest) == history.diff(2)
    assert history.diff(newest.path) == history.diff(2)
    assert history.diff(newest.path.name) == history.diff(2)
    assert history.diff(str(newest.path)) == history.diff(2)
    assert history.diff("current", {"n": 3, "phase1": {"status": "success"}}) == Diff()
    assert history.diff({}, 1) == [
        Change("/n", MISSING, 1),
        Change("/phase1", MISSING, {"status": "success"}),
    ]
    assert history.diff(3, "current") == []
    assert isinstance(history.diff(1), Diff)


def test_state_diff_refuses_operands_it_cannot_resolve(history: PipelineState) -> None:
    """A float, or a path outside the backups folder, is refused with a clear error."""
    with pytest.raises(TypeError, match="cannot compare"):
        history.diff(1.5)
    with pytest.raises(StateBackupError, match=r"is not in this state's backups folder"):
        history.diff(str(history.path))


# -- the log's ``changes`` summary ------------------------------------------------------


def test_changes_field_matches_the_top_level_keys_of_the_full_diff(
    state: PipelineState,
) -> None:
    """Each commit's ``changes`` is the set of top-level pointers its full diff touches."""
    commit(state, "a", x=1, y={"deep": [1]})
    before = state.read()
    with state.transaction(operation="b") as txn:
        txn.data["y"]["deep"].append(2)
        txn.data["z~/"] = "new"
        del txn.data["x"]
    after = state.read()
    expected = {"/" + c.pointer.split("/")[1] for c in _diff.diff(before, after)}
    assert set(state.history(1)[0].changes or []) == expected == {"/x", "/y", "/z~0~1"}


def test_changes_field_for_keys_with_quotes_and_colons(state: PipelineState) -> None:
    """A key holding the bytes ``": `` (quote, colon, space) is still named correctly."""
    commit(state, "quote", **{'say "hi": now': 1, "plain": 2})
    assert sorted(state.history(1)[0].changes or []) == ["/plain", '/say "hi": now']


def test_changes_field_is_none_for_a_hand_written_previous_version(state_path: Path) -> None:
    """When the replaced file was not written by the library, the summary says unknown."""
    state_path.write_text('{"a": 1}')  # one line, not the library's indented form
    state = PipelineState(state_path)
    commit(state, "after hand edit", a=2)
    assert state.history(1)[0].changes is None


_keys = st.text(max_size=6)
_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=6,
)
_docs = st.dictionaries(_keys, _values, max_size=5)


@settings(max_examples=200, deadline=None)
@given(old=_docs, new=_docs)
def test_changed_top_level_agrees_with_the_full_diff(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    """On the library's own bytes, the fast summary equals the top-level keys diff() finds."""
    summary = _diff.changed_top_level(_json.encode(old), _json.encode(new))
    assert summary is not None
    # diff(), not !=: 1 vs True and 1 vs 1.0 are equal in Python but different JSON.
    expected = {
        _diff.pointer([k])
        for k in old.keys() | new.keys()
        if k not in old or k not in new or _diff.diff(old[k], new[k])
    }
    assert set(summary) == expected
    assert len(summary) == len(set(summary))
