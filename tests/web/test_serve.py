"""``pipeline-state serve``: the standalone server, its warnings, and life without the extra."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipeline_common import PipelineState

from .conftest import EventStream

NO_EXTRA = """
import sys
sys.modules["uvicorn"] = None  # as if the web extra were not installed
from pipeline_common.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(path: Path, *args: str) -> subprocess.Popen[str]:
    """Run ``pipeline-state serve`` and wait for its 'serving' line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline_common", "serve", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() else "")
    return proc


def wait_until_up(url: str) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        try:
            return httpx.get(url)
        except httpx.ConnectError:
            assert time.monotonic() < deadline, f"{url} did not answer within 10 s"
            time.sleep(0.05)


def test_serve_without_the_extra_names_what_to_install(state: PipelineState) -> None:
    """Without the web extra, one line on stderr says exactly what to pip install."""
    state.write({})
    result = subprocess.run(
        [sys.executable, "-c", NO_EXTRA, "serve", str(state.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "pip install 'pipeline-common[web]'" in result.stderr


def test_serve_answers_and_stops_on_ctrl_c_with_a_stream_open(state: PipelineState) -> None:
    """The server answers on 127.0.0.1 by default, and Ctrl-C ends it despite open streams."""
    state.write({"phase1": {"status": "running"}})
    port = free_port()
    proc = start_serve(state.path, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    health = wait_until_up(f"{url}/api/health").json()
    assert health["state_ok"] is True
    assert health["path"] == str(state.path)
    stream = EventStream(f"{url}/api/events")
    assert stream.next().event == "snapshot"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode in (0, 130)  # 130: uvicorn >= 0.29 re-raises the Ctrl-C
    assert time.monotonic() - started < 2.0  # the stream was ended, not waited out
    stream.close()
    assert "Traceback" not in stderr


def test_a_non_loopback_host_prints_a_warning(state: PipelineState) -> None:
    """--host 0.0.0.0 serves, and warns that anyone who can reach it sees the state."""
    state.write({})
    port = free_port()
    proc = start_serve(state.path, "--host", "0.0.0.0", "--port", str(port))
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/api/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert "warning: serving on 0.0.0.0" in stderr
    assert "anyone who can reach" in stderr
