"""Pydantic models: the default pipeline schema.

The default schema checks only what every pipeline shares and allows everything
else, so adopting the library never rejects an existing ``pipeline.json``:

- any top-level key is allowed;
- a top-level key starting with ``phase`` must map to an object;
- a phase's ``status``, when present, is one of :data:`PHASE_STATUSES`.

Pass your own model with ``PipelineState(path, schema=MyModel)``; any Pydantic v2
``BaseModel`` subclass works. Validation checks the data; the file keeps exactly the
caller's JSON (defaults of the model are not written into it).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = ["PHASE_STATUSES", "PhaseRecord", "PhaseStatus", "PipelineModel"]

PhaseStatus = Literal["pending", "running", "success", "failed", "skipped"]
PHASE_STATUSES: tuple[str, ...] = get_args(PhaseStatus)


class PhaseRecord(BaseModel):
    """One phase's record: a status from the phase vocabulary, anything else beside it."""

    model_config = ConfigDict(extra="allow")

    status: PhaseStatus | None = None


class PipelineModel(BaseModel):
    """The default schema: ``phase*`` keys hold phase records; other keys are free."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _check_phases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        problems: list[str] = []
        for key, value in data.items():
            if not (isinstance(key, str) and key.startswith("phase")):
                continue
            if not isinstance(value, dict):
                problems.append(f"{key} must be an object, not {type(value).__name__}")
                continue
            status = value.get("status")
            if status is None or status in PHASE_STATUSES:
                continue
            try:
                PhaseRecord.model_validate({"status": status})
            except ValidationError:
                problems.append(
                    f"{key}.status is {status!r}; expected one of {', '.join(PHASE_STATUSES)}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return data
