"""The stage plan: a pipeline's stages, their order, weights and prerequisites.

The plan is kept in the state file itself, under one reserved top-level key, so it
shares the commit, the backups, the log and the history of the stage records::

    data["_pipeline"] = {
        "version": 1,
        "stages": [
            {"name": "extract", "weight": 1.0, "requires": []},
            {"name": "tts", "weight": 3.0, "requires": ["extract"]},
        ],
    }

The stage records stay at ``data[<stage name>]``. This module only reads, checks and
builds plans (plain data in, plain data out); ``progress`` and ``pipeline`` write them
through ``state.transaction()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PLAN_KEY",
    "PLAN_VERSION",
    "PlanProblem",
    "StageSpec",
    "attempts_of",
    "build",
    "from_data",
    "has_progress",
    "merge_requires",
    "phase_names",
    "to_json",
]

PLAN_KEY = "_pipeline"
PLAN_VERSION = 1


class PlanProblem(ValueError):
    """A plan that cannot be used; the caller turns it into its public error."""

    def __init__(self, message: str, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class StageSpec:
    """One stage of the plan."""

    name: str
    weight: float = 1.0
    requires: tuple[str, ...] = field(default_factory=tuple)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def build(
    stages: Sequence[str] | Mapping[str, float],
    requires: Mapping[str, Sequence[str]] | None = None,
) -> list[StageSpec]:
    """Check a declared plan and return it as specs, in order.

    Raises:
        PlanProblem: no stages, an empty or duplicate name, a bad weight, an unknown
            requirement, a cycle, or a stage listed before one it requires.
    """
    if isinstance(stages, str) or not isinstance(stages, Iterable):
        what = f"the string {stages!r}" if isinstance(stages, str) else repr(stages)
        raise PlanProblem(f"stages must be a list of names or a dict of weights, not {what}")
    pairs = list(stages.items()) if isinstance(stages, Mapping) else [(s, 1.0) for s in stages]
    if not pairs:
        raise PlanProblem("a plan needs at least one stage")
    weights: dict[str, float] = {}
    for name, weight in pairs:
        if not isinstance(name, str) or not name:
            raise PlanProblem(f"a stage name must be a non-empty string, not {name!r}")
        if name == PLAN_KEY:
            raise PlanProblem(f"{PLAN_KEY!r} is reserved for the plan itself", stage=name)
        if name in weights:
            raise PlanProblem(f"stage {name!r} is listed twice", stage=name)
        w = _number(weight)
        if w is None or not math.isfinite(w) or w <= 0:
            raise PlanProblem(
                f"the weight of stage {name!r} must be a finite number > 0, not {weight!r}",
                stage=name,
            )
        weights[name] = w
    reqs = dict(requires or {})
    for name in reqs:
        if name not in weights:
            raise PlanProblem(
                f"requirements given for {name!r}, which is not a stage of the plan "
                f"({', '.join(weights)})",
                stage=name,
            )
    specs: list[StageSpec] = []
    for name, weight in weights.items():
        given = reqs.get(name, ())
        if isinstance(given, str):
            given = (given,)
        needs: list[str] = []
        for req in given:
            if not isinstance(req, str):
                raise PlanProblem(
                    f"the requires of stage {name!r} must be stage names, not {req!r}",
                    stage=name,
                )
            if req == name:
                raise PlanProblem(f"stage {name!r} requires itself", stage=name)
            if req not in weights:
                raise PlanProblem(
                    f"stage {name!r} requires {req!r}, which is not a stage of the plan "
                    f"({', '.join(weights)})",
                    stage=name,
                )
            if req not in needs:
                needs.append(req)
        specs.append(StageSpec(name, weight, tuple(needs)))
    _check_graph(specs)
    return specs


def _check_graph(specs: list[StageSpec]) -> None:
    """Refuse a cycle, then a stage listed before one it requires (run order = plan order)."""
    graph = {s.name: s.requires for s in specs}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise PlanProblem(f"the plan has a cycle: {' -> '.join(cycle)}", stage=name)
        if name in done:
            return
        for req in graph[name]:
            visit(req, [*path, name])
        done.add(name)

    for spec in specs:
        visit(spec.name, [])
    position = {s.name: i for i, s in enumerate(specs)}
    for spec in specs:
        for req in spec.requires:
            if position[req] > position[spec.name]:
                raise PlanProblem(
                    f"stage {spec.name!r} requires {req!r}, which comes after it in the plan; "
                    f"list {req!r} first (stages run in plan order)",
                    stage=spec.name,
                )


def to_json(specs: Sequence[StageSpec]) -> dict[str, Any]:
    """The plan as it is stored under ``data[PLAN_KEY]``."""
    return {
        "version": PLAN_VERSION,
        "stages": [
            {"name": s.name, "weight": s.weight, "requires": list(s.requires)} for s in specs
        ],
    }


def from_data(data: Mapping[str, Any]) -> list[StageSpec] | None:
    """The stored plan of ``data``, or None when there is none.

    Raises:
        PlanProblem: the stored plan is malformed or from a newer version of the library.
    """
    raw = data.get(PLAN_KEY)
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list):
        raise PlanProblem(
            f"data[{PLAN_KEY!r}] is not a stage plan (an object with a 'stages' list); "
            "it is reserved for the plan: restore a backup or remove the key"
        )
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < PLAN_VERSION:
        raise PlanProblem(
            f"data[{PLAN_KEY!r}] has plan version {version!r}, which no version of this "
            "library writes; it is reserved for the plan: restore a backup or remove the key"
        )
    if version != PLAN_VERSION:
        raise PlanProblem(
            f"data[{PLAN_KEY!r}] has plan version {version!r}; this library reads version "
            f"{PLAN_VERSION}: upgrade pipeline_common"
        )
    weights: dict[str, float] = {}
    requires: dict[str, list[str]] = {}
    for entry in raw["stages"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PlanProblem(f"data[{PLAN_KEY!r}]['stages'] has a malformed entry: {entry!r}")
        name = entry["name"]
        weights[name] = entry.get("weight", 1.0)
        reqs = entry.get("requires", [])
        if not isinstance(reqs, list):
            raise PlanProblem(
                f"data[{PLAN_KEY!r}]: the requires of stage {name!r} is not a list", stage=name
            )
        requires[name] = reqs
    if len(weights) != len(raw["stages"]):
        raise PlanProblem(f"data[{PLAN_KEY!r}] lists a stage twice")
    try:
        return build(weights, requires)
    except PlanProblem as exc:
        raise PlanProblem(f"the stored plan in data[{PLAN_KEY!r}] is invalid: {exc}") from exc


def merge_requires(new: list[StageSpec], old: list[StageSpec] | None) -> list[StageSpec]:
    """Keep the stored prerequisites of stages declared without any (a plain tracker).

    A requirement on a stage that is no longer in the plan is dropped.
    """
    if not old:
        return new
    stored = {s.name: s.requires for s in old}
    position = {s.name: i for i, s in enumerate(new)}
    merged = []
    for i, spec in enumerate(new):
        kept = tuple(r for r in stored.get(spec.name, ()) if position.get(r, i) < i)
        merged.append(StageSpec(spec.name, spec.weight, kept))
    return merged


def has_progress(record: object) -> bool:
    """True when a stage record holds anything beyond a pending status."""
    if not isinstance(record, dict):
        return record is not None
    return any(k != "status" for k in record) or record.get("status") not in (None, "pending")


def phase_names(data: Mapping[str, Any]) -> list[str]:
    """The ``phase*`` keys of an old state without a plan, in the file's order."""
    return [k for k, v in data.items() if k.startswith("phase") and isinstance(v, dict)]


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def attempts_of(record: Mapping[str, Any]) -> int:
    """The attempts started on a stage since its last reset.

    The runner counts its runs in ``attempts``; a stage with retries counts the attempts
    of the current series in RetryHandler's ledger, on top of ``attempts_base`` (the
    attempts before that series). A stage only a tracker ran counts 1 once started.
    """
    runs = _count(record.get("attempts"))
    ledger = record.get("retry")
    series = None
    if isinstance(ledger, dict):
        # RetryHandler zeroes attempts on success and keeps the count in succeeded_after.
        series = _count(ledger.get("attempts")) or _count(ledger.get("succeeded_after"))
    if series:
        return (_count(record.get("attempts_base")) or 0) + series
    if runs is not None:
        return runs
    progress = record.get("progress")
    return 1 if isinstance(progress, dict) and progress.get("started_at") else 0
