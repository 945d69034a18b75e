"""The admin listener against browsers: cross-site requests and DNS rebinding.

A web page the operator visits can make the browser send requests to 127.0.0.1 (cross-site),
and a page whose name the attacker re-points at 127.0.0.1 can send same-origin ones with any
header (DNS rebinding). Neither may change state (``POST /cache/purge``) or read anything.
The tests speak raw HTTP to the real admin listener, as such a browser would, then check
that nothing was purged; the rule itself is also checked on generated requests against what
a page can make a browser send.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.admin import ADMIN_HEADER, known_names, refusal
from sidecar.config import AdminConfig, ConfigError, parse

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .test_operations import metric, request
from .test_signals import client_ctx, slow_upstream, start  # noqa: F401 (slow_upstream: a fixture)

Headers = list[tuple[str, str]]


async def admin_raw(
    port: int, method: str, path: str, headers: Headers, body: bytes = b"", *, version: str = "1.1"
) -> tuple[int, dict[str, Any]]:
    """One request, byte for byte as given (no Host unless ``headers`` has one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {path} HTTP/{version}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = {"raw": payload.decode("latin-1")}
    return int(status_line.split()[1]), doc


async def cached(running: Running) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{running.sidecar.admin_port}/metrics") as resp,
    ):
        return metric(await resp.text(), "sidecar_cache_entries")


def here(running: Running) -> str:
    return f"127.0.0.1:{running.sidecar.admin_port}"


#: what a page on http://evil.example can make a browser send to http://127.0.0.1:9090 without
#: a preflight: a form or fetch(..., {mode: "no-cors"}) with a simple content type
CROSS_SITE: dict[str, Headers] = {
    "form": [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", "http://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "navigate"),
    ],
    "text/plain fetch": [
        ("Content-Type", "text/plain;charset=UTF-8"),
        ("Origin", "http://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "no-cors"),
    ],
    "multipart form": [
        ("Content-Type", "multipart/form-data; boundary=x"),
        ("Origin", "http://evil.example"),
    ],
    "sandboxed iframe": [("Content-Type", "text/plain"), ("Origin", "null")],
    # a page on another port of the same host is "same-site", not "same-origin"
    "same-site page": [("Content-Type", "text/plain"), ("Sec-Fetch-Site", "same-site")],
    # an old browser that sends neither Origin nor Sec-Fetch-*
    "old browser": [("Content-Type", "application/x-www-form-urlencoded")],
}


@pytest.mark.parametrize("kind", sorted(CROSS_SITE))
async def test_a_cross_site_simple_post_is_refused_and_purges_nothing(
    running: Running, kind: str
) -> None:
    assert await request(running, "/app/", running.certs.bob) == 200
    assert await cached(running) == 1
    headers = [("Host", here(running)), *CROSS_SITE[kind]]
    status, doc = await admin_raw(
        running.sidecar.admin_port, "POST", "/cache/purge", headers, b"serial=1"
    )
    assert status == 403
    assert ADMIN_HEADER in doc["error"] or "another site" in doc["error"], doc
    assert await cached(running) == 1


async def test_a_cross_site_page_cannot_add_the_header_either(running: Running) -> None:
    """With the custom header or a JSON body the browser asks first (a CORS preflight, which
    gets no CORS answer); a browser that sent it anyway still says where the page is from."""
    assert await request(running, "/app/", running.certs.bob) == 200
    port = running.sidecar.admin_port
    for headers in (
        [("Host", here(running)), (ADMIN_HEADER, "1"), ("Origin", "http://evil.example")],
        [("Host", here(running)), ("Content-Type", "application/json"), ("Origin", "null")],
        [("Host", here(running)), (ADMIN_HEADER, "1"), ("Sec-Fetch-Site", "cross-site")],
    ):
        assert (await admin_raw(port, "POST", "/cache/purge", headers, b"{}"))[0] == 403
    preflight = [
        ("Host", here(running)),
        ("Origin", "http://evil.example"),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", ADMIN_HEADER.lower()),
    ]
    status, _ = await admin_raw(port, "OPTIONS", "/cache/purge", preflight)
    assert status >= 400
    assert await cached(running) == 1


@pytest.mark.parametrize("path", ["/cache/purge", "/metrics", "/readyz"])
async def test_dns_rebinding_is_refused(running: Running, path: str) -> None:
    """After evil.example resolves to 127.0.0.1 its page is same-origin with the listener and
    may send any header; only the Host it sends gives it away."""
    assert await request(running, "/app/", running.certs.bob) == 200
    port = running.sidecar.admin_port
    origin = f"evil.example:{port}"
    headers = [
        ("Host", origin),
        ("Origin", f"http://{origin}"),
        ("Sec-Fetch-Site", "same-origin"),
        (ADMIN_HEADER, "1"),
        ("Content-Type", "application/json"),
    ]
    method = "POST" if path == "/cache/purge" else "GET"
    status, doc = await admin_raw(port, method, path, headers, b"{}" if method == "POST" else b"")
    assert status == 421
    assert "evil.example" in doc["error"]
    assert await cached(running) == 1


async def test_the_documented_request_purges(running: Running) -> None:
    """README: curl -X POST -H 'X-Sidecar-Admin: 1' http://127.0.0.1:9090/cache/purge"""
    assert await request(running, "/app/", running.certs.bob) == 200
    url = f"http://127.0.0.1:{running.sidecar.admin_port}/cache/purge"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-X", "POST", "-H", f"{ADMIN_HEADER}: 1", url, stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert json.loads(out) == {"purged": 1, "scope": "all"}
    assert await cached(running) == 0
    # a JSON body is a non-simple request too
    assert await request(running, "/app/", running.certs.bob) == 200
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json={}) as resp,
    ):
        assert resp.status == 200 and (await resp.json())["purged"] == 1
    # the header's value does not matter, only that it is there
    status, doc = await admin_raw(
        running.sidecar.admin_port,
        "POST",
        "/cache/purge",
        [("Host", here(running)), (ADMIN_HEADER, "yes")],
    )
    assert status == 200 and doc["scope"] == "all"


@pytest.mark.parametrize(
    "host",
    [
        None,  # HTTP/1.0 without Host; a browser always sends one
        "127.0.0.1:{port}",
        "127.0.0.1",
        "[::1]:{port}",
        "10.42.0.17:{port}",  # a pod's address: kubelet probes, Prometheus' pod discovery
        "localhost:{port}",
        "LOCALHOST.",
        "shop-sidecar-metrics.prod.svc:{port}",  # named in admin.server_names
        "Shop-Sidecar-Metrics.prod.svc.cluster.local.",
    ],
)
async def test_probes_and_scrapes_keep_working(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream, host: str | None
) -> None:
    data = config_dir.base(upstream.port)
    data["admin"]["server_names"] = [
        "shop-sidecar-metrics.prod.svc",
        "shop-sidecar-metrics.prod.svc.cluster.local",
    ]
    running = await start_sidecar(data)
    port = running.sidecar.admin_port
    headers = [] if host is None else [("Host", host.format(port=port))]
    # what kubelet and Prometheus send
    headers += [("User-Agent", "kube-probe/1.29"), ("Accept", "*/*")]
    version = "1.0" if host is None else "1.1"
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _ = await admin_raw(port, "GET", path, headers, version=version)
        assert status == 200, (host, path)
    marked = [*headers, (ADMIN_HEADER, "1")]
    status, _ = await admin_raw(port, "POST", "/cache/purge", marked, version=version)
    assert status == 200


async def test_a_name_not_configured_is_refused(running: Running) -> None:
    port = running.sidecar.admin_port
    status, doc = await admin_raw(port, "GET", "/metrics", [("Host", f"metrics.internal:{port}")])
    assert status == 421
    assert "admin.server_names" in doc["error"]


@pytest.mark.own_process
async def test_through_the_supervisor(config_dir: ConfigDir, slow_upstream: int) -> None:  # noqa: F811
    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await start(config_dir, data)
    try:
        bob = client_ctx(config_dir, "bob")
        for _ in range(10):  # new connections: both workers cache bob
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"https://localhost:{port}/app/", ssl=bob) as resp,
            ):
                assert resp.status == 200
        host = f"127.0.0.1:{admin_port}"
        status, doc = await admin_raw(
            admin_port, "POST", "/cache/purge", [("Host", host), *CROSS_SITE["form"]], b"a=1"
        )
        assert status == 403, doc
        status, doc = await admin_raw(
            admin_port, "POST", "/cache/purge", [("Host", f"evil.example:{admin_port}")]
        )
        assert status == 421, doc
        status, doc = await admin_raw(
            admin_port, "GET", "/metrics", [("Host", f"evil.example:{admin_port}")]
        )
        assert status == 421, doc
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}/metrics") as resp:
                before = metric(await resp.text(), "sidecar_cache_entries")
            assert before >= 1  # nothing was purged
            async with session.post(
                f"http://{host}/cache/purge", headers={ADMIN_HEADER: "1"}
            ) as resp:
                assert resp.status == 200
                assert await resp.json() == {"purged": before, "workers": 2}
            for path in ("/healthz", "/readyz"):
                async with session.get(f"http://{host}{path}") as resp:
                    assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await proc.communicate()


# ---- the rule, on generated requests -------------------------------------------------------

CONFIG = AdminConfig(host="0.0.0.0", server_names=("metrics.shop.svc",))
NAMES = known_names(CONFIG)
OURS = ["127.0.0.1:9090", "[::1]:9090", "10.0.0.7", "localhost:9090", "metrics.shop.svc:9090"]
SIMPLE_TYPES = [
    None,
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
]
ANY_TYPES = [*SIMPLE_TYPES, "application/json", "Application/JSON; charset=utf-8"]
UNSAFE = ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"]


def headers_of(pairs: list[tuple[str, str | None]]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in pairs if v is not None)


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "HEAD", *UNSAFE]),
    host=st.sampled_from(OURS),
    origin=st.sampled_from(["http://evil.example", "http://127.0.0.1:8000", "null"]),
    fetch_site=st.sampled_from([None, "cross-site", "same-site"]),
    content_type=st.sampled_from(SIMPLE_TYPES),
    marker=st.sampled_from([None, "1"]),
)
def test_no_cross_site_request_is_answered(
    method: str,
    host: str,
    origin: str,
    fetch_site: str | None,
    content_type: str | None,
    marker: str | None,
) -> None:
    """Whatever a foreign page makes the browser send (it always says its Origin), nothing
    is answered; and without the marker no state-changing request is."""
    headers = headers_of(
        [
            ("Host", host),
            ("Origin", origin),
            ("Sec-Fetch-Site", fetch_site),
            ("Content-Type", content_type),
            (ADMIN_HEADER, marker),
        ]
    )
    assert refusal(method, headers, NAMES) is not None
    # A browser too old to send Origin or Sec-Fetch-*: it cannot add the header either
    # (CORS), so it is the marker that keeps state changes out of its reach.
    del headers["Origin"]
    if fetch_site is not None or (method not in ("GET", "HEAD") and marker is None):
        assert refusal(method, headers, NAMES) is not None


@settings(max_examples=300, derandomize=True)
@given(
    method=st.sampled_from(["GET", "HEAD", *UNSAFE]),
    name=st.sampled_from(["evil.example", "127.0.0.1.nip.io", "localhost.evil.example", "x"]),
    port=st.sampled_from(["", ":9090", ":80"]),
    fetch_site=st.sampled_from([None, "same-origin", "none"]),
    content_type=st.sampled_from(ANY_TYPES),
    marker=st.sampled_from([None, "1"]),
)
def test_no_rebound_name_is_answered(
    method: str,
    name: str,
    port: str,
    fetch_site: str | None,
    content_type: str | None,
    marker: str | None,
) -> None:
    """A page whose own name now resolves to us is same-origin and may send any header: only
    its Host tells it apart, and that is enough."""
    host = name + port
    headers = headers_of(
        [
            ("Host", host),
            ("Origin", f"http://{host}"),
            ("Sec-Fetch-Site", fetch_site),
            ("Content-Type", content_type),
            (ADMIN_HEADER, marker),
        ]
    )
    refused = refusal(method, headers, NAMES)
    assert refused is not None and refused.status == 421


@settings(max_examples=200, derandomize=True)
@given(
    method=st.sampled_from(["GET", "HEAD", *UNSAFE]),
    host=st.sampled_from([None, *OURS]),
    content_type=st.sampled_from(ANY_TYPES),
    marker=st.sampled_from([None, "1", "yes"]),
)
def test_tools_are_answered(
    method: str, host: str | None, content_type: str | None, marker: str | None
) -> None:
    """curl, kubelet and Prometheus (no Origin, no Sec-Fetch-*): reads always; state changes
    with the marker header or a JSON body."""
    headers = headers_of([("Host", host), ("Content-Type", content_type), (ADMIN_HEADER, marker)])
    json_body = content_type is not None and content_type.lower().startswith("application/json")
    expected = method in ("GET", "HEAD") or marker is not None or json_body
    assert (refusal(method, headers, NAMES) is None) == expected


def test_two_host_headers_are_refused() -> None:
    headers = CIMultiDict([("Host", "127.0.0.1"), ("Host", "evil.example")])
    refused = refusal("GET", headers, NAMES)
    assert refused is not None and refused.status == 400


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (["http://metrics.shop"], "admin.server_names[0]: not a host name"),
        (["metrics.shop:9090"], "admin.server_names[0]: not a host name"),
        (["ok.example", "*.shop.svc"], "admin.server_names[1]: not a host name"),
        ("metrics.shop", "admin.server_names: Input should be a valid"),
    ],
)
def test_server_names_are_checked(config_dir: ConfigDir, names: Any, problem: str) -> None:
    data = config_dir.base()
    data["admin"]["server_names"] = names
    with pytest.raises(ConfigError) as caught:
        parse(data, base_dir=config_dir.path)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_known_names() -> None:
    assert known_names(AdminConfig()) == frozenset({"localhost"})
    names = known_names(AdminConfig(host="Admin.Internal.", server_names=("M.Shop.svc.",)))
    assert names == frozenset({"localhost", "admin.internal", "m.shop.svc"})
