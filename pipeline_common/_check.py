"""Checks of public arguments, made when an argument is given, before anything is written.

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, with
a message that names the argument. ``bool`` is refused where a number is meant (it is
an ``int`` subclass, so ``max_backups=True`` would otherwise mean 1).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_bool", "check_callable", "check_int", "check_name", "check_seconds"]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(name: str, value: object, *, optional: bool = False) -> None:
    """``value`` must be True or False (or None when ``optional``)."""
    if (optional and value is None) or isinstance(value, bool):
        return
    raise TypeError(f"{name} must be True or False{' or None' if optional else ''}, not {value!r}")


def check_int(name: str, value: object, *, minimum: int = 0, optional: bool = False) -> None:
    """``value`` must be an int >= ``minimum`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be an int >= {minimum}{' or None' if optional else ''}, "
            f"not {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")


def check_seconds(
    name: str,
    value: object,
    *,
    optional: bool = False,
    positive: bool = False,
    forever: bool = False,
) -> None:
    """``value`` must be a finite number of seconds >= 0 (> 0 when ``positive``);
    ``forever`` also allows ``float("inf")``."""
    if optional and value is None:
        return
    bound = "> 0" if positive else ">= 0"
    if not _number(value):
        raise TypeError(
            f"{name} must be a number of seconds {bound}{' or None' if optional else ''}, "
            f"not {type(value).__name__} {value!r}"
        )
    number: Any = value
    if math.isnan(number) or (math.isinf(number) and not (forever and number > 0)):
        bad = True
    else:
        bad = number < 0 or (positive and number == 0)
    if bad:
        raise ValueError(
            f"{name} must be a finite number of seconds {bound}"
            f"{' (None waits forever)' if optional else ''}, not {value!r}"
        )


def check_name(name: str, value: object) -> None:
    """``value`` must be a non-empty str that can be encoded (no lone surrogates)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a non-empty str, not {type(value).__name__} {value!r}")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty str, not {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be valid text (no lone surrogates), not {value!r}") from None


def check_callable(name: str, value: object, *, optional: bool = False) -> None:
    """``value`` must be callable (or None when ``optional``)."""
    if (optional and value is None) or callable(value):
        return
    raise TypeError(f"{name} must be callable, not {type(value).__name__} {value!r}")
