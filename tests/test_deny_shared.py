"""Run-time deny entries and a replica cut off from Redis (``identity.shared.store``), for any
sequence of changes made while it is cut off: what it denied then reaches the fleet's set and
every other replica when it reconnects; what it took off then is not taken off the fleet's
set (another replica may have denied it again) and is denied here again. Fails closed.

Two ``SharedCache`` levels in one process stand for two replicas (one reaches Redis through a
proxy that can cut it off), each with a deny-list of its own (``Sink``); one real Redis.
``test_deny_fleet.py`` checks the same with real ``sidecar run`` processes over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.config import SharedCacheConfig
from sidecar.identity.shared.store import SharedCache

from .fleet import CutProxy
from .redisd import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture

#: the certificates the changes are about
SHAS = [f"{n:x}" * 64 for n in range(1, 5)]


class Sink:
    """A replica's run-time deny-list (``revocation.gate.Revocation``'s part of it)."""

    def __init__(self) -> None:
        self.runtime: set[str] = set()

    def deny(self, sha256: str, *, announce: bool = True) -> bool:
        if sha256 in self.runtime:
            return False
        self.runtime.add(sha256)
        return True

    def allow(self, sha256: str) -> str:
        if sha256 in self.runtime:
            self.runtime.discard(sha256)
            return "removed"
        return "absent"


async def until(check: Callable[[], bool | Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        got = check()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("not within the time allowed")
        await asyncio.sleep(0.02)


def level(url: str, sink: Sink) -> SharedCache:
    config = SharedCacheConfig.model_validate({"url": url, "timeout": "200ms"})
    shared = SharedCache(config, namespace="fake.0123456789abcdef", owner_wait=1.0)
    shared.attach_deny(sink)
    return shared


@dataclass
class Pair:
    """Two replicas' levels, ``a`` reaching Redis through ``proxy``, and their deny-lists."""

    a: SharedCache
    b: SharedCache
    here: Sink
    there: Sink
    proxy: CutProxy

    async def fleet_set(self) -> set[str]:
        members = await self.b._client.smembers("sidecar:deny")
        return {m.decode() if isinstance(m, bytes) else m for m in members}


@contextlib.asynccontextmanager
async def pair(redis_url: str, redis_port: int) -> AsyncIterator[Pair]:
    """Both levels started and up; closed, and the proxy cut, at the end."""
    proxy = CutProxy(redis_port)
    await proxy.restore()
    here, there = Sink(), Sink()
    a, b = level(proxy.url, here), level(redis_url, there)
    try:
        await a.start()
        await b.start()
        await until(lambda: a.up() and b.up())
        yield Pair(a, b, here, there, proxy)
    finally:
        await a.close()
        await b.close()
        await proxy.cut()


async def scenario(
    redis_url: str,
    redis_port: int,
    before: set[str],
    changes: list[tuple[str, bool]],
    elsewhere: list[tuple[str, bool]],
) -> None:
    async with pair(redis_url, redis_port) as p:
        a, b, here, there, proxy = p.a, p.b, p.here, p.there, p.proxy
        for sha256 in sorted(before):  # the fleet's entries, made on the other replica
            there.deny(sha256)
            assert await b.publish_deny(sha256, add=True)
        await until(lambda: here.runtime == before)
        await proxy.cut()
        await until(lambda: not a.up())
        unsent: set[str] = set()  # denied here meanwhile, not taken off again
        for sha256, add in changes:  # what an operator does here meanwhile (207 each)
            if add:
                here.deny(sha256)
                unsent.add(sha256)
            elif here.allow(sha256) != "removed":
                continue
            else:
                unsent.discard(sha256)
            assert not await a.publish_deny(sha256, add=add)
        for sha256, add in elsewhere:  # ... and another operator on the other replica
            if add:
                there.deny(sha256)
            elif there.allow(sha256) != "removed":
                continue
            assert await b.publish_deny(sha256, add=add)
        fleet_now = set(there.runtime)
        await proxy.restore()
        await until(lambda: a.up())
        # Nothing denied here meanwhile is lost, whatever the other replica took off; the
        # fleet's entries win over removals made here meanwhile (fails closed).
        expected = fleet_now | unsent
        await until(lambda: there.runtime == expected and here.runtime == expected)
        assert await p.fleet_set() == expected  # the set itself


@settings(
    max_examples=16,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.sets(st.sampled_from(SHAS), max_size=2),
    changes=st.lists(st.tuples(st.sampled_from(SHAS), st.booleans()), max_size=6),
    elsewhere=st.lists(st.tuples(st.sampled_from(SHAS), st.booleans()), max_size=4),
)
@example(before={SHAS[0]}, changes=[(SHAS[0], True)], elsewhere=[(SHAS[0], False)])
def test_what_a_cut_off_replica_denied_reaches_the_fleet_and_nothing_is_undone(
    redis_server: RedisServer,
    before: set[str],
    changes: list[tuple[str, bool]],
    elsewhere: list[tuple[str, bool]],
) -> None:
    redis_server.client().delete("sidecar:deny")
    asyncio.run(scenario(redis_server.url, redis_server.port, before, changes, elsewhere))


async def one_call_fails(
    redis_url: str, redis_port: int, set_garbage: Callable[[], object]
) -> None:
    async with pair(redis_url, redis_port) as p:
        set_garbage()  # the deny key is not a set: SADD fails, Redis stays up
        p.here.deny(SHAS[0])
        assert not await p.a.publish_deny(SHAS[0], add=True)
        assert p.a.up()
        await p.b._client.delete("sidecar:deny")  # the operator mends it
        # retried while up: it reaches the set and the other replica without a reconnection
        await until(lambda: p.there.runtime == {SHAS[0]})
        assert await p.fleet_set() == {SHAS[0]}


def test_a_denial_redis_failed_to_take_while_up_is_retried(redis_server: RedisServer) -> None:
    """One call failing (here: the deny key is not a set) is not a reconnection: the denial
    is retried with backoff while Redis is up, and reaches the fleet once it can."""
    client = redis_server.client()
    asyncio.run(
        one_call_fails(
            redis_server.url, redis_server.port, lambda: client.set("sidecar:deny", "garbage")
        )
    )
