"""Sidecar folders replaced by a symlink (or a file): every reader refuses, like a writer.

A writer already refused to create files through a symlinked ``.<stem>/``; the readers
(dry-run restore, diff, list_backups, backups, history, at, verify, version and the
CLI's read commands) now refuse too, with the same ``StateSidecarError``, so nothing is
ever shown from a folder outside the state's own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState, StateSidecarError
from pipeline_common.cli import main

_OUTSIDE = "pipeline_20200101_000000_000000.json.bak"


def _hijacked(tmp_path: Path, which: str) -> PipelineState:
    """A state with two commits whose ``which`` sidecar folder was swapped for a symlink
    to a folder holding a planted backup and log."""
    state = PipelineState(tmp_path / "pipeline.json")
    state.write({"n": 1})
    state.write({"n": 2})
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "backups").mkdir(parents=True)
    (elsewhere / "backups" / _OUTSIDE).write_text(json.dumps({"SECRET": "outside"}))
    (elsewhere / "transactions.log").write_text("")
    (elsewhere / "owner").write_text("pipeline.json\n")
    if which == "sidecar":
        shutil.rmtree(state.sidecar_dir)
        os.symlink(elsewhere, state.sidecar_dir)
    elif which == "backups":
        shutil.rmtree(state.backups_dir)
        os.symlink(elsewhere / "backups", state.backups_dir)
    else:  # a plain file where the folder should be
        shutil.rmtree(state.sidecar_dir)
        state.sidecar_dir.write_text("not a folder")
    return state


_READERS: dict[str, Callable[[PipelineState], Any]] = {
    "restore dry run": lambda s: s.restore_backup(_OUTSIDE, dry_run=True),
    "restore": lambda s: s.restore_backup(_OUTSIDE),
    "diff backup": lambda s: s.diff(_OUTSIDE),
    "diff generation": lambda s: s.diff(1),
    "list_backups": lambda s: s.list_backups(),
    "backup_manager.list_paths": lambda s: s.backup_manager.list_paths(),
    "backups": lambda s: s.backups(),
    "history": lambda s: s.history(),
    "get_transaction_history": lambda s: s.get_transaction_history(),
    "at": lambda s: s.at(1),
    "verify": lambda s: s.verify(),
    "version": lambda s: s.version,
    "read_versioned": lambda s: s.read_versioned(),
    "wait_for_change": lambda s: s.wait_for_change(0, timeout=0),
    "write": lambda s: s.write({"n": 3}),
}


@pytest.mark.parametrize("which", ["sidecar", "backups", "file"])
@pytest.mark.parametrize("reader", list(_READERS), ids=list(_READERS))
def test_every_reader_refuses_a_replaced_sidecar_folder(
    tmp_path: Path, which: str, reader: str
) -> None:
    """Each reader raises the writer's StateSidecarError naming the folder; nothing from
    the planted folder is returned."""
    state = _hijacked(tmp_path, which)
    folder = state.backups_dir if which == "backups" else state.sidecar_dir
    with pytest.raises(StateSidecarError, match="must be a real folder") as info:
        _READERS[reader](state)
    assert str(folder) in str(info.value)
    assert state.read() == {"n": 2}  # the state file itself stays readable


_COMMANDS = [
    ["show"],
    ["status"],
    ["history"],
    ["backups"],
    ["diff", _OUTSIDE],
    ["diff", "1"],
    ["restore", _OUTSIDE, "--dry-run"],
    ["verify"],
    ["repair"],
]


@pytest.mark.parametrize("which", ["sidecar", "backups"])
@pytest.mark.parametrize("command", _COMMANDS, ids=[" ".join(c) for c in _COMMANDS])
def test_cli_read_commands_refuse_a_symlinked_sidecar_folder(
    tmp_path: Path, which: str, command: list[str]
) -> None:
    """`pipeline-state <command>` exits 4 with the writer's message and prints nothing
    from the planted folder."""
    state = _hijacked(tmp_path, which)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([command[0], str(state.path), *command[1:]])
    assert code == 4, (code, out.getvalue(), err.getvalue())
    assert "must be a real folder" in err.getvalue()
    assert "SECRET" not in out.getvalue() + err.getvalue()
