"""Test servers: an aiohttp application on a free port of 127.0.0.1."""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web


async def serve_app(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None, **runner_kwargs: Any
) -> tuple[web.AppRunner, int]:
    """Start ``app`` (no access log); the runner, for ``cleanup()``, and the port it got."""
    runner = web.AppRunner(app, access_log=None, **runner_kwargs)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    port: int = runner.addresses[0][1]
    return runner, port
