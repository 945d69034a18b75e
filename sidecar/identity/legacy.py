"""Identity Plus "HTTP legacy": an identity for a browser whose certificate cannot be seen.

When a load balancer terminates TLS and will not ask for a client certificate, a browser is
sent to Identity Plus sign-on with an intent that is not ``strict-massl``: Identity Plus does
the mutual TLS itself and sends the browser back with ``identity-plus-intent=<reference>``,
which the sidecar resolves once into the certificate the person presented there. That
certificate (known by its serial, ``ClientCert.known_by_serial``) is then kept in a sealed
session cookie (``sessions``) and checked on every request like a certificate the sidecar
saw itself: verdict cache, then backend.

This module owns the flow's rules; the gateway calls it and makes the answers:

- ``reference``: the parameter in a request target, and the target without it;
- ``intent_cookie``: set with the redirect to sign-on, it holds the intent's reference,
  sealed, for the intent's lifetime. The browser that comes back must carry it with the same
  reference: a reference that leaked (a log, a shared link) or was planted by someone else's
  link is refused, and a return later than the intent's lifetime is refused;
- ``resolve``: each reference is resolved at most once by this process (a replay is refused
  before any call), then the session cookie is made;
- ``session``: the certificate a request's session cookie stands for, or why none.

Everything here fails closed: anything but exactly what the sidecar itself issued, in time,
is no identity.
"""

from __future__ import annotations

import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import unquote

from ..certs import ClientCert
from ..sessions import CLOCK_SKEW, COOKIE_NAME, Outcome, SessionSealer
from . import Verdict

#: the query parameter Identity Plus appends to the return URL
PARAMETER = "identity-plus-intent"
#: the cookie that carries a sign-on's reference from the redirect to the return
INTENT_COOKIE = "__Host-sidecar-intent"
#: how long an intent lives at Identity Plus (spec/identityplus.md: about 30 s); a return
#: later than this after the redirect is refused
INTENT_LIFETIME = 30.0
#: references remembered as used; past this, a return is refused until some expire
MAX_REMEMBERED = 10_000

_INTENT = "intent"
_SEPARATORS = re.compile(r"([&?])")
_SESSION = "session"

#: resolved: a session cookie was made; forged: no intent cookie from this service, or one
#: for another reference; replayed: already resolved once; expired: past the intent's
#: lifetime; unresolved: Identity Plus did not resolve it to an allowed certificate
Resolution = Literal["resolved", "forged", "replayed", "expired", "unresolved"]


class Resolver(Protocol):
    """The backend's side (``IdentityPlusBackend.resolve_intent``)."""

    async def resolve_intent(self, reference: str) -> tuple[int, Verdict] | None: ...


@dataclass(frozen=True, slots=True)
class Resolved:
    """How a return ended; ``cookie`` is the session's ``Set-Cookie`` when ``resolved``."""

    outcome: Resolution
    cookie: str | None = None


class Legacy:
    """The HTTP-legacy flow for one configuration (see the module's docstring).

    ``keys`` seal and open the cookies (the first seals); ``lifetime`` bounds a session
    (``identity.cache.ttl``); ``clock`` is wall-clock seconds (cookies outlive processes).
    """

    def __init__(
        self,
        resolver: Resolver,
        keys: Sequence[bytes],
        *,
        lifetime: float,
        clock: Callable[[], float] = time.time,
        intent_lifetime: float = INTENT_LIFETIME,
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        self._resolver = resolver
        self.sealer = SessionSealer(keys, lifetime=lifetime, clock=clock)
        self._clock = clock
        self.intent_lifetime = intent_lifetime
        self._max_remembered = max_remembered
        #: reference -> when it may be forgotten (its intent cookie has expired by then)
        self._used: OrderedDict[str, float] = OrderedDict()

    # ---- the sign-on ------------------------------------------------------------------------

    def intent_cookie(self, location: str, *, host: str) -> str:
        """The ``Set-Cookie`` for a redirect to ``location`` (``<signon_url>/<reference>``,
        as ``IdentityPlusBackend.sign_on`` makes it), for the server name ``host``."""
        reference = unquote(location.rsplit("/", 1)[-1])
        return self.sealer.set_cookie(
            {"k": _INTENT, "r": reference},
            host=host,
            name=INTENT_COOKIE,
            lifetime=self.intent_lifetime,
        )

    async def resolve(
        self, reference: str, cookie_headers: Iterable[str], *, host: str
    ) -> Resolved:
        """A return from sign-on with ``reference``, on a request for ``host`` carrying
        ``cookie_headers``: the session's ``Set-Cookie``, or why not.

        Raises ``IdentityUnavailable`` when Identity Plus fails (the reference is spent
        all the same: a reference is never sent twice)."""
        opened = self.sealer.open_request(cookie_headers, host=host, name=INTENT_COOKIE)
        if opened.outcome == "expired":
            return Resolved("expired")
        claims = opened.claims
        if (
            opened.outcome != "valid"
            or claims is None
            or claims.get("k") != _INTENT
            or not isinstance(claims.get("r"), str)
            or not hmac.compare_digest(str(claims["r"]).encode(), reference.encode())
        ):
            return Resolved("forged")
        if self._clock() - opened.issued_at > self.intent_lifetime:
            return Resolved("expired")
        if not self._spend(reference, opened.expires_at):
            return Resolved("replayed")
        found = await self._resolver.resolve_intent(reference)
        if found is None or found[1].kind != "allow":
            return Resolved("unresolved")
        cookie = self.sealer.set_cookie({"k": _SESSION, "s": str(found[0])}, host=host)
        return Resolved("resolved", cookie)

    def _spend(self, reference: str, expires_at: float) -> bool:
        """Mark ``reference`` used; False when it was already, or when too many are
        remembered to tell (fails closed)."""
        used = self._used
        now = self._clock()
        while used and next(iter(used.values())) <= now:
            used.popitem(last=False)
        if reference in used or len(used) >= self._max_remembered:
            return False
        # Remembered until its intent cookie cannot be accepted any more, whatever the order
        # the references arrive in (skew: a cookie issued by a replica whose clock is ahead).
        used[reference] = max(expires_at, now + self.intent_lifetime) + CLOCK_SKEW
        return True

    # ---- the session ------------------------------------------------------------------------

    def session(
        self, cookie_headers: Iterable[str], *, host: str
    ) -> tuple[Outcome, ClientCert | None]:
        """The certificate a request's session cookie stands for, with the cookie's outcome
        (``sessions.Outcome``); a cookie that is not a session this service made for ``host``
        in its lifetime stands for none."""
        opened = self.sealer.open_request(cookie_headers, host=host)
        claims = opened.claims
        if opened.outcome != "valid" or claims is None:
            return opened.outcome, None
        serial = claims.get("s")
        if claims.get("k") != _SESSION or not isinstance(serial, str) or not serial.isdigit():
            return "invalid", None
        return "valid", ClientCert.known_by_serial(int(serial))


def reference(target: str) -> tuple[str | None, str] | None:
    """The ``identity-plus-intent`` parameter of a request ``target``: None when there is
    none; else (the reference, or None when it is empty or given more than once, and the
    target without every occurrence). A name written with %-escapes counts: an application
    decoding it would see the parameter."""
    path, mark, query = target.partition("?")
    if not mark or ("intent" not in query.lower() and "%" not in query):
        return None
    # "?" separates too: a client that appends "?identity-plus-intent=" to a URL that has a
    # query already makes "/p?x=1?identity-plus-intent=R" (else a loop back to sign-on)
    tokens = _SEPARATORS.split(query)
    kept: list[str] = []
    values: list[str] = []
    for i in range(0, len(tokens), 2):
        piece = tokens[i]
        name, _, value = piece.partition("=")
        if unquote(name.replace("+", " ")).lower() == PARAMETER:
            values.append(unquote(value.replace("+", " ")))
        else:
            kept.append((tokens[i - 1] if i else "") + piece)
    if not values:
        return None
    rest = "".join(kept)
    if rest[:1] in ("&", "?"):
        rest = rest[1:]  # the first piece kept was not the first: its separator goes
    clean = path + ("?" + rest if rest else "")
    found = values[0] if len(values) == 1 and values[0] else None
    return found, clean


_OURS = (COOKIE_NAME, INTENT_COOKIE)
_PREFIX = b"__Host-sidecar-"


def cookie_headers(raw_headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """The ``Cookie`` header values that may hold one of our cookies (most requests have
    none: one substring search per Cookie header)."""
    return [
        value.decode("latin-1")
        for name, value in raw_headers
        if len(name) == 6 and name.lower() == b"cookie" and _PREFIX in value
    ]


def without_cookies(raw_headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``raw_headers`` without our cookies (the application never sees them, valid or not);
    a ``Cookie`` header left empty is dropped, the others' cookies kept as sent."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in raw_headers:
        if len(name) == 6 and name.lower() == b"cookie" and _PREFIX in value:
            pairs = [
                pair
                for pair in value.split(b";")
                if pair.strip(b" \t").partition(b"=")[0].rstrip(b" \t").decode("latin-1")
                not in _OURS
            ]
            value = b";".join(pairs).strip(b" \t")
            if not value:
                continue
        out.append((name, value))
    return out
