"""``async with state.atransaction()``: a transaction driven from an event loop.

The lock wait, the read and the commit run on one worker thread per transaction,
so the loop never blocks and the lock is taken and released on the same thread.
The open transaction is visible to the task through a context variable, so a nested
``state.transaction()`` in the same task joins it instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import StateTransaction

__all__ = ["AsyncTransaction", "async_active"]

_open: contextvars.ContextVar[dict[str, StateTransaction] | None] = contextvars.ContextVar(
    "pipeline_common_async_transactions", default=None
)


def async_active(lock_path: str) -> StateTransaction | None:
    """The async transaction this task has open on ``lock_path``, if any."""
    mapping = _open.get()
    return mapping.get(lock_path) if mapping else None


class AsyncTransaction:
    """Async context manager around one :class:`StateTransaction`."""

    def __init__(self, txn: StateTransaction) -> None:
        self._txn = txn
        self._executor: ThreadPoolExecutor | None = None
        self._token: contextvars.Token[dict[str, StateTransaction] | None] | None = None

    async def __aenter__(self) -> StateTransaction:
        key = str(self._txn.state.lock_path)
        outer = async_active(key)
        if outer is not None:  # nested in the same task: join on the loop, no thread
            return self._txn.__enter__()
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pipeline-txn")
        entering = loop.run_in_executor(self._executor, self._txn.__enter__)
        try:
            txn = await asyncio.shield(entering)
        except asyncio.CancelledError:
            # The worker may still get the lock: let it, then roll back on that thread.
            try:
                await entering
                await loop.run_in_executor(
                    self._executor, self._txn.__exit__, asyncio.CancelledError, None, None
                )
            except BaseException:  # noqa: BLE001 - the cancellation is what we re-raise
                pass
            self._executor.shutdown(wait=False)
            raise
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._token = _open.set({**(_open.get() or {}), key: txn})
        return txn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._executor is None:  # joined an outer transaction
            self._txn.__exit__(exc_type, exc, tb)
            return
        if self._token is not None:
            # Tasks created inside the block copied the mapping's reference: close the
            # transaction for them too, so they never join a finished transaction.
            mapping = _open.get()
            if mapping is not None:
                mapping.pop(str(self._txn.state.lock_path), None)
            _open.reset(self._token)
        loop = asyncio.get_running_loop()
        finishing = loop.run_in_executor(self._executor, self._txn.__exit__, exc_type, exc, tb)
        try:
            # Shielded: a cancelled task still finishes its commit or rollback and unlocks.
            await asyncio.shield(finishing)
        finally:
            self._executor.shutdown(wait=False)
