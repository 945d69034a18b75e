"""The static backend: users and their bound certificates, from the configuration.

A certificate is identified when its SHA-256 fingerprint is bound to a user; any other
certificate, however well it chains, is refused.
"""

from __future__ import annotations

from types import MappingProxyType

from ..certs import ClientCert
from ..config import StaticConfig
from ..errors import IdentityUnavailable
from . import LookupContext, SignOnPurpose, User, Verdict


class StaticBackend:
    name = "static"
    can_enrol = False

    def __init__(self, config: StaticConfig) -> None:
        users: dict[str, Verdict] = {}
        for entry in config.users:
            user = User(
                sub=entry.sub,
                username=entry.username,
                given_name=entry.given_name,
                family_name=entry.family_name,
                email=entry.email,
                roles=entry.roles,
            )
            verdict = Verdict.allow(user, code="bound")
            for binding in entry.certificates:
                users[binding.fingerprint] = verdict
        self._by_fingerprint = MappingProxyType(users)
        self._unbound = Verdict.deny("certificate is not bound to a user", code="unbound")

    def lookup_now(self, cert: ClientCert) -> Verdict:
        """The synchronous answer: a dict lookup, cheap enough to skip the cache's machinery."""
        return self._by_fingerprint.get(cert.sha256, self._unbound)

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        return self.lookup_now(cert)

    async def sign_on(self, purpose: SignOnPurpose, return_url: str) -> str:
        raise IdentityUnavailable("the static backend has no sign-on service")

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._by_fingerprint)
