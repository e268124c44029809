"""Caches under interleaving: nothing remembered lets a step be skipped on false proof.

For each value the library could remember between calls (the log's tail, the state
file's identity, the change-summary spans, the backups listing), a second process
changes the remembered thing in each way a guard could miss: same size, same mtime
(set back with ``os.utime``, as a coarse clock would leave it), same inode number
(deleted and recreated). The library must see the change every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_common import PipelineState, StateReadError


def _child(code: str, cwd: Path) -> None:
    """Run ``code`` in another process (``P`` is PipelineState there)."""
    prelude = "from pipeline_common import PipelineState as P\nimport os, json\n"
    subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, check=True, timeout=60)


def _operations(state: PipelineState) -> list[str]:
    return [json.loads(line)["operation"] for line in state.log_path.read_text().splitlines()]


def _freeze(path: Path, st: os.stat_result) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_torn_tail_as_long_as_another_process_record_never_costs_that_record(
    tmp_path: Path,
) -> None:
    """Defect 2: a torn tail of T bytes, another process commits so the log's size is
    the same as before; our commit must keep that process's record."""
    for attempt in range(20):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        s = PipelineState(folder / "t.json")
        s.write({"n": 0})
        # Measure the length of the other process's record, then tear a tail that long.
        probe = folder / "probe"
        probe.mkdir()
        _child("P('t.json').write({'n': 0})\nP('t.json').write({'b': 1})", probe)
        record = (probe / ".t" / "transactions.log").read_bytes().splitlines(keepends=True)[-1]
        with open(s.log_path, "ab") as fh:
            fh.write(b"{" + b"x" * (len(record) - 1))
        size = s.log_path.stat().st_size
        assert s.version == 1  # this process reads the tail
        _child("P('t.json').write({'b': 1})", folder)
        if s.log_path.stat().st_size != size:
            continue  # the record's length differed (timestamps, pids): try again
        s.write({"a": 1})
        assert _operations(s) == ["write", "write", "write"]
        assert s.verify(), repr(s.verify())
        return
    pytest.fail("never got a record as long as the torn tail")


@pytest.mark.parametrize("how", ["in place, same size and mtime", "new file, inode reused"])
def test_the_log_tail_is_read_afresh_whatever_the_file_looks_like(tmp_path: Path, how: str) -> None:
    """Another process rewrites the log so that size (and mtime, and maybe inode) match:
    the version we read is the file's, not a remembered one."""
    s = PipelineState(tmp_path / "v.json")
    s.write({"n": 0})
    s.write({"n": 1})
    assert s.version == 2
    st = s.log_path.stat()
    code = (
        "log = '.v/transactions.log'\n"
        "data = open(log, 'rb').read().replace(b'\"generation\":2', b'\"generation\":7')\n"
    )
    if how.startswith("in place"):
        code += "with open(log, 'r+b') as fh: fh.write(data)\n"
    else:
        code += "os.unlink(log)\nwith open(log, 'wb') as fh: fh.write(data)\n"
    _child(code, tmp_path)
    assert s.log_path.stat().st_size == st.st_size
    _freeze(s.log_path, st)
    assert s.version == 7


def _rewrite_in_place(path: Path, new: bytes) -> None:
    """What a legacy script does: open(path, "w") on the live file, keeping its inode;
    then set the mtime back, as a coarse clock would have left it."""
    st = path.stat()
    assert len(new) == st.st_size
    _child(f"open({str(path)!r}, 'r+b').write({new!r})", path.parent)
    assert path.stat().st_ino == st.st_ino
    _freeze(path, st)


def test_an_in_place_edit_with_the_same_stat_is_recorded_and_summarised_right(
    tmp_path: Path,
) -> None:
    """The state file's identity: same inode, size and mtime, other bytes. The next
    commit records the outside change (a recover record) and summarises its own
    change from the real bytes, not from spans remembered for the old ones."""
    s = PipelineState(tmp_path / "s.json")
    s.write({"a": 1, "b": 2, "c": 3})
    old = s.path.read_bytes()
    assert b'"a": 1' in old
    _rewrite_in_place(s.path, old.replace(b'"a": 1', b'"a": 9'))
    with s.transaction() as t:
        t.data["c"] = 4
    assert _operations(s)[-2:] == ["recover", "transaction"]
    newest = s.get_transaction_history(1)[0]
    assert newest["changes"] == ["/c"]
    assert s.read() == {"a": 9, "b": 2, "c": 4}
    assert s.verify(), repr(s.verify())


def test_read_never_trusts_a_file_by_its_stat(tmp_path: Path) -> None:
    """An in-place edit with the same stat that adds a duplicate key is refused by read(),
    as it would be without the log."""
    s = PipelineState(tmp_path / "r.json")
    s.write({"a": 1, "bb": 2})
    old = s.path.read_bytes()
    assert old == b'{\n  "a": 1,\n  "bb": 2\n}\n'
    _rewrite_in_place(s.path, b'{\n  "a": 1,\n  "a": 22\n}\n')
    with pytest.raises(StateReadError, match="duplicate"):
        s.read()


def test_read_versioned_matches_the_bytes_not_the_stat(tmp_path: Path) -> None:
    """The version paired with data is the one whose recorded sha256 matches the bytes."""
    s = PipelineState(tmp_path / "w.json")
    s.write({"a": 1})
    s.write({"a": 2})
    _rewrite_in_place(s.path, s.path.read_bytes().replace(b"2", b"3"))
    data, version = s.read_versioned(wait=0)
    assert data == {"a": 3}
    assert version == 2  # the log's newest version: the edit has none of its own yet
    with s.transaction() as t:  # which the next transaction records
        t.data["b"] = 1
    assert _operations(s)[-2:] == ["recover", "transaction"]
    assert s.read_versioned(wait=0) == ({"a": 3, "b": 1}, 4)


@pytest.mark.parametrize("how", ["another process commits", "a file added by hand"])
def test_the_backups_listing_is_never_reused_across_holds(tmp_path: Path, how: str) -> None:
    """A second process changes the backups folder between two of our commits (and sets
    its mtime back): our next commit still keeps exactly max_backups."""
    s = PipelineState(tmp_path / "k.json", max_backups=2)
    for n in range(4):
        s.write({"n": n})
    st = s.backups_dir.stat()
    if how == "another process commits":
        _child("P('k.json', max_backups=5).write({'n': 100})", tmp_path)
    else:
        name = "k_20000101_000000_000000.json.bak"
        _child(f"open('.k/backups/{name}', 'w').write('{{}}')", tmp_path)
    _freeze(s.backups_dir, st)
    s.write({"n": 5})
    names = sorted(p.name for p in s.backups_dir.iterdir())
    assert len(names) == 2, names
