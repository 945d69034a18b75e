"""The demo's application: an echo of what it received from the sidecar.

JSON for curl and scripts (the README's demo output); a small readable page when the client
asks for HTML, as a browser does. The page is built from the request alone, so every value on
it is escaped and its Content-Security-Policy lets nothing run.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from aiohttp import web

from .responses import wants_html


def echo_app() -> web.Application:
    """The echo upstream: every method, every path."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def echo(request: web.Request) -> web.Response:
    """The demo upstream: tells what it received, decoding X-USERINFO for readability.

    JSON for curl and scripts; a small HTML page when the client asks for HTML (a browser).
    """
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
    if wants_html(request.headers.get("Accept")):
        return web.Response(
            text=page(doc),
            content_type="text/html",
            charset="utf-8",
            # Everything on the page came from the request: nothing in it may run.
            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        )
    return web.json_response(doc, dumps=lambda o: json.dumps(o, indent=2) + "\n")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Demo application: {who}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:48em;margin:2em auto;padding:0 1em;color:#222}}
h1{{font-size:1.4em}}h2{{font-size:1.1em;margin-top:2em}}table{{border-collapse:collapse}}
th,td{{text-align:left;vertical-align:top;padding:.2em .8em .2em 0;border-bottom:1px solid #ddd}}
th{{white-space:nowrap}}
td{{font-family:ui-monospace,monospace;word-break:break-all}}p{{line-height:1.5}}</style></head>
<body><h1 id="who">{heading}</h1>
{identity}
<h2>The request as the application received it</h2>
<p><code id="request">{method} {path}</code> ({body_bytes} body bytes)</p>
<table id="headers">{headers}</table>
</body></html>
"""


def _row(name: str, value: object) -> str:
    return f"<tr><th>{escape(name)}</th><td>{escape(str(value))}</td></tr>"


def page(doc: dict[str, Any]) -> str:
    """The echo document as a page. Every value is escaped: all of it came from the request."""
    identity = doc["identity"]
    saw = doc["upstream_saw"]
    if isinstance(identity, dict):
        name = " ".join(
            str(identity[k]) for k in ("given_name", "family_name") if identity.get(k)
        ) or str(identity.get("username", ""))
        roles = identity.get("roles")
        rows = [_row(k, v) for k, v in identity.items() if k != "roles"]
        rows.append(
            _row(
                "roles", ", ".join(map(str, roles)) if isinstance(roles, list) and roles else "none"
            )
        )
        who, heading = name, f"Hello, {name}"
        text = (
            "<p>The sidecar identified your client certificate and told this application "
            "who you are in <code>X-USERINFO</code>:</p>"
            f'<table id="identity">{"".join(rows)}</table>'
        )
    elif identity is None:
        who, heading = "anonymous", "Hello, anonymous visitor"
        text = (
            '<p id="identity">No identity headers: the sidecar forwarded this request '
            "without an identified certificate (a public route).</p>"
        )
    else:
        who, heading = "unreadable identity", "Unreadable identity"
        text = '<p id="identity"><code>X-USERINFO</code> is not a base64 JSON object.</p>'
    headers = "".join(_row(k, v) for k, v in saw["headers"].items())
    return _PAGE.format(
        who=escape(who),
        heading=escape(heading),
        identity=text,
        method=escape(saw["method"]),
        path=escape(saw["path"]),
        body_bytes=saw["body_bytes"],
        headers=headers,
    )
