"""The PROXY protocol from trusted load balancers (issue #15, item 2), over real sockets.

With ``listen.proxy_protocol: true`` every connection starts with a PROXY header (version 1
or 2), read before TLS, within ``limits.handshake_timeout`` and ``proxyproto.MAX_LENGTH``
bytes, and only from ``front_proxy.trusted`` networks: any other connection is closed at
accept, whatever it sends. The address in the header is the client's for the access log,
``X-Forwarded-For``, trusted-proxy decisions, route ``addresses`` and rate limits. Then a
real HAProxy (``send-proxy-v2`` and ``send-proxy``) in TCP mode in front: the client's
certificate and address reach the application. Missing HAProxy is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from .conftest import ALICE_SUB, ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .test_listener import Response, read_response

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 192.0.2.1 {port} 443\r\n".encode()


def v2(source: str, port: int = 40000) -> bytes:
    # HAProxy's doc/proxy-protocol.txt 2.2: version 2, PROXY; AF_INET, STREAM; 12 bytes
    body = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address("192.0.2.1").packed
    body += struct.pack("!HH", port, 443)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def config(
    config_dir: ConfigDir,
    upstream: Upstream,
    *,
    trusted: list[str],
    tls: bool = True,
    **listen: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = config_dir.base(upstream.port)
    data["listen"] = {"host": "127.0.0.1", "port": 0, "proxy_protocol": True, "tls": tls, **listen}
    if not tls:
        data["listen"]["server_names"] = ["localhost"]
    data["front_proxy"] = {"trusted": trusted}
    data["routes"] = [
        {"path": "/public/", "access": "public"},
        {"path": "/admin/", "roles": ["administrator"]},
        {"path": "/office/", "addresses": {"allow": ["203.0.113.0/24"]}},
        {"path": "/"},
    ]
    return data


async def exchange(
    running: Running,
    header: bytes,
    path: str,
    *,
    tls: ssl.SSLContext | None,
    port: int | None = None,
    local: str | None = None,
) -> Response:
    """A request after ``header`` (sent in the clear, before TLS)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port or running.sidecar.port,
        local_addr=(local, 0) if local else None,
    )
    try:
        writer.write(header)
        await writer.drain()
        if tls is not None:
            await writer.start_tls(tls, server_hostname="localhost")
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(15):
            return await read_response(reader)
    finally:
        writer.close()


async def closed(running: Running, first: bytes, *, wait: float = 15) -> bool:
    """Whether the sidecar closes a connection that sent ``first`` (without answering)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.port)
    try:
        writer.write(first)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(wait):
            try:
                return await reader.read(1) == b""
            except ConnectionError:
                return True
    finally:
        writer.close()


@pytest.fixture
async def trusted(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    running: Running = await start_sidecar(config(config_dir, upstream, trusted=["127.0.0.1/32"]))
    return running


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
async def test_the_headers_address_is_the_clients(
    trusted: Running, upstream: Upstream, make: Any
) -> None:
    alice = trusted.client_ssl(trusted.certs.alice)
    with capture_logs() as logs:
        answer = await exchange(trusted, make("203.0.113.9"), "/office/x", tls=alice)
    assert answer.status == 200, answer.body
    seen = upstream.last
    assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    assert seen.header("X-Forwarded-For") == ["203.0.113.9"]
    assert seen.header("X-Real-IP") == ["203.0.113.9"]
    assert [e["client"] for e in logs if e["event"] == "request"] == ["203.0.113.9"]
    # another client address: the route's addresses say no
    answer = await exchange(trusted, make("198.51.100.7"), "/office/x", tls=alice)
    assert answer.status == 403


async def test_the_real_address_decides_trust(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    # The load balancer (127.0.0.1) is trusted; the client behind it is not a trusted proxy:
    # its X-Forwarded-For is replaced, not appended to.
    data = config(config_dir, upstream, trusted=["127.0.0.1/32"])
    running: Running = await start_sidecar(data)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.port)
    writer.write(v1("203.0.113.9"))
    await writer.drain()
    await writer.start_tls(running.client_ssl(running.certs.alice), server_hostname="localhost")
    writer.write(
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"X-Forwarded-For: 10.9.9.9\r\n\r\n"
    )
    async with asyncio.timeout(15):
        assert (await read_response(reader)).status == 200
    writer.close()
    assert upstream.last.header("X-Forwarded-For") == ["203.0.113.9"]


async def test_plain_http_after_the_header(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running: Running = await start_sidecar(
        config(config_dir, upstream, trusted=["127.0.0.1/32"], tls=False)
    )
    answer = await exchange(running, v2("203.0.113.9"), "/public/x", tls=None)
    assert answer.status == 200
    assert upstream.last.header("X-Forwarded-For") == ["203.0.113.9"]


async def test_an_untrusted_peer_is_closed_whatever_it_sends(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running: Running = await start_sidecar(config(config_dir, upstream, trusted=["10.0.0.0/8"]))
    with capture_logs() as logs:
        assert await closed(running, v1("203.0.113.9"))
        assert await closed(running, v2("203.0.113.9"))
    assert any(e["event"] == "proxy_protocol_refused" for e in logs)
    assert not upstream.seen


@pytest.mark.parametrize(
    "first",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello: no header
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PROXY TCP4 203.0.113.009 192.0.2.1 1 2\r\n",  # not canonical
        b"PROXY " + b"A" * 200,  # no CRLF within 107 bytes
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # declares more than MAX_LENGTH
    ],
    ids=["tls", "http", "leading-zero", "long-v1", "huge-v2"],
)
async def test_anything_but_a_header_from_a_trusted_peer_is_closed(
    trusted: Running, upstream: Upstream, first: bytes
) -> None:
    assert await closed(trusted, first)
    assert not upstream.seen


async def test_a_header_that_never_ends_is_closed_at_the_deadline(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config(config_dir, upstream, trusted=["127.0.0.1/32"])
    data["limits"] = {"handshake_timeout": "1s"}
    running: Running = await start_sidecar(data)
    assert await closed(running, b"PROXY TCP4 203.0.113.9", wait=20)


# ---- a real HAProxy in front ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def behind_haproxy(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    # HAProxy connects from 127.0.0.2, the only trusted address
    running: Running = await start_sidecar(config(config_dir, upstream, trusted=["127.0.0.2/32"]))
    return running


@pytest.fixture
def haproxy(behind_haproxy: Running, tmp_path: Path) -> Iterator[dict[str, int]]:
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.fail(
            "haproxy is not installed (Debian: apt-get install haproxy); .ci/run installs it"
        )
    ports = {"v2": _free_port(), "v1": _free_port()}
    sidecar = f"127.0.0.1:{behind_haproxy.sidecar.port}"
    lines = [
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 15s",
        "    timeout server 15s",
        "listen v2",
        f"    bind 127.0.0.1:{ports['v2']}",
        f"    server sidecar {sidecar} source 127.0.0.2 send-proxy-v2",
        "listen v1",
        f"    bind 127.0.0.1:{ports['v1']}",
        f"    server sidecar {sidecar} source 127.0.0.2 send-proxy",
    ]
    path = tmp_path / "haproxy.cfg"
    path.write_text("\n".join(lines) + "\n")
    check = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    process = subprocess.Popen(
        [binary, "-db", "-f", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        for port in ports.values():
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        out = process.stdout.read().decode() if process.stdout else ""
                        pytest.fail(f"HAProxy did not start on {port}: {out}")
                    time.sleep(0.05)
        yield ports
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize("way", ["v2", "v1"])
async def test_through_a_real_haproxy(
    haproxy: dict[str, int], behind_haproxy: Running, upstream: Upstream, way: str
) -> None:
    running = behind_haproxy
    # the client connects to HAProxy from 127.0.0.3: that is what the application must see
    answer = await exchange(
        running,
        b"",
        "/admin/x",
        tls=running.client_ssl(running.certs.alice),
        port=haproxy[way],
        local="127.0.0.3",
    )
    assert answer.status == 200, answer.body
    seen = upstream.last
    assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    assert seen.header("X-Forwarded-For") == ["127.0.0.3"]
    # Bob through HAProxy: his own identity, refused /admin/ as before
    bob = running.client_ssl(running.certs.bob)
    answer = await exchange(running, b"", "/admin/x", tls=bob, port=haproxy[way], local="127.0.0.3")
    assert answer.status == 403
    # and straight to the sidecar from 127.0.0.1, even with a well-formed header: closed
    assert await closed(running, v2("203.0.113.9"))
