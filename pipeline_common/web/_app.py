"""The status app: one page and a read-only JSON and Server-Sent Events API for one state file.

Every route is ``GET`` (Starlette adds ``HEAD``); any other method gets 405, so nothing
served here can change the state. The page and the API use relative URLs only, so the
app works mounted under any prefix.

Why no sse-starlette: the stream here is twenty lines, and every client must get the very
same bytes the watcher serialized once per commit; sse-starlette encodes each event per
client and adds a process-wide shutdown hook. Starlette's ``StreamingResponse`` already
ends the stream when the client disconnects.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import StateError
from ..state import PipelineState
from ._snapshot import PinnedState, record_json
from ._watcher import Client, StateWatcher, View, dumps

__all__ = ["status_app"]

HISTORY_LIMIT = 1000  # most records /api/history returns at once

_PAGE = resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")


def _csp(page: str) -> str:
    """A Content-Security-Policy that allows exactly the page's inline script and style."""

    def digest(tag: str) -> str:
        match = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        body = match.group(1) if match else ""
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    return (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
        "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'"
    )


_PAGE_HEADERS = {
    "Content-Security-Policy": _csp(_PAGE),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_JSON = "application/json"
_NO_CACHE = {"Cache-Control": "no-store"}


def _json_response(body: bytes, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type=_JSON, headers=_NO_CACHE)


def _view_response(view: View) -> Response:
    return _json_response(view.body, 503 if view.problem is not None else 200)


class _StatusApp:
    """The routes of one status app, around its :class:`StateWatcher`."""

    def __init__(self, watcher: StateWatcher, ping_interval: float) -> None:
        self.watcher = watcher
        self.ping_interval = ping_interval

    async def view(self) -> View:
        """The newest view; starting the watcher (a first read) happens off the loop."""
        return await anyio.to_thread.run_sync(self.watcher.ensure_started)

    async def page(self, request: Request) -> Response:
        # Relative API URLs need the page's URL to end in "/" (a mount at /pipeline
        # is reached as /pipeline/).
        if not request.url.path.endswith("/"):
            return RedirectResponse(request.url.replace(path=request.url.path + "/"), 307)
        return Response(_PAGE, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    async def status(self, request: Request) -> Response:
        return _view_response(await self.view())

    async def health(self, request: Request) -> Response:
        view = await self.view()
        body = {
            "ok": True,
            "path": str(self.watcher.state.path),
            "generation": view.generation,
            "state_ok": view.problem is None,
            "problem": view.problem,
            "clients": self.watcher.client_count,
        }
        return _json_response(dumps(body))

    async def history(self, request: Request) -> Response:
        text = request.query_params.get("limit", "50")
        try:
            limit = int(text)
            if not 1 <= limit <= HISTORY_LIMIT:
                raise ValueError
        except ValueError:
            problem = {
                "type": "ValueError",
                "kind": "bad_request",
                "message": f"limit must be an integer from 1 to {HISTORY_LIMIT}, not {text!r}",
                "path": str(self.watcher.state.path),
            }
            return _json_response(dumps({"error": problem}), 400)
        state = self.watcher.state
        try:
            records = await anyio.to_thread.run_sync(state.get_transaction_history, limit)
        except StateError as exc:
            problem = {
                "type": type(exc).__name__,
                "kind": "unreadable",
                "message": str(exc),
                "path": str(getattr(exc, "path", None) or state.log_path),
            }
            return _json_response(dumps({"error": problem}), 503)
        return _json_response(
            dumps({"path": str(state.path), "records": [record_json(r) for r in records]})
        )

    async def events(self, request: Request) -> Response:
        if request.method == "HEAD":  # headers only: a stream would never end
            return Response(media_type="text/event-stream", headers=_NO_CACHE)
        first = await self.view()
        return StreamingResponse(
            self._stream(first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, first: View) -> AsyncIterator[bytes]:
        """The event stream: the current view at once, each new one, a ping when quiet."""
        # Subscribed here, not in the handler: a response that never starts never
        # runs this generator's finally, and would leave its client subscribed.
        client = Client(asyncio.get_running_loop())
        unsubscribe = self.watcher.subscribe(client)
        try:
            # Whatever Last-Event-ID says, the client gets the whole current state at once:
            # each event carries the full snapshot, so nothing older is needed.
            latest = self.watcher.latest
            newest = latest if latest is not None and latest.seq > first.seq else first
            yield b"retry: 2000\n\n" + newest.first_frame
            seen = newest.seq
            while True:
                try:
                    view = await asyncio.wait_for(client.queue.get(), self.ping_interval)
                except asyncio.TimeoutError:
                    yield b": ping\n\n"
                    continue
                if view is None:
                    return
                if view.seq <= seen:
                    continue
                seen = view.seq
                yield view.frame
        finally:
            unsubscribe()


def status_app(
    path_or_state: str | os.PathLike[str] | PipelineState,
    *,
    ping_interval: float = 15.0,
    poll_interval: float = 0.1,
    lock_stale_after: float = 30.0,
) -> Starlette:
    """Build the ASGI app that shows one pipeline's state: a page and a read-only API.

    Mount it in an existing app (``app.mount("/pipeline", status_app("pipeline.json"))``)
    or serve it alone (``pipeline-state serve pipeline.json``). Routes: ``/`` (the page),
    ``/api/status``, ``/api/events`` (Server-Sent Events), ``/api/history?limit=N``,
    ``/api/health``; see docs/watching.md.

    Args:
        path_or_state: The state file, or a :class:`PipelineState` on it (only its path
            is used: the app never writes).
        ping_interval: Seconds between ``: ping`` comments on a quiet event stream.
        poll_interval: Seconds between two looks at the file (a ``stat``, no parsing).
        lock_stale_after: A lock held this long while nothing commits is shown as a
            problem (the writer may be stuck).

    Returns:
        A Starlette app; ``app.state.watcher`` is its watcher (``close()`` stops it).
    """
    path = path_or_state.path if isinstance(path_or_state, PipelineState) else path_or_state
    watcher = StateWatcher(
        PinnedState(Path(os.fspath(path))),
        poll_interval=poll_interval,
        lock_stale_after=lock_stale_after,
    )
    routes = _StatusApp(watcher, ping_interval)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Runs only when this app is the server's app; a mounted app's watcher is a
        # daemon thread that stops itself when idle.
        yield
        await anyio.to_thread.run_sync(watcher.close)

    app = Starlette(
        routes=[
            Route("/", routes.page, methods=["GET"]),
            Route("/api/status", routes.status, methods=["GET"]),
            Route("/api/events", routes.events, methods=["GET"]),
            Route("/api/history", routes.history, methods=["GET"]),
            Route("/api/health", routes.health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.watcher = watcher
    return app
