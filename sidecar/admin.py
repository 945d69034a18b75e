"""The admin listener: plain HTTP for probes, Prometheus and cache purges.

``/healthz`` says the process serves; ``/readyz`` says it should get traffic (not while
starting, draining, or while the identity backend reports its own credentials broken);
``/metrics`` is the Prometheus text format; ``POST /cache/purge`` empties the verdict cache,
or drops one certificate given by ``?serial=`` (decimal, ``0x`` hex or colon hex) or
``?sha256=``; ``/deny`` (``revocation.admin``) manages the run-time deny-list. Keep this
listener private: it has no authentication.

Browsers are kept out by one rule, ``refusal``, applied to every request by ``guard`` (the
supervisor's listener uses it too): the ``Host`` must be a name this listener is known by
(DNS rebinding); nothing a browser sends on behalf of another site or origin is answered;
and a request that changes state (any method but GET and HEAD) must be one a page cannot
send to another site without asking first: it carries ``X-Sidecar-Admin`` or a JSON body.
An endpoint that changes state is therefore never a GET.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from multidict import MultiMapping
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .certs import normalize_fingerprint, parse_serial
from .config import AdminConfig
from .log import get_logger
from .metrics import Metrics

#: the header that makes a state-changing admin request one a web page cannot send cross-site
#: without a CORS preflight (which this listener never grants); its value does not matter
ADMIN_HEADER = "X-Sidecar-Admin"
#: the methods that may not change state, and so need no proof that a browser did not send them
_SAFE = frozenset({"GET", "HEAD"})
#: Sec-Fetch-Site values for requests a page of this very origin, or the user, made
_OWN = frozenset({"same-origin", "none"})

log = get_logger("sidecar.admin")

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


# ---- who may ask ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str


def known_names(config: AdminConfig) -> frozenset[str]:
    """The host names the admin listener answers to, besides any IP address."""
    names = {"localhost", *config.server_names}
    host = config.host.lower().rstrip(".")
    if host and not _is_address(host):
        names.add(host)
    return frozenset(names)


def refusal(method: str, headers: MultiMapping[str], names: frozenset[str]) -> Refusal | None:
    """Why the admin listener must not answer this request, or None to answer it.

    Fails closed: a request is answered only when its Host is an IP address or one of
    ``names`` (a page whose own name was made to resolve to this host sends that name),
    nothing in it says a browser sent it for a page of another site or origin, and, if it may
    change state, it is not a "simple" request (the custom header, or a JSON body: either
    makes a browser ask first, and no CORS answer is ever given). A request without Host is
    answered: every browser sends one.
    """
    hosts = headers.getall("Host", [])
    if len(hosts) > 1:
        return Refusal(400, "more than one Host header")
    host = hosts[0] if hosts else None
    if host is not None:
        name = _host_name(host)
        if name not in names and not _is_address(name):
            return Refusal(
                421,
                f"this admin listener is not known as {name[:100]!r}: use its address, localhost, "
                "or a name listed in admin.server_names",
            )
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in _OWN:
        return Refusal(
            403,
            f"refused: a browser sent this for a page of another site (Sec-Fetch-Site: {site[:40]})",
        )
    origin = headers.get("Origin")
    if origin is not None and (host is None or origin.strip().lower() != f"http://{host}".lower()):
        return Refusal(
            403,
            f"refused: a browser sent this for a page of another site (Origin: {origin[:100]})",
        )
    if method not in _SAFE and ADMIN_HEADER not in headers and not _is_json(headers):
        return Refusal(
            403,
            f"a request that changes state needs the header {ADMIN_HEADER} (any value) or "
            "Content-Type: application/json, so that a web page cannot send it",
        )
    return None


def guard(config: AdminConfig) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware that applies ``refusal`` to every request of an admin application."""
    names = known_names(config)

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        refused = refusal(request.method, request.headers, names)
        if refused is None:
            return await handler(request)
        log.warning(
            "admin_request_refused",
            method=request.method,
            path=request.path[:200],
            client=request.remote,
            status=refused.status,
            reason=refused.reason,
        )
        return _json(refused.status, {"error": refused.reason})

    return middleware


def _host_name(host: str) -> str:
    """The name in a Host header: without port or IPv6 brackets, lower case, no final dot."""
    value = host.strip()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else value
    else:
        name, colon, port = value.rpartition(":")
        if colon and port.isdigit() and ":" not in name:
            value = name
    return value.lower().rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_json(headers: MultiMapping[str]) -> bool:
    media_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json"


# ---- the application ----------------------------------------------------------------------


def admin_app(
    *,
    metrics: Metrics,
    readiness: Readiness,
    purge: Callable[[], Purge | None],
    config: AdminConfig,
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

    app = web.Application(middlewares=[guard(config)])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_post("/cache/purge", purge_view)
    return app
