"""Defer a Ctrl-C that lands as a transaction's ``__exit__`` starts.

CPython runs a signal handler at the next check point, and the first one after a
``with`` block's last statement is often the entry of ``__exit__`` itself: a
``KeyboardInterrupt`` raised there leaves before any of our code runs, so no
``finally`` can release the lock. While a transaction is open on the main thread (the
only thread that runs signal handlers), SIGINT goes through :func:`_on_sigint`: at any
other point it calls the previous handler at once (so a block or a lock wait stays
interruptible); in ``__exit__`` it is noted, and :func:`release` raises it once the
bookkeeping is consistent again. Every other function of the package restores its
bookkeeping on any exception, so only this one point needs deferring.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from types import CodeType, FrameType
from typing import Any

try:  # the C module: signal.signal()'s enum wrapping costs ~5 us a call, twice a commit
    _raw: Any = importlib.import_module("_signal")
except ImportError:  # pragma: no cover - interpreters without it
    _raw = signal

__all__ = ["defer_in", "install", "release"]

_codes: set[CodeType] = set()  # frames of these functions defer SIGINT
_owner: object | None = None  # the transaction that installed the handler
_previous: Any = None  # the handler it replaced
_pending = False  # a SIGINT arrived in a deferring frame


def defer_in(code: CodeType) -> None:
    """Defer SIGINT that arrives while a frame of ``code`` runs its first steps."""
    _codes.add(code)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _pending
    if frame is not None and frame.f_code in _codes:
        _pending = True
        return
    _previous(signum, frame)


def install(owner: object) -> None:
    """Route SIGINT through the deferring handler until ``release(owner)``.

    A no-op off the main thread, when another transaction installed it already, or
    when SIGINT is ignored or left to the OS (then Ctrl-C raises nothing here).
    """
    global _owner, _previous
    if _owner is not None or threading.get_ident() != threading.main_thread().ident:
        return
    current = _raw.getsignal(signal.SIGINT)
    if not callable(current) or current is _on_sigint:
        return
    _previous = current
    _raw.signal(signal.SIGINT, _on_sigint)
    _owner = owner


def release(owner: object) -> None:
    """Undo :func:`install` for ``owner``; then deliver a deferred SIGINT, if any.

    Safe to call again (a second call finds nothing to do), so callers retry it.
    """
    global _owner, _pending
    if _owner is owner:
        _owner = None
        if _raw.getsignal(signal.SIGINT) is _on_sigint:  # unless the block replaced it
            _raw.signal(signal.SIGINT, _previous)
    if _pending and threading.get_ident() == threading.main_thread().ident:
        _pending = False
        _previous(signal.SIGINT, sys._getframe())  # default_int_handler raises KeyboardInterrupt
