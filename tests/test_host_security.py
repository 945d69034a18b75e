"""Requests for a host the sidecar does not serve are 421 Misdirected Request (issue #12, item 7).

The sidecar builds the return URL of its sign-on redirects, and ``X-Forwarded-Host``, from
the request's authority. A request whose ``Host`` (or, in absolute form, whose target's own
authority, RFC 9112 §3.2.2) is not one of the names the sidecar serves, or names another host
than the client asked for in TLS (SNI), is answered 421 (RFC 9110 §15.5.20) before any
identity lookup or intent, on the listener's own path and on aiohttp's alike. The names are
``listen.server_names``, by default the DNS and IP names of the server certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar import config as config_mod
from sidecar.errors import ConfigError
from sidecar.hosts import ServerNames, host_name

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .pki import make_leaf
from .test_listener import Conn, Response, req

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here

#: the test server certificate names localhost and 127.0.0.1 (tests/pki.py)
DEFAULT = "default"


@contextlib.asynccontextmanager
async def connect(running: Running, sni: str | None) -> AsyncIterator[Conn]:
    """A raw TLS connection that sends ``sni`` as its server name, or none at all."""
    context = ssl.create_default_context(cadata=running.certs.pki.server_ca.pem.decode())
    context.check_hostname = False  # the server name is the test's choice, not a check
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=context, server_hostname=sni or ""
    )
    conn = Conn(reader, writer)
    try:
        yield conn
    finally:
        await conn.close()


async def ask(
    running: Running,
    host: str | None,
    *,
    sni: str | None = "localhost",
    method: str = "GET",
    target: str = "/public/x",
    version: str = "1.1",
) -> Response:
    body = b"x" if method == "POST" else b""
    async with connect(running, sni) as conn:
        conn.send(req(method, target, body=body, host=host, version=version))
        return await conn.response(method)


# ---- the listener: Host and SNI ------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "handed-over"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "localhost.evil.example"])
async def test_a_host_not_served_is_421(
    running: Running, upstream: Upstream, method: str, host: str
) -> None:
    response = await ask(running, host, method=method)
    assert response.status == 421, response.body
    assert response.json()["title"] == "Misdirected Request"
    assert upstream.seen == []


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "handed-over"])
async def test_a_host_other_than_the_sni_is_421(
    running: Running, upstream: Upstream, method: str
) -> None:
    # both names are the server's (its certificate names localhost and 127.0.0.1)
    response = await ask(running, "127.0.0.1", sni="localhost", method=method)
    assert response.status == 421
    assert response.json()["detail"].startswith("This request names another host")
    assert upstream.seen == []


async def s_client(running: Running, sni: str, host: str) -> bytes:
    """One request through ``openssl s_client``, which (unlike Python, like wrk) sends an IP
    address as the server name when told to."""
    ca = running.config_dir.path / "server-ca.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{running.sidecar.port}",
        "-servername", sni, "-CAfile", str(ca),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    request = f"GET /public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    out, _ = await asyncio.wait_for(proc.communicate(request.encode()), 10)
    return out


async def test_an_ip_address_sent_as_sni_is_a_name_like_another(
    running: Running, upstream: Upstream
) -> None:
    # wrk and other OpenSSL clients send the address they connect to as the server name
    served = await s_client(running, "127.0.0.1", f"127.0.0.1:{running.sidecar.port}")
    assert served.startswith(b"HTTP/1.1 200 "), served[:200]
    refused = await s_client(running, "127.0.0.1", "localhost")
    assert refused.startswith(b"HTTP/1.1 421 "), refused[:200]
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "handed-over"])
@pytest.mark.parametrize(
    "host", ["localhost", "LocalHost", "localhost:8443", "localhost.", "LOCALHOST.:1"]
)
async def test_the_port_case_and_a_final_dot_are_not_part_of_the_name(
    running: Running, upstream: Upstream, method: str, host: str
) -> None:
    response = await ask(running, host, method=method)
    assert response.status == 200, response.body
    assert upstream.last.header("Host") == [host]  # passed on as sent


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "handed-over"])
async def test_without_sni_the_host_alone_decides(
    running: Running, upstream: Upstream, method: str
) -> None:
    for host in ("127.0.0.1", "127.0.0.1:8443", "localhost"):
        assert (await ask(running, host, sni=None, method=method)).status == 200
    assert (await ask(running, "evil.example", sni=None, method=method)).status == 421
    assert (await ask(running, "127.0.0.2", sni=None, method=method)).status == 421


async def test_an_sni_not_served_is_421_even_without_host(
    running: Running, upstream: Upstream
) -> None:
    # HTTP/1.0 may omit Host: then the TLS server name is the only authority there is
    ok = await ask(running, None, sni="localhost", version="1.0")
    assert ok.status == 200
    refused = await ask(running, None, sni="evil.example", version="1.0")
    assert refused.status == 421
    refused = await ask(running, "evil.example", sni="evil.example")
    assert refused.status == 421
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "handed-over"])
@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("https://evil.example/public/x", "localhost"),
        ("https://evil.example:443/public/x", "evil.example"),
        ("https://127.0.0.1/public/x", "localhost"),  # served, but not the SNI
        ("https://localhost/public/x", "evil.example"),  # the Host differs from the target
        ("https://localhost/public/x", "127.0.0.1"),
        ("https://user@localhost/public/x", "localhost"),
    ],
)
async def test_an_absolute_form_target_names_its_own_authority(
    running: Running, upstream: Upstream, method: str, target: str, host: str
) -> None:
    response = await ask(running, host, target=target, method=method)
    assert response.status in (400, 421), response.body
    if "evil" in target or "127" in target or "evil" in host or "127" in host:
        assert response.status == 421
    assert upstream.seen == []


async def test_a_host_with_an_ipv6_literal(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["listen"]["server_names"] = ["localhost", "::1", "[2001:db8::7]"]
    running = await start_sidecar(data)
    for host in ("[::1]", "[::1]:8443", "[0:0::1]:1", "[2001:DB8:0::7]"):
        assert (await ask(running, host, sni=None)).status == 200, host
    for host in ("[::2]", "[2001:db8::8]:8443"):
        assert (await ask(running, host, sni=None)).status == 421, host


async def test_configured_server_names_replace_the_certificates(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["listen"]["server_names"] = ["app.example", "*.apps.example", "10.0.0.1", "my_app"]
    running = await start_sidecar(data)
    for host in ("app.example", "a.apps.example", "B-2.Apps.Example:8443", "10.0.0.1:80", "my_app"):
        assert (await ask(running, host, sni=None)).status == 200, host
    # a wildcard covers one label, and only one; the certificate's names are not served now
    for host in ("apps.example", "a.b.apps.example", "localhost", "127.0.0.1", "xapp.example"):
        assert (await ask(running, host, sni=None)).status == 421, host
    # under a wildcard, the Host must still be the very name of the SNI
    assert (await ask(running, "a.apps.example", sni="a.apps.example")).status == 200
    assert (await ask(running, "b.apps.example", sni="a.apps.example")).status == 421


async def test_default_names_follow_the_certificate_on_reload(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start_sidecar(config_dir.base(upstream.port))
    assert (await ask(running, "localhost", sni=None)).status == 200
    renewed = make_leaf(
        config_dir.certs.pki.server_ca, "other", server=True, san_dns=["other.example"]
    )
    renewed.write(config_dir.path, "server")
    assert await running.sidecar.reload("test")
    assert (await ask(running, "localhost", sni=None)).status == 421
    assert (await ask(running, "other.example", sni="other.example")).status == 200


async def test_server_names_change_on_reload(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    running = await start_sidecar(data)
    data["listen"]["server_names"] = ["app.example"]
    config_dir.write(data)
    assert await running.sidecar.reload("test")
    assert (await ask(running, "localhost", sni=None)).status == 421
    assert (await ask(running, "app.example", sni=None)).status == 200
    assert running.sidecar.config.listen.server_names == ("app.example",)


async def test_a_misdirected_request_asks_no_identity(running: Running, upstream: Upstream) -> None:
    alice = running.certs.alice
    context = running.client_ssl(alice)
    context.check_hostname = False
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=context, server_hostname="localhost"
    )
    conn = Conn(reader, writer)
    try:
        conn.send(req("GET", "/admin/x", host="evil.example"))
        assert (await conn.response()).status == 421
        conn.send(req("GET", "/admin/x", host="localhost"))  # the connection goes on
        assert (await conn.response()).status == 200
    finally:
        await conn.close()
    cache = running.sidecar._cache()
    assert cache is not None and cache.stats.misses == 1  # only the second request looked up


# ---- enrolment: no intent for another host -------------------------------------------------


async def test_enrolment_for_an_evil_host_is_421_without_an_intent(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    data = config_dir.base(upstream.port)
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "signon_url": "https://signon.example",
            "enrol_missing": True,
        },
    }
    running = await start_sidecar(data)
    for method in ("GET", "POST"):
        response = await ask(running, "evil.example", target="/x", method=method)
        assert response.status == 421, (method, response.status, response.get("Location"))
        assert response.get("Location") == []
    assert fake_identityplus.intents == []
    response = await ask(running, f"localhost:{running.sidecar.port}", target="/x")
    assert response.status == 302
    [intent] = fake_identityplus.intents
    assert intent.return_url == f"https://localhost:{running.sidecar.port}/x"


# ---- configuration ---------------------------------------------------------------------------


def test_server_names_are_checked(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["listen"]["server_names"] = [
        "ok.example",
        "bad name",
        "*.*.example",
        "a.*.example",
        "*",
        "b\u00fccher.example",
        "[::1",
        "x" * 64 + ".example",
    ]
    with pytest.raises(ConfigError) as caught:
        config_mod.load(config_dir.write(data))
    problems = caught.value.problems
    for index in range(1, 8):
        assert any(p.startswith(f"listen.server_names[{index}]: ") for p in problems), (
            index,
            problems,
        )
    assert not any(p.startswith("listen.server_names[0]") for p in problems)
    data["listen"]["server_names"] = []
    with pytest.raises(ConfigError, match=r"listen\.server_names: at least one name"):
        config_mod.load(config_dir.write(data))


def test_names_are_normalised(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["listen"]["server_names"] = ["App.Example.", "*.Apps.Example", "[::1]", "0:0::2"]
    config = config_mod.load(config_dir.write(data))
    assert config.listen.server_names == ("app.example", "*.apps.example", "::1", "::2")


def test_a_certificate_without_names_needs_server_names(config_dir: ConfigDir) -> None:
    # no subjectAltName, and a common name that is no host name: nothing to serve by default
    nameless = make_leaf(
        config_dir.certs.pki.server_ca, "not a host name!", eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    nameless.write(config_dir.path, "nameless")
    data = config_dir.base()
    data["tls"]["certificate"], data["tls"]["key"] = "nameless.pem", "nameless.key"
    with pytest.raises(ConfigError, match=r"listen\.server_names: .*names no host"):
        config_mod.load(config_dir.write(data))
    data["listen"]["server_names"] = ["app.example"]
    assert config_mod.load(config_dir.write(data)).listen.server_names == ("app.example",)
    # a certificate without subjectAltName but a host name as its CN: that name
    legacy = make_leaf(
        config_dir.certs.pki.server_ca, "Legacy.Example", eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    legacy.write(config_dir.path, "nameless")
    assert ServerNames.for_certificate(legacy.cert).exact == frozenset({"legacy.example"})


def test_check_config_shows_the_names(config_dir: ConfigDir) -> None:
    import subprocess
    import sys

    path = config_dir.write(config_dir.base())
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "  names       localhost, 127.0.0.1 (from tls.certificate)" in result.stdout


# ---- the judgement, over generated authorities -----------------------------------------------

_LABELS = ["localhost", "LOCALHOST", "app", "a", "b", "example", "com", "evil", "x-1", "_s"]
_PIECES = [*_LABELS, ".", ".", ":", "8443", "[", "]", "::1", "127.0.0.1", "*", "%2e", "@", " "]


def _expected(names: ServerNames, authority: str, sni: str | None) -> bool:
    """Serves: the name, lowercased and without port or final dot, is a configured name or
    sits one label under a configured wildcard; and it is the SNI's name, if there was one."""
    name = host_name(authority)
    if name is None:
        return False
    if sni is not None and host_name(sni) != name:
        return False
    if name in names.exact:
        return True
    label, dot, parent = name.partition(".")
    return bool(dot) and bool(label) and ":" not in name and parent in names.wildcards


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    authority=st.lists(st.sampled_from(_PIECES), min_size=1, max_size=6).map("".join),
    sni=st.none() | st.sampled_from(["localhost", "app.example", "a.app.example", "127.0.0.1"]),
)
@example(authority="localhost:8443", sni="localhost")
@example(authority="a.app.example", sni="a.app.example")
@example(authority="[::1]:1", sni=None)
def test_a_request_is_served_only_for_a_name_served(authority: str, sni: str | None) -> None:
    names = ServerNames(["localhost", "*.app.example", "::1", "127.0.0.1"])
    reason = names.misdirected("/x", authority.encode("latin-1"), sni)
    assert (reason is None) is _expected(names, authority, sni), (authority, sni, reason)
    # absolute form: the target's authority is judged, and the Host must be the same name
    absolute = f"https://{authority}/x"
    if "/" not in authority and "?" not in authority and "#" not in authority:
        reason = names.misdirected(absolute, authority.encode("latin-1"), sni)
        assert (reason is None) is _expected(names, authority, sni)
        if reason is None:
            assert names.misdirected(absolute, b"evil.example", sni) is not None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=40))
def test_host_name_never_accepts_what_a_name_cannot_hold(text: str) -> None:
    name = host_name(text)
    if name is not None:
        assert name == name.lower()
        assert not name.endswith(".")
        assert not any(c in name for c in " /@?#[]%*\\")
        assert all(ord(c) < 128 for c in name)


# ---- the Host field's syntax, and the valid values each worker remembers -------------------


@pytest.mark.parametrize("bad", ["localhost/x", "local host", "user@localhost", "localhost:8a"])
async def test_a_bad_host_after_good_ones_on_the_same_connection_is_400(
    running: Running, upstream: Upstream, bad: str
) -> None:
    """The listener remembers Host values it found valid (``gateway._valid_host_field``): a
    connection's next request with a broken one is refused all the same, and nothing of it
    reaches the application."""
    async with connect(running, "localhost") as conn:
        for _ in range(3):
            conn.send(req("GET", "/public/x", host="localhost"))
            assert (await conn.response()).status == 200
        conn.send(req("GET", "/public/x", host=bad))
        response = await conn.response()
    assert response.status == 400, response.body
    assert len(upstream.seen) == 3


#: what a Host value may be made of, and what it may not
_HOST_PIECES = ["localhost", "a", ".", "-", ":", "8443", "[", "]", "::1", "%41", "%4", "%zz", "@"]
_HOST_PIECES += ["/", " ", "\t", "é", "~", "!", "$", "'", "(", ",", ";", "=", "_", "?", "#"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.sampled_from(_HOST_PIECES), max_size=6).map("".join), max_size=40))
def test_remembered_host_values_are_judged_as_the_pattern_judges_them(values: list[str]) -> None:
    """Whatever came before (the set filling up and being emptied included), a value is valid
    exactly when the pattern matches it."""
    from sidecar import gateway

    gateway._VALID_HOSTS.clear()
    filler = [f"h{n}.example".encode() for n in range(gateway._VALID_HOSTS_MAX - 3)]
    for value in [v.encode() for v in values] + filler + [v.encode() for v in values]:
        expected = gateway._HOST_FIELD.fullmatch(value) is not None
        assert gateway._valid_host_field(value) is expected, value
        assert gateway._valid_host_field(value) is expected, value  # remembered, or not
        assert len(gateway._VALID_HOSTS) <= gateway._VALID_HOSTS_MAX


def test_long_host_values_are_matched_every_time_not_remembered() -> None:
    """The set holds short values only: 256 long valid ones (a header line each, up to
    ``limits.max_header_line``) would otherwise stay in a worker's memory."""
    from sidecar import gateway

    gateway._VALID_HOSTS.clear()
    longest = gateway._VALID_HOST_LONGEST
    for n in range(300):
        long = b"a" * (longest - 5) + b"%d.example" % n
        assert gateway._valid_host_field(long) and gateway._valid_host_field(long + b":1")
    assert not gateway._VALID_HOSTS
    short = b"b" * (longest - 5) + b":8443"
    assert len(short) == longest and gateway._valid_host_field(short)
    assert list(gateway._VALID_HOSTS) == [short]
    assert not gateway._valid_host_field(b"x" * 9000 + b" y")
