"""examples/progress_pipeline.py: killed midway, restarted, followed by a watcher."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "progress_pipeline.py"
_WATCH = re.compile(r"^\[watch\]\s+(\d+\.\d)% ")


@pytest.mark.multiprocess
def test_example_resumes_after_sigkill_with_correct_percentages(tmp_path: Path) -> None:
    """It succeeds, resumes at the killed percentage, and the watcher never goes back."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(EXAMPLE.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    killed = re.search(
        r"^\[main\] killed worker \d+ with SIGKILL at phase3_transform "
        r"(\d+)/20 \(overall (\d+\.\d)%\)$",
        out,
        re.M,
    )
    resumed = re.search(
        r"^\[worker\] resumed phase3_transform from (\d+)/20 "
        r"\(overall (\d+\.\d)%\)$",
        out,
        re.M,
    )
    assert killed, out
    assert resumed, out
    assert killed.groups() == resumed.groups()
    assert int(killed.group(1)) >= 8
    # 1 + 2 weights done of 10, plus a fraction of phase3's 4.
    assert float(killed.group(2)) == pytest.approx(30 + 4 * int(killed.group(1)) / 20 * 10)
    assert "[worker] phase1_download already done" in out
    assert "[worker] phase2_parse already done" in out
    percents = [float(m.group(1)) for line in out.splitlines() if (m := _WATCH.match(line))]
    assert len(percents) >= 5
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    assert "[watch] pipeline success" in out
    assert out.rstrip().endswith(
        "[main] pipeline success, overall 100.0%, worker exit 0, watcher exit 0"
    )
    assert list(tmp_path.iterdir()) == []  # the demo cleans up after itself
