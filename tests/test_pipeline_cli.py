"""``pipeline-state run``, ``reset`` and ``status`` on a Pipeline, against real files."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState

TIMEOUT = 60.0

JOBS = """
import os, time
from pathlib import Path
from pipeline_common import Pipeline

pipeline = Pipeline("pipeline.json")


@pipeline.stage()
def extract(ctx):
    ctx.record["files"] = ["book.txt"]


@pipeline.stage(requires=["extract"], weight=3)
def tts(ctx):
    for i in ctx.track(range(4)):
        if os.environ.get("FAIL_TTS"):
            raise RuntimeError("tts engine down")
        if os.environ.get("HANG_TTS"):
            Path("ready").write_text("now")
            time.sleep(60)


@pipeline.stage(requires=["tts"])
def mix(ctx):
    pass


@pipeline.stage()
def cover(ctx):
    pass
"""


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline_common ARGS`` with stdin closed."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline_common", *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env={**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(cwd), **env},
        timeout=TIMEOUT,
    )


def on_terminal(cwd: Path, *args: str, answer: bytes = b"") -> tuple[int, str]:
    """Run the command on a pseudo-terminal, typing ``answer``."""
    master, slave = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline_common", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env={**os.environ, "TERM": "xterm", "PYTHONPATH": str(cwd)},
    ) as proc:
        os.close(slave)
        if answer:
            os.write(master, answer)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        code = proc.wait(TIMEOUT)
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    """A folder with jobs.py (extract -> tts -> mix, and cover)."""
    (tmp_path / "jobs.py").write_text(JOBS, encoding="utf-8")
    return tmp_path


def read(folder: Path) -> dict[str, Any]:
    """The state file's data."""
    return PipelineState(folder / "pipeline.json").read()


def test_run_prints_one_line_per_event_and_exits_0(jobs: Path) -> None:
    """Piped output is plain lines; a second run skips every stage."""
    result = run_cli(jobs, "run", "jobs:pipeline")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "extract: started (attempt 1)"
    assert lines[1].startswith("extract: success in ")
    assert "pipeline: success" in lines
    assert "\x1b" not in result.stdout
    assert [read(jobs)[s]["status"] for s in ("extract", "tts", "mix", "cover")] == ["success"] * 4
    again = run_cli(jobs, "run", "jobs:pipeline")
    assert again.returncode == 0
    assert "already done, not run: extract, tts, mix, cover" in again.stdout


def test_run_exit_codes(jobs: Path) -> None:
    """5 prerequisites (nothing written), 1 a failed stage, 2 a bad target or stage."""
    prereq = run_cli(jobs, "run", "jobs:pipeline", "tts")
    assert prereq.returncode == 5, prereq.stderr
    assert "'extract' (pending)" in prereq.stderr
    data = read(jobs)
    assert list(data) == ["_pipeline"]  # only the plan: nothing about tts

    failed = run_cli(jobs, "run", "jobs:pipeline", FAIL_TTS="1")
    assert failed.returncode == 1
    assert "stage 'tts' failed: RuntimeError: tts engine down" in failed.stderr
    assert failed.stderr.count("\n") == 1  # one line, no traceback
    assert "tts: FAILED: RuntimeError: tts engine down" in failed.stdout
    assert "mix" not in read(jobs)  # not run: it depends on tts

    for args in (
        ["nope:pipeline"],
        ["jobs"],
        ["jobs:missing"],
        ["jobs:os"],
        ["jobs:pipeline", "x"],
    ):
        bad = run_cli(jobs, "run", *args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith("pipeline-state: error:")

    resumed = run_cli(jobs, "run", "jobs.py:pipeline", "--json")
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["ran"] == ["tts", "mix", "cover"]
    assert doc["already_done"] == ["extract"]
    assert doc["status"]["stages"]["tts"]["attempts"] == 2


@pytest.mark.multiprocess
def test_status_shows_the_owner_of_a_running_stage_and_run_exits_3(jobs: Path) -> None:
    """While a runner holds tts: status names its pid, a second run exits 3."""
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline_common", "run", "jobs:pipeline"],
        cwd=jobs,
        env={**os.environ, "PYTHONPATH": str(jobs), "HANG_TTS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (jobs / "ready").exists():
            assert child.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status = run_cli(jobs, "status", "pipeline.json")
        assert status.returncode == 0, status.stderr
        assert f"tts: run by pid {child.pid} on " in status.stdout
        header = status.stdout.splitlines()[1].split()
        assert "ATTEMPTS" in header
        doc = json.loads(run_cli(jobs, "status", "pipeline.json", "--json").stdout)
        assert doc["stages"]["tts"]["owner"]["pid"] == child.pid
        assert list(doc["stages"]) == ["extract", "tts", "mix", "cover"]
        busy = run_cli(jobs, "run", "jobs:pipeline", "tts")
        assert busy.returncode == 3
        assert f"pid {child.pid}" in busy.stderr
        refused = run_cli(jobs, "reset", "pipeline.json", "tts", "--yes")
        assert refused.returncode == 3
    finally:
        child.kill()
        child.wait(TIMEOUT)
    # the owner is gone: the next run takes the stage over and finishes
    again = run_cli(jobs, "run", "jobs:pipeline")
    assert again.returncode == 0, again.stderr
    assert read(jobs)["tts"]["interruptions"][0]["owner"]["pid"] == child.pid


def test_reset_needs_yes_off_a_terminal_and_is_logged(jobs: Path) -> None:
    """reset --downstream resets the dependents from the stored plan; one backed-up commit."""
    assert run_cli(jobs, "run", "jobs:pipeline").returncode == 0
    raw = (jobs / "pipeline.json").read_bytes()
    refused = run_cli(jobs, "reset", "pipeline.json", "extract", "--downstream")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert (jobs / "pipeline.json").read_bytes() == raw
    unknown = run_cli(jobs, "reset", "pipeline.json", "nope", "--yes")
    assert unknown.returncode == 2
    assert "extract, tts, mix, cover" in unknown.stderr

    state = PipelineState(jobs / "pipeline.json")
    backups = len(state.backups())
    done = run_cli(jobs, "reset", "pipeline.json", "tts", "--downstream", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reset"] == ["tts", "mix"]
    data = state.read()
    assert (data["tts"], data["mix"]) == ({"status": "pending"}, {"status": "pending"})
    assert data["extract"]["status"] == data["cover"]["status"] == "success"
    assert state.history(limit=1)[0].operation == "reset tts"
    assert len(state.backups()) == backups + 1


def test_reset_asks_on_a_terminal(jobs: Path) -> None:
    """On a terminal, reset asks; 'n' changes nothing, 'y' resets."""
    assert run_cli(jobs, "run", "jobs:pipeline").returncode == 0
    code, output = on_terminal(jobs, "reset", "pipeline.json", "mix", answer=b"n\n")
    assert code == 1
    assert "Reset mix of pipeline.json to pending?" in output
    assert read(jobs)["mix"]["status"] == "success"
    code, output = on_terminal(jobs, "reset", "pipeline.json", "mix", answer=b"y\n")
    assert code == 0, output
    assert read(jobs)["mix"] == {"status": "pending"}


def test_run_on_a_terminal_draws_the_stage_table(jobs: Path) -> None:
    """On a terminal, run redraws the table (cursor moves), ending with every stage done."""
    code, output = on_terminal(jobs, "run", "jobs:pipeline")
    assert code == 0, output
    assert "\x1b[" in output  # redrawn in place
    assert "STAGE" in output
    assert "PROGRESS" in output
    last = output.rsplit("pipeline.json:", 1)[1]
    assert "100.0% overall" in last
