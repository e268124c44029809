"""One watcher per served state file: parse each commit once, fan it out to every client.

A daemon thread stats the state file and its log every ``poll_interval`` seconds (two
``stat`` calls, no parsing). When either changed, it reads the committed version once,
derives the snapshot once, serializes it once, and hands the same bytes to every
connected client's bounded queue through its event loop. A slow client whose queue is
full loses its oldest queued view, never the newest: memory stays bounded, and the
newest state always arrives.

What the watcher knows at any moment is a :class:`View`: the newest good snapshot and,
when the file is missing, corrupt or locked for long, the problem.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .._time import parse_iso
from ..errors import StateError, StateReadError
from ..progress import ProgressError
from ._snapshot import PinnedState, build_snapshot, classify

__all__ = ["Client", "StateWatcher", "View", "dumps"]

_logger = logging.getLogger(__name__)

QUEUE_SIZE = 16  # views queued per client before the oldest is dropped
_LOCK_CHECK_EVERY = 1.0  # seconds between lock probes while nothing commits


def dumps(value: Any) -> bytes:
    """JSON bytes; the stdlib takes over for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class View:
    """What the watcher knows after one refresh, ready to send.

    Attributes:
        seq: Increases with every published view (a client skips views it has seen).
        events: The event names: ``snapshot`` for the first view, then what changed
            (one event, plus ``pipeline_completed``/``pipeline_failed`` when it ended).
        generation: The generation shown (None when the file was never read).
        snapshot: The newest good snapshot (kept while a problem is shown).
        problem: ``{"type", "kind", "message", "path"}`` when the state cannot be shown.
        frame: The Server-Sent Events frame of this view.
        first_frame: The frame a client gets when it connects (event ``snapshot``).
        body: The ``/api/status`` body: the snapshot, or ``{"error": problem}``.
    """

    seq: int
    events: list[str]
    generation: int | None
    snapshot: dict[str, Any] | None
    problem: dict[str, Any] | None
    frame: bytes = field(repr=False)
    first_frame: bytes = field(repr=False)
    body: bytes = field(repr=False)


def _frame(event: str, payload: bytes, generation: int | None) -> bytes:
    head = f"id: {generation}\n" if generation is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + payload + b"\n\n"


def _with_status(
    event: str, stage: str | None, transitions: list[dict[str, Any]], status: bytes
) -> bytes:
    """``{"event", "stage", "transitions", "status"}`` around already serialized status bytes."""
    head = dumps({"event": event, "stage": stage, "transitions": transitions})
    return head[:-1] + b',"status":' + status + b"}"


def _make_view(
    seq: int,
    events: list[str],
    generation: int | None,
    snapshot: dict[str, Any] | None,
    problem: dict[str, Any] | None,
    *,
    stage: str | None = None,
    transitions: list[dict[str, Any]] | None = None,
) -> View:
    if problem is not None:
        payload = dumps({"event": "state_error", "error": problem, "status": snapshot})
        body = dumps({"error": problem})
        frame = first = _frame("state_error", payload, None)
    else:
        body = dumps(snapshot)  # serialized once; every frame embeds these bytes
        frame = b"".join(
            _frame(e, _with_status(e, stage, transitions or [], body), generation) for e in events
        )
        first = _frame("snapshot", _with_status("snapshot", stage, [], body), generation)
    return View(seq, events, generation, snapshot, problem, frame, first, body)


class Client:
    """One connected event stream: a bounded queue fed from the watcher's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = QUEUE_SIZE) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[View | None] = asyncio.Queue(size)
        self.dropped = 0

    def offer(self, view: View | None) -> None:
        """Queue ``view`` (None ends the stream); on a full queue, drop the oldest. Loop only."""
        while True:
            try:
                self.queue.put_nowait(view)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()
                self.dropped += 1


def _problem(
    kind: str, exc_type: str, message: str, path: os.PathLike[str] | str
) -> dict[str, Any]:
    return {"type": exc_type, "kind": kind, "message": message, "path": str(path)}


class StateWatcher:
    """Follow one state file and publish a :class:`View` after every change.

    Args:
        state: The state to follow (read only: the watcher never writes or locks it
            beyond a non-blocking probe of the lock while nothing commits).
        poll_interval: Seconds between two looks at the file and its log.
        lock_stale_after: A lock held this long with no commit is reported as a problem.
        idle_after: With no client and no request for this long, the thread stops;
            the next request starts it again.
    """

    def __init__(
        self,
        state: PinnedState,
        *,
        poll_interval: float = 0.1,
        lock_stale_after: float = 30.0,
        idle_after: float = 60.0,
    ) -> None:
        self.state = state
        self.poll_interval = poll_interval
        self.lock_stale_after = lock_stale_after
        self.idle_after = idle_after
        # _work serializes reading the file (slow: a parse, maybe a wait for the log);
        # _guard only guards the client set and the thread, so an event loop that
        # (un)subscribes a client never waits for a parse.
        self._work = threading.Lock()
        self._guard = threading.Lock()
        self._clients: dict[asyncio.AbstractEventLoop, set[Client]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._view: View | None = None
        self._seq = 0
        self._last_change = time.monotonic()
        self._last_lock_check = 0.0
        self._last_touch = time.monotonic()

    # -- public ----------------------------------------------------------------

    @property
    def view(self) -> View:
        """The newest view (starts the watcher if needed)."""
        return self.ensure_started()

    @property
    def refreshes(self) -> int:
        """How many times a version of the file was parsed (for tests and benchmarks)."""
        return self.state.decodes

    @property
    def latest(self) -> View | None:
        """The newest view published, without starting anything."""
        return self._view

    @property
    def client_count(self) -> int:
        """How many event streams are connected."""
        with self._guard:
            return sum(len(c) for c in self._clients.values())

    def ensure_started(self) -> View:
        """Start the thread if it is not running; return the newest view. Thread-safe."""
        with self._guard:
            self._last_touch = time.monotonic()
            view = self._view if self._running() else None
        if view is not None:
            return view
        with self._work:
            with self._guard:
                if self._running() and self._view is not None:
                    return self._view
            self._stop.clear()
            key = self._key()
            self._refresh(key)
            with self._guard:
                self._thread = threading.Thread(
                    target=self._run,
                    args=(key,),
                    name=f"pipeline-watch {self.state.path.name}",
                    daemon=True,
                )
                self._thread.start()
            assert self._view is not None
            return self._view

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def subscribe(self, client: Client) -> Callable[[], None]:
        """Deliver every new view to ``client``; return the unsubscriber."""
        with self._guard:
            self._clients.setdefault(client.loop, set()).add(client)

        def unsubscribe() -> None:
            with self._guard:
                clients = self._clients.get(client.loop)
                if clients is not None:
                    clients.discard(client)
                    if not clients:
                        del self._clients[client.loop]
                self._last_touch = time.monotonic()

        return unsubscribe

    def end_streams(self) -> None:
        """End every connected event stream (a server shutting down); safe from any thread."""
        with self._guard:
            self._fan_out(None)

    def close(self) -> None:
        """Stop the thread and end every connected stream."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        with self._guard:
            self._fan_out(None)

    # -- the thread ----------------------------------------------------------------

    def _key(self) -> tuple[object, object]:
        return (_stat(self.state.path, log=False), _stat(self.state.log_path, log=True))

    def _run(self, seen: tuple[object, object]) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                key = self._key()
                with self._work:
                    if key != seen:
                        seen = key
                        self._refresh(key)
                    else:
                        self._maybe_check_lock()
                with self._guard:
                    if self._idle_locked():
                        self._thread = None
                        return
            except Exception:  # never let the thread die: log, and look again
                _logger.exception("watching %s failed; retrying", self.state.path)

    def _idle_locked(self) -> bool:
        return not self._clients and time.monotonic() - self._last_touch > self.idle_after

    def _refresh(self, key: tuple[object, object]) -> None:
        """Read the version behind ``key`` (parsing only a new file) and publish it."""
        self._last_change = time.monotonic()
        before = self._view
        good = before.snapshot if before is not None else None
        state_key = key[0]
        try:
            if state_key is None:
                raise FileNotFoundError
            # Parsed again only when the bytes differ (PinnedState._decode): the side of
            # a commit seen in the log alone costs a read, not a parse.
            data, generation = self.state.read_versioned(wait=1.0)
            snapshot = build_snapshot(self.state, data, generation)
        except FileNotFoundError:
            self._publish(
                ["state_error"],
                None,
                good,
                _problem(
                    "missing",
                    "FileNotFoundError",
                    f"{self.state.path} does not exist: the pipeline has not started yet, "
                    "or the path is wrong. This page updates when the file appears.",
                    self.state.path,
                ),
            )
            return
        except StateError as exc:
            kind = _kind(exc)
            path = getattr(exc, "path", None) or self.state.path
            self._publish(
                ["state_error"], None, good, _problem(kind, type(exc).__name__, str(exc), path)
            )
            return
        if (
            before is not None
            and before.problem is None
            and before.snapshot is not None
            and before.generation == generation
            and before.snapshot["log"] == snapshot["log"]
        ):
            return  # the log's side of a commit already shown: nothing new to see
        events, stage, transitions = classify(good, snapshot)
        if before is not None and events == ["snapshot"]:
            events = ["progress"]  # recovered from a problem with no good snapshot before
        self._publish(events, generation, snapshot, None, stage=stage, transitions=transitions)

    def _maybe_check_lock(self) -> None:
        """While nothing commits for long, probe the lock: a stuck writer is a problem."""
        now = time.monotonic()
        if now - self._last_change < self.lock_stale_after:
            return
        if now - self._last_lock_check < _LOCK_CHECK_EVERY:
            return
        self._last_lock_check = now
        view = self._view
        try:
            info = self.state.lock_info()
        except StateError:
            return
        since = parse_iso((info.holder or {}).get("since"))
        age = time.time() - since if since is not None else None
        stuck = info.held and (age is None or age >= self.lock_stale_after)
        locked = view is not None and view.problem is not None and view.problem["kind"] == "locked"
        if stuck and not locked:
            holder = info.holder or {}
            held = f"for {age:.0f} s " if age is not None else ""
            problem = _problem(
                "locked",
                "StateLockError",
                f"the lock on {self.state.path} has been held {held}by pid {holder.get('pid')} "
                f"on {holder.get('host')} for {holder.get('operation')!r} with no commit: that "
                "writer may be stuck. The page shows the last committed state.",
                self.state.lock_path,
            )
            self._publish(
                ["state_error"],
                view.generation if view else None,
                view.snapshot if view else None,
                problem,
            )
        elif locked and not info.held and view is not None:
            self._last_change = now
            self._view = None  # republish the last good state as fresh
            self._refresh(self._key())

    def _publish(
        self,
        events: list[str],
        generation: int | None,
        snapshot: dict[str, Any] | None,
        problem: dict[str, Any] | None,
        *,
        stage: str | None = None,
        transitions: list[dict[str, Any]] | None = None,
    ) -> None:
        if self._view is None and problem is None:
            events = ["snapshot"]
        self._seq += 1
        self._view = _make_view(
            self._seq, events, generation, snapshot, problem, stage=stage, transitions=transitions
        )
        with self._guard:
            self._fan_out(self._view)

    def _fan_out(self, view: View | None) -> None:
        """Hand ``view`` to every client: one callback per event loop, not per client.

        Called with ``_guard`` held.
        """
        groups = list(self._clients.items())
        for loop, clients in groups:
            batch = list(clients)
            try:
                loop.call_soon_threadsafe(_deliver, batch, view)
            except RuntimeError:  # that loop is closed: its clients are gone
                self._clients.pop(loop, None)


def _kind(exc: StateError) -> str:
    """``corrupt`` (not a valid state), ``invalid`` (a stage record or the plan), or
    ``unreadable`` (the file or its log cannot be read)."""
    if isinstance(exc, StateReadError) and not isinstance(exc.__cause__, OSError):
        return "corrupt"
    if isinstance(exc, ProgressError):
        return "invalid"
    return "unreadable"


def _deliver(clients: list[Client], view: View | None) -> None:
    for client in clients:
        client.offer(view)


def _stat(path: os.PathLike[str], *, log: bool) -> object:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return ("error", exc.errno)
    if log:
        return (st.st_size, st.st_mtime_ns)
    return (st.st_ino, st.st_mtime_ns, st.st_size)
