"""The status page in a real headless Chromium, driven by Playwright's Python API.

Playwright cannot download its own browser here, so the distribution's ``chromium`` is
launched with ``executable_path=``. Without it (or without playwright) these tests skip
with the command that installs it; with ``CI`` set they fail instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState
from pipeline_common.progress import ProgressTracker
from pipeline_common.web import status_app

from .conftest import INSTALL, PLAN, require, run_writer

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS = "<img src=x onerror=alert(1)>"
WAIT_MS = 5000  # how long the page may take to show a change (the contract: 1 s)

Serve = Callable[[Any], str]


def find_chromium() -> str | None:
    """The distribution's Chromium binary, if installed."""
    return next((p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium; skipped (failed under CI) when chromium or playwright is missing."""
    require(["playwright"], INSTALL)
    executable = find_chromium()
    if executable is None:
        message = (
            f"no chromium at {' or '.join(CHROMIUM_PATHS)}; install it with: "
            "apt-get install -y chromium"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so this may not skip: {message}")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records every dialog (an ``alert`` would be an XSS)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.dialogs = []
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    yield tab
    context.close()


def stage_names(page: Any) -> list[str]:
    return page.eval_on_selector_all("tr[data-stage]", "rows => rows.map(r => r.dataset.stage)")


def wait_for_text(page: Any, selector: str, text: str) -> None:
    """Wait until the element's text equals ``text`` (no reload)."""
    page.wait_for_function(
        "([sel, text]) => document.querySelector(sel)?.textContent === text",
        arg=[selector, text],
        timeout=WAIT_MS,
    )


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("tr[data-stage]", timeout=WAIT_MS)


def test_the_page_shows_every_stage_of_the_plan(
    plan_state: PipelineState, serve: Serve, page: Any
) -> None:
    """Every stage of the stored plan has a row, in plan order; the running one is highlighted."""
    open_page(page, serve(status_app(plan_state.path)) + "/")
    assert stage_names(page) == list(PLAN)
    assert page.locator("tr.current").get_attribute("data-stage") == "extract"
    assert page.text_content("#overall-percent") == "4.0%"  # 20 % of weight 1 out of 5
    row = page.locator('tr[data-stage="extract"]')
    assert "2 / 10" in row.inner_text()
    assert "chapter 1" in row.inner_text()


def test_progress_from_another_process_shows_without_reload(
    plan_state: PipelineState, serve: Serve, page: Any
) -> None:
    """A writer process advances a stage; the bar and overall percent move, no reload."""
    open_page(page, serve(status_app(plan_state.path)) + "/")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloaded
    bar = 'tr[data-stage="extract"] .fill'
    assert page.eval_on_selector(bar, "el => el.style.width") == "20%"
    run_writer(plan_state.path, "update:extract=8")
    wait_for_text(page, "#overall-percent", "16.0%")  # 80 % of 1/5
    page.wait_for_function(
        "sel => document.querySelector(sel).style.width === '80%'", arg=bar, timeout=WAIT_MS
    )
    assert page.evaluate("window.loadedOnce") is True
    assert "8 / 10" in page.locator('tr[data-stage="extract"]').inner_text()


def test_a_failed_stage_shows_its_error(plan_state: PipelineState, serve: Serve, page: Any) -> None:
    """The failed stage's error appears under its row; the pipeline's badge says failed."""
    open_page(page, serve(status_app(plan_state.path)) + "/")
    run_writer(plan_state.path, "complete:extract", "start:tts/4", "fail:tts")
    page.wait_for_selector('tr[data-error-of="tts"]', timeout=WAIT_MS)
    assert page.text_content('tr[data-error-of="tts"]') == "RuntimeError: disk full"
    assert page.get_attribute('tr[data-stage="tts"]', "data-status") == "failed"
    assert page.text_content("#status") == "failed"


def test_markup_in_a_message_shows_as_text_and_runs_nothing(
    plan_state: PipelineState, serve: Serve, page: Any
) -> None:
    """A stage message ``<img src=x onerror=alert(1)>`` is shown literally; no dialog fires."""
    open_page(page, serve(status_app(plan_state.path)) + "/")
    with ProgressTracker(PipelineState(plan_state.path), min_interval=0) as tracker:
        tracker.start("extract")
        tracker.update("extract", 3, message=XSS)
        tracker.fail("extract", XSS)
    cell = 'tr[data-stage="extract"] td.msg'
    wait_for_text(page, cell, XSS)
    wait_for_text(page, 'tr[data-error-of="extract"]', XSS)
    page.wait_for_timeout(500)  # time for an onerror handler to run, if one had been made
    assert page.locator("img").count() == 0
    assert page.dialogs == []


def test_a_reload_shows_the_same_state(plan_state: PipelineState, serve: Serve, page: Any) -> None:
    """After a reload, the page shows at once what it showed before."""
    open_page(page, serve(status_app(plan_state.path)) + "/")
    run_writer(plan_state.path, "update:extract=5")
    wait_for_text(page, "#overall-percent", "10.0%")

    def shown() -> list[Any]:
        # the clock columns (elapsed, ETA) tick, so compare everything else
        return [
            page.text_content("#overall-percent"),
            page.text_content("#status"),
            page.text_content("#generation"),
            page.eval_on_selector_all(
                "tr[data-stage] td:not(.num), tr[data-stage] td.num:nth-child(4)",
                "cells => cells.map(c => c.textContent)",
            ),
            page.eval_on_selector_all("#log tr", "rows => rows.map(r => r.textContent)"),
        ]

    before = shown()
    page.reload()
    page.wait_for_selector("tr[data-stage]", timeout=WAIT_MS)
    wait_for_text(page, "#overall-percent", "10.0%")
    assert shown() == before


def test_the_page_works_under_a_mount_prefix(
    plan_state: PipelineState, serve: Serve, page: Any
) -> None:
    """Mounted at /pipeline in FastAPI, the page loads its data and updates live."""
    from fastapi import FastAPI

    app = FastAPI()
    app.mount("/pipeline", status_app(plan_state.path))
    url = serve(app)
    open_page(page, url + "/pipeline")  # no trailing slash: redirected to /pipeline/
    assert page.url == url + "/pipeline/"
    assert stage_names(page) == list(PLAN)
    run_writer(plan_state.path, "update:extract=6")
    wait_for_text(page, "#overall-percent", "12.0%")


def test_a_missing_file_shows_a_banner_until_it_appears(
    state_path: Path, serve: Serve, page: Any
) -> None:
    """No state file: a banner says so; the first commit clears it and shows the stages."""
    page.goto(serve(status_app(state_path)) + "/")
    page.wait_for_selector("#banner.show", timeout=WAIT_MS)
    assert "does not exist" in page.text_content("#banner")
    with ProgressTracker(PipelineState(state_path), PLAN):
        pass
    page.wait_for_selector("#banner", state="hidden", timeout=WAIT_MS)
    page.wait_for_selector("tr[data-stage]", timeout=WAIT_MS)
    assert stage_names(page) == list(PLAN)


def test_the_running_stage_shows_its_owner(
    state_path: Path, serve: Serve, page: Any, spawn_child: Any
) -> None:
    """A stage held by a Pipeline runner in another process shows that pid and host."""
    runner = spawn_child(
        """
        import sys
        from pipeline_common import Pipeline

        pipeline = Pipeline(sys.argv[1])

        @pipeline.stage()
        def extract(ctx):
            ctx.message("reading book.epub")
            print("running", flush=True)
            sys.stdin.readline()

        @pipeline.stage(requires=["extract"])
        def tts(ctx):
            pass

        pipeline.run()
        """,
        str(state_path),
    )
    assert runner.stdout.readline().strip() == "running"
    open_page(page, serve(status_app(state_path)) + "/")
    owner = f"pid {runner.pid} on {socket.gethostname()}"
    wait_for_text(page, 'tr[data-stage="extract"] .owner', owner)
    assert page.locator("tr.current").get_attribute("data-stage") == "extract"
    runner.stdin.write("\n")
    runner.stdin.flush()
    assert runner.wait(30) == 0
    wait_for_text(page, "#status", "success")
    assert page.locator(".owner").count() == 0
