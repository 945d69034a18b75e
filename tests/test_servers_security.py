"""Several sites on one port (``servers[]``, issue #16), through the real TLS listener: the
server is chosen by SNI during the handshake, with its own certificate, its own
``client_certificate`` mode and its own routes; a client without SNI gets the first; a
``Host`` that is not the chosen server's gets 421 (emissary#3340, apisix#8967: mTLS bypassed
when SNI and Host disagree); reloads change servers for the next connection."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidecar import tls_sessions, tls_tickets

from .conftest import ALICE_SUB, ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import Issued, make_leaf
from .policy_helpers import Answer, ask, leaf
from .test_listener import Conn, req

SPIFFE = "spiffe://prod.example/ns/shop/sa/orders"


def server_cert(config_dir: ConfigDir, name: str, *names: str) -> tuple[str, str]:
    issued = make_leaf(config_dir.certs.pki.server_ca, name, server=True, san_dns=[name, *names])
    cert, key = issued.write(config_dir.path, f"site-{name}")
    return str(cert), str(key)


def sites(config_dir: ConfigDir, upstream: Upstream) -> dict[str, Any]:
    """app.example (optional, people), www.example (none: public), api.example (required:
    services by SPIFFE ID)."""
    data = config_dir.base(upstream.port)
    del data["routes"]
    tls = {k: v for k, v in data["tls"].items() if k not in ("certificate", "key")}
    data["tls"] = tls
    app_cert, app_key = server_cert(config_dir, "app.example", "*.app.example")
    www_cert, www_key = server_cert(config_dir, "www.example")
    api_cert, api_key = server_cert(config_dir, "api.example")
    data["servers"] = [
        {
            "names": ["app.example", "*.app.example"],
            "certificate": app_cert,
            "key": app_key,
            "routes": [
                {"path": "/admin/", "roles": ["administrator"]},
                {"path": "/public/", "access": "public"},
                {"path": "/"},
            ],
        },
        {
            "names": ["www.example"],
            "certificate": www_cert,
            "key": www_key,
            "client_certificate": "none",
            "routes": [{"path": "/", "access": "public"}],
        },
        {
            "names": ["api.example"],
            "certificate": api_cert,
            "key": api_key,
            "client_certificate": "required",
            "routes": [
                {
                    "path": "/",
                    "access": "certificate",
                    "allow": {"san_uri": ["spiffe://prod.example/"]},
                }
            ],
        },
    ]
    return data


@pytest.fixture
async def running(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    result: Running = await start_sidecar(sites(config_dir, upstream))
    return result


async def get(
    running: Running,
    upstream: Upstream,
    path: str,
    *,
    sni: str | None,
    host: str,
    who: Issued | None = None,
) -> Answer:
    return await ask(running, upstream, path, who=who, host=host, server_name=sni)


def presented(running: Running, who: Issued | None, sni: str | None) -> ssl.SSLContext:
    context = running.client_ssl(who)
    context.check_hostname = False
    return context


@contextlib.asynccontextmanager
async def tls_to(
    running: Running, sni: str | None, who: Issued | None = None
) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=presented(running, who, sni),
        server_hostname=sni or "",
    )
    conn = Conn(reader, writer)
    try:
        yield conn
    finally:
        await conn.close()


def server_names_of(conn: Conn) -> list[str]:
    der = conn.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return list(
        cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    )


# ---- the server and its certificate are chosen by SNI -------------------------------------------


@pytest.mark.parametrize(
    ("sni", "names"),
    [
        ("app.example", ["app.example", "*.app.example"]),
        ("eu.app.example", ["app.example", "*.app.example"]),  # the wildcard
        ("WWW.Example", ["www.example"]),
        ("api.example", ["api.example"]),
        (None, ["app.example", "*.app.example"]),  # no SNI: the first server
        ("unknown.example", ["app.example", "*.app.example"]),  # no such server: the first
    ],
)
async def test_each_server_presents_its_certificate(
    running: Running, config_dir: ConfigDir, sni: str | None, names: list[str]
) -> None:
    who = (
        leaf(config_dir.certs.pki.client_intermediate, "o", uris=[SPIFFE])
        if sni == "api.example"
        else None
    )
    async with tls_to(running, sni, who) as conn:
        assert server_names_of(conn) == names


async def test_the_client_certificate_mode_is_the_servers(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    alice = config_dir.certs.alice
    # app.example asks (optional): alice is identified
    answer = await get(
        running, upstream, "/admin/x", sni="app.example", host="app.example", who=alice
    )
    assert answer.status == 200 and answer.seen is not None
    assert decode_userinfo(answer.seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    # www.example asks for nothing: the client has a certificate but sends none
    public = await get(running, upstream, "/", sni="www.example", host="www.example", who=alice)
    assert public.status == 200 and public.seen is not None
    assert not public.seen.header("X-USERINFO") and not public.seen.header("X-APP-CERTIFICATE")
    # api.example requires one: refused during the handshake
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await get(running, upstream, "/", sni="api.example", host="api.example")
    orders = leaf(config_dir.certs.pki.client_intermediate, "orders", uris=[SPIFFE])
    service = await get(running, upstream, "/x", sni="api.example", host="api.example", who=orders)
    assert service.status == 200 and service.seen is not None
    assert decode_userinfo(service.seen.header("X-USERINFO")[0])["sub"] == SPIFFE
    # routes are per server: /admin/ on api.example is the service route
    refused = await get(
        running, upstream, "/admin/x", sni="api.example", host="api.example", who=alice
    )
    assert refused.status == 403 and refused.seen is None


async def s_client(port: int, folder: Path, sni: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        sni,
        "-CAfile",
        str(folder / "server-ca.pem"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode(errors="replace")


@pytest.mark.parametrize("version", [[], ["-tls1_2"]])
async def test_a_public_server_sends_no_certificate_request(
    running: Running, config_dir: ConfigDir, version: list[str]
) -> None:
    """What a browser shows as a certificate prompt is the CertificateRequest: none on
    www.example, one on app.example (optional) and api.example (required)."""
    folder = config_dir.path
    www = await s_client(running.sidecar.port, folder, "www.example", "-msg", *version)
    assert "subject=CN = www.example" in www and "Verify return code: 0 (ok)" in www, www
    assert "CertificateRequest" not in www, www
    app = await s_client(running.sidecar.port, folder, "app.example", "-msg", *version)
    assert "subject=CN = app.example" in app and "CertificateRequest" in app, app
    api = await s_client(running.sidecar.port, folder, "api.example", *version, "-ign_eof")
    assert "alert certificate required" in api or "alert handshake failure" in api, api


# ---- Host must name the chosen server -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "host"),
    [
        ("www.example", "app.example"),  # the public site's connection, the protected site's Host
        ("www.example", "api.example"),
        ("app.example", "www.example"),
        (None, "www.example"),  # no SNI: the first server, whose names www.example is not
        ("unknown.example", "unknown.example"),  # the first server does not serve it
        ("unknown.example", "app.example"),  # and the Host is not the SNI
        ("eu.app.example", "app.example"),  # a wildcard's name, and another Host
    ],
)
async def test_a_host_that_is_not_the_chosen_servers_is_421(
    running: Running, config_dir: ConfigDir, upstream: Upstream, sni: str | None, host: str
) -> None:
    answer = await get(
        running, upstream, "/admin/x", sni=sni, host=host, who=config_dir.certs.alice
    )
    assert answer.status == 421, answer.response.body
    assert answer.seen is None


async def test_without_sni_the_first_server_serves_its_names(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    answer = await get(
        running, upstream, "/admin/x", sni=None, host="app.example", who=config_dir.certs.alice
    )
    assert answer.status == 200
    eu = await get(running, upstream, "/public/x", sni="eu.app.example", host="eu.app.example")
    assert eu.status == 200


async def test_a_client_hello_dribbled_byte_by_byte(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """The listener waits for the whole ClientHello before choosing the server."""
    context = presented(running, None, "www.example")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="www.example")
    reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.port)
    try:
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        hello = outgoing.read()
        for i in range(len(hello)):
            writer.write(hello[i : i + 1])
            await writer.drain()
            if i % 64 == 0:
                await asyncio.sleep(0.001)
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the listener closed the connection"
                incoming.write(data)
        writer.write(outgoing.read())
        der = client.getpeercert(binary_form=True)
        assert der is not None
        peer = x509.load_der_x509_certificate(der)
        assert peer.subject.rfc4514_string() == "CN=www.example"
        client.write(req("GET", "/", host="www.example"))
        writer.write(outgoing.read())
        answer = b""
        while b"\r\n\r\n" not in answer:
            incoming.write(await asyncio.wait_for(reader.read(65536), 5))
            with contextlib.suppress(ssl.SSLWantReadError):
                answer += client.read(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def test_route_labels_name_the_server(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    await get(running, upstream, "/public/x", sni="app.example", host="app.example")
    await get(running, upstream, "/", sni="www.example", host="www.example")
    labels = {
        s.labels["route"]
        for metric in running.sidecar.metrics.registry.collect()
        if metric.name == "sidecar_requests"
        for s in metric.samples
    }
    assert labels == {"app.example/public/", "www.example/"}


# ---- reload ---------------------------------------------------------------------------------------


async def test_a_reload_changes_servers_for_the_next_connection(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    alice = config_dir.certs.alice
    assert (await get(running, upstream, "/", sni="www.example", host="www.example")).status == 200
    data = sites(config_dir, upstream)
    www = data["servers"][1]
    www["client_certificate"] = "required"
    www["routes"] = [{"path": "/", "roles": ["administrator"]}]
    data["servers"].append(
        {
            "names": ["new.example"],
            "certificate": server_cert(config_dir, "new.example")[0],
            "key": server_cert(config_dir, "new.example")[1],
            "routes": [{"path": "/", "access": "public"}],
        }
    )
    config_dir.write(data)
    assert await running.sidecar.reload("test")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await get(running, upstream, "/", sni="www.example", host="www.example")
    admin = await get(running, upstream, "/", sni="www.example", host="www.example", who=alice)
    assert admin.status == 200 and admin.seen is not None and admin.seen.header("X-USERINFO")
    fresh = await get(running, upstream, "/", sni="new.example", host="new.example")
    assert fresh.status == 200
    async with tls_to(running, "new.example") as conn:
        assert server_names_of(conn) == ["new.example"]
    # and back to the short form: one certificate, the servers gone
    config_dir.write(config_dir.base(upstream.port))
    assert await running.sidecar.reload("test")
    gone = await get(running, upstream, "/", sni="new.example", host="new.example")
    assert gone.status == 421
    assert (
        await get(running, upstream, "/public/", sni="localhost", host="localhost")
    ).status == 200


# ---- sessions made with one server's name, resumed with another's -------------------------------


@pytest.mark.parametrize("resumption", ["cache", "tickets", "table"])
async def test_a_session_resumes_only_under_the_servers_name_it_was_made_for(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream, resumption: str
) -> None:
    """A session made for www.example (no client certificate asked) offered to api.example,
    which requires one: OpenSSL must not resume it (the listener picks the server's context
    before the handshake, and each context has its own cache or ticket keys), so the client
    meets api.example's certificate request. Both ways of resuming: one process's cache, and
    the workers' shared tickets. (Plain Python's servername callback switches contexts too
    late for this: the session is resumed with the first context's cache or keys.)"""
    from .test_tls_tickets_workers import fetch

    options: dict[str, Any] = {}
    if resumption != "cache":  # as a worker of several
        options["ticket_secret"] = tls_tickets.new_secret()
    if resumption == "table":  # ... whose sessions go to the table the workers share
        options["shared_sessions"] = tls_sessions.SessionStore.inherited(tls_sessions.create(64))
    running: Running = await start_sidecar(sites(config_dir, upstream), **options)
    port = running.sidecar.port
    anonymous = presented(running, None, None)
    public = await fetch(port, anonymous, "/", name="www.example")
    again = await fetch(port, anonymous, "/", public.session, name="www.example")
    assert (public.status, again.status, again.reused) == (200, 200, True)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        await fetch(port, anonymous, "/", again.session, name="api.example")
    assert len(upstream.seen) == 2
    # a session of app.example, where Alice is allowed, is a full handshake on api.example,
    # whose route does not allow her
    alice = presented(running, running.certs.alice, None)
    app = await fetch(port, alice, "/", name="app.example")
    crossed = await fetch(port, alice, "/", app.session, name="api.example")
    assert (app.status, crossed.status, crossed.reused) == (200, 403, False)
    assert len(upstream.seen) == 3
