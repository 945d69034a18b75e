"""The admin listener: plain HTTP for probes, Prometheus, cache purges, the status page and
trust reports.

``/healthz`` says the process serves; ``/readyz`` says it should get traffic (not while
starting, draining, or while the identity backend reports its own credentials broken);
``/metrics`` is the Prometheus text format; ``POST /cache/purge`` empties the verdict cache,
or drops one certificate given by ``?serial=`` (decimal, ``0x`` hex or colon hex) or
``?sha256=``, here and, with a shared cache, on every replica (207 when they could not be
told); ``/deny`` (``revocation.admin``) manages the run-time deny-list; ``GET /explain``
says what the policy does with a request (``explain``), to local peers only (loopback, or
``admin.explain_from``): it shows the configuration's rules; ``GET /`` is the status page
(``status``); ``POST /identityplus/{kind}`` sends a trust report (``admin_reports``). Keep
this listener private: it has no authentication.

Browsers are kept out by one rule, ``refusal``, applied to every request by ``guard`` (the
supervisor's listener uses it too): the ``Host`` must be a name this listener is known by
(DNS rebinding); nothing a browser sends on behalf of another site or origin is answered;
and a request that changes state (any method but GET and HEAD) must be one a page cannot
send to another site without asking first: it carries ``X-Sidecar-Admin`` or a JSON body.
An endpoint that changes state is therefore never a GET.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from aiohttp import web
from multidict import MultiMapping
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .certs import normalize_fingerprint, parse_serial
from .config import AdminConfig
from .explain import Assumption, Question, default_server_name
from .hosts import is_address
from .log import get_logger
from .metrics import Metrics
from .rules import IPNetwork, client_address, within
from .status import Document, respond

#: the header that makes a state-changing admin request one a web page cannot send cross-site
#: without a CORS preflight (which this listener never grants); its value does not matter
ADMIN_HEADER = "X-Sidecar-Admin"
#: the methods that may not change state, and so need no proof that a browser did not send them
_SAFE = frozenset({"GET", "HEAD"})
#: Sec-Fetch-Site values for requests a page of this very origin, or the user, made
_OWN = frozenset({"same-origin", "none"})

log = get_logger("sidecar.admin")

#: purge(sha256=..., serial=...) -> entries removed here, and whether the other replicas were
#: told through the shared cache (None without one); both None empties the cache
Purge = Callable[..., Awaitable[tuple[int, bool | None]]]
#: explain(question, certificate SHA-256 or None, assumption) -> (status, JSON document)
Explain = Callable[[Question, str | None, Assumption], tuple[int, dict[str, object]]]


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
    if host and not is_address(host):
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
        if name not in names and not is_address(name):
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


def _is_json(headers: MultiMapping[str]) -> bool:
    media_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json"


# ---- /explain ------------------------------------------------------------------------------

_EXPLAIN_PARAMETERS = frozenset(
    {
        "path",
        "method",
        "sha256",
        "host",
        "sni",
        "address",
        "header",
        "roles",
        "trust_score",
        "local_intrusions",
    }
)


def explain_refusal(request: web.BaseRequest, allowed: Sequence[IPNetwork]) -> web.Response | None:
    """403 unless the peer is local: loopback, a Unix socket (a worker's, reached by its
    supervisor only), or a network in ``admin.explain_from``. The answer shows the rules."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return None
    address = client_address(request.remote)
    if address is not None and (address.is_loopback or within(address, allowed)):
        return None
    log.warning("admin_request_refused", path="/explain", client=request.remote, status=403)
    return _json(
        403,
        {
            "error": "explain answers local peers only (loopback, or admin.explain_from): it "
            "shows the configuration's rules"
        },
    )


def explain_question(
    query: Mapping[str, str], headers: Sequence[str]
) -> tuple[Question, str | None, Assumption] | str:
    """``GET /explain``'s parameters, or what is wrong with them."""
    unknown = set(query) - _EXPLAIN_PARAMETERS
    if unknown:
        return f"unknown parameter(s): {', '.join(sorted(unknown))}"
    path = query.get("path")
    if not path:
        return "path is required (the request target, e.g. /admin/users)"
    try:
        sha256 = normalize_fingerprint(query["sha256"]) if "sha256" in query else None
        score = Decimal(query["trust_score"]) if "trust_score" in query else None
        intrusions = int(query["local_intrusions"]) if "local_intrusions" in query else None
    except (ValueError, InvalidOperation) as exc:
        return str(exc) if str(exc) else "a parameter is not a number"
    lines = []
    for header in headers:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            return f"header: not 'Name: value': {header[:100]!r}"
        lines.append((name.strip(), value.strip()))
    host = query.get("host")
    question = Question(
        path=path,
        method=query.get("method", "GET"),
        host=host,
        server_name=query["sni"] or None if "sni" in query else default_server_name(host),
        address=query.get("address"),
        headers=lines,
    )
    roles = tuple(r.strip() for r in query.get("roles", "").split(",") if r.strip())
    return question, sha256, Assumption(roles, score, intrusions)


# ---- the application ----------------------------------------------------------------------


def admin_app(
    *,
    metrics: Metrics,
    readiness: Readiness,
    purge: Callable[[], Purge | None],
    config: AdminConfig,
    explain: Explain | None = None,
    status: Callable[[], Document] | None = None,
    reports: Callable[[web.Request], Awaitable[web.Response]] | None = None,
) -> web.Application:
    """The admin application. ``purge`` returns the current cache's purge function (reloads
    swap it); ``explain`` answers ``GET /explain`` for the running configuration; ``status``
    makes the status document; ``reports`` answers trust reports."""

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
        removed, fleet = await fn(sha256=sha256, serial=serial)
        scope = (
            "all"
            if serial is None and sha256 is None
            else ("serial" if serial is not None else "sha256")
        )
        doc: dict[str, object] = {"purged": removed, "scope": scope}
        if fleet is None:
            return _json(200, doc)
        doc["fleet"] = fleet
        if not fleet:
            # Done here, not everywhere: say so (207, as the supervisor does for workers).
            doc["error"] = "the shared cache is unavailable: the other replicas were not told"
        return _json(200 if fleet else 207, doc)

    async def explain_view(request: web.Request) -> web.Response:
        refused = explain_refusal(request, config.explain_from)
        if refused is not None:
            return refused
        asked = explain_question(request.query, request.query.getall("header", []))
        if isinstance(asked, str):
            return _json(400, {"error": asked})
        if explain is None:
            return _json(503, {"error": "no policy is running"})
        status, document = explain(*asked)
        return _json(status, document)

    async def status_view(request: web.Request) -> web.Response:
        assert status is not None
        return respond(status(), request.headers.get("Accept"))

    app = web.Application(middlewares=[guard(config)])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_post("/cache/purge", purge_view)
    app.router.add_get("/explain", explain_view)
    if status is not None:
        app.router.add_get("/", status_view)
    if reports is not None:
        app.router.add_post("/identityplus/{kind}", reports)
    return app
