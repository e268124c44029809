"""The audit log (pipeline_common._log): JSON Lines, append-only, chained, torn-tail tolerant."""

from __future__ import annotations

import hashlib
import itertools
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from pipeline_common import PipelineState
from pipeline_common._log import TransactionLog


def _lines(state: PipelineState) -> list[bytes]:
    raw = state.log_path.read_bytes()
    assert raw.endswith(b"\n")
    return raw[:-1].split(b"\n")


def _run_mixed_history(state: PipelineState) -> None:
    """Commits, a failed block, a write, a validation failure and a restore."""
    with state.transaction(operation="first") as txn:
        txn.data["n"] = 1
    with pytest.raises(RuntimeError), state.transaction(operation="fails"):
        raise RuntimeError("boom")
    state.write({"n": 2})
    with pytest.raises(ValueError), state.transaction(operation="invalid") as txn:
        txn.data["phase1"] = "bad"
    state.restore_backup(state.list_backups()[0])


def test_history_is_empty_before_any_transaction(state: PipelineState) -> None:
    """With no log yet, get_transaction_history() returns []."""
    assert state.get_transaction_history() == []


def test_log_is_json_lines_with_one_object_per_line(state: PipelineState) -> None:
    """Every line of transactions.log is one JSON object."""
    _run_mixed_history(state)
    lines = _lines(state)
    assert len(lines) == 5
    for line in lines:
        assert isinstance(json.loads(line), dict)


def test_log_is_append_only(state: PipelineState) -> None:
    """Each transaction only adds bytes at the end; earlier bytes never change."""
    sizes: list[bytes] = []
    for n in range(4):
        state.write({"n": n})
        sizes.append(state.log_path.read_bytes())
    for earlier, later in itertools.pairwise(sizes):
        assert later.startswith(earlier)
        assert len(later) > len(earlier)


def test_records_carry_the_documented_fields(state: PipelineState) -> None:
    """Each record has timestamp (ISO 8601 UTC), operation, success, details, seq, generation."""
    _run_mixed_history(state)
    now = datetime.now().astimezone()
    for record in state.get_transaction_history():
        for key in ("timestamp", "operation", "success", "details", "seq", "generation", "prev"):
            assert key in record, key
        stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == timedelta(0)
        assert abs(now - stamp) < timedelta(minutes=5)
        assert isinstance(record["success"], bool)
        assert isinstance(record["details"], dict)


def test_history_is_newest_first_with_outcomes(state: PipelineState) -> None:
    """History lists records newest first, with each operation's success flag."""
    _run_mixed_history(state)
    history = state.get_transaction_history()
    assert [(r["operation"], r["success"]) for r in history] == [
        ("restore", True),
        ("invalid", False),
        ("write", True),
        ("fails", False),
        ("first", True),
    ]


def test_history_limit(state: PipelineState) -> None:
    """limit caps the records returned, newest kept; the default is 50."""
    for n in range(60):
        state.write({"n": n})
    assert len(state.get_transaction_history()) == 50
    assert [r["seq"] for r in state.get_transaction_history(limit=3)] == [60, 59, 58]
    assert state.get_transaction_history(limit=0) == []


def test_seq_increases_by_one_and_generation_counts_commits(state: PipelineState) -> None:
    """seq numbers every record; generation grows only on records that committed bytes."""
    _run_mixed_history(state)
    oldest_first = state.get_transaction_history()[::-1]
    assert [r["seq"] for r in oldest_first] == [1, 2, 3, 4, 5]
    assert [r["generation"] for r in oldest_first] == [1, 1, 2, 2, 3]


def test_sha256_of_the_last_commit_equals_the_file(state: PipelineState) -> None:
    """The newest commit record's sha256 is the sha256 of the state file's bytes."""
    for n in range(3):
        state.write({"n": n, "text": "é" * n})
        record = state.get_transaction_history(1)[0]
        assert record["sha256"] == hashlib.sha256(state.path.read_bytes()).hexdigest()


def test_failed_records_claim_no_commit(state: PipelineState) -> None:
    """A success: false record carries no sha256 and says what went wrong."""
    _run_mixed_history(state)
    failures = [r for r in state.get_transaction_history() if not r["success"]]
    assert len(failures) == 2
    for record in failures:
        assert "sha256" not in record
        assert record["details"]["error"]


def test_prev_chains_each_record_to_the_previous_line(state: PipelineState) -> None:
    """Each record's prev is the sha256 of the line before it; the first has none."""
    _run_mixed_history(state)
    lines = _lines(state)
    records = [json.loads(line) for line in lines]
    assert records[0]["prev"] is None
    for line, record in zip(lines, records[1:], strict=False):
        assert record["prev"] == hashlib.sha256(line).hexdigest()


@pytest.mark.parametrize(
    "tail",
    [b'{"seq": 99, "operation": "tor', b"\x00" * 300, b'garbage\n{"seq": 1'],
    ids=["torn-record", "nul-bytes", "garbage"],
)
def test_torn_tail_is_skipped_then_cut_by_the_next_append(
    state: PipelineState, tail: bytes
) -> None:
    """A torn or garbage last line is ignored by readers and removed before the next record."""
    state.write({"n": 1})
    state.write({"n": 2})
    clean = state.log_path.read_bytes()
    with state.log_path.open("ab") as fh:
        fh.write(tail)
    assert [r["seq"] for r in state.get_transaction_history()] == [2, 1]
    state.write({"n": 3})
    raw = state.log_path.read_bytes()
    assert raw.startswith(clean)
    records = [json.loads(line) for line in raw[len(clean) :].splitlines()]
    assert [r["seq"] for r in records] == [3]
    assert records[0]["prev"] == hashlib.sha256(clean.splitlines()[-1]).hexdigest()


def test_outside_change_is_recorded_as_a_recover_record(state: PipelineState) -> None:
    """A state changed without a log record gets a 'recover' record at the next transaction."""
    state.write({"n": 1})
    state.path.write_text('{"n": 100}')
    with state.transaction() as txn:
        txn.data["n"] += 1
    newest, recover = state.get_transaction_history(2)
    assert recover["operation"] == "recover"
    assert recover["sha256"] == hashlib.sha256(b'{"n": 100}').hexdigest()
    assert newest["sha256"] == hashlib.sha256(state.path.read_bytes()).hexdigest()
    assert state.read() == {"n": 101}


def test_history_survives_reopening(state_path: Path) -> None:
    """A new PipelineState on the same path reads and continues the same log."""
    first = PipelineState(state_path)
    first.write({"n": 1})
    second = PipelineState(state_path)
    second.write({"n": 2})
    assert [r["seq"] for r in second.get_transaction_history()] == [2, 1]


def test_transaction_log_reads_records_across_large_blocks(tmp_path: Path) -> None:
    """Records bigger than the read block, and many small ones, come back intact, newest first."""
    log = TransactionLog(tmp_path / "t.log", 0o644)
    big = "x" * 150_000
    log.append({"operation": "big", "success": True, "details": {"blob": big}})
    for i in range(300):
        log.append({"operation": f"op{i}", "success": True, "details": {}})
    log.append({"operation": "big2", "success": True, "details": {"blob": big}})
    history = TransactionLog(tmp_path / "t.log", 0o644).read(limit=None)
    assert len(history) == 302
    assert history[0]["operation"] == "big2"
    assert history[0]["details"]["blob"] == big
    assert history[-1]["details"]["blob"] == big
    assert [r["seq"] for r in history] == list(range(302, 0, -1))


def test_transaction_log_append_returns_the_chained_record(tmp_path: Path) -> None:
    """append() numbers the record, links it to the previous line and strips 'commits'."""
    log = TransactionLog(tmp_path / "t.log", 0o644)
    first = log.append({"operation": "a", "success": True, "commits": True, "sha256": "0" * 64})
    second = log.append({"operation": "b", "success": False})
    assert first["seq"] == 1
    assert first["generation"] == 1
    assert "commits" not in first
    assert second["seq"] == 2
    assert second["generation"] == 1
    (line1, _) = (tmp_path / "t.log").read_bytes().splitlines()
    assert second["prev"] == hashlib.sha256(line1).hexdigest()
