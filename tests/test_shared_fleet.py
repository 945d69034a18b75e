"""Several real sidecar processes sharing one Redis: the shared hit, one identity call per
certificate across the fleet, purges that reach every replica, and Redis killed, restarted,
hung, or out of one replica's reach, while requests keep their verdicts.

The identity backend is a counting verdict service (the ``http`` backend); each replica is a
``sidecar run`` process. Nothing here is mocked but that service and the upstream application.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .conftest import ConfigDir, Upstream, decode_userinfo
from .fleet import (
    CutProxy,
    Replica,
    Verdicts,
    eventually,
    fleet,
    get,
    make_clients,
    replica_config,
    verdicts,
)
from .redisd import RedisServer, redis_server
from .test_shared_cache import commands_run

__all__ = ["fleet", "redis_server", "verdicts"]  # fixtures

Fleet = Callable[..., Awaitable[Replica]]
REPO = Path(__file__).resolve().parent.parent


async def start_fleet(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_url: str | list[str],
    count: int,
    **options: Any,
) -> list[Replica]:
    urls = redis_url if isinstance(redis_url, list) else [redis_url] * count
    replicas = []
    for i in range(count):
        data = replica_config(
            config_dir, upstream_port=upstream.port, verdicts=verdicts, redis_url=urls[i], **options
        )
        replicas.append(await fleet(f"replica-{i}", data))
    return replicas


async def test_a_verdict_one_replica_got_is_a_hit_for_the_others(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    a, b = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 2)
    [client] = make_clients(config_dir, 1)
    assert await get(a.port, client) == 200
    assert await get(b.port, client) == 200
    assert verdicts.calls == {client.sha256: 1}
    assert await b.metric("sidecar_cache_shared_hits_total") == 1
    # from now on both answer from their own cache: Redis is not asked again
    before = commands_run(redis_server)
    for replica in (a, b):
        for _ in range(10):
            assert await get(replica.port, client) == 200
    assert commands_run(redis_server) == before
    # both forwarded the same identity
    infos = [decode_userinfo(s.header("X-USERINFO")[0]) for s in upstream.seen]
    assert (
        infos[0]
        == infos[1]
        == {
            "sub": f"u-{client.sha256[:12]}",
            "username": f"user-{client.sha256[:8]}",
            "roles": ["member"],
        }
    )


async def test_the_fleet_asks_once_per_certificate(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """Five worker processes (three replicas, one of them with two workers) receive the
    same new certificates at the same moment: one identity call per certificate."""
    replicas = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 2)
    replicas.append(
        await fleet(
            "replica-2w",
            replica_config(
                config_dir,
                upstream_port=upstream.port,
                verdicts=verdicts,
                redis_url=redis_server.url,
                workers=2,
            ),
        )
    )
    clients = make_clients(config_dir, 120)
    ports = [r.port for r in replicas] + [replicas[-1].port]  # the two-worker replica twice
    statuses = await asyncio.gather(*(get(port, c) for c in clients for port in ports))
    assert Counter(statuses) == {200: len(clients) * len(ports)}
    assert verdicts.calls == {c.sha256: 1 for c in clients}
    waits = sum([await r.metric("sidecar_cache_shared_lock_waits_total") for r in replicas])
    hits = sum([await r.metric("sidecar_cache_shared_hits_total") for r in replicas])
    assert waits + hits >= len(clients)  # the others waited for the first, or found its verdict


async def test_a_purge_reaches_every_replica(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """A certificate revoked at the identity service, purged at one replica's admin
    listener: every replica refuses it within a second (it was cached for 5 minutes)."""
    replicas = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 2)
    replicas.append(
        await fleet(
            "replica-2w",
            replica_config(
                config_dir,
                upstream_port=upstream.port,
                verdicts=verdicts,
                redis_url=redis_server.url,
                workers=2,
            ),
        )
    )
    revoked, kept = make_clients(config_dir, 2)
    for replica in replicas:
        for _ in range(3):  # both workers of the last one, most likely
            assert await get(replica.port, revoked) == 200
            assert await get(replica.port, kept) == 200
    verdicts.deny.add(revoked.sha256)
    assert await get(replicas[0].port, revoked) == 200  # still cached: that is what purge is for
    status, body = await replicas[0].admin("POST", f"/cache/purge?sha256={revoked.sha256}")
    assert status == 200, body
    assert json.loads(body) == {"purged": 1, "scope": "sha256", "fleet": True}
    purged_at = time.monotonic()

    async def refused_everywhere() -> bool:
        answers = [await get(r.port, revoked) for r in replicas for _ in range(3)]
        return set(answers) == {403}

    await eventually(refused_everywhere, within=5)
    assert time.monotonic() - purged_at < 2.5
    assert {await get(r.port, kept) for r in replicas} == {200}  # the others stay cached
    assert verdicts.calls[kept.sha256] == 1
    # through a supervisor too: all, reaching both its workers and the other replicas
    status, body = await replicas[2].admin("POST", "/cache/purge")
    assert status == 200 and json.loads(body)["fleet"] is True, body
    verdicts.deny.add(kept.sha256)
    await eventually(
        lambda: _all_equal([get(r.port, kept) for r in replicas for _ in range(3)], 403), within=5
    )


async def _all_equal(calls: list[Awaitable[int]], status: int) -> bool:
    return set(await asyncio.gather(*calls)) == {status}


async def test_redis_killed_mid_traffic_then_restarted(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """Requests keep their verdicts whatever Redis does: allowed certificates are forwarded
    (from the local cache or the backend), refused ones never are, nothing gets a 503."""
    a, b = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 2)
    clients = make_clients(config_dir, 40)
    refused = clients[::4]
    verdicts.deny.update(c.sha256 for c in refused)
    statuses: dict[str, Counter[int]] = {"allowed": Counter(), "refused": Counter()}
    stop = asyncio.Event()

    async def traffic(offset: int) -> None:
        n = offset
        while not stop.is_set():
            client = clients[n % len(clients)]
            replica = (a, b)[n % 2]
            kind = "refused" if client in refused else "allowed"
            statuses[kind][await get(replica.port, client)] += 1
            n += 7

    runners = [asyncio.ensure_future(traffic(i)) for i in range(6)]
    await asyncio.sleep(1.0)
    redis_server.kill()
    await asyncio.sleep(2.0)
    for replica in (a, b):
        assert (await replica.admin("GET", "/readyz"))[0] == 200  # still ready
    redis_server.start()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*runners)
    assert set(statuses["allowed"]) == {200}, statuses
    assert set(statuses["refused"]) == {403}, statuses
    assert sum(statuses["allowed"].values()) > 40
    # nothing refused reached the application
    forwarded = {decode_userinfo(s.header("X-USERINFO")[0])["sub"] for s in upstream.seen}
    assert not forwarded & {f"u-{c.sha256[:12]}" for c in refused}
    # both said so once, and came back
    for replica in (a, b):
        events = [e["event"] for e in replica.events()]
        assert events.count("shared_cache_unavailable") == 1, events
    await eventually(lambda: _shared_up(a, b))
    # shared caching resumed
    [fresh] = make_clients(config_dir, 1, prefix="after")
    assert await get(a.port, fresh) == 200 and await get(b.port, fresh) == 200
    assert verdicts.calls[fresh.sha256] == 1
    assert await a.metric("sidecar_cache_shared_fallback_seconds_total") > 0


async def _shared_up(*replicas: Replica) -> bool:
    return all([await r.metric("sidecar_cache_shared_up") == 1 for r in replicas])


async def test_a_hung_redis_costs_at_most_the_timeout(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    [a] = await start_fleet(
        fleet, config_dir, upstream, verdicts, redis_server.url, 1, timeout="100ms"
    )
    clients = make_clients(config_dir, 5)
    redis_server.freeze()
    try:
        for client in clients:
            started = time.monotonic()
            assert await get(a.port, client) == 200
            # the backend's 20 ms, the 100 ms timeout, a TLS handshake: generous for a busy
            # machine, and far below the 3 s that waiting for Redis' own timeouts would take
            assert time.monotonic() - started < 1.5
        assert await a.metric("sidecar_cache_shared_errors_total", kind="timeout") >= 1
        assert await a.metric("sidecar_cache_shared_up") == 0
    finally:
        redis_server.thaw()
    await eventually(lambda: _shared_up(a))


async def test_a_replica_cut_off_during_a_purge_empties_its_cache_when_it_reconnects(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    proxy = CutProxy(redis_server.port)
    await proxy.restore()
    a, b = await start_fleet(
        fleet, config_dir, upstream, verdicts, [redis_server.url, proxy.url], 2
    )
    [client] = make_clients(config_dir, 1)
    assert await get(a.port, client) == 200 and await get(b.port, client) == 200
    await proxy.cut()
    await eventually(lambda: _shared_down(b))
    verdicts.deny.add(client.sha256)
    _, body = await a.admin("POST", f"/cache/purge?sha256={client.sha256}")
    assert json.loads(body)["fleet"] is True
    assert await get(a.port, client) == 403
    # b could not hear it: it keeps its verdict until it can
    assert await get(b.port, client) == 200
    await proxy.restore()
    await eventually(lambda: _shared_up(b))
    assert await get(b.port, client) == 403  # it emptied its cache on reconnecting
    assert await b.metric("sidecar_cache_shared_resyncs_total") == 2
    await proxy.cut()


async def _shared_down(*replicas: Replica) -> bool:
    return all([await r.metric("sidecar_cache_shared_up") == 0 for r in replicas])


async def test_a_purge_without_redis_says_the_fleet_was_not_told(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    [a] = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 1)
    redis_server.kill()
    await eventually(lambda: _shared_down(a))
    status, body = await a.admin("POST", "/cache/purge")
    assert status == 207
    doc = json.loads(body)
    assert doc["fleet"] is False and "not told" in doc["error"] and doc["scope"] == "all"


#: the issue's target is 20 processes and 1,000 certificates (SIDECAR_TEST_FLEET=full, about
#: 15 s on an otherwise idle 2-CPU machine); by default a fleet half that size, which a
#: machine running other suites meanwhile also carries
FLEET = (20, 1000) if os.environ.get("SIDECAR_TEST_FLEET") == "full" else (10, 500)


async def test_many_processes_and_certificates_make_one_call_per_certificate(
    verdicts: Verdicts, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The issue's target: 20 processes receiving the same 1,000 new certificates at once
    make exactly 1,000 identity calls (``FLEET``). Each process builds its cache as
    ``sidecar run`` does (tests/shared_fleet_worker.py) and looks them all up at the same
    moment; TLS is left out (20,000 handshakes would take this 2-CPU machine minutes)."""
    processes, count = FLEET
    start_at = time.time() + 10  # every process connected and waiting by then
    outputs = [tmp_path / f"worker-{i}.json" for i in range(processes)]
    procs = []
    for out in outputs:
        with out.open("wb") as stdout, out.with_suffix(".log").open("wb") as stderr:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.shared_fleet_worker",
                    "--redis",
                    redis_server.url,
                    "--verdicts",
                    verdicts.url,
                    "--count",
                    str(count),
                    "--start-at",
                    str(start_at),
                    # Twenty processes and Redis on this 2-CPU machine: Redis gets little CPU
                    # while the burst is created, and with the default 50 ms it would count
                    # as slow (each worker then asks alone: correct, but not the target).
                    "--timeout",
                    "2s",
                    stdout=stdout,
                    stderr=stderr,
                    cwd=str(REPO),
                )
            )
    try:
        codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 240)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    logs = "".join(o.with_suffix(".log").read_text()[-1500:] for o in outputs)
    assert codes == [0] * processes, logs
    results = [json.loads(o.read_text().strip().splitlines()[-1]) for o in outputs]
    assert all(r["allowed"] == count and r["up"] for r in results), results
    assert len(verdicts.calls) == count
    assert sum(verdicts.calls.values()) == count, Counter(verdicts.calls.values())
    assert sum(r["skipped"] for r in results) == 0  # nobody went around Redis
