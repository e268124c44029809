"""Run examples/retry_phase.py as a user would and check what it prints and leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_common import PipelineState

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "retry_phase.py"


@pytest.mark.multiprocess
def test_retry_example_survives_sigkill_and_succeeds_on_attempt_3(tmp_path: Path) -> None:
    """The example kills its orchestrator after two failures; the restart succeeds on attempt 3."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[run 1] killed with SIGKILL (exit status -9)" in out
    assert "ledger after the kill: attempts=2, in_flight=False" in out
    assert "[run 2] resuming: 2 attempts so far" in out
    assert "[run 2] phase 4, attempt 3" in out
    assert "phase4: status=success, output=report.csv, succeeded after 3 attempts" in out

    state = PipelineState(tmp_path / "pipeline.json")
    outcomes = [
        (r["operation"], r["details"]["outcome"])
        for r in reversed(state.get_transaction_history(50))
        if r["operation"].startswith("retry:")
    ]
    assert outcomes == [
        ("retry:phase4 attempt 1", "started"),
        ("retry:phase4 attempt 1", "failed"),
        ("retry:phase4 attempt 2", "started"),
        ("retry:phase4 attempt 2", "failed"),
        ("retry:phase4 attempt 3", "started"),
        ("retry:phase4 attempt 3", "succeeded"),
    ]
    pids = {
        r["pid"] for r in state.get_transaction_history(50) if r["operation"].startswith("retry:")
    }
    assert len(pids) == 2  # two orchestrator processes did the attempts
    assert (tmp_path / "service_calls").read_text() == "3"
