"""Identity: what a backend says about a client certificate.

A ``Backend`` turns a ``ClientCert`` into a ``Verdict``: allow (with the ``User`` to announce
upstream), deny, validate (the person must go through the identity service first), or
unknown (the service has never seen this certificate: like having none). A
backend that cannot answer raises ``IdentityUnavailable``; it never guesses. The verdict
cache sits in front of every backend and has the same shape.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol

from ..certs import ClientCert

#: allow: identified; deny: refused (403); validate: the person must validate the certificate
#: with the identity service first (redirect); unknown: the identity service knows no such
#: certificate, which is treated like no certificate at all (401, or the enrolment redirect).
VerdictKind = Literal["allow", "deny", "validate", "unknown"]


@dataclass(frozen=True, slots=True)
class User:
    """The person behind a certificate, as announced upstream in ``X-USERINFO``."""

    sub: str
    username: str
    given_name: str | None = None
    family_name: str | None = None
    email: str | None = None
    roles: tuple[str, ...] = ()
    #: base64 of the UTF-8 JSON document: the exact header value, computed once per user.
    header_value: str = field(default="", compare=False, repr=False)
    #: the same, as the bytes sent
    header_bytes: bytes = field(default=b"", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.sub or not self.username:
            raise ValueError("a user needs a non-empty sub and username")
        if not self.header_value:
            object.__setattr__(self, "header_value", _userinfo_b64(self))
        object.__setattr__(self, "header_bytes", self.header_value.encode("ascii"))


def _userinfo_b64(user: User) -> str:
    doc: dict[str, object] = {"sub": user.sub, "username": user.username}
    for key in ("given_name", "family_name", "email"):
        value = getattr(user, key)
        if value:
            doc[key] = value
    doc["roles"] = list(user.roles)
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class Trust:
    """What Identity Plus says of the device behind a certificate, for route policy only
    (``routes[].identityplus``): never part of ``X-USERINFO``. None where the profile did not
    say, or said something that is not a number of the right kind."""

    #: ``trust-score``: a decimal from 0 to 5
    score: Decimal | None = None
    #: ``local-intrusions``: intrusions reported on this service
    local_intrusions: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A backend's answer for one certificate.

    ``reason`` is plain words safe to show the client; ``code`` is the backend's own code
    for logs and metrics (e.g. ``OK 0001``, ``unbound``); ``ttl`` overrides the cache's
    default when the backend says how long the answer holds.
    """

    kind: VerdictKind
    reason: str
    code: str
    user: User | None = None
    ttl: float | None = None
    #: where to send the person for ``validate`` when the backend already knows
    redirect: str | None = None
    #: served from cache past its ttl because the backend failed (stale-if-error)
    stale: bool = False
    #: the identity service's view of the device (Identity Plus), for route policy
    trust: Trust | None = None

    @classmethod
    def allow(
        cls, user: User, code: str = "allow", ttl: float | None = None, trust: Trust | None = None
    ) -> Verdict:
        return cls("allow", "identified", code, user=user, ttl=ttl, trust=trust)

    @classmethod
    def deny(cls, reason: str, code: str = "deny", ttl: float | None = None) -> Verdict:
        return cls("deny", reason, code, ttl=ttl)


@dataclass(frozen=True, slots=True)
class LookupContext:
    """What a backend may need besides the certificate."""

    client_ip: str | None = None


#: validate a certificate; enrol (get) one; legacy: sign on without the sidecar seeing any
#: certificate (Identity Plus HTTP legacy: the sign-on resolves the identity instead)
SignOnPurpose = Literal["validate", "enrol", "legacy"]


class Backend(Protocol):
    """Gives verdicts. Raises ``IdentityUnavailable`` when it cannot; never allows by default."""

    name: str
    #: True when the backend can send a person without a certificate to get one
    can_enrol: bool

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict: ...

    async def sign_on(self, purpose: SignOnPurpose, return_url: str) -> str:
        """The URL to send a browser to (validate a certificate, or enrol one).

        Raises ``IdentityUnavailable`` when the backend cannot make one.
        """
        ...

    async def close(self) -> None: ...
