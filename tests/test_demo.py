"""The live demo: ``python -m pipeline_common.demo`` proves every guarantee, line by line."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_common import demo


@pytest.mark.multiprocess
def test_demo_passes_every_check(tmp_path: Path) -> None:
    """The demo exits 0 and every line it prints is a PASS line (installed package, any cwd)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "pipeline_common.demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert len(lines) >= 15
    assert all(line.startswith("PASS  ") for line in lines), result.stdout
    text = result.stdout
    assert "kill -9 round 6" in text
    assert "4 processes x 100 increments = 400" in text
    assert "'phase3: tts'" in text
    assert "the next run() re-ran only tts" in text
    assert lines[-1].startswith("PASS  all ")
    assert list(tmp_path.iterdir()) == []  # everything happened in its own temp folder


def test_failed_check_gives_fail_line_and_exit_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """One failing check makes a FAIL line and a FAIL summary, and main() returns 1."""

    def fake_all(report: demo._Report, *_: object, **__: object) -> None:
        report.check(True, "fine")
        report.check(False, "broken")

    monkeypatch.setattr(demo, "_demo_all", fake_all)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert demo.main([]) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "PASS  fine"
    assert lines[1] == "FAIL  broken"
    assert lines[2].startswith("FAIL  1 of 2 checks failed")


def test_unexpected_error_in_a_section_is_one_fail_line() -> None:
    """A section that raises is reported as a FAIL line instead of crashing the demo."""
    out = io.StringIO()
    report = demo._Report(out)

    def section() -> None:
        raise OSError("disk on fire")

    report.run("kill -9", section)
    assert out.getvalue() == "FAIL  kill -9: unexpected OSError: disk on fire\n"
    assert report.failed == 1
