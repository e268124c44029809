"""Random SIGKILLs of a Pipeline runner: the file stays valid and the next run finishes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_common import Pipeline, PipelineState, StageContext
from pipeline_common.testing import check_invariants, random_kills

from ._scenarios import MAX_BACKUPS, state_file

STAGES = ("extract", "tts", "mix", "package")


def _pipeline(path: Path) -> Pipeline:
    """Four stages in a chain; tts writes progress at every item."""
    pipeline = Pipeline(path, max_backups=MAX_BACKUPS, timeout=5, min_interval=0)
    previous: list[str] = []
    for name in STAGES:

        def work(ctx: StageContext) -> None:
            for _ in ctx.track(range(5 if ctx.stage == "tts" else 1)):
                pass
            ctx.record["done_by"] = ctx.attempt

        pipeline.stage(name=name, requires=previous[-1:])(work)
        previous.append(name)
    return pipeline


def _run_and_reset(path: Path) -> None:
    """One unit of the child's loop: run everything, then reset it all for the next round."""
    pipeline = _pipeline(path)
    pipeline.run()
    pipeline.reset("extract", downstream=True)


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", [1, 2])
def test_killed_runners_leave_a_state_the_next_run_finishes(tmp_path: Path, seed: int) -> None:
    """After 15 kills at random moments, one more run completes every stage exactly once."""
    path = state_file(tmp_path)
    left_running = 0
    for _ in random_kills(
        lambda: _run_and_reset(path),
        path,
        kills=15,
        max_delay=0.05,
        seed=seed,
        max_backups=MAX_BACKUPS,
    ):
        data = PipelineState(path).read()
        left_running += any(data.get(n, {}).get("status") == "running" for n in STAGES)
    assert left_running > 0  # the kills did hit stages mid-run, not only between runs
    check_invariants(path, max_backups=MAX_BACKUPS, backup_slack=None, after_crash=True)
    state = PipelineState(path, max_backups=MAX_BACKUPS)
    before = len(state.get_transaction_history(limit=100_000))
    pipeline = _pipeline(path)
    result = pipeline.run()
    status = pipeline.status()
    assert status["status"] == "success", status
    assert all(s["owner"] is None for s in status["stages"].values())
    assert sorted(result.ran + result.already_done) == sorted(STAGES)
    # the finishing run ran each stage at most once: one claim and one success each
    newest = state.get_transaction_history(limit=100_000)[: -before or None]
    ops = [r["operation"] for r in newest if r["success"]]
    for name in result.ran:
        assert ops.count(f"stage {name}: start") == 1
        assert ops.count(f"stage {name}: success") == 1
    check_invariants(path, max_backups=MAX_BACKUPS, backup_slack=None, after_crash=True)
    if result.ran:  # a clean commit since the last kill: the log and the backups caught up
        assert state.verify(), state.verify().problems
