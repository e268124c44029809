"""The web tests need the web extra (and the test tools); this says how to get them."""

from __future__ import annotations

from .conftest import INSTALL, WEB, require


def test_the_web_extra_is_installed() -> None:
    """Starlette, uvicorn, httpx and FastAPI import; else skip (fail under CI) with the fix."""
    require(WEB, INSTALL)
