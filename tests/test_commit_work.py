"""Work removed from the commit path, and the proofs it rests on.

One log-tail read per commit: the tail read on entry serves the commit's append, and
only while nothing else was written to a log since (a recover record, a cut). The
backups listing taken for the link also shows a copy temp left by a crash. A large
state is parsed while its bytes are hashed, and the parse is used only when the hash
proves the bytes are the newest commit's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline_common import PipelineState, StateReadError
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


def _large(n: int = 40_000) -> dict[str, object]:
    """A state of over 1 MiB (the threshold is 512 KiB), so its hash runs on a helper
    thread beside the parse."""
    return {"items": [{"id": i, "name": f"item-{i:08d}"} for i in range(n)], "n": 0}


def _rewrite_same_size(path: Path, old: bytes, new: bytes) -> None:
    """An outside in-place edit that keeps the file's size (and so its stat, nearly)."""
    data = path.read_bytes()
    assert old in data
    assert len(old) == len(new)
    with open(path, "r+b") as fh:
        fh.write(data.replace(old, new, 1))


def test_a_large_state_edited_outside_is_parsed_afresh_and_recorded(tmp_path: Path) -> None:
    """The parse made beside the hash is dropped when the bytes are not the log's
    newest commit: the transaction sees the outside edit, and a recover record
    precedes its own."""
    state = PipelineState(tmp_path / "big.json")
    state.write(_large())
    assert state.path.stat().st_size > 1 << 20
    _rewrite_same_size(state.path, b'"item-00000007"', b'"ITEM-00000007"')
    with state.transaction() as txn:
        assert txn.data["items"][7]["name"] == "ITEM-00000007"
        txn.data["n"] = 1
    operations = [r["operation"] for r in state.get_transaction_history(3)]
    assert operations[:2] == ["transaction", "recover"]
    assert state.verify(), repr(state.verify())


def test_a_large_state_with_a_duplicate_key_added_outside_is_refused(tmp_path: Path) -> None:
    """The fast parse would keep the last of two duplicate keys; untrusted bytes are
    checked by the strict decoder, which refuses them, and nothing is written."""
    state = PipelineState(tmp_path / "dup.json")
    state.write(_large())
    _rewrite_same_size(state.path, b'"name": "item-00000009"', b'"id":   "item-00000009"')
    before = state.path.read_bytes()
    with pytest.raises(StateReadError, match="duplicate"), state.transaction() as txn:
        txn.data["n"] = 1
    assert state.path.read_bytes() == before


def test_a_large_trusted_state_is_parsed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A steady-state commit of a large state parses the file once, beside its hash."""
    import pipeline_common._json as json_module

    state = PipelineState(tmp_path / "once.json")
    state.write(_large())
    calls = [0]
    real = json_module.decode

    def counting(data: bytes, *, trusted: bool = False) -> dict[str, object]:
        if len(data) > 1 << 20:
            calls[0] += 1
        return real(data, trusted=trusted)

    monkeypatch.setattr(json_module, "decode", counting)
    with state.transaction() as txn:
        txn.data["n"] = 2
    assert calls[0] == 1
    assert state.read()["n"] == 2


def test_a_large_state_with_long_integers_reads_them_exactly(tmp_path: Path) -> None:
    """Integers beyond 64 bits are never taken from the fast parse (it reads them as
    floats): the exact decoder reads them, in the transaction too."""
    state = PipelineState(tmp_path / "long.json")
    big = 2**70 + 1
    data = _large()
    data["big"] = big
    state.write(data)
    with state.transaction() as txn:
        assert txn.data["big"] == big
        assert type(txn.data["big"]) is int
        txn.data["n"] = 3
    assert state.read()["big"] == big


def test_a_large_state_migrated_on_entry_is_seen_migrated(tmp_path: Path) -> None:
    """The parse made beside the hash is of the file before the migration commit; the
    transaction must see the migrated document, not that parse."""
    path = tmp_path / "mig.json"
    PipelineState(path).write(_large())

    def add_version(data: dict[str, object]) -> None:
        data["migrated"] = True

    state = PipelineState(path, schema_version=2, migrations={1: add_version})
    with state.transaction() as txn:
        assert txn.data.get("migrated") is True
        txn.data["n"] = 4
    assert state.read()["migrated"] is True
    operations = [r["operation"] for r in state.get_transaction_history(2)]
    assert operations == ["transaction", "migrate"]
