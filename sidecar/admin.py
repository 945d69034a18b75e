"""The admin listener: plain HTTP for probes, Prometheus and cache purges.

``/healthz`` says the process serves; ``/readyz`` says it should get traffic (not while
starting, draining, or while the identity backend reports its own credentials broken);
``/metrics`` is the Prometheus text format; ``POST /cache/purge`` empties the verdict cache,
or drops one certificate given by ``?serial=`` (decimal, ``0x`` hex or colon hex) or
``?sha256=``. Keep this listener private: it has no authentication.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .certs import normalize_fingerprint, parse_serial
from .metrics import Metrics

#: purge(sha256=..., serial=...) -> entries removed; both None empties the cache
Purge = Callable[..., int]


@dataclass
class Readiness:
    """Whether this process should receive traffic, and why not."""

    started: bool = False
    draining: bool = False
    #: checks that can make the process unready (e.g. the identity backend's credentials)
    checks: list[Callable[[], str | None]] = field(default_factory=list)

    def problem(self) -> str | None:
        if self.draining:
            return "draining"
        if not self.started:
            return "starting"
        for check in self.checks:
            reason = check()
            if reason:
                return reason
        return None


def _json(status: int, doc: dict[str, object]) -> web.Response:
    return web.Response(status=status, text=json.dumps(doc) + "\n", content_type="application/json")


def admin_app(
    *, metrics: Metrics, readiness: Readiness, purge: Callable[[], Purge | None]
) -> web.Application:
    """The admin application. ``purge`` returns the current cache's purge function (reloads swap it)."""

    async def healthz(request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problem = readiness.problem()
        if problem is None:
            return _json(200, {"ready": True})
        return _json(503, {"ready": False, "reason": problem})

    async def metrics_view(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def purge_view(request: web.Request) -> web.Response:
        serial_text = request.query.get("serial")
        sha_text = request.query.get("sha256")
        unknown = set(request.query) - {"serial", "sha256"}
        if unknown:
            return _json(400, {"error": f"unknown parameter(s): {', '.join(sorted(unknown))}"})
        if serial_text is not None and sha_text is not None:
            return _json(400, {"error": "give serial or sha256, not both"})
        try:
            serial = parse_serial(serial_text) if serial_text is not None else None
            sha256 = normalize_fingerprint(sha_text) if sha_text is not None else None
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        fn = purge()
        if fn is None:
            return _json(503, {"error": "no verdict cache is running"})
        removed = fn(sha256=sha256, serial=serial)
        scope = (
            "all"
            if serial is None and sha256 is None
            else ("serial" if serial is not None else "sha256")
        )
        return _json(200, {"purged": removed, "scope": scope})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_post("/cache/purge", purge_view)
    return app
