"""The demo's application: an echo of what it received from the sidecar, as JSON."""

from __future__ import annotations

import base64
import json

from aiohttp import web


def echo_app() -> web.Application:
    """The echo upstream: every method, every path."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def echo(request: web.Request) -> web.Response:
    """The demo upstream: tells what it received, decoding X-USERINFO for readability."""
    body = await request.read()
    userinfo = request.headers.get("X-USERINFO")
    decoded = None
    if userinfo:
        try:
            decoded = json.loads(base64.b64decode(userinfo))
        except ValueError:
            decoded = "<not base64 JSON>"
    cert = request.headers.get("X-APP-CERTIFICATE")
    doc = {
        "upstream_saw": {
            "method": request.method,
            "path": request.raw_path,
            "headers": {
                k: (v if k.lower() != "x-app-certificate" else v[:40] + "...")
                for k, v in request.headers.items()
            },
            "body_bytes": len(body),
        },
        "identity": decoded,
        "certificate_der_bytes": len(base64.b64decode(cert)) if cert else None,
    }
    return web.json_response(doc, dumps=lambda o: json.dumps(o, indent=2) + "\n")
