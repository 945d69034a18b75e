"""Certificate headers a client sends, attacked from outside over real TLS (issue #15).

Every header name of every certificate format the sidecar reads or writes
(``certformats.HEADER_NAMES``: RFC 9440 ``Client-Cert``, Envoy's XFCC, nginx's
``ssl-client-cert``, Traefik's, AWS ALB's) is removed from every client request, on every
route (public ones included), from trusted proxies too, in any spelling, on the listener's
path and on aiohttp's; what the application gets is only what the sidecar built from the
chain it validated.
"""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import certformats

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .test_header_security import PATH_IDS, PATHS, names_received, send


def spellings(name: str) -> list[str]:
    return [name, name.upper(), name.replace("-", "_"), name.title()]


FORGED = [
    (spelled, "forged") for name in sorted(certformats.HEADER_NAMES) for spelled in spellings(name)
]


@pytest.fixture(params=[False, True], ids=["client", "trusted-proxy"])
async def sidecar(
    request: pytest.FixtureRequest,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> Running:
    data: dict[str, Any] = config_dir.base(upstream.port)
    if request.param:
        data["trusted_proxies"] = ["127.0.0.1/32"]
    running: Running = await start_sidecar(data)
    return running


@pytest.mark.parametrize(("method", "body"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("path", ["/public/x", "/admin/x", "/x"])
async def test_no_certificate_header_of_any_format_passes(
    sidecar: Running, upstream: Upstream, method: str, body: bytes, path: str
) -> None:
    who = None if path.startswith("/public/") else sidecar.certs.alice
    status = await send(sidecar, path, FORGED, who, method)
    assert status == 200
    received = names_received(upstream)
    assert not received & certformats.HEADER_NAMES, received & certformats.HEADER_NAMES
    assert all(value != "forged" for _, value in upstream.last.headers)
