"""What a reload can change, as one value: ``Plan``. Every request keeps the plan it began
with (``gateway.Gateway.begin``); a reload builds a whole new one (``app``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .certs import ClientCert
from .forwarder import Forwarder
from .frontproxy import FrontProxy
from .headers import HeaderRules
from .identity import LookupContext, SignOnPurpose, Verdict
from .identity.intents import SignOn
from .identity.legacy import Legacy
from .revocation.gate import Revocation
from .servers import Servers


class Identity(Protocol):
    """What the gateway needs of the identity side (the verdict cache)."""

    @property
    def name(self) -> str: ...

    @property
    def can_enrol(self) -> bool: ...

    def peek(self, cert: ClientCert) -> Verdict | None:
        """A fresh cached verdict without awaiting, or None."""
        ...

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict: ...

    async def sign_on(
        self,
        purpose: SignOnPurpose,
        return_url: str,
        client_ip: str | None,
        *,
        shared: bool = True,
    ) -> SignOn: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a reload can change, swapped in as one value: a request uses one plan."""

    #: the servers, their names (Host, SNI; any other is 421) and their routes
    policy: Servers
    identity: Identity
    upstream: Forwarder
    rules: HeaderRules
    max_header_block: int
    #: whether a certificate is refused now (long-lived: the same object in every plan)
    revocation: Revocation
    #: Identity Plus HTTP legacy (``identity.identityplus.legacy``), or None
    legacy: Legacy | None = None
    #: the trusted front proxies and their certificate header; None: no ``front_proxy``
    front: FrontProxy | None = None
