"""Fixtures for the status app: a real uvicorn server on a free loopback port, an SSE reader.

The web extra is optional, so without it these tests are not collected and
test_extra_installed.py skips with the command that installs it; when the ``CI``
environment variable is set it fails instead, so CI never silently skips them.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState
from pipeline_common.progress import ProgressTracker

INSTALL = "pip install -e '.[test]'"


WEB = ["starlette", "uvicorn", "httpx", "fastapi"]


def missing(modules: list[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported."""
    found = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            found.append(name)
    return found


def require(modules: list[str], how: str) -> None:
    """Skip the test (fail it under CI) when a module it needs is missing, saying how to get it."""
    absent = missing(modules)
    if absent:
        message = f"{', '.join(absent)} not installed; install it with: {how}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so this may not skip: {message}", pytrace=False)
        pytest.skip(message)


# Without the web extra the test modules cannot even be imported: collect only
# test_extra_installed.py, whose one test skips (fails under CI) saying what to install.
if missing(WEB):
    collect_ignore_glob = ["test_[!e]*.py"]


PLAN = {"extract": 1.0, "tts": 3.0, "mix": 1.0}


# A child process that follows the stored plan and runs the commands given as arguments.
WRITER = """
import sys, time
from pipeline_common import PipelineState
from pipeline_common.progress import ProgressTracker

tracker = ProgressTracker(PipelineState(sys.argv[1]), min_interval=0)
started = set()
for command in sys.argv[2:]:
    verb, _, rest = command.partition(":")
    started.add(rest.partition("/")[0]) if verb == "start" else None
    if verb == "sleep":
        time.sleep(float(rest))
    elif verb == "start":
        stage, _, total = rest.partition("/")
        tracker.start(stage, total=int(total) if total else None, restart=True)
    elif verb == "update":
        stage, _, n = rest.partition("=")
        if stage not in started:  # resume the running stage in this process
            tracker.start(stage)
            started.add(stage)
        tracker.update(stage, int(n), message=f"item {n}")
    elif verb == "complete":
        tracker.complete(rest)
    elif verb == "fail":
        tracker.fail(rest, RuntimeError("disk full"))
tracker.close()
"""


def run_writer(path: Path, *commands: str) -> None:
    """Run WRITER in a fresh interpreter and wait for it."""
    subprocess.run([sys.executable, "-c", WRITER, str(path), *commands], check=True, timeout=60)


def spawn_writer(path: Path, *commands: str) -> subprocess.Popen[bytes]:
    """Start WRITER in a fresh interpreter."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), *commands])


class Served:
    """A uvicorn server running ``app`` in a thread, on a socket bound before it starts."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        import uvicorn  # the web extra: imported only by tests that required it

        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)  # in a thread: it installs no signal handler
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 10 s")
            time.sleep(0.01)

    def stop(self) -> None:
        for watcher in _watchers(self.server.config.app):
            watcher.end_streams()  # open event streams would hold the shutdown 1 s
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _watchers(app: Any) -> list[Any]:
    """The status apps' watchers in ``app``, mounted or not."""
    found = [app.state.watcher] if hasattr(getattr(app, "state", None), "watcher") else []
    for route in getattr(app, "routes", []):
        found.extend(_watchers(getattr(route, "app", None)))
    return found


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """Return a starter: ``serve(app)`` runs it on a free port and returns its base URL."""
    servers: list[Served] = []

    def start(app: Any) -> str:
        served = Served(app)
        servers.append(served)
        return served.url

    yield start
    for served in servers:
        served.stop()


@dataclass
class Event:
    """One Server-Sent Event, with the monotonic time it was read."""

    event: str
    id: str | None
    data: Any
    received: float
    wall: float


class EventStream:
    """Read an SSE stream on a thread; the test takes parsed events from a queue."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.comments: list[str] = []
        self.status_code: int | None = None
        self.headers: Any = None
        import httpx

        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=None))
        self._ready = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._read, args=(url, headers or {}), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the event stream did not answer within 10 s"

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                self.status_code = response.status_code
                self.headers = response.headers
                self._ready.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line == "":
                        if "data" in fields:
                            self.events.put(
                                Event(
                                    fields.get("event", "message"),
                                    fields.get("id"),
                                    json.loads(fields["data"]),
                                    time.monotonic(),
                                    time.time(),
                                )
                            )
                        fields = {}
                    else:
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
        except Exception:
            if not self._closed:
                raise
        finally:
            self._ready.set()

    def next(self, timeout: float = 5.0) -> Event:
        """The next event; fails the test when none comes within ``timeout`` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s") from None

    def until(self, predicate: Callable[[Event], bool], timeout: float = 5.0) -> Event:
        """Skip events until one matches ``predicate``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout} s")
            event = self.next(left)
            if predicate(event):
                return event

    def close(self) -> None:
        self._closed = True
        self._client.close()


@pytest.fixture
def sse() -> Iterator[Callable[..., EventStream]]:
    """Return an opener: ``sse(url, headers=None)`` connects an :class:`EventStream`."""
    opened: list[EventStream] = []

    def open_stream(url: str, headers: dict[str, str] | None = None) -> EventStream:
        stream = EventStream(url, headers)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


@pytest.fixture
def plan_state(state: PipelineState) -> PipelineState:
    """A state whose plan is extract, tts (weight 3), mix, with extract running at 2/10."""
    with ProgressTracker(state, PLAN) as tracker:
        tracker.start("extract", total=10, message="chapter 1")
        tracker.update("extract", 2)
    return state
