"""What a new connection costs the sidecar beyond OpenSSL's handshake (issue #19 item 4): the
client's verified chain is read from OpenSSL only when a configured certificate header carries
it, and each handshake makes one TLS 1.3 ticket, not two."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.certs import ClientCert
from sidecar.request import Request

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .test_tls_tickets_workers import fetch


@pytest.mark.parametrize(
    ("formats", "read"),
    [(None, False), (["app-certificate"], False), (["app-certificate", "xfcc"], True)],
)
async def test_the_chain_is_read_only_when_a_header_carries_it(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    formats: list[str] | None,
    read: bool,
) -> None:
    data: dict[str, Any] = config_dir.base(upstream.port)
    if formats is not None:
        data["headers"] = {"certificate_formats": formats}
    running: Running = await start_sidecar(data)
    calls: list[int] = []

    def source() -> tuple[bytes, ...]:
        calls.append(1)
        return (b"issuer",)

    request = Request(
        "GET",
        "/app/x",
        [(b"Host", b"localhost")],
        cert=ClientCert.from_der(config_dir.certs.alice.der),
        peer_ip="127.0.0.1",
        server_name="localhost",
        chain_source=source,
    )
    handler = running.sidecar.handler
    assert handler is not None
    handler.begin(request)
    assert calls == ([1] if read else [])
    assert request.chain == ((b"issuer",) if read else ())
    assert request.chain_source is None  # the connection is not kept alive by the request


async def test_one_ticket_per_handshake(running: Running) -> None:
    """TLS 1.3: the client receives one session ticket (OpenSSL's default is two, each a copy
    of the session with the client's certificate decoded again)."""
    assert running.sidecar.tls.current.num_tickets == 1
    ctx = running.client_ssl(running.certs.alice)
    first = await fetch(running.sidecar.port, ctx, "/app/first")
    assert first.status == 200 and first.session is not None and first.session.has_ticket
    again = await fetch(running.sidecar.port, ctx, "/app/again", first.session)
    assert (again.status, again.reused) == (200, True)
