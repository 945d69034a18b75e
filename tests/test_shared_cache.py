"""The shared verdict cache against a real Redis: what it stores, for how long, what it reads
back, and what happens when Redis is down, slow, restarted, or holds garbage.

Several ``VerdictCache``s in one process stand for several replicas here (each has its own
Redis connections and subscription); ``test_shared_fleet.py`` runs real sidecar processes.
The backend is a fake of our own protocol that counts calls per certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.certs import ClientCert
from sidecar.config import CacheConfig
from sidecar.errors import IdentityUnavailable
from sidecar.identity import Verdict
from sidecar.identity.cache import VerdictCache
from sidecar.identity.shared.record import encode_verdict
from sidecar.identity.shared.store import SharedCache
from sidecar.metrics import Metrics

from .redisd import RedisServer, free_port, redis_server, running_redis
from .test_cache import ALICE, CTX, FakeBackend, cert

__all__ = ["redis_server"]  # the fixture

NS = "fake.0123456789abcdef"

Factory = Callable[..., Any]


@pytest.fixture
async def make_cache() -> AsyncIterator[Factory]:
    """``make_cache(url, backend=..., **shared)``: a started cache with a shared level."""
    made: list[VerdictCache] = []

    async def make(
        url: str,
        backend: FakeBackend | None = None,
        *,
        ttl: float = 300,
        negative_ttl: float = 30,
        stale_if_error: float = 0,
        owner_wait: float = 2.0,
        namespace: str = NS,
        **shared: Any,
    ) -> VerdictCache:
        config = CacheConfig.model_validate(
            {
                "ttl": ttl,
                "negative_ttl": negative_ttl,
                "stale_if_error": stale_if_error,
                "shared": {"url": url, **shared},
            }
        )
        assert config.shared is not None
        level = SharedCache(config.shared, namespace=namespace, owner_wait=owner_wait)
        cache = VerdictCache(backend or FakeBackend(), config, shared=level)
        await cache.start()
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.close()


def shared_of(cache: VerdictCache) -> SharedCache:
    assert isinstance(cache.shared, SharedCache)
    return cache.shared


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        await asyncio.sleep(0.02)


# ---- the second level -------------------------------------------------------------------------


async def test_a_verdict_in_redis_is_used_without_asking_the_backend(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    a = await make_cache(redis_server.url, backend)
    b = await make_cache(redis_server.url, backend)
    c = cert(1)
    first = await a.lookup(c, CTX)
    second = await b.lookup(c, CTX)
    assert backend.calls[c.sha256] == 1
    assert second == first and second.user is not None
    assert second.user.header_value == ALICE.header_value
    assert b.peek(c) == first  # and now it is in b's own cache: a hit there touches nothing
    assert (shared_of(a).stats.misses, shared_of(b).stats.hits) == (1, 1)


def commands_run(server: RedisServer) -> int:
    """Commands Redis ran for the caches, but the subscribers' pings and the test's own."""
    stats = server.client().info("commandstats")
    ignored = {
        "cmdstat_ping",
        "cmdstat_info",
        "cmdstat_hello",
        "cmdstat_client|setinfo",
        "cmdstat_client|setname",
    }
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ignored)


async def test_a_local_hit_never_touches_redis(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    cache = await make_cache(redis_server.url)
    c = cert(5)
    await cache.lookup(c, CTX)
    before = commands_run(redis_server)
    for _ in range(500):
        assert cache.peek(c) is not None
        await cache.lookup(c, CTX)
    assert commands_run(redis_server) == before


async def test_keys_values_and_ttls_in_redis(
    redis_server: RedisServer, make_cache: Factory, tmp_path: Path
) -> None:
    backend = FakeBackend()
    allow, deny, unknown, short, validate, failing = (cert(n) for n in range(10, 16))
    backend.answers[deny.sha256] = Verdict.deny("revoked", code="PB 0004")
    backend.answers[unknown.sha256] = Verdict("unknown", "not known", "PB 0000")
    backend.answers[short.sha256] = Verdict.allow(ALICE, ttl=10)
    backend.answers[validate.sha256] = Verdict(
        "validate", "validate first", "PB 0003", redirect="https://signon.example/x"
    )
    backend.answers[failing.sha256] = IdentityUnavailable("down", code="timeout")
    cache = await make_cache(
        redis_server.url, backend, key_prefix="shop:", ttl=300, negative_ttl=30
    )
    for c in (allow, deny, unknown, short, validate):
        await cache.lookup(c, CTX)
    with pytest.raises(IdentityUnavailable):
        await cache.lookup(failing, CTX)

    r = redis_server.client()
    epoch = int(r.get("shop:epoch") or b"-1")
    assert epoch == 0

    def value_key(c: ClientCert) -> str:
        return f"shop:{NS}:0:v:{{{c.sha256}}}"

    # every key is under the prefix and the namespace; no lock is left behind
    assert sorted(redis_server.key_names()) == sorted(
        ["shop:epoch", *(value_key(c) for c in (allow, deny, unknown, short))]
    )
    ttls = {c: r.pttl(value_key(c)) for c in (allow, deny, unknown, short)}
    assert 295_000 < ttls[allow] <= 300_000
    assert 25_000 < ttls[deny] <= 30_000 and 25_000 < ttls[unknown] <= 30_000
    assert 5_000 < ttls[short] <= 10_000  # the backend's own ttl, shorter, is kept
    # validate verdicts and failures are never shared
    assert not r.exists(value_key(validate)) and not r.exists(value_key(failing))
    # what is stored: the verdict and the user; not the certificate, nothing secret
    stored = json.loads(r.get(value_key(allow)) or b"")
    assert stored == {
        "v": 1,
        "kind": "allow",
        "code": "ok",
        "reason": "identified",
        "user": {"sub": "a-1", "username": "alice", "roles": ["member"]},
    }
    assert json.loads(r.get(value_key(deny)) or b"") == {
        "v": 1,
        "kind": "deny",
        "code": "PB 0004",
        "reason": "revoked",
    }
    everything = b"".join(_bytes(r.get(k)) for k in redis_server.key_names() if ":v:" in k)
    assert allow.b64.encode() not in everything and b"BEGIN" not in everything


async def test_a_verdict_is_never_kept_longer_than_redis_keeps_it(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    a = await make_cache(redis_server.url, backend)
    b = await make_cache(redis_server.url, backend)
    c = cert(20)
    await a.lookup(c, CTX)
    key = shared_of(a).keys(c.sha256)[0]
    redis_server.client().pexpire(key, 800)  # 0.8 s left, whatever the configured 5 min
    found = await b.lookup(c, CTX)
    assert found.kind == "allow" and backend.calls[c.sha256] == 1
    assert b.peek(c) is not None
    await asyncio.sleep(0.9)
    assert b.peek(c) is None  # expired with Redis' copy, not 5 minutes later
    await b.lookup(c, CTX)
    assert backend.calls[c.sha256] == 2


async def test_a_shorter_configured_ttl_wins_over_what_redis_has_left(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    a = await make_cache(redis_server.url, backend, ttl=300)
    b = await make_cache(redis_server.url, backend, ttl=0.5)
    c = cert(21)
    await a.lookup(c, CTX)
    await b.lookup(c, CTX)
    assert b.peek(c) is not None
    await asyncio.sleep(0.6)
    assert b.peek(c) is None


def _bytes(value: object) -> bytes:
    assert value is None or isinstance(value, bytes)
    return value or b""


def _forged_allow(**extra: object) -> bytes:
    doc = json.loads(encode_verdict(Verdict.allow(ALICE)))
    doc.update(extra)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("garbage", "kind"),
    [
        (b"not json", "string"),
        (_forged_allow(admin=True), "string"),  # an unknown key: not ours
        (b'{"v":1,"kind":"allow","code":"ok","reason":"x"}', "string"),  # allow without user
        (encode_verdict(Verdict.allow(ALICE)), "persist"),  # no expiry: never trusted
        (b"", "hash"),  # another type at the key (WRONGTYPE)
    ],
    ids=["not-json", "unknown-key", "allow-without-user", "no-expiry", "wrong-type"],
)
async def test_garbage_in_redis_is_a_miss_counted_and_replaced(
    redis_server: RedisServer, make_cache: Factory, garbage: bytes, kind: str
) -> None:
    backend = FakeBackend()
    c = cert(30)
    backend.answers[c.sha256] = Verdict.deny("not allowed", code="deny")
    cache = await make_cache(redis_server.url, backend)
    key = shared_of(cache).keys(c.sha256)[0]
    r = redis_server.client()
    if kind == "hash":
        r.hset(key, "kind", "allow")
    else:
        r.set(key, garbage, px=None if kind == "persist" else 60_000)
    with capture_logs() as logs:
        verdict = await cache.lookup(c, CTX)
    assert verdict.kind == "deny"  # the backend's answer, never the garbage
    assert backend.calls[c.sha256] == 1
    assert shared_of(cache).stats.errors["invalid_entry"] == 1
    if kind != "hash":
        assert any(e["event"] == "shared_cache_invalid_entry" for e in logs)
    # and Redis now holds the verdict, with its ttl
    assert json.loads(r.get(key) or b"")["kind"] == "deny"
    assert 0 < r.pttl(key) <= 30_000


# ---- single-flight across the fleet -----------------------------------------------------------


async def test_many_caches_and_many_certificates_make_one_backend_call_each(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    # Single-flight is what is tested here, not the fallback: under a loaded machine a Redis
    # call can take longer than the 50 ms default, and each replica would then rightly ask
    # its own backend (seen: 6 calls per certificate once, in a compiled run under load).
    caches = [await make_cache(redis_server.url, backend, timeout="2s") for _ in range(6)]
    certs = [cert(1000 + n) for n in range(150)]

    async def slow_lookup(cache: VerdictCache, c: ClientCert) -> Verdict:
        return await cache.lookup(c, CTX)

    original = backend.lookup

    async def with_latency(c: ClientCert, context: Any) -> Verdict:
        await asyncio.sleep(0.02)
        return await original(c, context)

    backend.lookup = with_latency  # type: ignore[method-assign,assignment]
    results = await asyncio.gather(*(slow_lookup(k, c) for c in certs for k in caches))
    assert all(v.kind == "allow" for v in results)
    assert backend.calls == {c.sha256: 1 for c in certs}
    waits = sum(sum(shared_of(k).stats.lock_waits.values()) for k in caches)
    hits = sum(shared_of(k).stats.hits for k in caches)
    assert waits + hits == 5 * len(certs)
    assert sum(shared_of(k).stats.lock_waits["value"] for k in caches) == waits


async def test_a_waiting_replica_gets_the_verdict_in_the_holders_message(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    c = cert(35)
    gate = backend.gate(c)
    backend.answers[c.sha256] = Verdict.allow(ALICE, ttl=60)
    holder = await make_cache(redis_server.url, backend)
    waiting = await make_cache(redis_server.url, backend)
    r = redis_server.client()

    def scripts_run() -> int:
        stats = r.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    await holder.lookup(cert(36), CTX)  # loads the scripts (a first EVALSHA is NOSCRIPT)
    before = scripts_run()
    first = asyncio.ensure_future(holder.lookup(c, CTX))
    await backend.started[c.sha256].wait()
    second = asyncio.ensure_future(waiting.lookup(c, CTX))
    await eventually(lambda: shared_of(waiting).stats.misses == 1)
    gate.set()
    got, told = await first, await second
    assert told == dataclasses.replace(got, ttl=None)  # the ttl is Redis' own, on the key
    assert backend.calls[c.sha256] == 1
    assert shared_of(waiting).stats.lock_waits["value"] == 1
    # two lookups and one settle: the waiting replica did not ask Redis again
    assert scripts_run() - before == 3
    # and it keeps the verdict no longer than the holder's ttl
    await asyncio.sleep(0)
    assert waiting.peek(c) is not None
    entry = waiting._entries[c.sha256]
    assert entry.expires - time.monotonic() <= 60


async def test_waiting_replicas_ask_themselves_when_the_holder_fails(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    holder_backend, other_backend = FakeBackend(), FakeBackend()
    c = cert(40)
    gate = holder_backend.gate(c)
    holder_backend.answers[c.sha256] = IdentityUnavailable("down", code="timeout")
    holder = await make_cache(redis_server.url, holder_backend)
    other = await make_cache(redis_server.url, other_backend)
    first = asyncio.ensure_future(holder.lookup(c, CTX))
    await holder_backend.started[c.sha256].wait()
    second = asyncio.ensure_future(other.lookup(c, CTX))
    await eventually(lambda: shared_of(other).stats.misses == 1)
    gate.set()
    with pytest.raises(IdentityUnavailable):
        await first
    assert (await second).kind == "allow"  # told at once, asked its own backend
    assert other_backend.calls[c.sha256] == 1
    assert shared_of(other).stats.lock_waits["released"] == 1


async def test_waiting_is_bounded_by_the_backend_timeout(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    """A holder that never answers (its pod died holding the lock): the others wait at most
    the backend's timeout, then ask their own backend rather than fail."""
    stuck, other_backend = FakeBackend(), FakeBackend()
    c = cert(41)
    stuck.gate(c)  # never opened
    holder = await make_cache(redis_server.url, stuck, owner_wait=0.5)
    other = await make_cache(redis_server.url, other_backend, owner_wait=0.5)
    held = asyncio.ensure_future(holder.lookup(c, CTX))
    await stuck.started[c.sha256].wait()
    started = time.monotonic()
    assert (await other.lookup(c, CTX)).kind == "allow"
    assert 0.4 < time.monotonic() - started < 5
    assert shared_of(other).stats.lock_waits["timeout"] == 1
    held.cancel()


# ---- purges -----------------------------------------------------------------------------------


async def test_a_purge_of_one_certificate_reaches_the_other_caches(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    a = await make_cache(redis_server.url, backend)
    b = await make_cache(redis_server.url, backend)
    c, other = cert(50), cert(51)
    for k in (a, b):
        await k.lookup(c, CTX)
        await k.lookup(other, CTX)
    assert backend.calls[c.sha256] == 1
    removed, told = await a.purge_everywhere(sha256=c.sha256.upper())
    assert (removed, told) == (1, True)
    await eventually(lambda: b.peek(c) is None, within=1.0)  # within one second
    assert b.peek(other) is not None  # the others stay
    assert not redis_server.client().exists(shared_of(a).keys(c.sha256)[0])
    await b.lookup(c, CTX)
    assert backend.calls[c.sha256] == 2
    assert shared_of(b).stats.purges["received"] == 1


@pytest.mark.parametrize("scope", ["all", "serial"])
async def test_a_purge_of_all_or_by_serial_empties_the_shared_level(
    redis_server: RedisServer, make_cache: Factory, scope: str
) -> None:
    backend = FakeBackend()
    a = await make_cache(redis_server.url, backend)
    b = await make_cache(redis_server.url, backend)
    same_serial = [cert(60, serial=7), cert(61, serial=7)]
    kept = cert(62)
    for k in (a, b):
        for c in (*same_serial, kept):
            await k.lookup(c, CTX)
    removed, told = await a.purge_everywhere(serial=7 if scope == "serial" else None)
    assert told and removed == (2 if scope == "serial" else 3)
    await eventually(lambda: all(b.peek(c) is None for c in same_serial), within=1.0)
    assert (b.peek(kept) is None) == (scope == "all")
    assert int(redis_server.client().get("sidecar:epoch") or 0) == 1
    assert shared_of(b).epoch() == 1
    # the shared level starts over: a third replica finds nothing there
    c = cert(62)
    third = await make_cache(redis_server.url, backend)
    calls = backend.calls[c.sha256]
    await third.lookup(c, CTX)
    assert backend.calls[c.sha256] == calls + 1


async def test_an_answer_fetched_across_a_purge_is_stored_nowhere(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    c = cert(70)
    gate = backend.gate(c)
    a = await make_cache(redis_server.url, backend)
    b = await make_cache(redis_server.url, FakeBackend())
    pending = asyncio.ensure_future(a.lookup(c, CTX))
    await backend.started[c.sha256].wait()
    assert (await b.purge_everywhere(sha256=c.sha256))[1] is True
    await eventually(lambda: shared_of(a).stats.purges["received"] == 1)
    gate.set()
    assert (await pending).kind == "allow"  # answered ...
    assert a.peek(c) is None  # ... but not kept here
    assert not redis_server.client().exists(shared_of(a).keys(c.sha256)[0])  # nor in Redis


# ---- Redis failing ----------------------------------------------------------------------------


async def test_redis_down_at_start_then_up(tmp_path: Path, make_cache: Factory) -> None:
    server = RedisServer(tmp_path / "later", port=free_port())
    backend = FakeBackend()
    with capture_logs() as logs:
        cache = await make_cache(server.url, backend)
    assert not shared_of(cache).up()
    assert [e["event"] for e in logs].count("shared_cache_unavailable") == 1
    early = cert(80)
    assert (await cache.lookup(early, CTX)).kind == "allow"  # served without Redis
    assert shared_of(cache).stats.skipped == 1
    try:
        server.start()
        await eventually(lambda: shared_of(cache).up())
        # it could not know what was purged meanwhile: its own cache was emptied
        assert cache.peek(early) is None
        assert shared_of(cache).stats.resyncs == 1
        assert shared_of(cache).stats.fallback_seconds > 0
    finally:
        server.stop()


async def test_redis_killed_then_restarted(redis_server: RedisServer, make_cache: Factory) -> None:
    backend = FakeBackend()
    a = await make_cache(redis_server.url, backend)
    b = await make_cache(redis_server.url, backend)
    with capture_logs() as logs:
        redis_server.kill()
        for n in range(5):
            c = cert(90 + n)
            assert (await a.lookup(c, CTX)).kind == "allow"
            assert (await b.lookup(c, CTX)).kind == "allow"
        await eventually(lambda: not shared_of(a).up() and not shared_of(b).up())
        down = [e for e in logs if e["event"] == "shared_cache_unavailable"]
        assert len(down) == 2  # once per cache, not once per lookup or reconnect attempt
        redis_server.start()
        await eventually(lambda: shared_of(a).up() and shared_of(b).up())
    assert [e["event"] for e in logs].count("shared_cache_connected") == 2
    # shared caching resumes
    c = cert(99)
    calls = backend.calls[c.sha256]
    await a.lookup(c, CTX)
    await b.lookup(c, CTX)
    assert backend.calls[c.sha256] == calls + 1


async def test_a_hung_redis_falls_back_within_the_timeout(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    cache = await make_cache(redis_server.url, backend, timeout="100ms")
    redis_server.freeze()  # connections stay open, nothing answers
    try:
        took = []
        for n in range(4):
            started = time.monotonic()
            assert (await cache.lookup(cert(100 + n), CTX)).kind == "allow"
            took.append(time.monotonic() - started)
        stats = shared_of(cache).stats
        assert stats.errors["timeout"] == 3  # then Redis counts as down: no more waiting
        assert not shared_of(cache).up() and stats.skipped >= 1
        # Generous bounds (a loaded machine stretches the loop): never the backend's 2 s wait
        assert max(took[:3]) < 1.5, took
        assert took[3] < 0.5, took
    finally:
        redis_server.thaw()
    await eventually(lambda: shared_of(cache).up())


async def test_redis_answering_errors_never_fails_a_lookup(
    redis_server: RedisServer, make_cache: Factory
) -> None:
    backend = FakeBackend()
    cache = await make_cache(redis_server.url, backend)
    # a server that refuses every write (out of memory; a read-only replica is alike)
    r = redis_server.client()
    r.set("filler", "x" * 1000)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    with capture_logs() as logs:
        assert (await cache.lookup(cert(110), CTX)).kind == "allow"
    assert backend.calls[cert(110).sha256] == 1
    assert not shared_of(cache).up()
    [down] = [e for e in logs if e["event"] == "shared_cache_unavailable"]
    assert "maxmemory" in down["reason"]


# ---- credentials and TLS ---------------------------------------------------------------------


async def test_a_password_from_a_file(tmp_path: Path, make_cache: Factory) -> None:
    (tmp_path / "pw").write_text("s3cret-pass\n")
    (tmp_path / "wrong").write_text("nope\n")
    auth = ("--requirepass", "s3cret-pass")
    with running_redis(tmp_path / "redis", extra=auth, password="s3cret-pass") as server:
        with capture_logs() as logs:
            good = await make_cache(server.url, password_file=str(tmp_path / "pw"))
            bad = await make_cache(server.url, password_file=str(tmp_path / "wrong"))
        assert shared_of(good).up() and not shared_of(bad).up()
        assert "s3cret" not in repr(logs) and "nope" not in repr(logs)
        assert (await bad.lookup(cert(120), CTX)).kind == "allow"  # without Redis


async def test_an_acl_user_limited_to_the_prefix_is_enough(
    redis_server: RedisServer, make_cache: Factory, tmp_path: Path
) -> None:
    """What the README recommends: a user that can touch only the prefix's keys and
    channel, with the commands the cache uses."""
    redis_server.client().acl_setuser(
        "sidecar",
        enabled=True,
        passwords=["+fleet-pass"],
        keys=["shop:*"],
        channels=["shop:*"],
        commands=["+@read", "+@write", "+@scripting", "+@pubsub", "+ping", "+client|setname"],
    )
    (tmp_path / "pw").write_text("fleet-pass\n")
    backend = FakeBackend()
    options = {"username": "sidecar", "password_file": str(tmp_path / "pw"), "key_prefix": "shop:"}
    a = await make_cache(redis_server.url, backend, **options)
    b = await make_cache(redis_server.url, backend, **options)
    assert shared_of(a).up() and shared_of(b).up()
    c = cert(125)
    await a.lookup(c, CTX)
    await b.lookup(c, CTX)
    assert backend.calls[c.sha256] == 1
    assert (await a.purge_everywhere(sha256=c.sha256))[1] is True
    await eventually(lambda: b.peek(c) is None, within=1.0)
    assert (await a.purge_everywhere())[1] is True
    # and nothing outside the prefix is allowed to it
    outside = await make_cache(redis_server.url, backend, **{**options, "key_prefix": "other:"})
    assert not shared_of(outside).up()


async def test_rediss_verifies_the_server_and_presents_a_client_certificate(
    tmp_path: Path, make_cache: Factory
) -> None:
    from .pki import PKI, make_leaf

    pki = PKI.create()
    pki.server.write(tmp_path, "server")
    wrong_name = make_leaf(pki.server_ca, "other", server=True, san_dns=["other.example"])
    wrong_name.write(tmp_path, "other")
    (tmp_path / "server-ca.pem").write_bytes(pki.server_ca.pem)
    (tmp_path / "client-ca.pem").write_bytes(pki.client_root.pem + pki.client_intermediate.pem)
    client = pki.client("sidecar")
    client.write(tmp_path, "client", chain=[pki.client_intermediate])
    unknown_ca = PKI.create()
    (tmp_path / "unknown-ca.pem").write_bytes(unknown_ca.server_ca.pem)

    def tls_server(name: str, cert: str) -> Any:
        from .redisd import running_redis

        port = free_port()
        return running_redis(
            tmp_path / name,
            port=free_port(),
            extra=(
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(tmp_path / f"{cert}.pem"),
                "--tls-key-file",
                str(tmp_path / f"{cert}.key"),
                "--tls-ca-cert-file",
                str(tmp_path / "client-ca.pem"),
                "--tls-auth-clients",
                "yes",
            ),
        ), port

    context, port = tls_server("tls", "server")
    with context:
        url = f"rediss://localhost:{port}"
        files = {"certificate": str(tmp_path / "client.pem"), "key": str(tmp_path / "client.key")}
        good = await make_cache(url, ca=str(tmp_path / "server-ca.pem"), **files)
        no_client_cert = await make_cache(url, ca=str(tmp_path / "server-ca.pem"))
        other_ca = await make_cache(url, ca=str(tmp_path / "unknown-ca.pem"), **files)
        system_store = await make_cache(url, **files)
        assert shared_of(good).up()
        assert not shared_of(no_client_cert).up()
        assert not shared_of(other_ca).up()
        assert not shared_of(system_store).up()
        c = cert(130)
        await good.lookup(c, CTX)
        assert not (await no_client_cert.lookup(c, CTX)).stale
    context, port = tls_server("tls-other-name", "other")
    with context:
        named_otherwise = await make_cache(
            f"rediss://localhost:{port}", ca=str(tmp_path / "server-ca.pem"), **files
        )
        assert not shared_of(named_otherwise).up()  # the host name is checked


# ---- metrics ---------------------------------------------------------------------------------


async def test_metrics(redis_server: RedisServer, make_cache: Factory) -> None:
    from prometheus_client import generate_latest

    backend = FakeBackend()
    a = await make_cache(redis_server.url, backend)
    b = await make_cache(redis_server.url, backend)
    metrics = Metrics()
    metrics.bind_shared_cache(lambda: shared_of(b).stats)
    c = cert(140)
    await a.lookup(c, CTX)
    await b.lookup(c, CTX)
    text = generate_latest(metrics.registry).decode()
    assert "sidecar_cache_shared_hits_total 1.0" in text
    assert "sidecar_cache_shared_up 1.0" in text
    assert 'sidecar_cache_shared_errors_total{kind="timeout"} 0.0' in text
    assert 'sidecar_cache_shared_lock_waits_total{result="value"} 0.0' in text
    assert "sidecar_cache_shared_fallback_seconds_total" in text
    # without a shared cache, none of these
    plain = Metrics()
    assert "sidecar_cache_shared" not in generate_latest(plain.registry).decode()


async def test_a_process_that_never_closes_the_cache_still_exits(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """asyncio.run cancels what is left at its end: the cache's reconnecting task must end
    even when the client takes that cancellation for its own read timeout (seen: a process
    whose lookups failed hung at exit in asyncio.run's _cancel_all_tasks)."""
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "import asyncio, sys\n"
        "from sidecar.config import SharedCacheConfig\n"
        "from sidecar.identity.shared.store import SharedCache\n"
        "async def main():\n"
        f"    cache = SharedCache(SharedCacheConfig(url={redis_server.url!r}), namespace='a.b', owner_wait=1)\n"
        "    await cache.start()\n"
        "    assert cache.up()\n"
        "    await asyncio.sleep(float(sys.argv[1]))\n"
        "asyncio.run(main())\n"
    )
    waits = ["0", "0.3", "0.999", "1.0", "1.5"]  # around the subscriber's 1 s reads
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            wait,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for wait in waits
    ]
    try:
        results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()[-1000:]


# ---- inside the sidecar -------------------------------------------------------------------


async def test_a_reload_keeps_or_replaces_the_shared_cache_and_its_counters(
    redis_server: RedisServer, start_sidecar: Any, config_dir: Any, upstream: Any
) -> None:
    """A reload that leaves identity.cache.shared alone keeps the running cache (and its
    connections); one that changes it brings a new one, and the old one is closed after
    the grace period; the metrics' counters carry over."""
    from .test_operations import admin, metric, request

    data = config_dir.base(upstream.port)
    data["identity"]["cache"] = {"shared": {"url": redis_server.url}}
    running = await start_sidecar(data)
    sidecar = running.sidecar
    first = sidecar.handler.plan.identity
    assert isinstance(first, VerdictCache) and shared_of(first).up()
    assert await request(running, "/app/", running.certs.bob) == 200
    data["routes"].append({"path": "/more/"})
    config_dir.write(data)
    assert await sidecar.reload("test")
    assert sidecar.handler.plan.identity is first  # kept: identity did not change
    await admin(running, "GET", "/metrics")  # a scrape (Prometheus' every 30 s) before it
    data["identity"]["cache"]["shared"]["key_prefix"] = "other:"
    config_dir.write(data)
    assert await sidecar.reload("test")
    second = sidecar.handler.plan.identity
    assert second is not first and shared_of(second).up()
    assert await request(running, "/app/", running.certs.bob) == 200  # a miss: new prefix
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_cache_shared_misses_total") == 2  # one per cache, carried
    assert metric(text, "sidecar_cache_shared_up") == 1
    assert any(k.startswith("other:") for k in redis_server.key_names())
    # the old one closes once the grace period (2 s here) is over
    await eventually(lambda: not shared_of(first).up(), within=10)
