"""The status API and its event stream, through HTTP against a real uvicorn server."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline_common import PipelineState
from pipeline_common._time import parse_iso
from pipeline_common.progress import ProgressTracker
from pipeline_common.web import status_app

from .conftest import PLAN, EventStream, run_writer, spawn_writer

Serve = Callable[[Any], str]
Sse = Callable[..., EventStream]


def fingerprint(state: PipelineState) -> tuple[Any, ...]:
    """Everything a write would change: the state's bytes and inode, the log, the backups."""
    st = os.stat(state.path)
    log = state.log_path.read_bytes() if state.log_path.exists() else b""
    backups = sorted(p.name for p in state.backups_dir.iterdir())
    return (
        st.st_ino,
        st.st_mtime_ns,
        state.path.read_bytes(),
        hashlib.sha256(log).digest(),
        backups,
    )


def test_status_is_the_trackers_status_plus_generation(
    plan_state: PipelineState, serve: Serve
) -> None:
    """/api/status holds the seed's fields, every plan stage in order, and the generation."""
    url = serve(status_app(plan_state.path))
    body = httpx.get(f"{url}/api/status").json()
    expected = ProgressTracker(PipelineState(plan_state.path)).status()
    assert list(body["stages"]) == list(PLAN) == list(expected["stages"])
    assert body["status"] == expected["status"] == "running"
    assert body["current_stage"] == "extract"
    assert body["overall_progress"] == pytest.approx(expected["overall_progress"])
    assert body["generation"] == plan_state.version
    extract = body["stages"]["extract"]
    assert (extract["current"], extract["total"], extract["progress_percent"]) == (2, 10, 20.0)
    for key in ("elapsed_seconds", "eta_seconds", "attempts", "owner", "error", "message"):
        assert key in extract
    assert body["log"][0]["generation"] == plan_state.version
    assert len(body["log"]) == min(plan_state.version, 20)


def test_history_returns_the_newest_records(plan_state: PipelineState, serve: Serve) -> None:
    """/api/history?limit=N returns the N newest log records; a bad limit is a 400."""
    url = serve(status_app(plan_state.path))
    records = httpx.get(f"{url}/api/history?limit=2").json()["records"]
    assert [r["seq"] for r in records] == [r["seq"] for r in plan_state.get_transaction_history(2)]
    assert len(records) == 2
    assert records[0]["success"] is True
    bad = httpx.get(f"{url}/api/history?limit=zero")
    assert bad.status_code == 400
    assert "limit" in bad.json()["error"]["message"]


def test_health_answers_even_when_the_state_is_missing(state_path: Path, serve: Serve) -> None:
    """/api/health is 200 while the server runs, and names the state's problem."""
    url = serve(status_app(state_path))
    body = httpx.get(f"{url}/api/health").json()
    assert body["ok"] is True
    assert body["state_ok"] is False
    assert body["problem"]["kind"] == "missing"


def test_no_method_changes_the_state(plan_state: PipelineState, serve: Serve, sse: Sse) -> None:
    """Every route answers GET only: POST, PUT, PATCH and DELETE get 405, and no byte changes."""
    url = serve(status_app(plan_state.path))
    before = fingerprint(plan_state)
    stream = sse(f"{url}/api/events")
    stream.next()
    for route in ("/", "/api/status", "/api/events", "/api/history", "/api/health"):
        if route != "/api/events":  # a stream: it was read above
            assert httpx.get(f"{url}{route}", timeout=5).status_code == 200
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            response = httpx.request(method, f"{url}{route}", json={"phase1": {}})
            assert response.status_code == 405, (method, route)
    time.sleep(0.3)  # the watcher polls meanwhile
    assert fingerprint(plan_state) == before


def test_a_commit_from_another_process_reaches_a_client_within_one_second(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """Each commit of a writer process arrives as an event well within 1 s (delay measured)."""
    url = serve(status_app(plan_state.path))
    stream = sse(f"{url}/api/events")
    first = stream.next()
    assert first.event == "snapshot"
    assert first.id == str(plan_state.version)
    # uneven gaps, so the commits fall at different moments of the 0.1 s poll
    gaps = ["sleep:0.21", "sleep:0.27", "sleep:0.33", "sleep:0.24", "sleep:0.3", "sleep:0.22"]
    steps = [
        x for n, gap in zip(range(3, 9), gaps, strict=True) for x in (f"update:extract={n}", gap)
    ]
    writer = spawn_writer(plan_state.path, *steps)
    delays = []
    for n in range(3, 9):
        event = stream.until(lambda e, n=n: e.data["status"]["stages"]["extract"]["current"] == n)
        assert event.event == "progress"
        assert event.id == str(event.data["status"]["generation"])
        committed = parse_iso(event.data["status"]["log"][0]["timestamp"])
        assert committed is not None
        delays.append(event.wall - committed)
    assert writer.wait(30) == 0
    print(
        f"\nevent delay after a commit: median {statistics.median(delays) * 1000:.0f} ms, "
        f"max {max(delays) * 1000:.0f} ms over {len(delays)} commits"
    )
    assert max(delays) < 1.0, delays


def test_events_name_what_changed(plan_state: PipelineState, serve: Serve, sse: Sse) -> None:
    """stage_completed, stage_started, progress, stage_failed and pipeline_failed, in order."""
    url = serve(status_app(plan_state.path))
    stream = sse(f"{url}/api/events")
    stream.next()
    gap = "sleep:0.3"  # longer than the poll interval: one event per commit
    steps = ["complete:extract", gap, "start:tts/4", gap, "update:tts=1", gap, "fail:tts"]
    run_writer(plan_state.path, *steps)
    seen = []
    while not seen or seen[-1][0] != "pipeline_failed":
        event = stream.next()
        seen.append((event.event, event.data["stage"]))
    assert seen == [
        ("stage_completed", "extract"),
        ("stage_started", "tts"),
        ("progress", "tts"),
        ("stage_failed", "tts"),
        ("pipeline_failed", "tts"),
    ]
    status = httpx.get(f"{url}/api/status").json()
    assert status["stages"]["tts"]["error"] == "RuntimeError: disk full"


def test_commits_between_two_looks_arrive_as_one_event_listing_every_transition(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """Commits closer than the poll interval coalesce; ``transitions`` names each change."""
    url = serve(status_app(plan_state.path, poll_interval=0.5))
    stream = sse(f"{url}/api/events")
    stream.next()
    run_writer(plan_state.path, "complete:extract", "start:tts/4")
    event = stream.until(lambda e: e.data["status"]["current_stage"] == "tts")
    assert event.event == "stage_completed"
    assert event.data["transitions"] == [
        {"stage": "extract", "from": "running", "to": "success"},
        {"stage": "tts", "from": "pending", "to": "running"},
    ]


def test_pipeline_completed_follows_the_last_stage(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """The commit that ends the pipeline sends stage_completed, then pipeline_completed."""
    url = serve(status_app(plan_state.path))
    stream = sse(f"{url}/api/events")
    stream.next()
    run_writer(
        plan_state.path,
        "complete:extract",
        "start:tts",
        "complete:tts",
        "start:mix",
        "complete:mix",
    )
    done = stream.until(lambda e: e.event == "pipeline_completed")
    assert done.data["status"]["status"] == "success"
    assert done.data["status"]["overall_progress"] == 100.0


def test_a_reconnecting_client_gets_the_current_snapshot_at_once(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """With Last-Event-ID of an old generation, the first event is the current state."""
    url = serve(status_app(plan_state.path))
    old = plan_state.version
    run_writer(plan_state.path, "update:extract=7")
    stream = sse(f"{url}/api/events", headers={"Last-Event-ID": str(old)})
    event = stream.next(timeout=1.0)
    assert event.id == str(plan_state.version) != str(old)
    assert event.data["status"]["stages"]["extract"]["current"] == 7


def test_a_quiet_stream_gets_ping_comments(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """With nothing to send, the stream carries a ``: ping`` comment every ping_interval."""
    url = serve(status_app(plan_state.path, ping_interval=0.2))
    stream = sse(f"{url}/api/events")
    stream.next()
    time.sleep(0.7)
    assert stream.comments.count(": ping") >= 2
    assert stream.headers is not None
    assert stream.headers["content-type"].startswith("text/event-stream")


def test_many_clients_share_one_parse_per_commit(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """Five clients, four commits: the file is parsed at most once per commit, not per client."""
    app = status_app(plan_state.path)
    url = serve(app)
    streams = [sse(f"{url}/api/events") for _ in range(5)]
    for stream in streams:
        stream.next()
    watcher = app.state.watcher
    before, generation = watcher.refreshes, plan_state.version
    run_writer(  # the writer resumes the stage (a commit), then three updates
        plan_state.path,
        "update:extract=3",
        "sleep:0.3",
        "update:extract=4",
        "sleep:0.3",
        "update:extract=5",
    )
    for stream in streams:
        stream.until(lambda e: e.data["status"]["stages"]["extract"]["current"] == 5)
    commits = plan_state.version - generation
    assert commits == 4
    # commits closer than the poll share one parse; a commit landing between a look at
    # the file and its read can cost one more parse, never one per client (5 x 4)
    assert 3 <= watcher.refreshes - before <= commits + 1
    assert httpx.get(f"{url}/api/health").json()["clients"] == 5


def test_a_client_that_disconnects_is_forgotten(plan_state: PipelineState, serve: Serve) -> None:
    """Closing a stream's connection unsubscribes its client at once: nothing is kept for it."""
    url = serve(status_app(plan_state.path))
    port = int(url.rsplit(":", 1)[1])
    sockets = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: test\r\n\r\n")
        received = b""
        while b"event: snapshot" not in received:
            received += sock.recv(65536)
        sockets.append(sock)
    assert httpx.get(f"{url}/api/health").json()["clients"] == 3
    for sock in sockets:
        sock.close()
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/api/health").json()["clients"]:
        assert time.monotonic() < deadline, "closed streams are still subscribed"
        time.sleep(0.05)


def test_a_missing_file_is_a_503_until_it_appears(state_path: Path, serve: Serve, sse: Sse) -> None:
    """Missing: 503 naming the problem; the stream says so; the first commit recovers both."""
    url = serve(status_app(state_path))
    response = httpx.get(f"{url}/api/status")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error == {
        "type": "FileNotFoundError",
        "kind": "missing",
        "message": error["message"],
        "path": str(state_path),
    }
    assert "does not exist" in error["message"]
    assert list(state_path.parent.iterdir()) == []  # looking created nothing
    stream = sse(f"{url}/api/events")
    first = stream.next()
    assert first.event == "state_error"
    assert first.id is None
    with ProgressTracker(PipelineState(state_path), PLAN):
        pass
    event = stream.next()
    assert event.event in ("snapshot", "progress")
    assert list(event.data["status"]["stages"]) == list(PLAN)
    assert httpx.get(f"{url}/api/status").status_code == 200


def test_a_corrupt_file_is_a_503_and_recovers(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """Corrupt: 503 with StateReadError; the server keeps running; a repair recovers it."""
    url = serve(status_app(plan_state.path))
    stream = sse(f"{url}/api/events")
    stream.next()
    good = plan_state.path.read_bytes()
    plan_state.path.write_bytes(b'{"extract": {"sta')  # what a careless editor leaves
    event = stream.until(lambda e: e.event == "state_error", timeout=5)
    assert event.data["error"]["kind"] == "corrupt"
    assert event.data["status"]["stages"]["extract"]["current"] == 2  # the last good state
    response = httpx.get(f"{url}/api/status")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "StateReadError"
    assert response.json()["error"]["path"] == str(plan_state.path)
    plan_state.write(json.loads(good))  # the repair: a logged commit of the good version
    event = stream.until(lambda e: e.event != "state_error", timeout=5)
    assert httpx.get(f"{url}/api/status").status_code == 200
    assert event.data["status"]["stages"]["extract"]["status"] == "running"


def test_an_invalid_stage_record_is_a_503_naming_it(state: PipelineState, serve: Serve) -> None:
    """A stage whose status is not one ProgressTracker knows: 503, kind ``invalid``."""
    state.write({"phase1": {"status": "bogus"}}, validate=False)
    url = serve(status_app(state.path))
    response = httpx.get(f"{url}/api/status")
    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["type"], error["kind"]) == ("ProgressError", "invalid")
    assert "bogus" in error["message"]


def test_a_lock_held_for_long_is_a_503_until_released(
    plan_state: PipelineState, serve: Serve, spawn_child: Any
) -> None:
    """A writer holding the lock with no commit for lock_stale_after seconds is reported."""
    url = serve(status_app(plan_state.path, lock_stale_after=0.5))
    assert httpx.get(f"{url}/api/status").status_code == 200
    holder = spawn_child(
        """
        import sys, time
        from pipeline_common import PipelineState
        with PipelineState(sys.argv[1]).transaction(operation="phase2: stuck") as txn:
            print("locked", flush=True)
            sys.stdin.readline()
        """,
        str(plan_state.path),
    )
    assert holder.stdout.readline().strip() == "locked"
    deadline = time.monotonic() + 5
    while (response := httpx.get(f"{url}/api/status")).status_code == 200:
        assert time.monotonic() < deadline, "the long-held lock was never reported"
        time.sleep(0.1)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["kind"] == "locked"
    assert "phase2: stuck" in error["message"]
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(10) == 0
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/api/status").status_code != 200:
        assert time.monotonic() < deadline, "no recovery after the lock was released"
        time.sleep(0.1)


def test_mounted_under_a_prefix_in_starlette_and_fastapi(
    plan_state: PipelineState, serve: Serve, sse: Sse
) -> None:
    """app.mount("/pipeline", status_app(...)) works in Starlette and in FastAPI."""
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.routing import Mount

    for app in (
        Starlette(routes=[Mount("/pipeline", status_app(plan_state.path))]),
        FastAPI(),
    ):
        if isinstance(app, FastAPI):
            app.mount("/pipeline", status_app(plan_state))  # a PipelineState works too
        url = serve(app)
        page = httpx.get(f"{url}/pipeline/")
        assert page.status_code == 200
        assert "EventSource" in page.text
        assert '"/api/' not in page.text  # relative URLs only
        assert httpx.get(f"{url}/pipeline", follow_redirects=True).url.path == "/pipeline/"
        assert httpx.get(f"{url}/pipeline/api/status").json()["stages"]["extract"]["current"] == 2
        assert httpx.get(f"{url}/pipeline/api/history?limit=1").status_code == 200
        stream = sse(f"{url}/pipeline/api/events")
        assert stream.next().event == "snapshot"
        assert httpx.post(f"{url}/pipeline/api/status").status_code == 405


def test_the_page_is_self_contained_and_locked_down(
    plan_state: PipelineState, serve: Serve
) -> None:
    """One HTML page, no external asset, with a CSP that allows only its own script."""
    url = serve(status_app(plan_state.path))
    page = httpx.get(f"{url}/")
    assert page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text
    assert "https://" not in page.text
    assert "innerHTML" not in page.text
    assert "insertAdjacentHTML" not in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'sha256-" in csp
