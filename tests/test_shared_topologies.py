"""The shared cache on a Redis Cluster and behind Redis Sentinel, both real (three cluster
masters made with redis-cli; a master watched by one sentinel): the shared hit, one backend
call per certificate, purges reaching the other caches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.identity.cache import VerdictCache

from .redisd import RedisServer, SentinelSetup, running_cluster, running_sentinel
from .test_cache import CTX, FakeBackend, cert
from .test_shared_cache import Factory, eventually, make_cache, shared_of

__all__ = ["make_cache"]  # the fixture


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    with running_cluster(tmp_path / "cluster") as nodes:
        yield nodes


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    with running_sentinel(tmp_path / "sentinel") as setup:
        yield setup


async def share_and_purge(a: VerdictCache, b: VerdictCache, backend: FakeBackend) -> None:
    certs = [cert(500 + n) for n in range(40)]
    await asyncio.gather(*(k.lookup(c, CTX) for c in certs for k in (a, b)))
    assert backend.calls == {c.sha256: 1 for c in certs}
    removed, told = await a.purge_everywhere(sha256=certs[0].sha256)
    assert (removed, told) == (1, True)
    await eventually(lambda: b.peek(certs[0]) is None, within=1.0)
    assert b.peek(certs[1]) is not None
    removed, told = await b.purge_everywhere()
    assert told
    await eventually(lambda: all(a.peek(c) is None for c in certs), within=1.0)
    await a.lookup(certs[1], CTX)
    assert backend.calls[certs[1].sha256] == 2  # the shared level started over too


async def test_a_redis_cluster(cluster: list[RedisServer], make_cache: Factory) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster[0].port},127.0.0.1:{cluster[1].port}"
    backend = FakeBackend()
    a = await make_cache(url, backend)
    b = await make_cache(url, backend)
    assert shared_of(a).up() and shared_of(b).up()
    await share_and_purge(a, b, backend)
    # the verdicts are spread over the masters, each certificate's keys in one slot
    for n in range(30):
        await a.lookup(cert(600 + n), CTX)
    holding = [node for node in cluster if node.key_names("*:v:*")]
    assert len(holding) >= 2


async def test_redis_sentinel(sentinel: SentinelSetup, make_cache: Factory) -> None:
    backend = FakeBackend()
    a = await make_cache(sentinel.url, backend)
    b = await make_cache(sentinel.url, backend)
    assert shared_of(a).up() and shared_of(b).up()
    await share_and_purge(a, b, backend)
    assert sentinel.master.key_names("sidecar:*")  # on the master the sentinel named
