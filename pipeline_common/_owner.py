"""Who runs a stage, and whether that process is still there.

A running stage's record names its owner::

    {"pid": 4242, "host": "build-1", "since": "...Z", "proc_start": 123456}

``proc_start`` is the process start time from ``/proc/<pid>/stat`` (field 22, in clock
ticks since boot; proc(5)). A pid alone is not enough: after a crash or a reboot the
pid is often reused by another program, and the stage would then look owned forever.
Only the host that wrote the owner can judge it; another host's owner is "unknown".

An owner written by this very process carries a ``claim`` token, registered here
while the run that claimed the stage is still going (:func:`claim`, :func:`release`).
A claim of this process whose run ended without recording its outcome (a Ctrl-C
between the claim and the outcome, a failed outcome commit) is "gone", so the next
run in the same process takes the stage over instead of refusing it forever.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from ._time import now_iso

__all__ = [
    "HOST",
    "Verdict",
    "claim",
    "describe",
    "is_this_process",
    "judge",
    "mine",
    "proc_start",
    "release",
]

HOST = socket.gethostname()

Verdict = Literal["alive", "gone", "reused", "unknown"]


def proc_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None when not readable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[:1] == [b"Z"]:  # a zombie: dead, only not yet reaped by its parent
        return -1
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


_own_start: tuple[int, int | None] | None = None  # (pid, start): fixed for a process


def _own_proc_start() -> int | None:
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:  # a forked child has its own
        _own_start = (pid, proc_start(pid))
    return _own_start[1]


def mine() -> dict[str, Any]:
    """The owner record of this process, for a stage it claims now."""
    return {"pid": os.getpid(), "host": HOST, "since": now_iso(), "proc_start": _own_proc_start()}


_claims: set[str] = set()  # tokens of the claims whose run is going on in this process
_claims_lock = threading.Lock()


def claim() -> dict[str, Any]:
    """A new owner record of this process, registered as running until :func:`release`."""
    owner = mine()
    owner["claim"] = uuid.uuid4().hex
    with _claims_lock:
        _claims.add(owner["claim"])
    return owner


def release(owner: Mapping[str, Any]) -> None:
    """Forget the claim of ``owner``: its run in this process has ended."""
    with _claims_lock:
        _claims.discard(owner.get("claim"))


def is_this_process(owner: Mapping[str, Any]) -> bool:
    """True when ``owner`` was written by this very process (pid, host and start time)."""
    return (
        owner.get("host") == HOST
        and owner.get("pid") == os.getpid()
        and owner.get("proc_start") == _own_proc_start()
    )


def _ended_here(owner: Mapping[str, Any]) -> bool:
    """True for a claim made by this process whose run is over."""
    token = owner.get("claim")
    if not isinstance(token, str) or not is_this_process(owner):
        return False
    with _claims_lock:
        return token not in _claims


def judge(owner: Mapping[str, Any]) -> Verdict:
    """Whether the owner of a running stage is alive, gone, a reused pid, or unknown here."""
    pid = owner.get("pid")
    if owner.get("host") != HOST or not isinstance(pid, int) or isinstance(pid, bool):
        return "unknown"
    if pid <= 0 or _ended_here(owner):
        return "gone"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, owned by another user
    started = proc_start(pid)
    if started == -1:
        return "gone"
    recorded = owner.get("proc_start")
    if isinstance(recorded, int) and started is not None and started != recorded:
        return "reused"
    return "alive"


def describe(owner: Mapping[str, Any]) -> str:
    """``pid 4242 on build-1 since ...Z``."""
    return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
