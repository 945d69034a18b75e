"""The few exceptions that cross module boundaries.

Foreign errors (ssl, yaml, aiohttp, cryptography) are translated into these where the foreign
call is made, so that callers deal with our vocabulary only.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one ``path: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class CertificateError(ValueError):
    """A certificate or key file that cannot be read or does not fit its purpose."""


class IdentityUnavailable(Exception):
    """The identity backend could not give a verdict (network, timeout, malformed reply)."""

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        self.reason = reason
        self.code = code
        super().__init__(reason)


class UpstreamError(Exception):
    """The upstream application could not be reached or did not answer in time.

    ``kind`` is one of ``connect``, ``timeout``, ``reset``, ``protocol``: a bounded label for
    metrics, and what the gateway answers by (504 for ``timeout``, else 502).
    """

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}")


class LimitReached(Exception):
    """A bound on what clients may hold refuses a request before it is forwarded.

    ``limit`` is the ``limits`` key (a bounded label for metrics); ``status`` what the gateway
    answers: 429 for a bound per client address (that client holds too much), 503 for one
    per worker (everyone together does).
    """

    def __init__(self, limit: str, status: int) -> None:
        self.limit = limit
        self.status = status
        super().__init__(f"limits.{limit} reached")
