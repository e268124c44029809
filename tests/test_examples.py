"""The examples run as scripts, from a fresh folder, and do what their docstrings say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_orchestrator_scenario_rolls_back_then_resumes(tmp_path: Path) -> None:
    """Without arguments: run 1 fails in phase 3 and rolls back, run 2 resumes and finishes."""
    result = run_example("phase_orchestrator.py", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "phase3 tts: FAILED (TTS engine crashed on chapter 2)" in out
    assert "phase1 extract text: already done, skipped" in out
    assert "all phases done" in out
    assert "phase3  success  attempts=2" in out
    assert "rolled back: RuntimeError: TTS engine crashed on chapter 2" in out
    assert list(tmp_path.iterdir()) == []  # it worked in its own temp folder


def test_orchestrator_on_a_path_fails_then_resumes(tmp_path: Path) -> None:
    """With a path: --fail-phase 2 exits 1 with phase 2 failed; a rerun finishes the rest."""
    state = tmp_path / "pipeline.json"
    first = run_example("phase_orchestrator.py", str(state), "--fail-phase", "2", cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    data = json.loads(state.read_text())
    assert data["phase1"]["status"] == "success"
    assert data["phase2"]["status"] == "failed"
    assert "half_done" not in data["phase2"]  # the failed transaction's change was rolled back
    assert "phase3" not in data

    second = run_example("phase_orchestrator.py", str(state), cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    data = json.loads(state.read_text())
    assert [data[f"phase{n}"]["status"] for n in range(1, 6)] == ["success"] * 5
    assert data["phase1"]["attempts"] == 1
    assert data["phase2"]["attempts"] == 2
    assert "error" not in data["phase2"]
    assert Path(data["phase5"]["outputs"]["audiobook"]).is_file()
    assert data["pipeline"]["runs"] == 2


def test_repl_restore_session_restores_undoes_and_redoes(tmp_path: Path) -> None:
    """The REPL session prints each step and ends with the state from before the accident."""
    result = run_example("repl_restore.py", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in (
        ">>> backups = state.list_backups()",
        ">>> json.loads(backups[0].read_bytes())",
        ">>> state.restore_backup(backups[0])",
        ">>> state.restore_backup(undo)",
    ):
        assert step in out
    assert out.rstrip().endswith("OK: restore, undo and redo gave the expected states")
    data = json.loads((tmp_path / "work" / "pipeline.json").read_text())
    assert [data[f"phase{n}"]["status"] for n in (1, 2, 3)] == ["success"] * 3


def test_repl_restore_refuses_an_existing_state(tmp_path: Path) -> None:
    """It never overwrites a state file that is already there."""
    (tmp_path / "pipeline.json").write_text('{"mine": true}\n')
    result = run_example("repl_restore.py", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert json.loads((tmp_path / "pipeline.json").read_text()) == {"mine": True}
