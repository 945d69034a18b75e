"""The identity side through the whole sidecar.

A real TLS client certificate → the sidecar → the fake Identity Plus API over mutual TLS (or a
small in-house verdict service for the http backend) → the echo upstream. Every row of the
outcome table in ``spec/identityplus.md`` and every identity row of contract §4 is played here
end to end; ``test_identityplus.py``, ``test_http_backend.py`` and ``test_cache.py`` test the
same parts one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from .conftest import ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .fake_identityplus import FakeIdentityPlus, Fault, fake_identityplus
from .pki import Issued
from .ports import free_port
from .servers import serve_app

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here

SIGNON = "https://signon.example"
TIMEOUT = 1.0  # identity.identityplus.timeout in these tests, seconds


# ---- helpers --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers["Content-Type"].startswith("application/problem+json"), self.headers
        doc: dict[str, Any] = json.loads(self.body)
        assert doc["status"] == self.status
        return doc


async def fetch(
    running: Running,
    path: str,
    who: Issued | None = None,
    *,
    method: str = "GET",
    data: Any = None,
) -> Reply:
    """One request through the sidecar; redirects are returned, never followed."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            URL(running.url + path, encoded=True),
            ssl=running.client_ssl(who),
            data=data,
            allow_redirects=False,
        ) as resp,
    ):
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


async def admin(running: Running, method: str, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{running.sidecar.admin_port}{path}"
    headers = {"X-Sidecar-Admin": "1"}  # what a state-changing admin request needs
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as resp,
    ):
        text = await resp.text()
        return resp.status, (json.loads(text) if path != "/metrics" else text)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def serial_of(who: Issued) -> int:
    return int(who.cert.serial_number)


def sha256_of(who: Issued) -> str:
    return hashlib.sha256(who.der).hexdigest()


def userinfo(upstream: Upstream) -> dict[str, Any]:
    [value] = upstream.last.header("X-USERINFO")
    return decode_userinfo(value)


def sub_of(values: list[str]) -> str:
    [value] = values
    return str(decode_userinfo(value)["sub"])


def anonymous(upstream: Upstream) -> bool:
    last = upstream.last
    return last.header("X-USERINFO") == [] and last.header("X-APP-CERTIFICATE") == []


@dataclass
class Env:
    """A running sidecar with the identityplus backend aimed at the fake."""

    fake: FakeIdentityPlus
    running: Running
    upstream: Upstream

    def client(self, cn: str, **kwargs: object) -> Issued:
        """A fresh client certificate from the CA the sidecar trusts."""
        return self.running.certs.pki.client(cn, **kwargs)

    async def get(self, path: str, who: Issued | None = None, **kwargs: Any) -> Reply:
        return await fetch(self.running, path, who, **kwargs)

    def url(self, path: str) -> str:
        return f"https://localhost:{self.running.sidecar.port}{path}"


StartIdentityPlus = Callable[..., Awaitable[Env]]


@pytest.fixture
def start_ip(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> StartIdentityPlus:
    """Starts a sidecar whose backend is the fake; keyword arguments are identityplus keys
    (``cache=`` is the identity.cache section). The fake outlives the sidecar at teardown."""

    async def start(*, cache: dict[str, Any] | None = None, **settings: Any) -> Env:
        identityplus: dict[str, Any] = {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "signon_url": SIGNON,
            "timeout": f"{TIMEOUT:g}s",
        }
        identityplus.update(settings)
        data = config_dir.base(upstream.port)
        data["identity"] = {
            "backend": "identityplus",
            "identityplus": identityplus,
            "cache": cache or {},
        }
        running = await start_sidecar(data)
        return Env(fake_identityplus, running, upstream)

    return start


# ---- OK: allowed, with the profile mapped to X-USERINFO ----------------------------------------

PROFILES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "OK 0001",
        "profile",
        {
            "organizational_reference": "ref-ada-1",
            "organizational_name": "Ada King Lovelace",
            "organizational_email": "ada@example.org",
            "service_roles": ["administrator", "member"],
            "extra": {"trust-score": 4.25, "sites-frequented": 3, "org-custom": {"a": 1}},
        },
        {
            "sub": "ref-ada-1",
            "username": "ref-ada-1",
            "given_name": "Ada",
            "family_name": "King Lovelace",
            "email": "ada@example.org",
            "roles": ["administrator", "member"],
        },
    ),
    (
        "OK 0002",
        "profile",
        {
            "organizational_reference": "ref-ada-2",
            "local_user_name": "ada",
            "organizational_name": "Ada",
            "service_roles": ["member"],
        },
        {"sub": "ref-ada-2", "username": "ada", "given_name": "Ada", "roles": ["member"]},
    ),
    (
        "OK 0002",
        "profile",
        {"local_user_name": "ada.local"},
        {"sub": "ada.local", "username": "ada.local", "roles": []},
    ),
    # A bare allowing Simple-Response: the certificate's serial and CN stand in.
    ("OK 0001", "simple", {}, {"sub": "<serial>", "username": "Ada Lovelace", "roles": []}),
]


@pytest.mark.parametrize(("outcome", "envelope", "fields", "expected"), PROFILES)
async def test_an_allowing_outcome_is_forwarded_with_the_mapped_profile(
    start_ip: StartIdentityPlus,
    outcome: str,
    envelope: str,
    fields: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    env = await start_ip()
    ada = env.client("Ada Lovelace")
    if envelope == "simple":
        env.fake.set_simple(serial_of(ada), outcome)
    else:
        env.fake.set_profile(serial_of(ada), outcome, **fields)
    reply = await env.get("/app/page?x=1", ada)
    assert reply.status == 200, reply.body
    seen = env.upstream.last
    assert seen.raw_path == "/app/page?x=1"
    expected = {k: (str(serial_of(ada)) if v == "<serial>" else v) for k, v in expected.items()}
    assert userinfo(env.upstream) == expected
    assert seen.header("X-APP-CERTIFICATE") == [base64.b64encode(ada.der).decode()]
    # asked once, over mTLS with the agent certificate, for this serial
    assert env.fake.calls[serial_of(ada)] == 1
    [call] = env.fake.requests
    assert call.operation == "Identity-Inquiry" and call.agent_sha256 == env.fake.agent.sha256


async def test_the_profile_roles_decide_the_route(start_ip: StartIdentityPlus) -> None:
    env = await start_ip()
    member, admin_ = env.client("Mia Member"), env.client("Ad Min")
    env.fake.set_profile(serial_of(member), "OK 0001", service_roles=["member"])
    env.fake.set_profile(serial_of(admin_), "OK 0002", service_roles=["administrator"])

    reply = await env.get("/admin/users", member)
    assert reply.status == 403 and "role" in reply.problem()["detail"]
    assert env.upstream.seen == []
    assert (await env.get("/app/", member)).status == 200
    assert (await env.get("/admin/users", admin_)).status == 200
    assert userinfo(env.upstream)["roles"] == ["administrator"]
    # one inquiry per certificate: the role check used the cached verdict
    assert env.fake.calls[serial_of(member)] == 1


# ---- PB 0000/0001: no such certificate ---------------------------------------------------------


@pytest.mark.parametrize("outcome", ["PB 0000", "PB 0001"])
async def test_a_certificate_unknown_to_identity_plus_is_401(
    start_ip: StartIdentityPlus, outcome: str
) -> None:
    env = await start_ip()
    who = env.client("Nobody Known")
    env.fake.set_simple(serial_of(who), outcome)
    reply = await env.get("/app/", who)
    assert reply.status == 401
    assert "certificate" in reply.problem()["detail"].lower()
    assert "Location" not in reply.headers
    assert env.upstream.seen == [] and env.fake.intents == []


@pytest.mark.parametrize("outcome", ["PB 0000", "PB 0001"])
async def test_a_certificate_unknown_to_identity_plus_enrols_when_configured(
    start_ip: StartIdentityPlus, outcome: str
) -> None:
    env = await start_ip(enrol_missing=True)
    who = env.client("Nobody Known")
    env.fake.set_simple(serial_of(who), outcome)
    reply = await env.get("/app/page?a=1", who)
    assert reply.status == 302
    [intent] = env.fake.intents
    assert reply.headers["Location"] == f"{SIGNON}/{intent.reference}"
    assert intent.type == "request" and intent.strict_massl is True
    assert intent.return_url == env.url("/app/page?a=1")
    assert env.upstream.seen == []


async def test_no_certificate_enrols_when_configured(start_ip: StartIdentityPlus) -> None:
    env = await start_ip(enrol_missing=True)
    reply = await env.get("/app/page?a=b%20c")
    assert reply.status == 302
    [intent] = env.fake.intents
    assert reply.headers["Location"] == f"{SIGNON}/{intent.reference}"
    assert (intent.type, intent.strict_massl) == ("request", True)
    assert intent.return_url == env.url("/app/page?a=b%20c")
    # a POST is not redirected (the browser would replay it as a GET): 401 with the link
    reply = await env.get("/app/form", method="POST", data=b"x=1")
    assert reply.status == 401
    assert reply.headers["Location"] == f"{SIGNON}/{env.fake.intents[-1].reference}"
    assert reply.problem()["sign_on_url"] == reply.headers["Location"]
    assert env.fake.calls == {} and env.upstream.seen == []


async def test_no_certificate_is_401_without_enrolment(start_ip: StartIdentityPlus) -> None:
    env = await start_ip()
    reply = await env.get("/app/")
    assert reply.status == 401 and "Location" not in reply.headers
    assert "certificate" in reply.problem()["detail"].lower()
    assert env.fake.requests == [] and env.upstream.seen == []


# ---- PB 0002/0003: validation redirect ---------------------------------------------------------


@pytest.mark.parametrize("outcome", ["PB 0002", "PB 0003"])
async def test_validation_redirects_a_get_to_sign_on(
    start_ip: StartIdentityPlus, outcome: str
) -> None:
    env = await start_ip()
    who = env.client("Val Idate")
    env.fake.set_simple(serial_of(who), outcome)
    path = "/app/page?q=a%20b&x=1"
    reply = await env.get(path, who)
    assert reply.status == 302
    [intent] = env.fake.intents
    assert reply.headers["Location"] == SIGNON + "/" + intent.reference
    assert intent.type == "validate"
    assert intent.return_url == f"https://localhost:{env.running.sidecar.port}{path}"
    assert intent.strict_massl is True
    assert reply.headers["Cache-Control"] == "no-store"
    assert env.upstream.seen == []


@pytest.mark.parametrize("outcome", ["PB 0002", "PB 0003"])
async def test_validation_answers_a_post_401_with_the_sign_on_url(
    start_ip: StartIdentityPlus, outcome: str
) -> None:
    env = await start_ip()
    who = env.client("Val Idate")
    env.fake.set_profile(serial_of(who), outcome)  # either envelope carries any outcome
    reply = await env.get("/app/form", who, method="POST", data=b"amount=100")
    assert reply.status == 401
    [intent] = env.fake.intents
    location = f"{SIGNON}/{intent.reference}"
    assert reply.headers["Location"] == location
    doc = reply.problem()
    assert doc["sign_on_url"] == location and "validated" in doc["detail"]
    assert intent.type == "validate" and intent.return_url == env.url("/app/form")
    assert env.upstream.seen == []


async def test_after_validation_the_service_is_asked_again(start_ip: StartIdentityPlus) -> None:
    env = await start_ip()
    who = env.client("Val Idate")
    serial = serial_of(who)
    env.fake.set_simple(serial, "PB 0003")
    assert (await env.get("/app/", who)).status == 302
    assert (await env.get("/app/", who)).status == 302  # never cached: asked each time
    assert env.fake.calls[serial] == 2
    # the person validates at Identity Plus, and the browser comes back
    env.fake.set_profile(serial, "OK 0001", organizational_reference="val")
    reply = await env.get("/app/", who)
    assert reply.status == 200
    assert env.fake.calls[serial] == 3
    assert userinfo(env.upstream)["sub"] == "val"
    # from now on the allowing verdict is cached
    assert (await env.get("/app/", who)).status == 200
    assert env.fake.calls[serial] == 3


# ---- PB 0004..0008: refused, and the refusal cached --------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "words"),
    [
        ("PB 0004", "revoked"),
        ("PB 0005", "intruder"),
        ("PB 0006", "not recognised"),
        ("PB 0007", "tampered"),
        ("PB 0008", "authorization has expired"),
    ],
)
async def test_a_refused_certificate_is_403_and_the_refusal_is_cached(
    start_ip: StartIdentityPlus, outcome: str, words: str
) -> None:
    env = await start_ip(cache={"negative_ttl": "30s"})
    who = env.client("Re Fused")
    env.fake.set_simple(serial_of(who), outcome)
    for path in ("/app/", "/admin/", "/app/other"):
        reply = await env.get(path, who)
        assert reply.status == 403
        assert words in reply.problem()["detail"]
    assert env.fake.calls[serial_of(who)] == 1  # no new inquiry within negative_ttl
    assert env.upstream.seen == []
    assert env.fake.intents == []


async def test_a_refusal_is_asked_again_after_negative_ttl(start_ip: StartIdentityPlus) -> None:
    env = await start_ip(cache={"negative_ttl": "300ms"})
    who = env.client("Re Fused")
    env.fake.set_simple(serial_of(who), "PB 0004")
    assert (await env.get("/app/", who)).status == 403
    await asyncio.sleep(0.45)
    env.fake.set_profile(serial_of(who), "OK 0001")  # e.g. the revocation was a mistake
    assert (await env.get("/app/", who)).status == 200
    assert env.fake.calls[serial_of(who)] == 2


# ---- ER: the service refuses the request --------------------------------------------------------


@pytest.mark.parametrize("outcome", ["ER 0001", "ER 0002"])
async def test_a_request_error_is_503_and_not_cached(
    start_ip: StartIdentityPlus, outcome: str
) -> None:
    env = await start_ip()
    who = env.client("Er Ror")
    env.fake.set_simple(serial_of(who), outcome)
    for _ in range(2):
        reply = await env.get("/app/", who)
        assert reply.status == 503
        assert reply.headers["Retry-After"].isdigit()
        assert outcome not in reply.body.decode()  # no internals
        reply.problem()
    assert env.fake.calls[serial_of(who)] == 2
    assert env.upstream.seen == []
    # not this service's own credentials: still ready
    assert (await admin(env.running, "GET", "/readyz"))[0] == 200
    _, text = await admin(env.running, "GET", "/metrics")
    labels = {"backend": "identityplus", "outcome": outcome}
    assert metric(text, "sidecar_identity_lookups_total", **labels) == 2


async def test_a_refused_api_certificate_makes_the_sidecar_unready_until_accepted(
    start_ip: StartIdentityPlus,
) -> None:
    env = await start_ip()
    who = env.client("Ok User")
    env.fake.set_profile(serial_of(who), "OK 0001", organizational_reference="ok")
    assert (await admin(env.running, "GET", "/readyz"))[0] == 200
    env.fake.refuse_agent(outcome="ER 1103")

    reply = await env.get("/app/", who)
    assert reply.status == 503 and reply.headers["Retry-After"].isdigit()
    assert env.upstream.seen == []
    # with the verdict cache still empty, as after a restart (an empty cache once hid this)
    status, doc = await admin(env.running, "GET", "/readyz")
    assert status == 503 and doc["ready"] is False
    assert "credentials" in doc["reason"] and "ER 1103" in doc["reason"]

    env.fake.refuse_agent(outcome=None)  # the operator renewed the certificate
    assert (await admin(env.running, "GET", "/readyz"))[0] == 503  # until a call succeeds
    assert (await env.get("/app/", who)).status == 200
    status, doc = await admin(env.running, "GET", "/readyz")
    assert (status, doc) == (200, {"ready": True})


async def test_readiness_notices_fixed_credentials_without_a_visitor(
    start_ip: StartIdentityPlus,
) -> None:
    """An unready pod gets no traffic: readiness itself must ask the service again (a ping)."""
    env = await start_ip()
    who = env.client("Pi Ng")
    env.fake.refuse_agent(outcome="ER 1104")
    assert (await env.get("/app/", who)).status == 503
    assert (await admin(env.running, "GET", "/readyz"))[0] == 503
    env.fake.refuse_agent(outcome=None)  # the operator fixed it; nobody visits
    for _ in range(60):
        await asyncio.sleep(0.1)
        status, _ = await admin(env.running, "GET", "/readyz")
        if status == 200:
            break
    else:
        pytest.fail("readiness never noticed the fixed credentials")
    pings = [c for c in env.fake.requests if c.method == "PUT" and c.operation == ""]
    assert pings, "no ping was sent"


# ---- the service failing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", ["slow", "500", "invalid-json", "reset", "unknown-envelope", "down"]
)
async def test_a_failing_service_with_a_cold_cache_is_503_within_the_timeout(
    start_ip: StartIdentityPlus, fault: Fault | str
) -> None:
    env = await start_ip(
        **({"endpoint": f"https://127.0.0.1:{free_port()}/v1"} if fault == "down" else {})
    )
    who = env.client("Fa Iling")
    env.fake.set_profile(serial_of(who), "OK 0001")  # what it would say if it could
    if fault != "down":
        env.fake.set_fault(serial_of(who), fault)  # type: ignore[arg-type]
    started = time.monotonic()
    reply = await env.get("/app/", who)
    elapsed = time.monotonic() - started
    assert reply.status == 503
    assert reply.headers["Retry-After"].isdigit()
    reply.problem()
    # fail closed, and within the configured timeout (a bound, not a performance claim)
    assert elapsed < TIMEOUT + 2.0, elapsed
    if fault == "slow":
        assert elapsed >= TIMEOUT * 0.9, elapsed
    assert env.upstream.seen == []
    # a failure is never cached: the next request asks again
    env.fake.set_fault(serial_of(who), None)
    if fault != "down":
        assert (await env.get("/app/", who)).status == 200


async def test_a_public_route_is_forwarded_anonymously_while_the_service_fails(
    start_ip: StartIdentityPlus,
) -> None:
    env = await start_ip()
    known, other = env.client("Known Person"), env.client("Other Person")
    env.fake.set_profile(serial_of(known), "OK 0001", organizational_reference="known")
    # while the service answers, a public route carries the identity
    assert (await env.get("/public/page", known)).status == 200
    assert userinfo(env.upstream)["sub"] == "known"

    env.fake.set_fault(None, "500")
    for who in (other, None):
        reply = await env.get("/public/page?x=1", who)
        assert reply.status == 200
        assert env.upstream.last.raw_path == "/public/page?x=1"
        assert anonymous(env.upstream)
    # and the protected routes fail closed meanwhile
    assert (await env.get("/app/", other)).status == 503


# ---- stale_if_error -------------------------------------------------------------------------------


async def test_stale_if_error_keeps_identified_requests_flowing(
    start_ip: StartIdentityPlus,
) -> None:
    env = await start_ip(cache={"ttl": "300ms", "stale_if_error": "30s"})
    who = env.client("Stale Person")
    serial = serial_of(who)
    env.fake.set_profile(serial, "OK 0001", organizational_reference="stale")
    assert (await env.get("/app/", who)).status == 200
    _, text = await admin(env.running, "GET", "/metrics")
    assert metric(text, "sidecar_cache_stale_served_total") == 0

    await asyncio.sleep(0.4)  # the allowing verdict expires
    env.fake.set_fault(serial, "500")
    for _ in range(2):
        reply = await env.get("/app/", who)
        assert reply.status == 200
        assert userinfo(env.upstream)["sub"] == "stale"
        assert env.upstream.last.header("X-APP-CERTIFICATE") == [base64.b64encode(who.der).decode()]
    assert env.fake.calls[serial] == 3  # each stale answer follows a real attempt
    _, text = await admin(env.running, "GET", "/metrics")
    assert metric(text, "sidecar_cache_stale_served_total") == 2

    # once the service is back, a fresh answer replaces the stale one
    env.fake.set_fault(serial, None)
    env.fake.set_profile(serial, "OK 0001", organizational_reference="fresh")
    assert (await env.get("/app/", who)).status == 200
    assert userinfo(env.upstream)["sub"] == "fresh"


async def test_without_stale_if_error_an_expired_verdict_fails_closed(
    start_ip: StartIdentityPlus,
) -> None:
    env = await start_ip(cache={"ttl": "300ms", "stale_if_error": 0})
    who = env.client("Stale Person")
    env.fake.set_profile(serial_of(who), "OK 0001")
    assert (await env.get("/app/", who)).status == 200
    await asyncio.sleep(0.4)
    env.fake.set_fault(serial_of(who), "500")
    reply = await env.get("/app/", who)
    assert reply.status == 503 and reply.headers["Retry-After"].isdigit()
    assert len(env.upstream.seen) == 1


async def test_a_refusal_is_never_served_stale(start_ip: StartIdentityPlus) -> None:
    env = await start_ip(cache={"negative_ttl": "300ms", "stale_if_error": "30s"})
    who = env.client("Re Voked")
    env.fake.set_simple(serial_of(who), "PB 0004")
    assert (await env.get("/app/", who)).status == 403
    await asyncio.sleep(0.4)
    env.fake.set_fault(serial_of(who), "500")
    assert (await env.get("/app/", who)).status == 503


# ---- one inquiry per certificate, whatever the concurrency ----------------------------------------


async def test_a_hundred_concurrent_first_requests_make_one_inquiry(
    start_ip: StartIdentityPlus,
) -> None:
    env = await start_ip()
    who = env.client("Busy Person")
    env.fake.set_profile(serial_of(who), "OK 0001", organizational_reference="busy")
    env.fake.latency = 0.2
    context = env.running.client_ssl(who)
    connector = aiohttp.TCPConnector(limit=0, ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with session.get(f"{env.running.url}/app/{i}") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(100)))
    assert statuses == [200] * 100
    assert env.fake.calls[serial_of(who)] == 1
    # the requests did overlap: several waited on the one inquiry in flight
    _, text = await admin(env.running, "GET", "/metrics")
    assert metric(text, "sidecar_cache_misses_total") > 1
    assert len(env.upstream.seen) == 100
    assert {sub_of(s.header("X-USERINFO")) for s in env.upstream.seen} == {"busy"}


# ---- serial spellings and purge ---------------------------------------------------------------------


@pytest.mark.parametrize(("serial_format", "spelling"), [(None, "{:d}"), ("hex", "0x{:X}")])
async def test_the_serial_is_sent_as_configured(
    start_ip: StartIdentityPlus, serial_format: str | None, spelling: str
) -> None:
    settings = {"serial_format": serial_format} if serial_format else {}
    env = await start_ip(**settings)
    serial = 0x7ABCDEF0123456789
    who = env.client("Serial Person", serial=serial)
    env.fake.set_profile(serial, "OK 0001")
    assert (await env.get("/app/", who)).status == 200
    [call] = env.fake.requests
    assert call.serial_text == spelling.format(serial)
    assert call.serial == serial


async def test_a_purge_by_serial_forces_a_new_inquiry(start_ip: StartIdentityPlus) -> None:
    env = await start_ip()
    who, other = env.client("Purged Person"), env.client("Kept Person")
    for person in (who, other):
        env.fake.set_profile(serial_of(person), "OK 0001")
        assert (await env.get("/app/", person)).status == 200
        assert (await env.get("/app/", person)).status == 200
    assert env.fake.calls[serial_of(who)] == 1

    env.fake.set_simple(serial_of(who), "PB 0004")  # revoked at Identity Plus meanwhile
    status, doc = await admin(env.running, "POST", f"/cache/purge?serial=0x{serial_of(who):x}")
    assert (status, doc) == (200, {"purged": 1, "scope": "serial"})
    assert (await env.get("/app/", who)).status == 403
    assert env.fake.calls[serial_of(who)] == 2
    # the other certificate's verdict was kept
    assert (await env.get("/app/", other)).status == 200
    assert env.fake.calls[serial_of(other)] == 1


async def test_the_agent_certificate_expiry_is_exported(start_ip: StartIdentityPlus) -> None:
    env = await start_ip()
    _, text = await admin(env.running, "GET", "/metrics")
    expected = env.fake.agent.issued.cert.not_valid_after_utc.timestamp()
    assert metric(text, "sidecar_agent_certificate_expiry_timestamp_seconds") == expected


# ---- the http backend ---------------------------------------------------------------------------------


@dataclass
class VerdictService:
    """An in-house verdict service on plain HTTP: answers by certificate fingerprint."""

    port: int = 0
    replies: dict[str, Any] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verdict"


@pytest.fixture
async def verdict_service() -> AsyncIterator[VerdictService]:
    service = VerdictService()

    async def verdict(request: web.Request) -> web.Response:
        body = await request.json()
        service.seen.append(body)
        reply = service.replies.get(body["sha256"], {"verdict": "deny"})
        if isinstance(reply, bytes):
            return web.Response(body=reply, content_type="text/html")
        return web.json_response(reply)

    app = web.Application()
    app.router.add_post("/verdict", verdict)
    runner, service.port = await serve_app(app)
    yield service
    await runner.cleanup()


async def test_the_http_backend_through_the_sidecar(
    verdict_service: VerdictService,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    data = config_dir.base(upstream.port)
    data["identity"] = {
        "backend": "http",
        "http": {
            "url": verdict_service.url,
            "timeout": "1s",
            "signon_url": "https://login.example/start",
        },
    }
    running = await start_sidecar(data)
    pki = config_dir.certs.pki
    allowed, denied, unknown, validate, validate_here, broken = (
        pki.client(n) for n in ("Al Lowed", "De Nied", "Un Known", "Va Lid", "Va Here", "Bro Ken")
    )

    def program(who: Issued, reply: Any) -> None:
        verdict_service.replies[sha256_of(who)] = reply

    user = {
        "sub": "u-1",
        "username": "allowed",
        "given_name": "Al",
        "email": "al@example.com",
        "roles": ["administrator"],
        "department": "ignored",
    }
    program(allowed, {"verdict": "allow", "user": user, "future-key": 1})
    program(denied, {"verdict": "deny", "reason": "this device is not enrolled"})
    program(unknown, {"verdict": "unknown"})
    program(validate, {"verdict": "validate", "redirect": "https://idp.example/check?id=7"})
    program(validate_here, {"verdict": "validate"})
    program(broken, b"<html>oops</html>")

    reply = await fetch(running, "/admin/x?y=1", allowed)
    assert reply.status == 200
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0]) == {
        "sub": "u-1",
        "username": "allowed",
        "given_name": "Al",
        "email": "al@example.com",
        "roles": ["administrator"],
    }
    assert upstream.last.header("X-APP-CERTIFICATE") == [base64.b64encode(allowed.der).decode()]
    [asked] = verdict_service.seen
    assert asked == {
        "certificate": base64.b64encode(allowed.der).decode(),
        "sha256": sha256_of(allowed),
        "serial": str(serial_of(allowed)),
        "serial_hex": f"{serial_of(allowed):X}",
        "subject": "CN=Al Lowed",
        "issuer": "CN=Test Client Intermediate",
        "client_ip": "127.0.0.1",
    }
    forwarded = len(upstream.seen)

    reply = await fetch(running, "/app/", denied)
    assert reply.status == 403 and reply.problem()["detail"] == "This device is not enrolled."
    reply = await fetch(running, "/app/", unknown)
    assert reply.status == 401 and "Location" not in reply.headers
    reply = await fetch(running, "/app/p?q=1", validate)
    assert reply.status == 302
    assert reply.headers["Location"] == "https://idp.example/check?id=7"
    reply = await fetch(running, "/app/p?q=1", validate_here)
    assert reply.status == 302
    location = urlsplit(reply.headers["Location"])
    assert (location.scheme, location.netloc, location.path) == ("https", "login.example", "/start")
    assert parse_qs(location.query) == {
        "purpose": ["validate"],
        "return_url": [f"https://localhost:{running.sidecar.port}/app/p?q=1"],
    }
    started = time.monotonic()
    reply = await fetch(running, "/app/", broken)
    assert reply.status == 503 and reply.headers["Retry-After"].isdigit()
    assert time.monotonic() - started < 3.0
    assert len(upstream.seen) == forwarded  # nothing else was forwarded
