"""Work removed from the commit path, and the proofs it rests on.

One log-tail read per commit: the tail read on entry serves the commit's append, and
only while nothing else was written to a log since (a recover record, a cut). The
backups listing taken for the link also shows a copy temp left by a crash.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline_common import PipelineState
from pipeline_common._log import TransactionLog


def _count_tail_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = TransactionLog.tail

    def counting(self: TransactionLog) -> object:
        calls[0] += 1
        return real(self)

    monkeypatch.setattr(TransactionLog, "tail", counting)
    return calls


def _chain_ok(state: PipelineState) -> bool:
    return next(c for c in state.verify().checks if c.name == "log chain intact").ok


def test_a_commit_reads_the_log_tail_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A steady-state commit reads the tail on entry only; the append chains to it."""
    state = PipelineState(tmp_path / "s.json")
    state.write({"n": 0})
    calls = _count_tail_reads(monkeypatch)
    for _ in range(3):
        with state.transaction() as txn:
            txn.data["n"] += 1
    assert calls[0] == 3
    assert [r["seq"] for r in state.get_transaction_history(3)] == [4, 3, 2]
    assert _chain_ok(state)


def test_a_recover_record_on_entry_makes_the_commit_read_the_tail_again(
    tmp_path: Path,
) -> None:
    """An outside write is recorded on entry; the commit's record chains to that one."""
    state = PipelineState(tmp_path / "s.json")
    state.write({"n": 0})
    state.path.write_text(json.dumps({"n": 5}))
    with state.transaction() as txn:
        txn.data["n"] += 1
    ops = [r["operation"] for r in state.get_transaction_history(3)]
    assert ops == ["transaction", "recover", "write"]
    assert state.read() == {"n": 6}
    assert _chain_ok(state)


def test_repair_cutting_the_log_inside_its_hold_makes_its_record_chain(
    tmp_path: Path,
) -> None:
    """repair() cuts a torn tail under the lock, then logs: its record must chain to
    the log as cut, not to the tail read on entry."""
    state = PipelineState(tmp_path / "s.json")
    state.write({"n": 0})
    with state.log_path.open("ab") as fh:
        fh.write(b'{"seq": 9, "torn')
    state.repair()
    assert state.log_path.read_bytes().endswith(b"\n")
    assert _chain_ok(state)
    with state.transaction() as txn:
        txn.data["n"] += 1
    assert _chain_ok(state)


def test_a_copy_temp_left_by_a_crash_is_seen_in_the_listing_and_removed(
    tmp_path: Path,
) -> None:
    """The temp a crash left mid-copy is removed by the next backup (no lstat for it)."""
    state = PipelineState(tmp_path / "s.json")
    state.write({"n": 0})
    with state.transaction() as txn:
        txn.data["n"] += 1
    tmp = state.backups_dir / ".s.json.backup.tmp"
    tmp.write_bytes(b'{"n": ')
    with state.transaction() as txn:
        txn.data["n"] += 1
    assert not tmp.exists()
    assert state.read() == {"n": 2}
