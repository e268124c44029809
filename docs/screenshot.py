"""Regenerate docs/img/status-page.png: the status page of a sample pipeline, mid-run.

Usage (needs ``pip install -e '.[test]'`` and Debian's ``chromium``)::

    python docs/screenshot.py [--out docs/img/status-page.png]

Builds a sample audiobook pipeline in a temporary folder (two stages done, one running,
one failed after three attempts, two pending), serves it with ``status_app`` on a free
loopback port, and photographs the page in headless Chromium, as the browser tests do.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from pipeline_common import PipelineState
from pipeline_common.progress import ProgressTracker
from pipeline_common.web import status_app

CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if os.access(p, os.X_OK)),
    None,
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PLAN = {
    "extract_text": 1,
    "split_chapters": 1,
    "cover_art": 1,
    "tts": 6,
    "mix_audio": 2,
    "package": 1,
}
REQUIRES = {
    "split_chapters": ["extract_text"],
    "tts": ["split_chapters"],
    "mix_audio": ["tts"],
    "package": ["mix_audio", "cover_art"],
}


def sample_pipeline(path: Path) -> None:
    """A pipeline 25 minutes into its run: TTS at chapter 14 of 24, the cover art failed."""
    state = PipelineState(path)
    start = time.time() - 25 * 60
    now = [start]
    tracker = ProgressTracker(state, PLAN, requires=REQUIRES, min_interval=0, clock=lambda: now[0])

    def at(minutes: float) -> None:
        now[0] = start + minutes * 60

    tracker.start("extract_text", total=412, message="book.epub")
    at(2.5)
    tracker.update("extract_text", 412, message="412 pages")
    tracker.complete("extract_text")
    tracker.start("split_chapters", total=24)
    at(3.0)
    tracker.update("split_chapters", 24, message="24 chapters")
    tracker.complete("split_chapters")
    tracker.start("cover_art", message="asking the image service")
    at(3.1)
    tracker.start("tts", total=24, message="chapter 1")
    at(6.0)
    with state.transaction(operation="retry: cover_art") as txn:
        txn.data["cover_art"]["retry"] = {"attempts": 3}
    tracker.fail("cover_art", ConnectionError("image service answered 503 three times; gave up"))
    at(24.9)
    tracker.update("tts", 14, message="chapter 15: The Whiteness of the Whale")
    tracker.close()


def serve(app: object) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "img" / "status-page.png"
    )
    args = parser.parse_args()
    if CHROMIUM is None:
        raise SystemExit("no chromium found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="audiobook-") as tmp:
        path = Path(tmp) / "audiobook.json"
        sample_pipeline(path)
        app = status_app(path)
        server, thread, url = serve(app)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 720})
                page.goto(url)
                page.wait_for_selector("tr[data-stage]")
                page.wait_for_timeout(600)  # the bars' width transition
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            app.state.watcher.end_streams()
            server.should_exit = True
            thread.join(10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
