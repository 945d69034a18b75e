"""The identity backend's word on revocation: Identity Plus says a certificate is revoked
(``PB 0004``) or was reported as an intruder (``PB 0005``).

``WatchedBackend`` wraps the configured backend, unchanged, and tells
``Revocation.backend_revoked`` of each such verdict. Within a process the verdict cache
keeps the refusal itself (it replaces whatever was cached for the certificate); what this adds
is the notice (``Revocation.on_revoked``) for whatever shares verdicts beyond the process.
"""

from __future__ import annotations

from typing import Any

from ..certs import ClientCert
from ..identity import Backend, LookupContext, SignOnPurpose, Verdict
from .gate import Revocation

#: Identity Plus outcomes that say a certificate is withdrawn: revoked, and reported intruder
REVOKING_CODES = frozenset({"PB 0004", "PB 0005"})


class WatchedBackend:
    """An identity backend, unchanged, whose revoking verdicts (``REVOKING_CODES``) are told to
    ``Revocation.backend_revoked``. Everything else about the backend is passed through."""

    def __init__(self, backend: Backend, revocation: Revocation) -> None:
        self.backend = backend
        self._revocation = revocation
        self.name = backend.name
        self.can_enrol = backend.can_enrol

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        verdict = await self.backend.lookup(cert, context)
        if verdict.code in REVOKING_CODES:
            self._revocation.backend_revoked(cert, verdict.code)
        return verdict

    async def sign_on(self, purpose: SignOnPurpose, return_url: str) -> str:
        return await self.backend.sign_on(purpose, return_url)

    async def close(self) -> None:
        await self.backend.close()

    def __getattr__(self, name: str) -> Any:
        # what the application reads of a backend by name (agent_expiry, credential_problem,
        # ping): the backend's own
        return getattr(self.backend, name)
