"""The stage plan lives in the state: declared once, seen by every process, changed safely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PlanError, ProgressError, ProgressTracker
from pipeline_common.state import PipelineState

STAGES = {"extract": 1.0, "tts": 3.0, "mix": 1.0}
REQUIRES = {"tts": ["extract"], "mix": ["tts"]}


def log_size(state: PipelineState) -> int:
    """The number of records in the transaction log."""
    return len(state.get_transaction_history(limit=10_000))


def status_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``pipeline-state status`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline_common", "status", *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )


def test_declaring_writes_the_plan_once_in_a_logged_transaction(state: PipelineState) -> None:
    """The first declaration commits the plan; the same plan again commits nothing."""
    ProgressTracker(state, STAGES, requires=REQUIRES).close()
    stored = state.read()["_pipeline"]
    assert stored == {
        "version": 1,
        "stages": [
            {"name": "extract", "weight": 1.0, "requires": []},
            {"name": "tts", "weight": 3.0, "requires": ["extract"]},
            {"name": "mix", "weight": 1.0, "requires": ["tts"]},
        ],
    }
    assert [r["operation"] for r in state.get_transaction_history()] == ["plan"]
    before = log_size(state)
    ProgressTracker(state, STAGES, requires=REQUIRES).close()
    ProgressTracker(state, STAGES).close()  # no requires given: the stored ones are kept
    assert log_size(state) == before
    assert state.read()["_pipeline"] == stored


def test_another_process_sees_every_stage_and_the_same_percent(
    state: PipelineState, tmp_path: Path
) -> None:
    """The issue's scenario: a tracker runs, the operator's terminal shows the same pipeline."""
    tracker = ProgressTracker(state, STAGES, requires=REQUIRES, min_interval=0)
    tracker.start("extract", total=10)
    tracker.complete("extract")
    tracker.start("tts", total=100)
    tracker.update("tts", 45)
    mine = tracker.status()

    fresh = ProgressTracker(PipelineState(state.path)).status()
    assert list(fresh["stages"]) == ["extract", "tts", "mix"]
    assert fresh["stages"]["mix"]["status"] == "pending"
    assert fresh["overall_progress"] == pytest.approx(mine["overall_progress"])
    assert fresh["stages"]["tts"]["requires"] == ["extract"]
    assert fresh["stages"]["tts"]["weight"] == 3.0

    table = status_cli(tmp_path, str(state.path))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert f"{mine['overall_progress']:.1f}% overall" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["extract", "tts", "mix"]
    assert lines[4].split()[1] == "pending"
    doc = json.loads(status_cli(tmp_path, str(state.path), "--json").stdout)
    assert list(doc["stages"]) == ["extract", "tts", "mix"]
    assert doc["overall_progress"] == pytest.approx(mine["overall_progress"])
    tracker.close()


def test_status_has_the_contract_fields(state: PipelineState) -> None:
    """Each stage carries weight, requires, attempts, owner and error beside the old fields."""
    tracker = ProgressTracker(state, STAGES, requires=REQUIRES)
    tracker.start("extract")
    tracker.fail("extract", OSError("disk full"))
    status = ProgressTracker(state).status()
    assert list(status) == ["status", "current_stage", "stages", "overall_progress", "eta_seconds"]
    extract = status["stages"]["extract"]
    assert extract["error"] == "OSError: disk full"
    assert extract["attempts"] == 1
    assert extract["owner"] is None
    assert isinstance(extract["weight"], float)
    assert status["stages"]["mix"]["attempts"] == 0
    assert status["stages"]["mix"]["error"] is None
    tracker.close()


def test_a_follower_sees_a_plan_changed_after_it_was_made(state: PipelineState) -> None:
    """A tracker made without stages re-reads the plan at every status()."""
    follower = ProgressTracker(state)
    assert follower.status()["stages"] == {}
    assert follower.status()["status"] == "pending"
    ProgressTracker(state, ["a", "b"]).close()
    assert list(follower.status()["stages"]) == ["a", "b"]
    ProgressTracker(state, ["a", "c", "b"]).close()
    assert list(follower.status()["stages"]) == ["a", "c", "b"]


def test_added_and_reordered_stages_are_one_logged_transaction(state: PipelineState) -> None:
    """A changed plan that orphans nothing is written in one commit."""
    tracker = ProgressTracker(state, ["a", "b"])
    tracker.start("a")
    tracker.complete("a")
    before = log_size(state)
    ProgressTracker(state, ["b", "a", "c"]).close()
    assert log_size(state) == before + 1
    assert [s["name"] for s in state.read()["_pipeline"]["stages"]] == ["b", "a", "c"]
    assert state.read()["a"]["status"] == "success"


def test_a_plan_that_orphans_recorded_progress_is_refused(state: PipelineState) -> None:
    """Renaming a stage with progress is refused, nothing written, unless replace_plan=True."""
    tracker = ProgressTracker(state, ["extract", "tts"])
    tracker.start("extract")
    tracker.complete("extract")
    raw = state.path.read_bytes()
    before = log_size(state)
    with pytest.raises(PlanError, match=r"'extract'.*replace_plan=True") as caught:
        ProgressTracker(state, ["extract_text", "tts"])
    assert caught.value.orphans == ["extract"]
    assert isinstance(caught.value, ProgressError)
    assert state.path.read_bytes() == raw
    assert log_size(state) == before
    # a stage with no progress may go
    ProgressTracker(state, ["extract"]).close()
    ProgressTracker(state, ["extract_text"], replace_plan=True).close()
    data = state.read()
    assert [s["name"] for s in data["_pipeline"]["stages"]] == ["extract_text"]
    assert data["extract"]["status"] == "success"  # the record stays


@pytest.mark.parametrize(
    ("requires", "match"),
    [
        ({"b": ["nope"]}, "requires 'nope', which is not a stage"),
        ({"a": ["b"], "b": ["a"]}, "cycle"),
        ({"a": ["a"]}, "requires itself"),
        ({"a": ["b"]}, "comes after it"),
        ({"zzz": ["a"]}, "not a stage of the plan"),
    ],
)
def test_a_bad_graph_is_refused_when_declared(
    state: PipelineState, requires: dict[str, list[str]], match: str
) -> None:
    """Unknown requirements, cycles and backward order are refused; nothing is written."""
    with pytest.raises(PlanError, match=match):
        ProgressTracker(state, ["a", "b"], requires=requires)
    assert not state.path.exists()


def test_a_corrupt_stored_plan_is_reported(state: PipelineState) -> None:
    """A foreign value under the reserved key is a PlanError naming the key."""
    state.write({"_pipeline": ["not", "a", "plan"]})
    with pytest.raises(PlanError, match="_pipeline"):
        ProgressTracker(state)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"version": 1, "stages": [{"name": "a", "requires": [["x"]]}]}, "must be stage names"),
        (
            {"version": 1, "stages": [{"name": "a"}, {"name": "b", "requires": [{"a": 1}]}]},
            "must be stage names",
        ),
        ({"version": [1], "stages": []}, "restore a backup"),
        ({"version": "1", "stages": []}, "restore a backup"),
    ],
)
def test_a_hand_edited_stored_plan_is_a_plan_error_naming_the_file(
    state: PipelineState, plan: dict[str, Any], match: str
) -> None:
    """Odd types in a hand-edited plan: a PlanError naming the file, never a raw TypeError."""
    state.write({"_pipeline": plan})
    with pytest.raises(PlanError, match=match) as caught:
        ProgressTracker(state)
    assert state.path.name in str(caught.value)
    with pytest.raises(PlanError, match="must be stage names"):
        ProgressTracker(state, ["a", "b"], requires={"b": [["a"]]})  # type: ignore[list-item]


def test_declare_false_writes_nothing(state: PipelineState) -> None:
    """A view over named stages never writes a plan."""
    tracker = ProgressTracker(state, ["a"], declare=False)
    assert tracker.status()["stages"]["a"]["status"] == "pending"
    assert not state.path.exists()


def test_old_phase_states_still_work(state: PipelineState) -> None:
    """Without a plan, a follower lists the phase* keys in file order."""
    data: dict[str, Any] = {"phase2": {"status": "success"}, "phase1": {"status": "running"}}
    state.write(data)
    status = ProgressTracker(state).status()
    assert list(status["stages"]) == ["phase2", "phase1"]
    assert status["overall_progress"] == 50.0
