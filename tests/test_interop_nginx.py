"""nginx in front of the sidecar (issue #15, item 5): the README's worked example, for real.

nginx terminates TLS, asks for a client certificate without verifying it
(``ssl_verify_client optional_no_ca``) and passes it as ``ssl-client-cert:
$ssl_client_escaped_cert`` to the sidecar in front-proxy mode (``listen.tls: false``). nginx
connects from 127.0.0.2 (``proxy_bind``), the only trusted address; the tests' own direct
connections come from 127.0.0.1, an untrusted peer. Missing nginx is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from .conftest import ALICE_SUB, ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import PKI, Issued
from .test_listener import Response, read_response


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else ""
                pytest.fail(f"nginx did not start listening on {port}: {text}")
            time.sleep(0.05)


class Nginx:
    def __init__(self, port: int) -> None:
        self.port = port


@pytest.fixture
async def sidecar(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    data: dict[str, Any] = config_dir.base(upstream.port)
    data["listen"] = {"host": "127.0.0.1", "port": 0, "tls": False, "server_names": ["localhost"]}
    data["front_proxy"] = {"trusted": ["127.0.0.2/32"], "certificate_header": "ssl-client-cert"}
    running: Running = await start_sidecar(data)
    return running


@pytest.fixture
def nginx(sidecar: Running, config_dir: ConfigDir) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if binary is None:
        pytest.fail("nginx is not installed (Debian: apt-get install nginx); .ci/run installs it")
    prefix = config_dir.path / "nginx"
    prefix.mkdir()
    port = _free_port()
    log = prefix / "error.log"
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {log} info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {config_dir.path}/server.pem;
        ssl_certificate_key {config_dir.path}/server.key;
        ssl_verify_client optional_no_ca;
        location / {{
            proxy_pass http://127.0.0.1:{sidecar.sidecar.port};
            proxy_bind 127.0.0.2;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header ssl-client-cert $ssl_client_escaped_cert;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
}}
"""
    )
    check = subprocess.run(
        [binary, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(log)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(conf), "-e", str(log), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, process, log)
        yield Nginx(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def get(
    port: int,
    path: str,
    *,
    tls: ssl.SSLContext | None,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls is not None else None
    )
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        async with asyncio.timeout(15):
            return await read_response(reader)
    finally:
        writer.close()


def escaped(cert: Issued) -> str:
    return quote(cert.pem.decode(), safe="")


async def test_a_client_certificate_through_nginx_is_the_right_identity(
    nginx: Nginx, sidecar: Running, upstream: Upstream
) -> None:
    answer = await get(nginx.port, "/admin/x", tls=sidecar.client_ssl(sidecar.certs.alice))
    assert answer.status == 200, answer.body
    seen = upstream.last
    assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    assert not seen.header("ssl-client-cert")
    # Bob, a member, is not an administrator: the same policy as over TLS
    assert (
        await get(nginx.port, "/admin/x", tls=sidecar.client_ssl(sidecar.certs.bob))
    ).status == 403
    assert (await get(nginx.port, "/x", tls=sidecar.client_ssl(sidecar.certs.bob))).status == 200
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["username"] == "bob"


async def test_without_a_certificate_a_clients_header_does_not_pass_nginx(
    nginx: Nginx, sidecar: Running, upstream: Upstream
) -> None:
    forged = [("ssl-client-cert", escaped(sidecar.certs.alice))]
    assert (await get(nginx.port, "/x", tls=sidecar.client_ssl(), headers=forged)).status == 401
    assert (
        await get(nginx.port, "/public/x", tls=sidecar.client_ssl(), headers=forged)
    ).status == 200
    assert not upstream.last.header("X-USERINFO")
    assert not upstream.last.header("ssl-client-cert")


async def test_a_forged_header_from_an_untrusted_peer_is_stripped(
    nginx: Nginx, sidecar: Running, upstream: Upstream
) -> None:
    forged = [("ssl-client-cert", escaped(sidecar.certs.alice))]
    direct = sidecar.sidecar.port  # from 127.0.0.1, not nginx's 127.0.0.2
    assert (await get(direct, "/x", tls=None, headers=forged)).status == 401
    assert (await get(direct, "/public/x", tls=None, headers=forged)).status == 200
    assert not upstream.last.header("ssl-client-cert")
    assert not upstream.last.header("X-USERINFO")


async def test_an_unverifiable_certificate_from_nginx_is_refused(
    nginx: Nginx, sidecar: Running, upstream: Upstream
) -> None:
    # optional_no_ca: nginx asks for any certificate and passes it on; the sidecar verifies
    mallory = PKI.create().client("Mallory")
    answer = await get(nginx.port, "/public/x", tls=sidecar.client_ssl(mallory))
    assert answer.status == 403
    assert b"does not verify" in answer.body
    assert not upstream.seen
