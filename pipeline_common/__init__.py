"""pipeline_common: a pipeline's JSON state file that cannot be corrupted.

Re-exports only; see the modules for the code.
"""

from __future__ import annotations

from .errors import (
    StateBackupError,
    StateDurabilityError,
    StateError,
    StateLockError,
    StateReadError,
    StateSerializationError,
    StateSidecarError,
    StateValidationError,
    StateWarning,
    StateWriteError,
)
from .models import PHASE_STATUSES, PhaseRecord, PipelineModel
from .state import PipelineState, StateTransaction

__version__ = "0.1.0"

__all__ = [
    "PHASE_STATUSES",
    "PhaseRecord",
    "PipelineModel",
    "PipelineState",
    "StateBackupError",
    "StateDurabilityError",
    "StateError",
    "StateLockError",
    "StateReadError",
    "StateSerializationError",
    "StateSidecarError",
    "StateTransaction",
    "StateValidationError",
    "StateWarning",
    "StateWriteError",
    "__version__",
]
