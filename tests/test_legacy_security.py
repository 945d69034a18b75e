"""Identity Plus "HTTP legacy" (issue #15, item 4): an identity when no certificate is seen.

End to end over real TLS against the fake Identity Plus: a browser without a certificate is
sent to sign on (an intent that is not ``strict-massl``, with the original URL built from a
served name, and a sealed intent cookie binding the sign-on to that browser); the return with
``identity-plus-intent=<reference>`` is resolved once into a session cookie; requests with the
cookie are checked like a certificate (cache, then backend: revocation bites) and forwarded
with the same ``X-USERINFO`` a certificate would get, without ``X-APP-CERTIFICATE`` and
without our cookies. Forged, replayed, expired and unresolved references get 401 and no
cookie; a tampered, expired or other host's cookie is no cookie, and is counted.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.identity.legacy import INTENT_COOKIE
from sidecar.sessions import COOKIE_NAME, SessionSealer, read_key

from .conftest import ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .fake_identityplus import FakeIdentityPlus, fake_identityplus

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here

SIGNON = "https://signon.example"
HTML = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"
TTL = 120


def legacy_config(
    config_dir: ConfigDir, fake: FakeIdentityPlus, upstream_port: int, **identityplus: Any
) -> dict[str, Any]:
    key = config_dir.path / "session.key"
    if not key.exists():
        key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    data = config_dir.base(upstream_port)
    data["identity"] = {
        "backend": "identityplus",
        "cache": {"ttl": TTL},
        "identityplus": {
            "endpoint": fake.url,
            "certificate": str(fake.agent_certificate),
            "key": str(fake.agent_key),
            "ca": str(fake.ca_file),
            "signon_url": SIGNON,
            "timeout": "5s",
            "legacy": True,
            "session_keys": ["session.key"],
            **identityplus,
        },
    }
    return data


@pytest.fixture
async def legacy(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> Running:
    running: Running = await start_sidecar(
        legacy_config(config_dir, fake_identityplus, upstream.port)
    )
    return running


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def location(self) -> str | None:
        found = self.header("Location")
        return found[0] if found else None

    def cookie(self, name: str) -> str | None:
        """The value a ``Set-Cookie`` gives cookie ``name``."""
        for line in self.header("Set-Cookie"):
            key, _, rest = line.partition("=")
            if key == name:
                return rest.split(";", 1)[0]
        return None


async def get(
    running: Running,
    target: str,
    *,
    accept: str | None = HTML,
    cookies: dict[str, str] | None = None,
    method: str = "GET",
    who: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    sent = dict(headers or {})
    if accept is not None:
        sent["Accept"] = accept
    if cookies:
        sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    connector = aiohttp.TCPConnector(ssl=running.client_ssl(who), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s,
        s.request(
            method, running.url + target, headers=sent, allow_redirects=False, data=None
        ) as response,
    ):
        body = await response.read()
        lines = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]
        return Reply(response.status, lines, body)


async def metric(running: Running, name: str, label: str) -> dict[str, float]:
    url = f"http://127.0.0.1:{running.sidecar.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels[label]] = sample.value
    return out


async def sign_on(running: Running, target: str = "/app/page?x=1") -> tuple[str, str]:
    """A browser's first visit: (the intent's reference, the intent cookie's value)."""
    first = await get(running, target)
    assert first.status == 302, first
    assert first.location is not None and first.location.startswith(SIGNON + "/")
    intent_cookie = first.cookie(INTENT_COOKIE)
    assert intent_cookie
    return first.location.rsplit("/", 1)[1], intent_cookie


async def session_for(
    running: Running, fake: FakeIdentityPlus, serial: int, target: str = "/app/page?x=1"
) -> str:
    reference, intent_cookie = await sign_on(running, target)
    fake.sign_on(reference, serial)
    sep = "&" if "?" in target else "?"
    back = await get(
        running,
        f"{target}{sep}identity-plus-intent={reference}",
        cookies={INTENT_COOKIE: intent_cookie},
    )
    assert back.status == 302, back
    value = back.cookie(COOKIE_NAME)
    assert value
    return value


def key_bytes(running: Running) -> bytes:
    return read_key(running.config_dir.path / "session.key")


# ---- step 1: the redirect to sign-on ------------------------------------------------------


async def test_a_browser_without_a_certificate_is_sent_to_sign_on(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    first = await get(legacy, "/app/page?x=1")
    assert first.status == 302
    [intent] = fake_identityplus.intents
    assert first.location == f"{SIGNON}/{intent.reference}"
    assert intent.strict_massl is False
    assert intent.type == "request"
    assert intent.return_url == f"{legacy.url}/app/page?x=1"
    [set_cookie] = first.header("Set-Cookie")
    name_value, *attributes = set_cookie.split("; ")
    assert name_value.startswith(f"{INTENT_COOKIE}=")
    assert sorted(attributes) == sorted(
        ["Max-Age=30", "Path=/", "Secure", "HttpOnly", "SameSite=Lax"]
    )
    assert upstream.seen == []


async def test_the_return_url_is_built_from_the_served_name_not_the_host_as_sent(
    legacy: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    port = legacy.sidecar.port
    spelled = await get(legacy, "/app/x", headers={"Host": f"LocalHost.:{port}"})
    assert spelled.status == 302
    assert fake_identityplus.intents[-1].return_url == f"https://localhost:{port}/app/x"
    # a name this service does not serve never reaches an intent
    for host in ("evil.example", f"evil.example:{port}", f"localhost@evil.example:{port}"):
        refused = await get(legacy, "/app/x", headers={"Host": host})
        assert refused.status in (400, 421), (host, refused)
    assert len(fake_identityplus.intents) == 1


async def test_every_visit_gets_an_intent_of_its_own(
    legacy: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    # Shared intents would hand one visitor's reference to another.
    one = await get(legacy, "/app/page")
    two = await get(legacy, "/app/page")
    assert one.location != two.location
    assert len(fake_identityplus.intents) == 2


@pytest.mark.parametrize(
    ("method", "accept"),
    [("GET", "application/json"), ("GET", None), ("POST", HTML), ("DELETE", HTML)],
)
async def test_other_requests_without_a_certificate_still_get_401(
    legacy: Running, fake_identityplus: FakeIdentityPlus, method: str, accept: str | None
) -> None:
    reply = await get(legacy, "/app/page", method=method, accept=accept)
    assert reply.status == 401
    assert reply.location is None and reply.header("Set-Cookie") == []
    assert fake_identityplus.intents == []


async def test_public_routes_and_certificates_are_not_sent_to_sign_on(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    assert (await get(legacy, "/public/page")).status == 200
    fake_identityplus.set_profile(legacy.certs.alice.cert.serial_number, local_user_name="alice")
    with_cert = await get(legacy, "/app/page", who=legacy.certs.alice)
    assert with_cert.status == 200
    assert fake_identityplus.intents == []


# ---- step 2: the return -------------------------------------------------------------------


async def test_the_round_trip(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    alice = legacy.certs.alice
    fake_identityplus.set_profile(
        alice.cert.serial_number,
        "OK 0002",
        local_user_name="alice",
        organizational_reference="ref-alice",
        organizational_name="Alice Liddell",
        organizational_email="alice@example.com",
        service_roles=["administrator"],
    )
    reference, intent_cookie = await sign_on(legacy, "/app/page?x=1")
    fake_identityplus.sign_on(reference, alice.cert.serial_number)
    back = await get(
        legacy,
        f"/app/page?x=1&identity-plus-intent={reference}",
        cookies={INTENT_COOKIE: intent_cookie},
    )
    assert back.status == 302
    assert back.location == f"{legacy.url}/app/page?x=1"
    [set_cookie] = back.header("Set-Cookie")
    name_value, *attributes = set_cookie.split("; ")
    assert name_value.startswith(f"{COOKIE_NAME}=")
    assert sorted(attributes) == sorted(
        [f"Max-Age={TTL}", "Path=/", "Secure", "HttpOnly", "SameSite=Lax"]
    )  # host-only: no Domain
    assert fake_identityplus.resolutions[reference] == 1
    assert upstream.seen == []
    session = back.cookie(COOKIE_NAME)
    assert session

    page = await get(
        legacy, "/admin/page?x=1", cookies={"theme": "dark", COOKIE_NAME: session, "b": "2"}
    )
    assert page.status == 200
    seen = upstream.last
    assert seen.raw_path == "/admin/page?x=1"
    assert seen.header("X-APP-CERTIFICATE") == []
    assert seen.header("Cookie") == ["theme=dark; b=2"]
    # exactly what a certificate gets
    with_cert = await get(legacy, "/admin/page?x=1", who=alice)
    assert with_cert.status == 200
    assert upstream.last.header("X-USERINFO") == seen.header("X-USERINFO")
    userinfo = decode_userinfo(seen.header("X-USERINFO")[0])
    assert userinfo["sub"] == "ref-alice" and userinfo["username"] == "alice"
    assert userinfo["roles"] == ["administrator"]
    assert all("identity-plus-intent" not in s.raw_path for s in upstream.seen)
    assert await metric(legacy, "sidecar_legacy_returns_total", "result") == {"resolved": 1.0}


async def test_a_replayed_reference_gets_401_and_no_cookie(
    legacy: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    serial = legacy.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    reference, intent_cookie = await sign_on(legacy)
    fake_identityplus.sign_on(reference, serial)
    target = f"/app/page?x=1&identity-plus-intent={reference}"
    first = await get(legacy, target, cookies={INTENT_COOKIE: intent_cookie})
    assert first.status == 302 and first.cookie(COOKIE_NAME)
    again = await get(legacy, target, cookies={INTENT_COOKIE: intent_cookie})
    assert again.status == 401
    assert again.header("Set-Cookie") == []
    assert fake_identityplus.resolutions[reference] == 1  # refused before any call
    counts = await metric(legacy, "sidecar_legacy_returns_total", "result")
    assert counts == {"resolved": 1.0, "replayed": 1.0}


async def test_a_forged_reference_gets_401_and_no_cookie(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    serial = legacy.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    # someone else's reference (it resolves at Identity Plus), without its intent cookie, or
    # with the intent cookie of another sign-on, or an empty or doubled parameter
    theirs, _ = await sign_on(legacy)
    fake_identityplus.sign_on(theirs, serial)
    _, mine = await sign_on(legacy)
    attempts = [
        (f"/app/page?identity-plus-intent={theirs}", {}),
        (f"/app/page?identity-plus-intent={theirs}", {INTENT_COOKIE: mine}),
        (f"/app/page?identity-plus-intent={theirs}", {INTENT_COOKIE: mine[:-2] + "AA"}),
        ("/app/page?identity-plus-intent=", {INTENT_COOKIE: mine}),
        (
            f"/app/page?identity-plus-intent={theirs}&identity%2Dplus-intent={theirs}",
            {INTENT_COOKIE: mine},
        ),
        (f"/public/page?identity-plus-intent={theirs}", {}),
    ]
    for target, cookies in attempts:
        reply = await get(legacy, target, cookies=cookies)
        assert reply.status == 401, (target, reply)
        assert reply.header("Set-Cookie") == [], target
    assert fake_identityplus.resolutions[theirs] == 0
    assert upstream.seen == []
    counts = await metric(legacy, "sidecar_legacy_returns_total", "result")
    assert counts == {"forged": float(len(attempts))}


async def test_an_expired_reference_gets_401_and_no_cookie(
    legacy: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    serial = legacy.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    reference, _ = await sign_on(legacy)
    fake_identityplus.sign_on(reference, serial)
    # the intent cookie as the sidecar made it 31 s ago (intents live 30 s)
    old = SessionSealer([key_bytes(legacy)], lifetime=TTL, clock=lambda: time.time() - 31)
    stale = old.seal({"k": "intent", "r": reference}, host="localhost", lifetime=30)
    reply = await get(
        legacy, f"/app/page?identity-plus-intent={reference}", cookies={INTENT_COOKIE: stale}
    )
    assert reply.status == 401 and reply.header("Set-Cookie") == []
    assert fake_identityplus.resolutions[reference] == 0
    assert await metric(legacy, "sidecar_legacy_returns_total", "result") == {"expired": 1.0}


async def test_an_unresolved_reference_gets_401_and_no_cookie(
    legacy: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    serial = legacy.certs.alice.cert.serial_number
    # nobody signed on with it; then one whose profile refuses; then one naming no certificate
    fake_identityplus.set_simple(serial, "PB 0004")
    for sign in (None, serial, "anonymous"):
        reference, intent_cookie = await sign_on(legacy)
        if sign == "anonymous":
            fake_identityplus.set_profile(serial, local_user_name="alice")
            fake_identityplus.sign_on(reference, serial, authorizing=False)
        elif sign is not None:
            fake_identityplus.sign_on(reference, serial)
        reply = await get(
            legacy,
            f"/app/page?identity-plus-intent={reference}",
            cookies={INTENT_COOKIE: intent_cookie},
        )
        assert reply.status == 401, (sign, reply)
        assert reply.header("Set-Cookie") == []
        assert fake_identityplus.resolutions[reference] == 1
    assert await metric(legacy, "sidecar_legacy_returns_total", "result") == {"unresolved": 3.0}


async def test_identity_plus_failing_on_return_is_503_and_no_cookie(
    legacy: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    reference, intent_cookie = await sign_on(legacy)
    fake_identityplus.set_fault(None, "500")
    reply = await get(
        legacy,
        f"/app/page?identity-plus-intent={reference}",
        cookies={INTENT_COOKIE: intent_cookie},
    )
    assert reply.status == 503 and reply.header("Set-Cookie") == []
    assert await metric(legacy, "sidecar_legacy_returns_total", "result") == {"failed": 1.0}


async def test_the_parameter_is_never_forwarded_with_a_certificate_either(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    alice = legacy.certs.alice
    fake_identityplus.set_profile(alice.cert.serial_number, local_user_name="alice")
    reply = await get(legacy, "/app/page?a=1&identity-plus-intent=zzz&b=2", who=alice)
    assert reply.status == 302
    assert reply.location == f"{legacy.url}/app/page?a=1&b=2"
    assert upstream.seen == [] and fake_identityplus.resolutions["zzz"] == 0


# ---- step 3: the session ------------------------------------------------------------------


async def test_a_tampered_expired_or_other_hosts_cookie_is_no_cookie_and_counted(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    serial = legacy.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    session = await session_for(legacy, fake_identityplus, serial)
    flipped = session[:20] + ("A" if session[20] != "A" else "B") + session[21:]
    key = key_bytes(legacy)
    other_host = SessionSealer([key], lifetime=TTL).seal(
        {"k": "session", "s": str(serial)}, host="other.example"
    )
    expired = SessionSealer([key], lifetime=TTL, clock=lambda: time.time() - TTL - 1).seal(
        {"k": "session", "s": str(serial)}, host="localhost"
    )
    wrong_kind = SessionSealer([key], lifetime=TTL).seal(
        {"k": "intent", "r": str(serial)}, host="localhost"
    )
    for bad in (flipped, other_host, expired, wrong_kind, "%%%"):
        api = await get(legacy, "/app/page", accept="application/json", cookies={COOKIE_NAME: bad})
        assert api.status == 401, bad
        browser = await get(legacy, "/app/page", cookies={COOKIE_NAME: bad})
        assert browser.status == 302 and browser.location is not None
        assert browser.location.startswith(SIGNON)
    assert upstream.seen == []
    counts = await metric(legacy, "sidecar_legacy_cookies_total", "outcome")
    assert counts == {"invalid": 6.0, "expired": 2.0, "malformed": 2.0}
    # and the real one still works
    assert (await get(legacy, "/app/page", cookies={COOKIE_NAME: session})).status == 200


async def test_a_session_is_checked_again_like_a_certificate(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    serial = legacy.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    session = await session_for(legacy, fake_identityplus, serial)
    for _ in range(3):
        assert (await get(legacy, "/app/page", cookies={COOKIE_NAME: session})).status == 200
    assert fake_identityplus.calls[serial] == 1  # then from the verdict cache
    # revoked at Identity Plus, and the operator purges the cache by serial
    fake_identityplus.set_simple(serial, "PB 0004")
    url = f"http://127.0.0.1:{legacy.sidecar.admin_port}/cache/purge?serial={serial}"
    admin = {"X-Sidecar-Admin": "1"}
    async with aiohttp.ClientSession() as client, client.post(url, headers=admin) as response:
        assert response.status == 200
    refused = await get(legacy, "/app/page", cookies={COOKIE_NAME: session})
    assert refused.status == 403
    assert fake_identityplus.calls[serial] == 2


async def test_a_route_that_judges_the_certificate_itself_does_not_take_a_session(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    data = legacy_config(config_dir, fake_identityplus, upstream.port)
    alice_fp = hashlib.sha256(config_dir.certs.alice.der).hexdigest()
    data["routes"] = [
        {"path": "/strict/", "allow": {"fingerprint": [alice_fp]}},
        {"path": "/"},
    ]
    running: Running = await start_sidecar(data)
    serial = running.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    session = await session_for(running, fake_identityplus, serial)
    assert (await get(running, "/app/", cookies={COOKIE_NAME: session})).status == 200
    for accept in (None, HTML):  # a browser is not sent to sign on either: it would loop
        strict = await get(running, "/strict/", accept=accept, cookies={COOKIE_NAME: session})
        assert strict.status == 401 and strict.location is None
    assert all(s.raw_path != "/strict/" for s in upstream.seen)


def test_the_sealed_session_holds_no_more_than_the_serial(tmp_path: Path) -> None:
    # What the browser holds reveals nothing without the key, and says only which
    # certificate to ask about: the person's details come from the verdict each time.
    key = os.urandom(32)
    sealer = SessionSealer([key], lifetime=TTL)
    value = sealer.seal({"k": "session", "s": "12345"}, host="localhost")
    assert b"12345" not in base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    assert len(value) < 200


async def test_a_reference_appended_with_a_second_question_mark_is_read(
    legacy: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    # The spec says Identity Plus "appends ?identity-plus-intent=": to a URL that has a query
    # already, that may be a second "?". Missed, it would be a loop back to sign-on.
    serial = legacy.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    reference, intent_cookie = await sign_on(legacy, "/app/page?x=1")
    fake_identityplus.sign_on(reference, serial)
    back = await get(
        legacy,
        f"/app/page?x=1?identity-plus-intent={reference}",
        cookies={INTENT_COOKIE: intent_cookie},
    )
    assert back.status == 302 and back.location == f"{legacy.url}/app/page?x=1"
    assert back.cookie(COOKIE_NAME)
    assert upstream.seen == []
