"""Headers that tell an application who the client is or which host it asked for, attacked
from outside over real TLS (issue #12, second round, finding 9).

Frameworks and their plugins take the client's address from whichever of these they find
first (the PHP "real IP" idiom reads ``HTTP_CLIENT_IP`` before ``X-Forwarded-For``; Rails'
``RemoteIp`` reads ``Client-IP``; django-ipware and python-ipware read ``X-Forwarded``,
``Forwarded-For``, ``Via``, ``Fastly-Client-IP`` ...), and build links and redirects from
``X-Host`` and ``X-Original-Host``. Only a trusted proxy may send them: from any other peer
they are removed, in every spelling; from a trusted proxy they pass.
"""

from __future__ import annotations

import pytest

from sidecar.config import ConfigError, load

from .conftest import ConfigDir, Running, SidecarFactory
from .servers import Scripted, StartScripted, keep_alive_ok
from .test_header_names_security import Client, normal, received_fields

#: (header, what reads it) — the README's table gives each one's reason
CLIENT_ADDRESS = [
    ("Client-IP", "Rails ActionDispatch::RemoteIp, the PHP 'real IP' idiom, ipware"),
    ("X-Forwarded", "Squid; django-ipware, python-ipware"),
    ("Forwarded-For", "django-ipware, python-ipware"),
    ("X-Originating-IP", "Microsoft mail and web front ends; application plugins"),
    ("X-Remote-IP", "PHP 'real IP' helpers"),
    ("X-Remote-Addr", "PHP 'real IP' helpers"),
    ("Fastly-Client-IP", "Fastly; python-ipware"),
    ("Fly-Client-IP", "Fly.io; python-ipware"),
    ("X-AppEngine-User-IP", "Google App Engine; python-ipware"),
    ("X-Azure-ClientIP", "Azure Front Door; python-ipware"),
    ("X-Azure-SocketIP", "Azure Front Door"),
    ("DO-Connecting-IP", "DigitalOcean App Platform; python-ipware"),
    ("X-Envoy-External-Address", "Envoy and Istio; python-ipware"),
    ("X-Envoy-Internal", "Envoy: 'the client is internal', trusted by Envoy-aware services"),
    ("CF-Connecting-IPv6", "Cloudflare"),
    ("CF-Pseudo-IPv4", "Cloudflare"),
    ("X-Original-Forwarded-For", "ingress-nginx keeps the client's X-Forwarded-For here"),
    ("X-ProxyUser-IP", "Google"),
    ("Via", "django-ipware before 3 reads HTTP_VIA as the client's address"),
    ("X-Host", "host-override readers; link and redirect builders"),
    ("X-Original-Host", "Azure Application Gateway, ASP.NET; link and redirect builders"),
]
NAMES = [name for name, _ in CLIENT_ADDRESS]


@pytest.fixture
async def recorder(scripted: StartScripted) -> Scripted:
    return await scripted(keep_alive_ok)


async def gate(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, recorder: Scripted, trusted: bool
) -> Running:
    data = config_dir.base(recorder.port)
    if trusted:
        data["trusted_proxies"] = ["127.0.0.1/32"]
    running: Running = await start_sidecar(data)
    return running


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["listener", "aiohttp"])
@pytest.mark.parametrize("who", [None, "bob"])
async def test_client_address_headers_are_removed_from_clients(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    recorder: Scripted,
    method: str,
    who: str | None,
) -> None:
    running = await gate(start_sidecar, config_dir, recorder, trusted=False)
    client = Client(running, running.certs.bob if who else None)
    sent = [(name, "10.6.6.6") for name in NAMES]
    sent += [(name.upper().replace("-", "_"), "10.6.6.7") for name in NAMES]  # CGI spelling
    try:
        target = "/app/x" if who else "/public/x"
        assert await client.send(method, target, sent) == 200
    finally:
        await client.close()
    received = received_fields(recorder)
    arrived = {normal(name) for name, _ in received}
    assert not arrived & {normal(name) for name in NAMES}, received


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["listener", "aiohttp"])
async def test_a_trusted_proxy_may_send_them(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, recorder: Scripted, method: str
) -> None:
    running = await gate(start_sidecar, config_dir, recorder, trusted=True)
    client = Client(running, None)
    try:
        assert await client.send(method, "/public/x", [(n, "10.1.2.3") for n in NAMES]) == 200
    finally:
        await client.close()
    received = dict(received_fields(recorder))
    assert {name: received.get(name) for name in NAMES} == dict.fromkeys(NAMES, "10.1.2.3")


@pytest.mark.parametrize("name", ["Client-IP", "X_Forwarded", "Via", "X.Host"])
def test_they_cannot_be_configured_as_identity_headers(config_dir: ConfigDir, name: str) -> None:
    data = config_dir.base()
    data["headers"] = {"userinfo": name}
    with pytest.raises(ConfigError) as caught:
        load(config_dir.write(data))
    assert any(
        p.startswith(f"headers.userinfo: {name!r} is a header") for p in caught.value.problems
    ), caught.value.problems
