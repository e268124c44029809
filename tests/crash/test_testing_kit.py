"""The public test kit, and the examples of docs/testing.md, which are executed here."""

from __future__ import annotations

import errno
import gzip
import re
from pathlib import Path

import pytest

from pipeline_common import PipelineState, StateWriteError
from pipeline_common.testing import (
    InvariantViolation,
    check_invariants,
    inject_fault,
    record_calls,
)

from ._scenarios import commit, state_file, version

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def test_docs_examples_run() -> None:
    """Every python block of docs/testing.md runs, in order, in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"__name__": "docs_testing"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)


def test_check_invariants_flags_a_corrupt_state(tmp_path: Path) -> None:
    """A state that does not parse is a violation, named in the message."""
    path = state_file(tmp_path)
    commit(path, 1)
    path.write_bytes(b'{"n": ')
    with pytest.raises(InvariantViolation, match="does not parse"):
        check_invariants(path)


def test_check_invariants_flags_a_lost_acknowledged_commit(tmp_path: Path) -> None:
    """A state older than the acknowledged version is a violation."""
    path = state_file(tmp_path)
    commit(path, 1)
    with pytest.raises(InvariantViolation, match="neither the acknowledged"):
        check_invariants(path, acknowledged=version(2))
    assert check_invariants(path, acknowledged=version(2), in_flight=[version(1)]).state


def test_check_invariants_flags_orphans_after_a_commit(tmp_path: Path) -> None:
    """An orphan temp file is tolerated after a crash, not after a commit."""
    path = state_file(tmp_path)
    commit(path, 1)
    (path.parent / ".pipeline.json.tmp").write_bytes(b"{")
    check_invariants(path, after_crash=True)
    with pytest.raises(InvariantViolation, match="orphan temp"):
        check_invariants(path, after_crash=False)


def test_inject_fault_persistent_and_nth(tmp_path: Path) -> None:
    """nth picks the matching call; persistent keeps failing; the hook is removed after."""
    path = state_file(tmp_path)
    commit(path, 1)
    with inject_fault("write", nth=1, errno=errno.ENOSPC) as fault:
        with pytest.raises(StateWriteError) as info:
            commit(path, 2)
    assert fault.fired == 1
    assert info.value.errno == errno.ENOSPC
    with record_calls() as calls:
        commit(path, 3)
    assert any(c.op == "replace" for c in calls)
    check_invariants(path, acknowledged=version(3), after_crash=False)


def test_check_invariants_reads_compressed_backups(tmp_path: Path) -> None:
    """With compress_backups=True the .json.gz backups are counted and checked too."""
    path = tmp_path / "pipeline.json"
    state = PipelineState(path, compress_backups=True, max_backups=3)
    versions = [{"n": i} for i in range(6)]
    for each in versions:
        state.write(each)
    report = check_invariants(path, max_backups=3, acknowledged=versions[-1], history=versions)
    assert report.backups == 3
    state.list_backups()[0].write_bytes(gzip.compress(b'{"n": 99}\n'))
    with pytest.raises(InvariantViolation, match="not a version that was ever committed"):
        check_invariants(path, max_backups=3, history=versions)
