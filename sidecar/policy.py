"""Route policy: which route a request belongs to, and what to do with the request.

Pure functions, deny by default. ``RouteTable.match`` picks the route with the longest
matching path prefix that covers the request's method (routes with the same path are tried
in the order configured). Because the upstream application may read a path differently from
us (``%2F``, ``//``, ``;params``, letter case, a script's ``PATH_INFO``, a format suffix), a
path is matched under every reading an application server is known to apply (``readings``);
when the readings disagree on the route, the request is refused as ambiguous rather than
guessed. A target that no reading makes safe (a ``.`` or ``..`` segment in any reading, a
``#``, an escape that decodes to another escape) is refused outright. ``admit`` applies what a
route asks before any identity verdict (addresses, certificate matchers, ``access:
certificate``); ``decide`` turns the route and the verdict into one ``Decision``: the only
place where a status code for a policy outcome is chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from .certs import ClientCert
from .identity import User, Verdict
from .readings import BadPath as BadPath
from .readings import PathReader
from .rules import AddressRule, CertificateRule, TrustRule, certificate_user


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    public: bool = False
    roles: frozenset[str] = frozenset()
    #: the methods the route covers (GET brings HEAD); None: every method. Another method
    #: falls through to the next route that matches
    methods: frozenset[str] | None = None
    #: ``access: certificate``: the certificate alone decides, the identity backend is not asked
    certificate_only: bool = False
    #: ``allow``: what the certificate must say
    allow: CertificateRule | None = None
    #: ``addresses``: who may reach the route, and who needs no certificate there
    addresses: AddressRule | None = None
    #: ``identityplus``: what Identity Plus must say of the device
    trust: TrustRule | None = None
    #: how logs and metrics name it: its path, made unique where paths repeat (empty: path)
    label: str = field(default="", compare=False)
    #: where it was configured (``routes[2]``, ``servers[1].routes[0]``), for people
    origin: str = field(default="", compare=False)

    def matches(self, path: str) -> bool:
        # "/admin/" also covers "/admin": the upstream usually serves both the same way.
        return path.startswith(self.path) or (
            self.path.endswith("/") and len(self.path) > 1 and path == self.path[:-1]
        )

    def covers(self, method: str | None) -> bool:
        """Whether the route applies to ``method`` (None: whatever the method)."""
        methods = self.methods
        return methods is None or method is None or method in methods

    @property
    def plain(self) -> bool:
        """Roles at most: nothing for ``admit`` to do (today's routes, the fast path)."""
        return (
            self.allow is None
            and self.addresses is None
            and self.trust is None
            and not self.certificate_only
        )

    @property
    def name(self) -> str:
        """The label logs and metrics use."""
        return self.label or self.path


#: what the route cache may hold, in bytes of keys (an entry costs its key and about this much)
ROUTE_CACHE_BYTES = 1 << 20
_ENTRY_OVERHEAD = 100
#: longer paths are matched every time (they are rare, and would fill the cache fastest)
_CACHED_PATH = 512


class RouteTable:
    """Routes compiled once; ``match`` is called per request."""

    def __init__(self, routes: Iterable[Route]) -> None:
        # Longest prefix first: the first hit is the longest match. The sort is stable:
        # routes with the same path keep the order they were configured in.
        self._routes = tuple(sorted(routes, key=lambda r: len(r.path), reverse=True))
        self._reader = PathReader(r.path for r in self._routes)
        #: some route covers only some methods: the method takes part in every match
        self.by_method = any(r.methods is not None for r in self._routes)
        # Keys are chosen by anonymous clients: bounded in bytes, emptied when full.
        self._cache: dict[str, Route | None] = {}
        self._cache_bytes = 0

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes, in the order they are tried."""
        return self._routes

    def _longest(self, prefixes: frozenset[str], method: str | None) -> Route | None:
        for route in self._routes:
            if route.path in prefixes and route.covers(method):
                return route
        return None

    def match(self, raw_path: str, method: str = "GET") -> Route | None:
        """The route for a raw request target and method, or None when none matches (denied).

        Raises ``BadPath`` when the target is malformed or its readings (letter case
        ignored or not) fall under different routes.
        """
        key = f"{method} {raw_path}" if self.by_method else raw_path
        cached = self._cache.get(key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        route = self._match(raw_path, method)
        if len(raw_path) <= _CACHED_PATH:
            cost = len(key) + _ENTRY_OVERHEAD
            if self._cache_bytes + cost > ROUTE_CACHE_BYTES:
                self._cache.clear()
                self._cache_bytes = 0
            self._cache[key] = route
            self._cache_bytes += cost
        return route

    def routed(self, raw_path: str) -> bool:
        """Whether some route covers the path with some method (for a refusal's reason)."""
        return self._match(raw_path, None) is not None

    def _match(self, raw_path: str, method: str | None) -> Route | None:
        routes = {self._longest(prefixes, method) for prefixes in self._reader.match_sets(raw_path)}
        if len(routes) != 1:
            raise BadPath("path is ambiguous: it could address different routes")
        return routes.pop()

    @property
    def cache_bytes(self) -> int:
        """What the cache holds now, as it counts it (for tests and metrics)."""
        return self._cache_bytes


_MISSING = object()


# ---- decisions ----------------------------------------------------------------------------


class Forward:
    """Send the request upstream; ``user`` is None for an anonymous (public) request.

    A plain class, not a frozen dataclass: the compiled build compiles this ``__init__``,
    where a dataclass's generated one runs interpreted (1.4 % of a worker's time on S1). It
    compares and hashes as the dataclass did; ``user`` is not assigned after ``__init__``."""

    __slots__ = ("user",)

    def __init__(self, user: User | None) -> None:
        self.user: Final = user

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Forward):
            return NotImplemented
        return self.user == other.user

    def __hash__(self) -> int:
        return hash((Forward, self.user))

    def __repr__(self) -> str:
        return f"Forward(user={self.user!r})"


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


class Refused(Exception):
    """A request refused while its route is chosen (its target is fine): ``deny`` says how."""

    def __init__(self, deny: Deny) -> None:
        super().__init__(deny.reason)
        self.deny = deny


NO_ROUTE = Deny(403, "no route allows this path", "no_route")
NO_METHOD = Deny(403, "no route allows this method on this path", "method_not_allowed")
METHOD_OVERRIDE = Deny(
    403,
    "the request asks to be served as another method (X-HTTP-Method-Override, X-HTTP-Method, "
    "X-Method-Override or _method), which this path's routes treat differently: send that "
    "method itself",
    "method_override",
)
NO_CERTIFICATE = Deny(401, "a client certificate is required", "no_certificate")
MISSING_ROLE = Deny(403, "your account lacks a role this path requires", "missing_role")
ADDRESS_REFUSED = Deny(
    403,
    "this path cannot be reached from your network address (addresses.allow)",
    "addresses.allow",
)
ANONYMOUS = Forward(None)
_TRUST_REFUSALS = {
    "identityplus.min_trust_score": Deny(
        403,
        "your device's Identity Plus trust score is lower than this path requires "
        "(identityplus.min_trust_score)",
        "identityplus.min_trust_score",
    ),
    "identityplus.max_local_intrusions": Deny(
        403,
        "more intrusions were reported for your certificate on this service than this path "
        "allows (identityplus.max_local_intrusions)",
        "identityplus.max_local_intrusions",
    ),
}
_matcher_refusals: dict[str, Deny] = {}


def matcher_refusal(key: str) -> Deny:
    """403 naming the matcher a certificate failed (``allow.san_uri``), never its contents."""
    deny = _matcher_refusals.get(key)
    if deny is None:
        deny = Deny(403, f"your client certificate does not satisfy this path's rule {key}", key)
        _matcher_refusals[key] = deny  # one per matcher key: a handful
    return deny


def trust_refusal(key: str) -> Deny:
    return _TRUST_REFUSALS[key]


def admit(route: Route, cert: ClientCert | None, address: str | None) -> Decision | None:
    """What a route decides before, or without, any identity verdict; None when the verdict
    decides. Fails closed, in this order: an address outside ``addresses.allow`` (403); on an
    exempt address, no certificate or one that fails a matcher is forwarded anonymously;
    no certificate where the certificate alone decides (401); a certificate that fails a
    matcher (403, naming it); one that passes where it alone decides is forwarded as its own
    user (``rules.certificate_user``). ``address`` is the client's, never from a header."""
    addresses = route.addresses
    exempt = False
    if addresses is not None:
        if not addresses.reaches(address):
            return ADDRESS_REFUSED
        exempt = addresses.exempts(address)
    if cert is None:
        if exempt:
            return ANONYMOUS
        return NO_CERTIFICATE if route.certificate_only else None
    allow = route.allow
    if allow is not None:
        failed = allow.first_failure(cert)
        if failed is not None:
            return ANONYMOUS if exempt else matcher_refusal(failed)
    if route.certificate_only:
        return Forward(certificate_user(cert))
    return None


def accepts_session(route: Route) -> bool:
    """Whether an Identity Plus HTTP-legacy session may stand for a certificate on ``route``:
    not where the certificate itself is judged (``allow`` matchers, ``certificate_only``),
    since the sidecar never saw one. Fails closed: such a route treats the session as no
    certificate."""
    return route.plain or (route.allow is None and not route.certificate_only)


def needs_verdict(route: Route, cert: ClientCert | None, address: str | None) -> bool:
    """Whether the identity backend is to be asked about ``cert`` for ``route``."""
    return cert is not None and (route.plain or admit(route, cert, address) is None)


def decide(
    route: Route | None,
    verdict: Verdict | None,
    *,
    has_certificate: bool,
    backend_failed: bool = False,
    enrol: bool = False,
    cert: ClientCert | None = None,
    address: str | None = None,
) -> Decision:
    """What to do with a request. Fails closed: anything not explicitly allowed is refused.

    ``verdict`` is None when there is no certificate or the backend failed
    (``backend_failed``); ``cert`` is the client certificate and ``address`` the client's
    address, for the route's own rules (``admit``). A public route is forwarded whatever the
    verdict, with the user only when the verdict allows; so is a route whose
    ``addresses.exempt`` holds the client, with the user only when every rule lets them in.
    """
    if route is None:
        return NO_ROUTE
    exempt = False
    if not route.plain:
        early = admit(route, cert if has_certificate else None, address)
        if early is not None:
            return early
        addresses = route.addresses
        exempt = addresses is not None and addresses.exempts(address)
    if route.public or exempt:
        if verdict is None or verdict.kind != "allow" or verdict.user is None:
            return ANONYMOUS
        if exempt and _refusal(route, verdict) is not None:
            return ANONYMOUS
        return Forward(verdict.user)
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
    refusal = _refusal(route, verdict)
    if refusal is not None:
        return refusal
    return Forward(verdict.user)


def _refusal(route: Route, verdict: Verdict) -> Deny | None:
    """What refuses an identified user: a missing role, then the device's trust."""
    user = verdict.user
    if route.roles and (user is None or route.roles.isdisjoint(user.roles)):
        return MISSING_ROLE
    trust = route.trust
    if trust is not None:
        failed = trust.failure(verdict.trust)
        if failed is not None:
            return trust_refusal(failed)
    return None


def certificate_refusal(cert: ClientCert, now: float) -> tuple[str, str] | None:
    """Checks OpenSSL made at the handshake, made again per request: a connection can outlive
    its certificate, and defence in depth costs two comparisons."""
    if now > cert.not_after_ts:
        return "your client certificate has expired", "cert_expired"
    if now < cert.not_before_ts:
        return "your client certificate is not valid yet", "cert_not_yet_valid"
    if not cert.client_auth:  # the attribute: certs.py is interpreted, a call costs more
        return (
            "your client certificate is not meant for client authentication",
            "cert_no_client_auth",
        )
    return None


def compile_routes(entries: Iterable[tuple[str, bool, Iterable[str]]]) -> RouteTable:
    return RouteTable(Route(path, public, frozenset(roles)) for path, public, roles in entries)
