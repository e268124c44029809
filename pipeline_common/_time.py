"""Timestamps as the library writes them: ISO 8601, UTC, microseconds, ending in Z."""

from __future__ import annotations

import time
from datetime import datetime, timezone

__all__ = ["iso", "now_iso", "parse_iso"]


def iso(ts: float) -> str:
    """Format a POSIX timestamp as ``2026-11-22T23:21:57.957576Z``."""
    text = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def now_iso() -> str:
    """The current time, formatted by :func:`iso`."""
    return iso(time.time())


def parse_iso(text: object) -> float | None:
    """Parse what :func:`iso` writes (or any ISO 8601 string) to a POSIX timestamp.

    Returns None for anything that is not such a string. Python 3.10's
    ``fromisoformat`` does not accept the ``Z`` suffix, hence the replace.
    """
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
