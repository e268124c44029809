"""A 5-stage pipeline that is SIGKILLed midway, restarted, and followed live by a watcher.

Run it from any folder (it works in a temporary one and removes it)::

    python examples/progress_pipeline.py

Three kinds of process take part, all started by the first one:

- ``work``: runs the stages with a :class:`ProgressTracker`; a stage found running in
  the state file resumes from its persisted ``current``;
- ``watch``: follows the state file with ``tracker.watch()`` and prints a progress line
  each time it changes, until the pipeline completes;
- the main process starts the watcher and a worker, kills the worker with SIGKILL in the
  middle of the third stage, starts a new worker, and checks the outcome.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline_common import PipelineState
from pipeline_common.progress import ProgressTracker

# Stage name -> weight in the overall progress; each stage has ITEMS items.
STAGES = {
    "phase1_download": 1.0,
    "phase2_parse": 2.0,
    "phase3_transform": 4.0,
    "phase4_train": 2.0,
    "phase5_publish": 1.0,
}
ITEMS = 20
SECONDS_PER_ITEM = 0.015
KILL_STAGE, KILL_AT = "phase3_transform", 8


def work(path: str) -> None:
    """Run the pipeline, resuming whatever a previous run left unfinished."""
    print(f"[worker] pid {os.getpid()} started", flush=True)
    with ProgressTracker(PipelineState(path), STAGES, min_interval=0.05) as tracker:
        for name in STAGES:
            if tracker.status()["stages"][name]["status"] in ("success", "skipped"):
                print(f"[worker] {name} already done", flush=True)
                continue
            with tracker.stage(name, total=ITEMS) as stage:
                if stage.resumed:
                    overall = tracker.status()["overall_progress"]
                    print(
                        f"[worker] resumed {name} from {stage.current:g}/{ITEMS} "
                        f"(overall {overall:.1f}%)",
                        flush=True,
                    )
                for _ in range(int(stage.current), ITEMS):
                    time.sleep(SECONDS_PER_ITEM)  # the real work of one item
                    stage.advance()
    print("[worker] done", flush=True)


def render(status: dict[str, Any]) -> str:
    """Format a status as one progress line."""
    percent = status["overall_progress"]
    bar = "#" * int(percent / 5)
    name = status["current_stage"]
    if name is not None:
        stage = status["stages"][name]
        where = f"{name} {stage['current']:g}/{stage['total']:g}"
    else:
        where = status["status"]
    eta = status["eta_seconds"]
    eta_text = "--" if eta is None else f"{eta:.1f}s"
    return f"[watch] {percent:5.1f}% [{bar:<20}] {where} eta {eta_text}"


def watch(path: str) -> None:
    """Print a line each time the pipeline's progress changes, until it finishes."""
    tracker = ProgressTracker(PipelineState(path), STAGES)
    last = ""
    status: dict[str, Any] = {}
    # On a terminal the line is redrawn in place; in a pipe, one line per change.
    live = sys.stdout.isatty()
    for status in tracker.watch(interval=0.02, timeout=60):
        line = render(status)
        if line != last:
            print(("\r" if live else "") + line, end="" if live else "\n", flush=True)
            last = line
    if live:
        print()
    print(f"[watch] pipeline {status['status']}", flush=True)


def main() -> int:
    """Run a worker, kill it midway, restart it, and follow it all with a watcher."""
    # The children get this interpreter's -W options (the tests run with -W error).
    me = [sys.executable, *(f"-W{w}" for w in sys.warnoptions), os.path.abspath(__file__)]
    with tempfile.TemporaryDirectory(prefix="progress-demo-") as folder:
        path = str(Path(folder) / "pipeline.json")
        tracker = ProgressTracker(PipelineState(path), STAGES)
        watcher = subprocess.Popen([*me, "watch", path])
        first = subprocess.Popen([*me, "work", path])
        deadline = time.monotonic() + 30
        while tracker.status()["stages"][KILL_STAGE]["current"] < KILL_AT:
            if first.poll() is not None or time.monotonic() > deadline:
                print("[main] the worker ended before the kill point", flush=True)
                watcher.kill()
                watcher.wait()
                return 1
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        status = tracker.status()
        stage = status["stages"][KILL_STAGE]
        print(
            f"[main] killed worker {first.pid} with SIGKILL at {KILL_STAGE} "
            f"{stage['current']:g}/{ITEMS} (overall {status['overall_progress']:.1f}%)",
            flush=True,
        )
        second = subprocess.Popen([*me, "work", path])
        worker_rc = second.wait(timeout=60)
        watcher_rc = watcher.wait(timeout=60)
        final = tracker.status()
        print(
            f"[main] pipeline {final['status']}, overall {final['overall_progress']:.1f}%, "
            f"worker exit {worker_rc}, watcher exit {watcher_rc}",
            flush=True,
        )
        return 0 if final["status"] == "success" and worker_rc == watcher_rc == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "work":
        work(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "watch":
        watch(sys.argv[2])
    else:
        sys.exit(main())
