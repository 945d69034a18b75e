"""Route policy: which route a request path belongs to, and what to do with the request.

Pure functions, deny by default. ``RouteTable.match`` picks the route with the longest
matching path prefix. Because the upstream application may read a path differently from us
(``%2F``, ``//``, ``;params``, letter case, a script's ``PATH_INFO``, a format suffix), a
path is matched under every reading an application server is known to apply (``readings``);
when the readings disagree on the route, the request is refused as ambiguous rather than
guessed. A target that no reading makes safe (a ``.`` or ``..`` segment in any reading, a
``#``, an escape that decodes to another escape) is refused outright. ``decide`` turns the
route and the verdict into one ``Decision``: the only place where a status code for a policy
outcome is chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .identity import User, Verdict
from .readings import BadPath as BadPath
from .readings import PathReader


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    public: bool = False
    roles: frozenset[str] = frozenset()

    def matches(self, path: str) -> bool:
        # "/admin/" also covers "/admin": the upstream usually serves both the same way.
        return path.startswith(self.path) or (
            self.path.endswith("/") and len(self.path) > 1 and path == self.path[:-1]
        )


#: what the route cache may hold, in bytes of keys (an entry costs its key and about this much)
ROUTE_CACHE_BYTES = 1 << 20
_ENTRY_OVERHEAD = 100
#: longer paths are matched every time (they are rare, and would fill the cache fastest)
_CACHED_PATH = 512


class RouteTable:
    """Routes compiled once; ``match`` is called per request."""

    def __init__(self, routes: Iterable[Route]) -> None:
        # Longest prefix first: the first hit is the longest match.
        self._routes = tuple(sorted(routes, key=lambda r: len(r.path), reverse=True))
        self._reader = PathReader(r.path for r in self._routes)
        # Keys are chosen by anonymous clients: bounded in bytes, emptied when full.
        self._cache: dict[str, Route | None] = {}
        self._cache_bytes = 0

    def _longest(self, prefixes: frozenset[str]) -> Route | None:
        for route in self._routes:
            if route.path in prefixes:
                return route
        return None

    def match(self, raw_path: str) -> Route | None:
        """The route for a raw request target, or None when none matches (denied).

        Raises ``BadPath`` when the target is malformed or its readings (letter case
        ignored or not) fall under different routes.
        """
        cached = self._cache.get(raw_path, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        routes = {self._longest(prefixes) for prefixes in self._reader.match_sets(raw_path)}
        if len(routes) != 1:
            raise BadPath("path is ambiguous: it could address different routes")
        route = routes.pop()
        if len(raw_path) <= _CACHED_PATH:
            cost = len(raw_path) + _ENTRY_OVERHEAD
            if self._cache_bytes + cost > ROUTE_CACHE_BYTES:
                self._cache.clear()
                self._cache_bytes = 0
            self._cache[raw_path] = route
            self._cache_bytes += cost
        return route

    @property
    def cache_bytes(self) -> int:
        """What the cache holds now, as it counts it (for tests and metrics)."""
        return self._cache_bytes


_MISSING = object()


# ---- decisions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request upstream; ``user`` is None for an anonymous (public) request."""

    user: User | None


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: str
    code: str


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the person to the identity service: ``validate`` a certificate, or ``enrol`` one."""

    purpose: Literal["validate", "enrol"]
    reason: str
    #: where to, when the verdict already says; otherwise the backend makes it (an intent)
    location: str | None = None


@dataclass(frozen=True, slots=True)
class Unavailable:
    reason: str


Decision = Forward | Deny | Redirect | Unavailable

NO_ROUTE = Deny(403, "no route allows this path", "no_route")
NO_CERTIFICATE = Deny(401, "a client certificate is required", "no_certificate")


def decide(
    route: Route | None,
    verdict: Verdict | None,
    *,
    has_certificate: bool,
    backend_failed: bool = False,
    enrol: bool = False,
) -> Decision:
    """What to do with a request. Fails closed: anything not explicitly allowed is refused.

    ``verdict`` is None when there is no certificate or the backend failed
    (``backend_failed``). A public route is forwarded whatever the verdict, with the user
    only when the verdict allows.
    """
    if route is None:
        return NO_ROUTE
    if route.public:
        return Forward(verdict.user if verdict is not None and verdict.kind == "allow" else None)
    if verdict is not None and verdict.kind == "unknown":
        has_certificate = False  # the identity service has never seen it: as if there were none
    if not has_certificate:
        if enrol:
            return Redirect("enrol", "a client certificate is required")
        return NO_CERTIFICATE
    if backend_failed or verdict is None:
        return Unavailable("the identity service is unavailable")
    if verdict.kind == "validate":
        return Redirect("validate", verdict.reason, verdict.redirect)
    if verdict.kind != "allow" or verdict.user is None:
        return Deny(403, verdict.reason, verdict.code)
    if route.roles and route.roles.isdisjoint(verdict.user.roles):
        return Deny(403, "your account lacks a role this path requires", "missing_role")
    return Forward(verdict.user)


def compile_routes(entries: Iterable[tuple[str, bool, Iterable[str]]]) -> RouteTable:
    return RouteTable(Route(path, public, frozenset(roles)) for path, public, roles in entries)
