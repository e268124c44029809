"""pipeline_common: a pipeline's JSON state file that cannot be corrupted.

Re-exports only; see the modules for the code.
"""

from __future__ import annotations

from ._diff import MISSING, Change, Diff
from ._history import BackupInfo, Check, HistoryRecord, LockInfo, RepairReport, VerifyReport
from .errors import (
    StateBackupError,
    StateConflictError,
    StateDurabilityError,
    StateError,
    StateLockError,
    StateReadError,
    StateSchemaError,
    StateSerializationError,
    StateSidecarError,
    StateValidationError,
    StateWarning,
    StateWriteError,
)
from .models import PHASE_STATUSES, PhaseRecord, PipelineModel
from .pipeline import (
    Pipeline,
    PrerequisiteError,
    RunResult,
    StageBusyError,
    StageContext,
    StageFailedError,
)
from .progress import PlanError, ProgressError, ProgressTracker, StageProgress
from .retry import RetryExhaustedError, RetryHandler
from .state import PipelineState, StateTransaction

__version__ = "0.1.0"

__all__ = [
    "BackupInfo",
    "Change",
    "Check",
    "Diff",
    "HistoryRecord",
    "LockInfo",
    "MISSING",
    "PHASE_STATUSES",
    "PhaseRecord",
    "Pipeline",
    "PipelineModel",
    "PipelineState",
    "PlanError",
    "PrerequisiteError",
    "ProgressError",
    "ProgressTracker",
    "RepairReport",
    "RetryExhaustedError",
    "RetryHandler",
    "RunResult",
    "StageBusyError",
    "StageContext",
    "StageFailedError",
    "StageProgress",
    "StateBackupError",
    "StateConflictError",
    "StateDurabilityError",
    "StateError",
    "StateLockError",
    "StateReadError",
    "StateSchemaError",
    "StateSerializationError",
    "StateSidecarError",
    "StateTransaction",
    "StateValidationError",
    "StateWarning",
    "StateWriteError",
    "VerifyReport",
    "__version__",
]
