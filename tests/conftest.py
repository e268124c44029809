"""Shared fixtures: a state path in ``tmp_path``, a state on it, a umask switch, child processes.

Helpers are handed out as fixtures rather than imported from here, so this file never
clashes with another ``conftest`` module (for example ``tests/crash/conftest.py``).
Child interpreters run in ``tmp_path`` with the parent's environment, so they import the
installed package, the same one the tests import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline_common import PipelineState

# A child interpreter starts in about 0.2 s; this bound only matters when something hangs.
CHILD_TIMEOUT = 60.0

RunChild = Callable[..., "subprocess.CompletedProcess[str]"]
SpawnChild = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    """The path of a state file that does not exist yet."""
    return tmp_path / "pipeline.json"


@pytest.fixture
def state(state_path: Path) -> PipelineState:
    """A state on a fresh path, with a short lock timeout so a locking bug fails fast."""
    return PipelineState(state_path, timeout=5.0)


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Return a setter for the process umask; the old umask is put back afterwards."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


@pytest.fixture
def run_child(tmp_path: Path) -> RunChild:
    """Return a runner: ``run_child(code, *args)`` runs ``code`` in a fresh interpreter."""

    def run(
        code: str, *args: str, timeout: float = CHILD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
            check=False,
        )

    return run


@pytest.fixture
def spawn_child(tmp_path: Path) -> Iterator[SpawnChild]:
    """Return a starter for background interpreters with piped stdio; all are reaped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def spawn(code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=CHILD_TIMEOUT)
