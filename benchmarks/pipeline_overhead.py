"""The Pipeline runner's own cost: 6 empty stages, against the same bookkeeping by hand.

Usage::

    python benchmarks/pipeline_overhead.py [--runs 20] [--durability full|atomic] [--json]

For each run, in a fresh folder:

- **by hand**: ``ProgressTracker(state, 6 stages)`` made first (it writes the plan), then
  timed: ``tracker.start(s); tracker.complete(s)`` for each stage (12 commits);
- **Pipeline**: a ``Pipeline`` with 6 empty stages, its plan declared first
  (``status()``), then timed: ``pipeline.run()`` (12 commits: a claim and an outcome
  per stage, plus the runner's reads, prerequisite and owner checks).

Prints the median of each and the ratio Pipeline / by hand (1.0 = no overhead beyond the
commits themselves). Both pay the same commit protocol (lock, fsync, rename, log).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pipeline_common import Pipeline, PipelineState, ProgressTracker, StageContext

STAGES = [f"stage{i}" for i in range(1, 7)]


def by_hand(folder: Path, durability: Literal["full", "atomic"]) -> float:
    """Seconds for 6 x (start + complete) with a ProgressTracker."""
    state = PipelineState(folder / "hand.json", durability=durability)
    tracker = ProgressTracker(state, STAGES)
    t0 = time.perf_counter()
    for stage in STAGES:
        tracker.start(stage)
        tracker.complete(stage)
    elapsed = time.perf_counter() - t0
    tracker.close()
    return elapsed


def with_pipeline(folder: Path, durability: Literal["full", "atomic"]) -> float:
    """Seconds for pipeline.run() of 6 empty stages, the plan already declared."""
    pipeline = Pipeline(folder / "runner.json", durability=durability)
    for name in STAGES:

        def empty(ctx: StageContext) -> None:
            pass

        pipeline.stage(name=name)(empty)
    pipeline.status()  # declares the plan, like the tracker's constructor above
    t0 = time.perf_counter()
    result = pipeline.run()
    elapsed = time.perf_counter() - t0
    assert result.ran == STAGES
    pipeline.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each (default 20)")
    parser.add_argument("--durability", choices=["full", "atomic"], default="full")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    hand: list[float] = []
    runner: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pipeline-overhead-") as tmp:
        for i in range(args.runs):
            # each measurement in its own new folder (a second file in the same folder
            # ran measurably faster); the order alternates, so neither is always first
            first, second = Path(tmp) / f"a{i}", Path(tmp) / f"b{i}"
            first.mkdir()
            second.mkdir()
            if i % 2:
                runner.append(with_pipeline(first, args.durability))
                hand.append(by_hand(second, args.durability))
            else:
                hand.append(by_hand(first, args.durability))
                runner.append(with_pipeline(second, args.durability))
    hand_ms = statistics.median(hand) * 1000
    runner_ms = statistics.median(runner) * 1000
    report: dict[str, Any] = {
        "runs": args.runs,
        "durability": args.durability,
        "by_hand_ms": round(hand_ms, 3),
        "pipeline_ms": round(runner_ms, 3),
        "ratio": round(runner_ms / hand_ms, 3),
        "per_stage_overhead_ms": round((runner_ms - hand_ms) / len(STAGES), 3),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"6 empty stages, {args.runs} runs, durability={args.durability} (medians):\n"
            f"  by hand (6 x start+complete): {hand_ms:8.2f} ms\n"
            f"  Pipeline.run():               {runner_ms:8.2f} ms\n"
            f"  ratio Pipeline / by hand:     {report['ratio']:8.3f}\n"
            f"  runner overhead per stage:    {report['per_stage_overhead_ms']:8.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
