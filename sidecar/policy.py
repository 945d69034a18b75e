"""Route policy: which route a request path belongs to, and what to do with the request.

Pure functions, deny by default. ``RouteTable.match`` picks the route with the longest
matching path prefix. Because the upstream application may read a path differently from us
(``..`` segments, ``%2F``, ``//``, ``;params``), a path is matched under every reading an
application server is known to apply; when the readings disagree on the route, the request is
refused as ambiguous rather than guessed. ``decide`` turns the route and the verdict into one
``Decision``: the only place where a status code for a policy outcome is chosen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from .identity import User, Verdict


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


class BadPath(ValueError):
    """The request path cannot be matched safely; answered 400."""


_PARAMS = re.compile(r";[^/]*")
_SLASHES = re.compile(r"/{2,}")
_ENCODED_SLASH = re.compile(r"%2f", re.IGNORECASE)


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg == ".":
            continue
        if seg == "..":
            if not out:
                raise BadPath("path climbs above the root")
            out.pop()
            continue
        out.append(seg)
    if segments[-1] in (".", "..") and (not out or out[-1] != ""):
        out.append("")
    return "/" + "/".join(out)


def readings(raw_path: str) -> set[str]:
    """The paths an upstream may understand for ``raw_path`` (query excluded).

    Raises ``BadPath`` for what no reading makes safe: no leading slash, control characters,
    NUL, backslashes (raw or encoded), or ``..`` above the root.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise BadPath("request target is not an absolute path")
    lowered = path.lower()
    if (
        "\\" in path
        or "%5c" in lowered
        or "%00" in lowered
        or any(ord(c) < 0x20 or c == "\x7f" for c in path)
    ):
        raise BadPath("path contains a backslash or a control character")
    decoded_all = unquote(path, errors="replace")
    # The same decoding but keeping %2F as a non-separator (what most servers do).
    decoded_keep_slash = "%2F".join(
        unquote(p, errors="replace") for p in _ENCODED_SLASH.split(path)
    )
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in decoded_all):
        raise BadPath("path contains a backslash or a control character")
    out: set[str] = set()
    for candidate in (path, decoded_all, decoded_keep_slash):
        for variant in (candidate, _PARAMS.sub("", candidate)):
            merged = _SLASHES.sub("/", variant)
            out.add(_remove_dot_segments(merged))
            out.add(_remove_dot_segments(variant))
    return out


class RouteTable:
    """Routes compiled once; ``match`` is called per request."""

    def __init__(self, routes: Iterable[Route]) -> None:
        # Longest prefix first: the first hit is the longest match.
        self._routes = tuple(sorted(routes, key=lambda r: len(r.path), reverse=True))
        self._cache: dict[str, Route | None] = {}

    def match_one(self, path: str) -> Route | None:
        for route in self._routes:
            if route.matches(path):
                return route
        return None

    def match(self, raw_path: str) -> Route | None:
        """The route for a raw request path, or None when none matches (denied).

        Raises ``BadPath`` when the path is malformed or its readings fall under different
        routes.
        """
        cached = self._cache.get(raw_path, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        routes = {self.match_one(p) for p in readings(raw_path)}
        if len(routes) != 1:
            raise BadPath("path is ambiguous: it could address different routes")
        route = routes.pop()
        if len(self._cache) < 10_000 and len(raw_path) <= 512:
            self._cache[raw_path] = route
        return route


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
