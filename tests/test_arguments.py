"""Arguments: every public parameter, given a wrong type or value, is refused at once.

One table: (call, argument, bad value). Each case must raise TypeError or ValueError
(or a library error that subclasses one) whose message names the argument, and must
leave the state file, its log and its backups exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, ProgressTracker, RetryHandler, StateTransaction

BAD_BOOLS: list[Any] = [None, 0, 1, "yes", 1.0]
BAD_COUNTS: list[Any] = [-1, 2.5, True, "3", None, float("nan")]
BAD_LIMITS: list[Any] = [-1, 2.5, True, "3"]  # None means "all" where a limit is optional
BAD_SECONDS: list[Any] = [-1, float("nan"), -math.inf, "1", True, [1]]
BAD_NAMES: list[Any] = [123, "", "   ", None, b"op", "\ud800"]
BAD_CALLABLES: list[Any] = [None, 1, "print"]


def _state(tmp_path: Path, **kwargs: Any) -> PipelineState:
    return PipelineState(tmp_path / "a.json", durability="atomic", **kwargs)


def _txn(s: PipelineState, **kwargs: Any) -> None:
    with s.transaction(**kwargs) as t:
        t.data["touched"] = True


def _tracker(s: PipelineState, **kwargs: Any) -> ProgressTracker:
    # declare=False: declaring a plan writes it, and these cases check that nothing is written
    return ProgressTracker(s, ["a", "b"], min_interval=0, declare=False, **kwargs)


Case = tuple[str, str, Any, Callable[[PipelineState, Path, Any], object]]

CASES: list[Case] = []


def _add(call: str, argument: str, values: list[Any], run: Callable[..., object]) -> None:
    CASES.extend((call, argument, value, run) for value in values)


# PipelineState(...)
_add("PipelineState", "path", [None, 3, b"a.json"], lambda s, d, v: PipelineState(v))
_add("PipelineState", "path", [""], lambda s, d, v: PipelineState(v))
_add("PipelineState", "max_backups", BAD_COUNTS, lambda s, d, v: _state(d, max_backups=v))
_add(
    "PipelineState",
    "timeout",
    [*BAD_SECONDS, math.nan],
    lambda s, d, v: _state(d, timeout=v),
)
_add("PipelineState", "validate_on_read", BAD_BOOLS, lambda s, d, v: _state(d, validate_on_read=v))
_add(
    "PipelineState",
    "backup_before_write",
    BAD_BOOLS,
    lambda s, d, v: _state(d, backup_before_write=v),
)
_add("PipelineState", "compress_backups", BAD_BOOLS, lambda s, d, v: _state(d, compress_backups=v))
_add("PipelineState", "schema", [dict, 1, "Model"], lambda s, d, v: _state(d, schema=v))
_add(
    "PipelineState",
    "schema_version",
    [0, -1, 1.5, True, "2"],
    lambda s, d, v: _state(d, schema_version=v),
)
_add(
    "PipelineState",
    "migrations",
    [[1], {"1": print}, {1: "not callable"}, {0: print}],
    lambda s, d, v: _state(d, schema_version=2, migrations=v),
)
_add("PipelineState", "durability", ["fast", None, 1], lambda s, d, v: _state(d, durability=v))

# transaction(...) and StateTransaction(...)
_add("transaction", "operation", BAD_NAMES, lambda s, d, v: _txn(s, operation=v))
_add("transaction", "validate", BAD_BOOLS, lambda s, d, v: _txn(s, validate=v))
_add("transaction", "seed_data", [[1], "{}", 3], lambda s, d, v: _txn(s, seed_data=v))
_add(
    "transaction",
    "expect_version",
    [-1, 1.5, True, "1"],
    lambda s, d, v: _txn(s, expect_version=v),
)
_add("transaction", "backup", [0, "no", 1.0], lambda s, d, v: _txn(s, backup=v))
_add(
    "StateTransaction",
    "operation",
    BAD_NAMES,
    lambda s, d, v: StateTransaction(s, operation=v),
)
_add("atransaction", "operation", BAD_NAMES, lambda s, d, v: s.atransaction(operation=v))

# writes, restores, reads
_add("write", "validate", BAD_BOOLS, lambda s, d, v: s.write({"n": 2}, validate=v))
_add("restore_backup", "backup_path", [None, 3, ["x"]], lambda s, d, v: s.restore_backup(v))
_add(
    "restore_backup",
    "validate",
    BAD_BOOLS,
    lambda s, d, v: s.restore_backup(s.list_backups(1)[0], validate=v),
)
_add(
    "restore_backup",
    "dry_run",
    BAD_BOOLS,
    lambda s, d, v: s.restore_backup(s.list_backups(1)[0], dry_run=v),
)
_add("read", "validate", [0, "yes"], lambda s, d, v: s.read(validate=v))
_add("read_versioned", "wait", BAD_SECONDS, lambda s, d, v: s.read_versioned(wait=v))
_add("list_backups", "limit", BAD_LIMITS, lambda s, d, v: s.list_backups(v))
_add("get_transaction_history", "limit", BAD_LIMITS, lambda s, d, v: s.get_transaction_history(v))
_add("history", "limit", BAD_LIMITS, lambda s, d, v: s.history(v))
_add("backups", "limit", BAD_LIMITS, lambda s, d, v: s.backups(v))
_add("at", "generation", [-1, 1.5, True, "1", None], lambda s, d, v: s.at(v))
_add(
    "wait_for_change",
    "since_version",
    [1.5, True, "1", None],
    lambda s, d, v: s.wait_for_change(v, 0),
)
_add("wait_for_change", "timeout", BAD_SECONDS, lambda s, d, v: s.wait_for_change(0, v))
_add(
    "wait_for_change",
    "interval",
    [0, *BAD_SECONDS],
    lambda s, d, v: s.wait_for_change(0, 0, interval=v),
)
_add("on_commit", "callback", BAD_CALLABLES, lambda s, d, v: s.on_commit(v))

# RetryHandler(...) and its calls
_add("RetryHandler", "max_retries", BAD_COUNTS, lambda s, d, v: RetryHandler(max_retries=v))
_add("RetryHandler", "retry_delay", BAD_SECONDS, lambda s, d, v: RetryHandler(retry_delay=v))
_add("RetryHandler", "max_delay", BAD_SECONDS, lambda s, d, v: RetryHandler(max_delay=v))
_add(
    "RetryHandler",
    "backoff_multiplier",
    [0.5, math.nan, math.inf, "2", True],
    lambda s, d, v: RetryHandler(backoff_multiplier=v),
)
_add(
    "RetryHandler",
    "max_elapsed",
    [0, *BAD_SECONDS],
    lambda s, d, v: RetryHandler(max_elapsed=v),
)
_add("RetryHandler", "jitter", BAD_BOOLS, lambda s, d, v: RetryHandler(jitter=v))
_add(
    "RetryHandler", "retry_on", [1, "OSError", [OSError]], lambda s, d, v: RetryHandler(retry_on=v)
)
_add("RetryHandler", "state", [1, "a.json", {}], lambda s, d, v: RetryHandler(state=v))
_add("RetryHandler", "sleep", BAD_CALLABLES, lambda s, d, v: RetryHandler(sleep=v))
_add("RetryHandler", "async_sleep", BAD_CALLABLES, lambda s, d, v: RetryHandler(async_sleep=v))
_add("RetryHandler", "clock", BAD_CALLABLES, lambda s, d, v: RetryHandler(clock=v))
_add(
    "RetryHandler.call",
    "operation",
    BAD_NAMES,
    lambda s, d, v: RetryHandler(state=s).call(v, lambda: 1),
)
_add("RetryHandler.call", "fn", BAD_CALLABLES, lambda s, d, v: RetryHandler(state=s).call("op", v))

# ProgressTracker(...) and its calls
_add("ProgressTracker", "state", [None, "a.json", 1], lambda s, d, v: ProgressTracker(v, ["a"]))
_add("ProgressTracker", "stages", [[], ["a", "a"], [""], 3], lambda s, d, v: ProgressTracker(s, v))
_add(
    "ProgressTracker",
    "min_interval",
    BAD_SECONDS,
    lambda s, d, v: ProgressTracker(s, ["a"], min_interval=v),
)
_add("ProgressTracker", "clock", BAD_CALLABLES, lambda s, d, v: _tracker(s, clock=v))
_add("ProgressTracker", "monotonic", BAD_CALLABLES, lambda s, d, v: _tracker(s, monotonic=v))
_add("ProgressTracker", "sleep", BAD_CALLABLES, lambda s, d, v: _tracker(s, sleep=v))
_add("ProgressTracker.start", "stage", [None, 3, "nope"], lambda s, d, v: _tracker(s).start(v))
_add(
    "ProgressTracker.start",
    "total",
    [-1, math.nan, "10", True],
    lambda s, d, v: _tracker(s).start("a", total=v),
)


def _ids(case: Case) -> str:
    return f"{case[0]}-{case[1]}-{case[2]!r}"


def _snapshot(s: PipelineState) -> tuple[bytes, bytes, list[str]]:
    return (
        s.path.read_bytes(),
        s.log_path.read_bytes(),
        sorted(p.name for p in s.backups_dir.iterdir()),
    )


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_a_wrong_argument_is_refused_naming_it_and_nothing_is_written(
    tmp_path: Path, case: Case
) -> None:
    """TypeError or ValueError that names the argument; the file, log and backups unchanged."""
    _call, argument, value, run = case
    s = _state(tmp_path)
    s.write({"n": 0})
    s.write({"n": 1})
    before = _snapshot(s)
    with pytest.raises((TypeError, ValueError)) as info:
        run(s, tmp_path, value)
    name = argument.split(".")[-1]
    assert name in str(info.value) or argument in str(info.value), str(info.value)
    assert _snapshot(s) == before


def test_the_table_covers_every_case() -> None:
    """The count reported in the closing note."""
    print(f"{len(CASES)} argument cases")
    assert len(CASES) > 200
