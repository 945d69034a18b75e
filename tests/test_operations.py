"""Operations: admin endpoints, metrics, logs, reload without downtime."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from .conftest import ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import make_ca, make_leaf


async def admin(running: Running, method: str, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{running.sidecar.admin_port}{path}"
    # the header a state-changing admin request needs (sidecar.admin); harmless on reads
    headers = {"X-Sidecar-Admin": "1"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as resp,
    ):
        return resp.status, await resp.text()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    assert found, f"no sample {name} {labels}"
    return total


async def request(running: Running, path: str, who: Any = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.url + path, ssl=running.client_ssl(who)) as resp,
    ):
        await resp.read()
        return resp.status


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def test_health_ready_and_metrics(running: Running) -> None:
    assert (await admin(running, "GET", "/healthz"))[0] == 200
    status, body = await admin(running, "GET", "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True}
    assert await request(running, "/app/", running.certs.bob) == 200
    assert await request(running, "/app/") == 401
    assert await request(running, "/admin/", running.certs.bob) == 403
    _, after = await admin(running, "GET", "/metrics")
    forwarded = dict(route="/", method="GET", decision="forwarded", status_class="2xx")
    assert metric(after, "sidecar_requests_total", **forwarded) == 1
    assert (
        metric(after, "sidecar_requests_total", route="/", decision="denied", status_class="4xx")
        == 1
    )
    assert metric(after, "sidecar_requests_total", route="/admin/", decision="denied") == 1
    assert metric(after, "sidecar_request_duration_seconds_count", decision="forwarded") == 1
    assert metric(after, "sidecar_upstream_duration_seconds_count") == 1
    assert metric(after, "sidecar_identity_lookups_total", backend="static", outcome="bound") == 1
    assert metric(after, "sidecar_cache_hits_total") == 1  # bob's second request
    assert metric(after, "sidecar_cache_entries") == 1
    assert metric(after, "sidecar_server_certificate_expiry_timestamp_seconds") > 0
    assert metric(after, "sidecar_in_flight_requests") == 0
    # labels never carry request paths or serials
    assert (
        "/app/" not in after and running.certs.bob.cert.serial_number.__format__("X") not in after
    )


async def test_handshake_failures_and_expiring_certificates_are_counted(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    soon = config_dir.certs.pki.client("expires soon", days_valid=(-1, 3))
    data = config_dir.base(upstream.port)
    data["identity"]["static"]["users"].append(
        {
            "sub": "s",
            "username": "soon",
            "certificates": [{"sha256": hashlib.sha256(soon.der).hexdigest()}],
        }
    )
    running = await start_sidecar(data)
    assert await request(running, "/app/", soon) == 200
    assert await request(running, "/app/", running.certs.bob) == 200
    outsider = make_leaf(make_ca("unknown"), "outsider")
    with pytest.raises((ssl.SSLError, aiohttp.ClientError, ConnectionError)):
        await request(running, "/app/", outsider)
    import gc

    gc.collect()
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_client_certificates_expiring_soon") == 1
    assert metric(text, "sidecar_tls_handshake_failures_total") >= 1


async def test_purge_forces_a_new_lookup(running: Running) -> None:
    bob = running.certs.bob
    assert await request(running, "/app/", bob) == 200
    assert await request(running, "/app/", bob) == 200
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_identity_lookups_total", backend="static") == 1
    serial = f"0x{bob.cert.serial_number:X}"
    status, body = await admin(running, "POST", f"/cache/purge?serial={serial}")
    assert status == 200 and json.loads(body) == {"purged": 1, "scope": "serial"}
    assert await request(running, "/app/", bob) == 200
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_identity_lookups_total", backend="static") == 2
    status, body = await admin(
        running, "POST", f"/cache/purge?sha256={hashlib.sha256(bob.der).hexdigest()}"
    )
    assert json.loads(body)["purged"] == 1
    status, body = await admin(running, "POST", "/cache/purge")
    assert status == 200 and json.loads(body)["scope"] == "all"
    assert (await admin(running, "POST", "/cache/purge?serial=zz"))[0] == 400
    assert (await admin(running, "POST", "/cache/purge?sha256=12"))[0] == 400
    assert (await admin(running, "GET", "/cache/purge"))[0] == 405


async def test_access_log_fields_and_no_secrets(running: Running) -> None:
    alice = running.certs.alice
    with capture_logs() as events:
        assert await request(running, "/admin/x?q=1", alice) == 200
    [event] = [e for e in events if e["event"] == "request"]
    for key in (
        "request_id",
        "client",
        "method",
        "path",
        "status",
        "duration_ms",
        "route",
        "decision",
        "reason",
        "cert_serial",
        "cert_sha256",
        "cert_subject",
        "sub",
        "upstream_ms",
    ):
        assert event.get(key) is not None, key
    assert event["cert_serial"] == f"{alice.cert.serial_number:X}"
    assert event["sub"] == "2d73cf2a-5339-421e-81cd-8fa0d25a100b"
    blob = json.dumps(events, default=str)
    import base64

    assert base64.b64encode(alice.der).decode()[:60] not in blob  # never the certificate
    assert "PRIVATE KEY" not in blob
    assert "eyJzdWIi" not in blob  # never the X-USERINFO value


async def test_reload_adds_user_while_keepalive_connection_stays_open(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    stranger = running.certs.stranger
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=running.client_ssl(stranger),
        server_hostname="localhost",
    )
    get = b"GET /app/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
    writer.write(get)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 403")
    data = yaml.safe_load((config_dir.path / "sidecar.yaml").read_text())
    data["identity"]["static"]["users"].append(
        {"sub": "sub-mallory", "username": "mallory", "certificates": [{"file": "stranger.pem"}]}
    )
    config_dir.write(data)
    assert await running.sidecar.reload("test")
    writer.write(get)  # the same, still open, keep-alive connection
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    writer.close()
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["username"] == "mallory"
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_config_reloads_total", result="success") == 1


async def test_broken_reload_keeps_serving(running: Running, config_dir: ConfigDir) -> None:
    (config_dir.path / "server.pem").write_text("not a certificate")
    with capture_logs() as events:
        assert not await running.sidecar.reload("test")
    assert any(e["event"] == "reload_failed" and "tls.certificate" in e["problem"] for e in events)
    assert await request(running, "/app/", running.certs.bob) == 200
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_config_reloads_total", result="failure") == 1
    assert (await admin(running, "GET", "/readyz"))[0] == 200


async def test_rotated_server_certificate_is_presented_to_new_connections(
    running: Running, config_dir: ConfigDir
) -> None:
    new_ca = make_ca("Rotated server CA")
    make_leaf(new_ca, "localhost", server=True).write(config_dir.path, "server")
    assert await running.sidecar.reload("test")
    ctx = ssl.create_default_context(cadata=new_ca.pem.decode())
    _, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=ctx, server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    rotated = x509.load_pem_x509_certificate((config_dir.path / "server.pem").read_bytes())
    assert der == rotated.public_bytes(serialization.Encoding.DER)
    with pytest.raises((ssl.SSLError, aiohttp.ClientError)):
        await request(running, "/public/x")  # the old CA no longer vouches for the server


async def test_removed_client_ca_refuses_next_handshake(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    bob = running.certs.bob
    assert await request(running, "/app/", bob) == 200
    other = make_ca("Some other client CA")
    (config_dir.path / "client-ca.pem").write_bytes(other.pem)
    assert await running.sidecar.reload("test")
    with pytest.raises((ssl.SSLError, aiohttp.ClientError, ConnectionError)):
        await request(running, "/app/", bob)
    assert len(upstream.seen) == 1


async def test_watched_file_change_reloads(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["reload"] = {"watch": True, "interval": "100ms"}
    running = await start_sidecar(data)
    assert await request(running, "/app/", running.certs.stranger) == 403
    data["identity"]["static"]["users"].append(
        {"sub": "sub-mallory", "username": "mallory", "certificates": [{"file": "stranger.pem"}]}
    )
    config_dir.write(data)
    for _ in range(50):
        await asyncio.sleep(0.1)
        if await request(running, "/app/", running.certs.stranger) == 200:
            break
    else:
        pytest.fail("the changed file was not picked up")


async def test_readiness_fails_while_draining(running: Running) -> None:
    running.sidecar.readiness.draining = True
    status, body = await admin(running, "GET", "/readyz")
    assert status == 503 and json.loads(body)["reason"] == "draining"
    assert (await admin(running, "GET", "/healthz"))[0] == 200


async def test_reload_keeps_a_warm_cache_unless_identity_changed(
    running: Running, config_dir: ConfigDir
) -> None:
    bob = running.certs.bob
    assert await request(running, "/app/", bob) == 200
    data = yaml.safe_load((config_dir.path / "sidecar.yaml").read_text())
    data["routes"].append({"path": "/extra/", "access": "public"})
    config_dir.write(data)
    assert await running.sidecar.reload("test")
    assert await request(running, "/app/", bob) == 200
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_identity_lookups_total", backend="static") == 1  # still cached
    data["identity"]["static"]["users"][1]["roles"] = ["member", "auditor"]
    config_dir.write(data)
    assert await running.sidecar.reload("test")
    assert await request(running, "/app/", bob) == 200
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_identity_lookups_total", backend="static") == 2  # asked again
