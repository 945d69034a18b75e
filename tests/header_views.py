"""Decoded views of the header rules for the tests' assertions: ``request_fields`` and
``response_fields`` (which work on the bytes as sent) on a multidict, as a multidict."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.headers import HeaderRules, lines_to_multidict, request_fields, response_fields
from sidecar.identity import User


def _encoded(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[tuple[bytes, bytes]]:
    return [
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        for name, value in headers.items()
    ]


def upstream_headers(
    rules: HeaderRules,
    incoming: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    client_ip: str | None,
    trusted: bool,
    request_id: str,
    user: User | None,
    certificate_b64: str | None,
) -> CIMultiDict[str]:
    """``request_fields`` for decoded headers, as a multidict."""
    block, _ = request_fields(
        rules,
        _encoded(incoming),
        client_ip=client_ip,
        trusted=trusted,
        request_id=request_id,
        user=user,
        certificate_b64=certificate_b64,
    )
    return lines_to_multidict(block)


def response_headers(incoming: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop and report ones (framing is ours to decide)."""
    block, _, _ = response_fields(_encoded(incoming))
    return lines_to_multidict(block)
