"""The commit's sha256, hashed beside the write for large payloads (pipeline_common._digest)."""

from __future__ import annotations

import hashlib
import threading

import pytest

from pipeline_common._digest import Digest


@pytest.mark.parametrize("size", [0, 1, (1 << 19) - 1, 1 << 19, (1 << 20) + 7, 3 << 20])
def test_digest_is_the_sha256_of_the_bytes(size: int) -> None:
    """Inline (small) or on a helper thread (from 512 KiB), the digest is the same."""
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    digest = Digest(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()  # asking twice is fine


def test_large_payloads_are_hashed_on_a_helper_thread() -> None:
    """From 512 KiB, hashing runs on its own thread, which is gone once the digest is read."""
    digest = Digest(b"a" * (2 << 20))
    assert digest._thread is not None
    digest.hexdigest()
    assert not any(t.name == "pipeline-sha256" and t.is_alive() for t in threading.enumerate())


def test_without_threads_the_digest_is_computed_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """When no thread can be started, the commit still gets its digest."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    data = b"b" * (2 << 20)
    assert Digest(data).hexdigest() == hashlib.sha256(data).hexdigest()
