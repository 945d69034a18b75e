"""Sign-on intents are bounded (issue #12, item 7).

Every anonymous request to a protected path, with ``enrol_missing``, made the sidecar
register an intent with Identity Plus: one outbound API call per request, for anyone, without
bound. Now an intent registered for a return URL (and purpose) is reused for 20 s (Identity
Plus keeps one about 30 s), concurrent requests share one registration, and registrations
are rate limited per client address (20 at once, then one every 3 s; IPv6 by /64) and per
worker (100 at once, then 10 a second): beyond, 429 with ``Retry-After``. Counted in
``sidecar_signon_intents_total{result}``.

The end-to-end tests drive the sidecar over TLS with the fake Identity Plus; the bookkeeping
(``identity/intents.py``) is tested with a fake clock and generated traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sidecar.errors import IdentityUnavailable
from sidecar.identity import SignOnPurpose
from sidecar.identity.intents import (
    OVERALL,
    PER_ADDRESS,
    PER_NETWORK,
    PER_SUBSCRIBER,
    REUSE_FOR,
    IntentGate,
    Rate,
    SignOnLimited,
    address_key,
)

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .fake_identityplus import FakeIdentityPlus, fake_identityplus

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here

SIGNON = "https://signon.example"


# ---- through the sidecar ----------------------------------------------------------------------


@pytest.fixture
async def enrolling(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> Running:
    data = config_dir.base(upstream.port)
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "signon_url": SIGNON,
            "timeout": "5s",
            "enrol_missing": True,
        },
    }
    running: Running = await start_sidecar(data)
    return running


@dataclass
class Answer:
    status: int
    location: str | None
    retry_after: str | None
    body: bytes = b""


async def get_many(
    running: Running, paths: list[str], *, connections: int = 10, method: str = "GET"
) -> list[Answer]:
    connector = aiohttp.TCPConnector(limit=connections, ssl=running.client_ssl())
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(path: str) -> Answer:
            async with session.request(
                method, running.url + path, allow_redirects=False, data=b"x" * (method == "POST")
            ) as response:
                body = await response.read()
                return Answer(
                    response.status,
                    response.headers.get("Location"),
                    response.headers.get("Retry-After"),
                    body,
                )

        return list(await asyncio.gather(*(one(p) for p in paths)))


async def intents_metric(running: Running) -> dict[str, float]:
    url = f"http://127.0.0.1:{running.sidecar.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sidecar_signon_intents_total":
                out[sample.labels["result"]] = sample.value
    return out


async def test_a_hundred_anonymous_requests_to_one_url_register_one_intent(
    enrolling: Running, fake_identityplus: FakeIdentityPlus, upstream: Upstream
) -> None:
    answers = await get_many(enrolling, ["/app/page?x=1"] * 100, connections=20)
    assert {a.status for a in answers} == {302}
    [intent] = fake_identityplus.intents
    assert {a.location for a in answers} == {f"{SIGNON}/{intent.reference}"}
    assert intent.return_url == f"{enrolling.url}/app/page?x=1"
    # and one more, later on, still within the intent's life
    [later] = await get_many(enrolling, ["/app/page?x=1"])
    assert later.location == f"{SIGNON}/{intent.reference}"
    assert len(fake_identityplus.intents) == 1
    assert await intents_metric(enrolling) == {"registered": 1.0, "coalesced": 100.0}
    assert upstream.seen == []


async def test_a_flood_from_one_address_is_limited(
    enrolling: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    burst = PER_ADDRESS.burst
    started = time.monotonic()
    first = await get_many(enrolling, [f"/app/page/{i}" for i in range(burst)], connections=1)
    assert [a.status for a in first] == [302] * burst
    # the next one at once, a POST (which would get 401 with the sign-on URL): refused
    [post] = await get_many(enrolling, ["/app/form"], method="POST")
    assert post.status == 429
    assert post.retry_after is not None and 1 <= int(post.retry_after) <= 3
    assert b"Too Many Requests" in post.body and post.location is None
    rest = await get_many(enrolling, [f"/app/page/{i}" for i in range(burst, 60)], connections=1)
    elapsed = time.monotonic() - started
    statuses = [a.status for a in rest]
    assert statuses.count(429) >= len(rest) - (1 + elapsed * PER_ADDRESS.per_second)
    assert {a.location is None for a in rest if a.status == 429} == {True}
    registered = burst + statuses.count(302)
    assert len(fake_identityplus.intents) == registered
    # what was registered is still served to everyone who asks for it
    [again] = await get_many(enrolling, ["/app/page/3"])
    assert again.status == 302 and again.location == first[3].location
    metric = await intents_metric(enrolling)
    assert metric["registered"] == registered
    assert metric["limited"] == 1 + statuses.count(429)
    assert metric["coalesced"] == 1


async def test_validation_intents_are_coalesced_too(
    enrolling: Running, fake_identityplus: FakeIdentityPlus, config_dir: ConfigDir
) -> None:
    who = config_dir.certs.pki.client("Val Idate")
    fake_identityplus.set_simple(who.cert.serial_number, "PB 0003")
    context = enrolling.client_ssl(who)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(
                enrolling.url + "/app/x", ssl=context, allow_redirects=False
            ) as response:
                assert response.status == 302
    [intent] = fake_identityplus.intents
    assert intent.type == "validate"
    assert fake_identityplus.calls[who.cert.serial_number] == 5  # never cached: asked each time


async def test_a_failed_registration_is_not_reused(
    enrolling: Running, fake_identityplus: FakeIdentityPlus
) -> None:
    fake_identityplus.set_fault(None, "500")
    [failed] = await get_many(enrolling, ["/app/x"])
    assert failed.status == 503 and failed.retry_after is not None
    fake_identityplus.set_fault(None, None)
    [ok] = await get_many(enrolling, ["/app/x"])
    assert ok.status == 302
    assert await intents_metric(enrolling) == {"failed": 1.0, "registered": 1.0}


# ---- the bookkeeping, with a fake clock -------------------------------------------------------


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Registry:
    """Stands in for the backend's ``sign_on``: counts calls, can stall or fail."""

    calls: list[tuple[str, str, float]] = field(default_factory=list)
    clock: Clock | None = None
    gate: asyncio.Event | None = None
    fail: bool = False

    async def __call__(self, purpose: SignOnPurpose, return_url: str) -> str:
        self.calls.append((purpose, return_url, self.clock.now if self.clock else 0.0))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise IdentityUnavailable("down", code="connect")
        return f"https://signon.example/{len(self.calls)}"


def make_gate(registry: Registry, clock: Clock, **kwargs: Any) -> IntentGate:
    registry.clock = clock
    return IntentGate(registry, clock=clock, **kwargs)


async def test_an_intent_is_reused_for_its_window_only() -> None:
    clock, registry = Clock(), Registry()
    gate = make_gate(registry, clock)
    first = await gate.sign_on("enrol", "https://a/x", "10.0.0.1")
    assert not first.coalesced
    clock.now += REUSE_FOR - 0.1
    again = await gate.sign_on("enrol", "https://a/x", "10.0.0.2")
    assert again.coalesced and again.location == first.location
    assert not (await gate.sign_on("validate", "https://a/x", "10.0.0.1")).coalesced
    clock.now += 0.2
    renewed = await gate.sign_on("enrol", "https://a/x", "10.0.0.1")
    assert not renewed.coalesced and renewed.location != first.location
    assert len(registry.calls) == 3


async def test_concurrent_requests_share_one_registration() -> None:
    clock, registry = Clock(), Registry(gate=asyncio.Event())
    gate = make_gate(registry, clock)
    tasks = [
        asyncio.create_task(gate.sign_on("enrol", "https://a/x", f"10.0.0.{i}")) for i in range(10)
    ]
    await asyncio.sleep(0.01)
    assert registry.gate is not None
    registry.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(registry.calls) == 1
    assert len({r.location for r in results}) == 1
    assert sorted(r.coalesced for r in results) == [False] + [True] * 9


async def test_a_failure_reaches_every_waiter_and_is_not_kept() -> None:
    clock, registry = Clock(), Registry(gate=asyncio.Event(), fail=True)
    gate = make_gate(registry, clock)
    tasks = [
        asyncio.create_task(gate.sign_on("enrol", "https://a/x", "10.0.0.1")) for _ in range(3)
    ]
    await asyncio.sleep(0.01)
    assert registry.gate is not None
    registry.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, IdentityUnavailable) for o in outcomes)
    registry.fail = False
    assert not (await gate.sign_on("enrol", "https://a/x", "10.0.0.1")).coalesced
    assert len(registry.calls) == 2


async def test_a_cancelled_waiter_does_not_cancel_the_registration() -> None:
    clock, registry = Clock(), Registry(gate=asyncio.Event())
    gate = make_gate(registry, clock)
    first = asyncio.create_task(gate.sign_on("enrol", "https://a/x", "10.0.0.1"))
    await asyncio.sleep(0.01)
    first.cancel()
    assert registry.gate is not None
    registry.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await gate.sign_on("enrol", "https://a/x", "10.0.0.1")).coalesced
    assert len(registry.calls) == 1


async def test_the_address_limit_refills_and_says_when() -> None:
    clock, registry = Clock(), Registry()
    rate = Rate(burst=3, per_second=0.5)
    gate = make_gate(registry, clock, per_address=rate)
    for i in range(3):
        await gate.sign_on("enrol", f"https://a/{i}", "10.0.0.1")
    with pytest.raises(SignOnLimited) as caught:
        await gate.sign_on("enrol", "https://a/3", "10.0.0.1")
    assert caught.value.retry_after == 2
    await gate.sign_on("enrol", "https://a/3", "10.0.0.2")  # another address is not limited
    clock.now += 1.5
    with pytest.raises(SignOnLimited) as caught:
        await gate.sign_on("enrol", "https://a/4", "10.0.0.1")
    assert caught.value.retry_after == 1
    clock.now += 0.5
    await gate.sign_on("enrol", "https://a/4", "10.0.0.1")
    # an intent already registered is served to a limited address all the same
    assert (await gate.sign_on("enrol", "https://a/0", "10.0.0.1")).coalesced


async def test_the_overall_limit_bounds_many_addresses() -> None:
    clock, registry = Clock(), Registry()
    gate = make_gate(registry, clock, overall=Rate(burst=5, per_second=1.0))
    for i in range(5):
        await gate.sign_on("enrol", f"https://a/{i}", f"10.0.{i}.1")
    with pytest.raises(SignOnLimited) as caught:
        await gate.sign_on("enrol", "https://a/5", "10.0.9.1")
    assert caught.value.retry_after == 1
    clock.now += 1
    await gate.sign_on("enrol", "https://a/5", "10.0.9.1")


def test_ipv6_addresses_are_limited_by_their_64_prefix() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7") == "192.0.2.7"
    assert address_key(None) == address_key("not an address") == ""


async def test_memory_is_bounded() -> None:
    clock, registry = Clock(), Registry()
    gate = make_gate(
        registry,
        clock,
        per_address=Rate(burst=1000, per_second=1000.0),
        per_network=Rate(burst=1000, per_second=1000.0),
        overall=Rate(burst=10_000, per_second=1000.0),
        max_addresses=50,
        max_urls=40,
    )
    for i in range(500):
        await gate.sign_on("enrol", f"https://a/{i}", str(ipaddress.IPv4Address(i + 1)))
    assert gate.remembered_addresses <= 50
    assert gate.remembered_urls <= 40
    await gate.sign_on("enrol", "https://a/" + "x" * 5000, "10.0.0.1")  # too long to remember
    assert not (await gate.sign_on("enrol", "https://a/" + "x" * 5000, "10.0.0.1")).coalesced


# Generated traffic: whatever arrives, from whichever addresses, the registrations made stay
# within both rates over every time window, and no answer is older than the reuse window.

_events = st.lists(
    st.tuples(
        st.floats(0, 4, allow_nan=False),  # seconds since the previous request
        st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2", "10.0.0.3"]),
        st.integers(0, 6),  # which URL
    ),
    max_size=150,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(events=_events)
def test_registrations_stay_within_the_rates(events: list[tuple[float, str, int]]) -> None:
    per_address, overall = Rate(burst=4, per_second=0.5), Rate(burst=6, per_second=1.0)
    reuse = 5.0

    async def run() -> None:
        clock, registry = Clock(), Registry()
        gate = make_gate(registry, clock, per_address=per_address, overall=overall, reuse_for=reuse)
        made: list[tuple[float, str]] = []
        limited: list[int] = []
        issued_at: dict[str, float] = {}
        for pause, address, url in events:
            clock.now += pause
            try:
                result = await gate.sign_on("enrol", f"https://a/{url}", address)
            except SignOnLimited as exc:
                limited.append(exc.retry_after)
                continue
            if result.coalesced:
                assert clock.now - issued_at[result.location] < reuse
            else:
                made.append((clock.now, address_key(address)))
                issued_at[result.location] = clock.now
        assert all(seconds >= 1 for seconds in limited)
        times = [t for t, _ in made]
        for start in times:
            for width in (0.0, 1.0, 5.0, 20.0):
                window = [(t, k) for t, k in made if start <= t <= start + width]
                assert len(window) <= overall.burst + width * overall.per_second + 1e-9
                for key in {k for _, k in window}:
                    mine = [t for t, k in window if k == key]
                    assert len(mine) <= per_address.burst + width * per_address.per_second + 1e-9

    asyncio.run(run())


def test_the_defaults_are_what_the_readme_says() -> None:
    assert PER_ADDRESS.burst == 20
    assert PER_ADDRESS.per_second == pytest.approx(1 / 3)
    assert (OVERALL.burst, OVERALL.per_second) == (100, 10.0)
    assert (PER_SUBSCRIBER.burst, PER_SUBSCRIBER.per_second) == (20, 1.0)
    assert (PER_NETWORK.burst, PER_NETWORK.per_second) == (30, 3.0)
    # one network and one visitor elsewhere fit in the worker's budget (test_signon_fairness)
    assert PER_NETWORK.burst + PER_ADDRESS.burst < OVERALL.burst
    assert PER_NETWORK.per_second + PER_ADDRESS.per_second <= OVERALL.per_second
    assert REUSE_FOR == 20.0
