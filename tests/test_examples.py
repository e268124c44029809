"""The examples run as scripts, from a fresh folder, and do what their docstrings say."""

from __future__ import annotations

import json
import os
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


def test_audiobook_pipeline_scenario_fails_in_phase_4_then_resumes(tmp_path: Path) -> None:
    """The Pipeline version: run 1 stops at phase 4 (after one retried error), run 2 finishes."""
    result = run_example("audiobook_pipeline.py", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "stopped: phase4 failed (RuntimeError: TTS engine crashed on chapter 2)" in out
    assert "phase4  failed   attempts=2  error='RuntimeError: TTS engine crashed" in out
    assert "phase5  pending  attempts=0" in out
    assert "already done, skipped: phase1, phase2, phase3" in out
    assert "phase4  success  attempts=4" in out
    assert "all phases done" in out
    assert list(tmp_path.iterdir()) == []


def test_audiobook_pipeline_on_a_path_fails_then_resumes(tmp_path: Path) -> None:
    """run_orchestrator(input, state): --fail-phase 2 exits 1; a rerun runs phases 2-6 only."""
    book = tmp_path / "book.txt"
    book.write_text("Chapter 1. One.\nChapter 2. Two.\n", encoding="utf-8")
    state = tmp_path / "pipeline.json"
    first = run_example(
        "audiobook_pipeline.py", str(book), str(state), "--fail-phase", "2", cwd=tmp_path
    )
    assert first.returncode == 1, first.stdout + first.stderr
    data = json.loads(state.read_text())
    assert data["phase1"]["status"] == "success"
    assert data["phase2"]["status"] == "failed"
    assert data["phase2"]["error"]["type"] == "RuntimeError"
    assert "phase3" not in data
    assert [s["name"] for s in data["_pipeline"]["stages"]] == [f"phase{n}" for n in range(1, 7)]

    second = run_example("audiobook_pipeline.py", str(book), str(state), cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    data = json.loads(state.read_text())
    assert [data[f"phase{n}"]["status"] for n in range(1, 7)] == ["success"] * 6
    assert (data["phase1"]["attempts"], data["phase2"]["attempts"]) == (1, 2)
    assert data["phase2"]["error"] is None
    assert data["phase4"]["retry"]["succeeded_after"] == 2  # the transient error, retried
    assert Path(data["phase6"]["outputs"]["audiobook"]).is_file()


def test_audiobook_pipeline_runs_from_the_command_line(tmp_path: Path) -> None:
    """pipeline-state run examples/audiobook_pipeline.py:from_env runs the six phases."""
    book = tmp_path / "book.txt"
    book.write_text("Chapter 1. One.\n", encoding="utf-8")
    env = {
        **os.environ,
        "AUDIOBOOK_INPUT": str(book),
        "AUDIOBOOK_STATE": str(tmp_path / "pipeline.json"),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline_common",
            "run",
            f"{EXAMPLES}/audiobook_pipeline.py:from_env",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "phase6: success" in result.stdout
    assert "pipeline: success" in result.stdout
