"""One request, from its head to its access event (``Request``), and the steps of its life as
a state machine: ``Step``, and every move it may make, ``_NEXT`` (``move`` makes one).

A protocol (``http1.client``, ``fallback``) makes a ``Request`` from what it read; the
``gateway`` moves it through its steps and records how it ended; the protocol writes its
answer. The one object carries all three, so a request costs one allocation, not one per
party."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Final

from multidict import CIMultiDict
from yarl import URL

from .certs import ClientCert
from .forwarder import Forwarder
from .headers import Captured
from .identity import User
from .plan import Plan
from .policy import Redirect, Route
from .responses import Answer


class Step(IntEnum):
    """Where a request is (``Request.step``). It moves only as ``_NEXT`` allows."""

    NEW = 0  #: read by a protocol; ``begin`` comes next
    LOOK_UP = 1  #: waits for a verdict from the identity side
    SIGN_ON = 2  #: waits for a sign-on address from the identity side
    FORWARD = 3  #: to be sent upstream (``request.upstream``, ``request.block``)
    ANSWER = 4  #: our own answer is ready (``request.answer``)
    FORWARDED = 5  #: the upstream's answer went to the client
    ENDED = 6  #: counted and logged
    RESOLVE = 7  #: waits for the identity side to resolve a sign-on's reference (HTTP legacy)


NEW: Final = Step.NEW
LOOK_UP: Final = Step.LOOK_UP
SIGN_ON: Final = Step.SIGN_ON
FORWARD: Final = Step.FORWARD
ANSWER: Final = Step.ANSWER
FORWARDED: Final = Step.FORWARDED
ENDED: Final = Step.ENDED
RESOLVE: Final = Step.RESOLVE

#: every move a request can make; an unexpected error moves any request still at work to
#: ANSWER (500)
_NEXT: Final[dict[Step, frozenset[Step]]] = {
    NEW: frozenset({LOOK_UP, SIGN_ON, RESOLVE, FORWARD, ANSWER}),
    LOOK_UP: frozenset({SIGN_ON, FORWARD, ANSWER}),
    SIGN_ON: frozenset({ANSWER}),
    RESOLVE: frozenset({ANSWER}),
    FORWARD: frozenset({FORWARDED, ANSWER}),
    ANSWER: frozenset({ENDED}),
    FORWARDED: frozenset({ENDED}),
    ENDED: frozenset(),
}


def move(request: Request, step: Step) -> None:
    """Move ``request`` to ``step``, as ``_NEXT`` allows (anything else is a bug: an error)."""
    if step not in _NEXT[request.step]:
        raise RuntimeError(f"a request cannot go from {request.step.name} to {step.name}")
    request.step = step


class Request:
    """One request from its head to its access event: what the protocol read, what the
    gateway made of it, and how it ended (the access event's values)."""

    __slots__ = (
        "_headers",
        "answer",
        "block",
        "cert",
        "chain",
        "chain_source",
        "client_ip",
        "decision",
        "has_host",
        "http10",
        "keep_alive",
        "legacy",
        "method",
        "peer_ip",
        "plan",
        "raw_headers",
        "reason",
        "redirect",
        "reports",
        "request_id",
        "route",
        "server_name",
        "session",
        "stale",
        "started",
        "status",
        "step",
        "target",
        "trusted",
        "upstream",
        "upstream_seconds",
        "user",
        "verdict_code",
    )

    def __init__(
        self,
        method: str,
        target: str,
        raw_headers: Sequence[tuple[bytes, bytes]],
        *,
        cert: ClientCert | None,
        peer_ip: str | None,
        server_name: str | None,
        chain: tuple[bytes, ...] = (),
        chain_source: Callable[[], tuple[bytes, ...]] | None = None,
        http10: bool = False,
        keep_alive: bool = True,
    ) -> None:
        # ---- what the protocol read
        self.method = method
        #: the request target as sent (origin-, absolute- or asterisk-form)
        self.target = target
        self.raw_headers = raw_headers
        self._headers: CIMultiDict[str] | None = None
        #: the connection's client certificate, parsed (None: no identity)
        self.cert = cert
        #: the validated certificates after ``cert`` (its issuers, the trust anchor left
        #: out), for the upstream's chain headers; () when not known
        self.chain: tuple[bytes, ...] = chain
        #: where ``chain`` is read from, when the plan's headers need it (``Gateway.begin``):
        #: reading it from OpenSSL costs more than a handshake's Python work otherwise does
        self.chain_source = chain_source
        self.peer_ip = peer_ip
        #: the client's address: the peer's, or behind a trusted front proxy the one its
        #: X-Forwarded-For names (``frontproxy``); for logs, policy and rate limits
        self.client_ip = peer_ip
        #: the TLS server name (SNI) the client asked for; None when it sent none
        self.server_name = server_name
        self.http10 = http10
        #: the client asked for the connection to stay open (the protocol may still close it)
        self.keep_alive = keep_alive
        # ---- what the gateway made of it
        self.step = NEW
        self.plan: Plan | None = None
        self.request_id = ""
        self.trusted = False
        self.started = 0.0
        self.route: Route | None = None
        #: FORWARD: where to, the header lines to send, and whether they have a Host
        self.upstream: Forwarder | None = None
        self.block = b""
        self.has_host = False
        #: SIGN_ON: the decision, and the URL to come back to
        self.redirect: tuple[Redirect, str] | None = None
        #: HTTP legacy: the server name cookies are bound to, once the request is in the
        #: flow; at RESOLVE also the sign-on's reference (None: unusable) and the URL
        #: without it
        self.legacy: tuple[str, str | None, str] | None = None
        #: HTTP legacy: the certificate the session cookie stands for (never sent upstream)
        self.session: ClientCert | None = None
        #: ANSWER: what to send
        self.answer: Answer | None = None
        # ---- how it ended
        self.status = 0
        #: forwarded, denied, redirected, unavailable, upstream_error, error
        self.decision = ""
        self.reason = ""
        self.verdict_code: str | None = None
        self.user: User | None = None
        self.stale = False
        self.upstream_seconds: float | None = None
        #: FORWARDED: the report headers the upstream's answer carried (taken out of it by
        #: ``Forward.head``), for the trust reporter
        self.reports: Captured | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        """The headers decoded (as aiohttp decodes them), made when first asked for: the
        usual forwarded request never needs them."""
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_headers
            )
        return headers

    @property
    def path(self) -> str:
        """The target's path, %-decoded (for the log only)."""
        return decoded_paths.get(self.target)

    @property
    def route_label(self) -> str:
        route = self.route
        return route.name if route is not None else "-"  # policy: unique labels


#: targets longer than this are decoded every time: rare, and they would fill the cache
_LONGEST_CACHED_TARGET = 1024
#: what an entry costs beyond its two strings' characters (object headers, the dict's slot)
_PATH_ENTRY = 120


class PathCache:
    """Decoded request paths by raw target, for the access log. Anonymous clients choose the
    keys, so what is held is bounded in characters (keys and values, about bytes, plus an
    estimate per entry), and the cache is emptied when it would pass that bound."""

    __slots__ = ("budget", "entries", "size")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self.entries: dict[str, str] = {}

    def get(self, raw: str) -> str:
        value = self.entries.get(raw)
        if value is not None:
            return value
        try:
            value = URL(raw, encoded=True).path
        except ValueError:
            value = raw
        if len(raw) <= _LONGEST_CACHED_TARGET:
            cost = len(raw) + len(value) + _PATH_ENTRY
            if self.size + cost > self.budget:
                self.entries.clear()
                self.size = 0
            self.entries[raw] = value
            self.size += cost
        return value


decoded_paths = PathCache(1 << 20)
