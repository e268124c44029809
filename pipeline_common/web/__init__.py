"""A live status page and read-only API for one pipeline state file (the ``web`` extra).

``pip install 'pipeline-common[web]'``, then serve it alone with
``pipeline-state serve pipeline.json``, or mount it in an existing ASGI app::

    app.mount("/pipeline", status_app("pipeline.json"))

Never imported by ``pipeline_common`` itself: the core library does not need Starlette.
"""

from __future__ import annotations

from ._app import status_app

__all__ = ["status_app"]
