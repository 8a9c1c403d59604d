"""The objects the web app shares, reached through typed keys (no module-level singletons).

Handlers get their collaborators through their constructors (see the ``setup_*`` functions);
the runtime is kept on the app for what runs around the handlers (start-up hooks, tests).
"""

from __future__ import annotations

from aiohttp import web

from connector.runtime import Runtime

runtime_key = web.AppKey("runtime", Runtime)
