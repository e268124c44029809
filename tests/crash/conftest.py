"""Shared fixtures of the crash-safety suite (slow nightly sizes: ``pytest -m slow``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pipeline_common import _fs, _lock


@pytest.fixture(autouse=True)
def _clean_seam_and_locks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail a test that leaves a seam hook installed; close lock fds of finished tests."""
    _fs.set_hook(None)
    yield
    leftover = _fs.set_hook(None)
    # Each test uses fresh folders, so the per-path lock objects would pile up open fds.
    for key in list(_lock._registry):
        lock = _lock._registry[key]
        if lock._held_by is None and lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None
    assert leftover is None, "a test left a hook installed on the file-system seam"
