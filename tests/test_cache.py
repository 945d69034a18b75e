"""The verdict cache, with a fake clock and a fake backend: no sleeping, no network."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections import Counter

import pytest

from sidecar.certs import ClientCert
from sidecar.config import CacheConfig, StaticConfig
from sidecar.errors import IdentityUnavailable
from sidecar.identity import LookupContext, SignOnPurpose, User, Verdict
from sidecar.identity.cache import VerdictCache
from sidecar.identity.static import StaticBackend
from tests.pki import make_ca, make_leaf

CTX = LookupContext(client_ip="192.0.2.1")
ALICE = User(sub="a-1", username="alice", roles=("member",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """Implements the Backend protocol; answers per fingerprint, optionally held at a gate."""

    name = "fake"
    can_enrol = True

    def __init__(self) -> None:
        self.answers: dict[str, Verdict | Exception] = {}
        self.default: Verdict | Exception = Verdict.allow(ALICE, code="ok")
        self.calls: Counter[str] = Counter()
        self.contexts: list[LookupContext] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.closed = False

    def gate(self, cert: ClientCert) -> asyncio.Event:
        self.started[cert.sha256] = asyncio.Event()
        self.gates[cert.sha256] = asyncio.Event()
        return self.gates[cert.sha256]

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        self.calls[cert.sha256] += 1
        self.contexts.append(context)
        if cert.sha256 in self.started:
            self.started[cert.sha256].set()
        if cert.sha256 in self.gates:
            await self.gates[cert.sha256].wait()
        answer = self.answers.get(cert.sha256, self.default)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sign_on(self, purpose: SignOnPurpose, return_url: str) -> str:
        return f"https://signon.example/{purpose}?r={return_url}"

    async def close(self) -> None:
        self.closed = True


_BASE = ClientCert.from_x509(make_leaf(make_ca(), "base").cert)


def cert(n: int, *, serial: int | None = None) -> ClientCert:
    """A distinct certificate as the cache sees it (fingerprint and serial), made cheaply."""
    digest = hashlib.sha256(n.to_bytes(8, "big")).hexdigest()
    return dataclasses.replace(_BASE, sha256=digest, serial=n if serial is None else serial)


def make(
    backend: FakeBackend | None = None, clock: Clock | None = None, **config: object
) -> tuple[VerdictCache, FakeBackend, Clock]:
    backend = backend or FakeBackend()
    clock = clock or Clock()
    settings: dict[str, object] = {"ttl": 300, "negative_ttl": 30}
    settings.update(config)
    return VerdictCache(backend, CacheConfig.model_validate(settings), clock=clock), backend, clock


# ---- how long verdicts are kept ----------------------------------------------------------------


async def test_allow_is_kept_for_ttl() -> None:
    cache, backend, clock = make()
    c = cert(1)
    first = await cache.lookup(c, CTX)
    assert first.kind == "allow"
    assert cache.peek(c) is first
    clock.advance(299.9)
    assert await cache.lookup(c, CTX) is first
    assert backend.calls[c.sha256] == 1
    clock.advance(0.1)
    assert cache.peek(c) is None
    await cache.lookup(c, CTX)
    assert backend.calls[c.sha256] == 2
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)


async def test_refusal_is_kept_for_negative_ttl() -> None:
    cache, backend, clock = make()
    c = cert(1)
    backend.answers[c.sha256] = Verdict.deny("revoked", code="PB 0004")
    assert (await cache.lookup(c, CTX)).kind == "deny"
    clock.advance(29)
    assert cache.peek(c) is not None
    clock.advance(1)
    assert cache.peek(c) is None
    await cache.lookup(c, CTX)
    assert backend.calls[c.sha256] == 2


async def test_validate_is_never_kept() -> None:
    cache, backend, clock = make(stale_if_error=600)
    c = cert(1)
    await cache.lookup(c, CTX)  # an allow, kept
    clock.advance(301)
    backend.answers[c.sha256] = Verdict("validate", "needs validation", "PB 0003")
    assert (await cache.lookup(c, CTX)).kind == "validate"
    assert cache.peek(c) is None
    assert len(cache) == 0  # the old allow is gone too: after validation, ask again
    await cache.lookup(c, CTX)
    assert backend.calls[c.sha256] == 3
    # ... and it cannot be served stale either
    backend.answers[c.sha256] = IdentityUnavailable("down")
    with pytest.raises(IdentityUnavailable):
        await cache.lookup(c, CTX)


async def test_backend_ttl_shortens_but_never_lengthens() -> None:
    cache, backend, clock = make()
    short, long_ = cert(1), cert(2)
    backend.answers[short.sha256] = Verdict.allow(ALICE, ttl=10)
    backend.answers[long_.sha256] = Verdict.allow(ALICE, ttl=86400)
    await cache.lookup(short, CTX)
    await cache.lookup(long_, CTX)
    clock.advance(10)
    assert cache.peek(short) is None
    assert cache.peek(long_) is not None
    clock.advance(290)
    assert cache.peek(long_) is None


async def test_zero_ttl_keeps_nothing() -> None:
    cache, backend, _ = make(ttl=0, negative_ttl=0)
    c = cert(1)
    await cache.lookup(c, CTX)
    await cache.lookup(c, CTX)
    assert backend.calls[c.sha256] == 2
    assert len(cache) == 0


# ---- bounded memory --------------------------------------------------------------------------


async def test_a_flood_of_distinct_certificates_stays_within_max_entries() -> None:
    cache, backend, _ = make(max_entries=100)
    for n in range(10_000):
        await cache.lookup(cert(n), CTX)
    assert len(cache) == cache.stats.size == 100
    assert cache.stats.evictions == 9_900
    assert len(cache._by_serial) == 100
    assert sum(backend.calls.values()) == 10_000


async def test_least_recently_used_is_evicted_first() -> None:
    cache, _, _ = make(max_entries=3)
    a, b, c, d = cert(1), cert(2), cert(3), cert(4)
    for x in (a, b, c):
        await cache.lookup(x, CTX)
    assert cache.peek(a) is not None  # a is now the most recently used
    await cache.lookup(d, CTX)
    assert cache.peek(b) is None
    assert all(cache.peek(x) is not None for x in (a, c, d))


# ---- single flight ---------------------------------------------------------------------------


async def test_concurrent_first_lookups_share_one_backend_call() -> None:
    cache, backend, _ = make()
    c = cert(1)
    gate = backend.gate(c)
    waiters = [
        asyncio.create_task(cache.lookup(c, LookupContext(f"10.0.0.{i}"))) for i in range(100)
    ]
    await backend.started[c.sha256].wait()
    gate.set()
    verdicts = await asyncio.gather(*waiters)
    assert backend.calls[c.sha256] == 1
    assert all(v is verdicts[0] for v in verdicts)
    assert (cache.stats.misses, cache.stats.coalesced) == (100, 99)
    assert backend.contexts == [LookupContext("10.0.0.0")]


async def test_a_slow_lookup_does_not_hold_up_another_certificate() -> None:
    cache, backend, _ = make()
    slow, fast = cert(1), cert(2)
    gate = backend.gate(slow)
    pending = asyncio.create_task(cache.lookup(slow, CTX))
    await backend.started[slow.sha256].wait()
    assert (await asyncio.wait_for(cache.lookup(fast, CTX), 5)).kind == "allow"
    assert not pending.done()
    gate.set()
    assert (await pending).kind == "allow"


async def test_a_failure_reaches_every_waiter_and_is_not_cached() -> None:
    cache, backend, _ = make()
    c = cert(1)
    gate = backend.gate(c)
    backend.answers[c.sha256] = IdentityUnavailable("timed out", code="timeout")
    waiters = [asyncio.create_task(cache.lookup(c, CTX)) for _ in range(10)]
    await backend.started[c.sha256].wait()
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, IdentityUnavailable) and r.code == "timeout" for r in results)
    assert backend.calls[c.sha256] == 1
    assert cache.stats.failures == 1
    del backend.answers[c.sha256]
    assert (await cache.lookup(c, CTX)).kind == "allow"
    assert backend.calls[c.sha256] == 2


async def test_an_unexpected_exception_reaches_the_waiters_and_is_not_cached() -> None:
    cache, backend, _ = make()
    c = cert(1)
    backend.answers[c.sha256] = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        await cache.lookup(c, CTX)
    assert len(cache) == 0
    assert not cache._inflight


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    cache, backend, _ = make()
    c = cert(1)
    gate = backend.gate(c)
    first = asyncio.create_task(cache.lookup(c, CTX))
    second = asyncio.create_task(cache.lookup(c, CTX))
    await backend.started[c.sha256].wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert (await second).kind == "allow"
    assert backend.calls[c.sha256] == 1
    assert cache.peek(c) is not None


async def test_when_every_waiter_is_cancelled_the_answer_is_still_kept() -> None:
    cache, backend, _ = make()
    c = cert(1)
    gate = backend.gate(c)
    only = asyncio.create_task(cache.lookup(c, CTX))
    await backend.started[c.sha256].wait()
    only.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await only
    while cache._inflight:
        await asyncio.sleep(0)
    assert cache.peek(c) is not None


# ---- stale-if-error --------------------------------------------------------------------------


async def test_stale_allow_is_served_within_the_window_when_the_backend_fails() -> None:
    cache, backend, clock = make(stale_if_error=60)
    c = cert(1)
    fresh = await cache.lookup(c, CTX)
    clock.advance(300 + 59)
    backend.answers[c.sha256] = IdentityUnavailable("down")
    stale = await cache.lookup(c, CTX)
    assert stale.stale
    assert not fresh.stale
    assert stale == dataclasses.replace(fresh, stale=True)
    assert cache.stats.stale_served == 1
    assert cache.peek(c) is None  # stale answers are never fresh hits
    clock.advance(1)
    with pytest.raises(IdentityUnavailable):
        await cache.lookup(c, CTX)


async def test_without_stale_if_error_a_failure_propagates() -> None:
    cache, backend, clock = make()
    c = cert(1)
    await cache.lookup(c, CTX)
    clock.advance(301)
    backend.answers[c.sha256] = IdentityUnavailable("down")
    with pytest.raises(IdentityUnavailable):
        await cache.lookup(c, CTX)
    assert cache.stats.stale_served == 0


async def test_a_refusal_is_never_served_stale() -> None:
    cache, backend, clock = make(stale_if_error=600)
    c = cert(1)
    backend.answers[c.sha256] = Verdict.deny("revoked")
    await cache.lookup(c, CTX)
    clock.advance(31)
    backend.answers[c.sha256] = IdentityUnavailable("down")
    with pytest.raises(IdentityUnavailable):
        await cache.lookup(c, CTX)


async def test_stale_if_error_works_with_zero_ttl() -> None:
    cache, backend, clock = make(ttl=0, stale_if_error=10)
    c = cert(1)
    await cache.lookup(c, CTX)
    assert cache.peek(c) is None
    backend.answers[c.sha256] = IdentityUnavailable("down")
    clock.advance(5)
    assert (await cache.lookup(c, CTX)).stale


async def test_other_errors_are_never_answered_from_stale() -> None:
    cache, backend, clock = make(stale_if_error=60)
    c = cert(1)
    await cache.lookup(c, CTX)
    clock.advance(301)
    backend.answers[c.sha256] = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        await cache.lookup(c, CTX)


# ---- purge -----------------------------------------------------------------------------------


async def test_purge_by_fingerprint_as_operators_write_it() -> None:
    cache, _, _ = make()
    a, b = cert(1), cert(2)
    await cache.lookup(a, CTX)
    await cache.lookup(b, CTX)
    colons = ":".join(a.sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    assert cache.purge(sha256=colons) == 1
    assert cache.peek(a) is None
    assert cache.peek(b) is not None
    assert cache.purge(sha256=a.sha256) == 0
    with pytest.raises(ValueError, match="fingerprint"):
        cache.purge(sha256="nope")


async def test_purge_by_serial_removes_every_certificate_with_it() -> None:
    cache, _, _ = make()
    same1, same2, other = cert(1, serial=77), cert(2, serial=77), cert(3, serial=78)
    for c in (same1, same2, other):
        await cache.lookup(c, CTX)
    assert cache.purge(serial=77) == 2
    assert cache.peek(other) is not None
    assert cache.purge(serial=77) == 0
    assert 77 not in cache._by_serial


async def test_purge_by_both_needs_both_to_match() -> None:
    cache, _, _ = make()
    c = cert(1, serial=5)
    await cache.lookup(c, CTX)
    assert cache.purge(sha256=c.sha256, serial=6) == 0
    assert cache.purge(sha256=c.sha256, serial=5) == 1


async def test_purge_all_and_forget() -> None:
    cache, _, _ = make()
    for n in range(5):
        await cache.lookup(cert(n), CTX)
    cache.forget(cert(0).sha256)
    assert len(cache) == 4
    assert cache.purge() == 4
    assert len(cache) == 0
    assert not cache._by_serial


async def test_an_answer_fetched_across_a_purge_is_not_kept() -> None:
    cache, backend, _ = make()
    c = cert(1)
    gate = backend.gate(c)
    pending = asyncio.create_task(cache.lookup(c, CTX))
    await backend.started[c.sha256].wait()
    cache.purge()
    gate.set()
    assert (await pending).kind == "allow"
    assert cache.peek(c) is None


# ---- the rest of the backend shape -----------------------------------------------------------


async def test_delegates_name_enrolment_sign_on_and_close() -> None:
    cache, backend, _ = make()
    assert cache.name == "fake"
    assert cache.can_enrol
    # sign-on goes through the intent gate (coalesced, rate limited: test_signon_security.py)
    signed = await cache.sign_on("enrol", "https://x/", "192.0.2.1")
    assert signed.location == "https://signon.example/enrol?r=https://x/"
    assert not signed.coalesced
    c = cert(1)
    backend.gate(c)
    pending = asyncio.create_task(cache.lookup(c, CTX))
    await backend.started[c.sha256].wait()
    await cache.close()
    assert backend.closed
    with pytest.raises(asyncio.CancelledError):
        await pending


async def test_the_static_backend_through_the_cache() -> None:
    leaf = make_leaf(make_ca(), "alice")
    bound, unbound = ClientCert.from_x509(leaf.cert), cert(9)
    static = StaticBackend(
        StaticConfig.model_validate(
            {
                "users": [
                    {"sub": "a-1", "username": "alice", "certificates": [{"sha256": bound.sha256}]}
                ]
            }
        )
    )
    cache = VerdictCache(static, CacheConfig.model_validate({}), clock=Clock())
    assert cache.peek(bound) is None
    assert (await cache.lookup(bound, CTX)).user == User(sub="a-1", username="alice")
    assert (await cache.lookup(unbound, CTX)).kind == "deny"
    hit = cache.peek(bound)
    assert hit is not None
    assert hit.kind == "allow"
    assert cache.stats.hits == 1
    await cache.close()
