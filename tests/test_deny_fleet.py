"""Run-time deny entries reach every replica sharing a verdict cache (issue #17 item 3 with
#14): ``POST /deny`` on one replica and every other refuses the certificate within a second;
``DELETE /deny`` and they allow it again. The entries are kept in Redis (a set under the key
prefix), so a replica that starts, or reconnects, later has them.

Real ``sidecar run`` processes, one real Redis, requests over real TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.revocation.admin import RUNTIME_DENY_FILE, Runtime, read_runtime, write_runtime
from sidecar.workers import _sent_to

from .conftest import ConfigDir, Upstream
from .fleet import (
    Client,
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
from .test_shared_fleet import _shared_down, _shared_up, start_fleet

__all__ = ["fleet", "redis_server", "verdicts"]  # fixtures

Fleet = Callable[..., Awaitable[Replica]]


async def _status_everywhere(replicas: list[Replica], client: Client, status: int) -> bool:
    return {await get(r.port, client) for r in replicas for _ in range(2)} == {status}


@contextlib.asynccontextmanager
async def cut_off_first(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
    **options: Any,
) -> AsyncIterator[tuple[Replica, Replica, CutProxy]]:
    """Two replicas of one Redis, the first through a proxy that can cut it off; the proxy
    is cut when the test ends, passed or failed (its relays would outlive it)."""
    proxy = CutProxy(redis_server.port)
    await proxy.restore()
    try:
        a, b = await start_fleet(
            fleet, config_dir, upstream, verdicts, [proxy.url, redis_server.url], 2, **options
        )
        yield a, b, proxy
    finally:
        await proxy.cut()


async def test_a_deny_entry_reaches_every_replica_and_one_started_later(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    a, b = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 2)
    [client] = make_clients(config_dir, 1)
    assert await get(a.port, client) == 200 and await get(b.port, client) == 200
    status, body = await a.admin("POST", f"/deny?sha256={client.sha256}")
    assert status == 200, body
    assert json.loads(body) == {"denied": client.sha256, "new": True, "fleet": True}
    denied_at = time.monotonic()
    await eventually(lambda: _status_everywhere([a, b], client, 403), within=5)
    assert time.monotonic() - denied_at < 2.5
    # b refuses it as revoked, and lists it
    _, listing = await b.admin("GET", "/deny")
    assert json.loads(listing)["runtime"] == [client.sha256]
    # kept in Redis, under the prefix: fingerprints only
    assert redis_server.client().smembers("sidecar:deny") == {client.sha256.encode()}
    # a replica started after the deny has it from its first request
    [c] = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 1)
    assert await get(c.port, client) == 403
    # no echo: b and c did not send it back (a's answer said "new" once, Redis holds one)
    assert not [e for e in b.events() + c.events() if e.get("event") == "deny_not_shared"]
    # DELETE on a: every replica allows it again
    status, body = await a.admin("DELETE", f"/deny?sha256={client.sha256}")
    assert status == 200, body
    assert json.loads(body)["fleet"] is True
    await eventually(lambda: _status_everywhere([a, b, c], client, 200), within=5)
    assert redis_server.client().smembers("sidecar:deny") == set()


async def test_a_replica_cut_off_from_redis_catches_up_when_it_reconnects(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    async with cut_off_first(fleet, config_dir, upstream, verdicts, redis_server) as (
        b,
        a,
        proxy,
    ):
        first, second = make_clients(config_dir, 2)
        for client in (first, second):
            assert await get(a.port, client) == 200 and await get(b.port, client) == 200
        assert (await a.admin("POST", f"/deny?sha256={first.sha256}"))[0] == 200
        await eventually(lambda: _status_everywhere([b], first, 403), within=5)
        await proxy.cut()
        await eventually(lambda: _shared_down(b))
        # meanwhile: first allowed again, second denied
        assert (await a.admin("DELETE", f"/deny?sha256={first.sha256}"))[0] == 200
        assert (await a.admin("POST", f"/deny?sha256={second.sha256}"))[0] == 200
        # b could not hear it: it keeps refusing what it was told to (fails closed)
        assert await get(b.port, first) == 403
        await proxy.restore()
        await eventually(lambda: _shared_up(b))
        await eventually(lambda: _status_everywhere([b], second, 403), within=5)
        await eventually(lambda: _status_everywhere([b], first, 200), within=5)


async def test_without_redis_a_deny_entry_holds_here_and_says_so(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    [a] = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 1)
    [client] = make_clients(config_dir, 1)
    assert await get(a.port, client) == 200
    redis_server.kill()
    await eventually(lambda: _shared_down(a))
    status, body = await a.admin("POST", f"/deny?sha256={client.sha256}")
    assert status == 207, body
    doc = json.loads(body)
    assert doc["denied"] == client.sha256 and doc["fleet"] is False
    assert "local only" in doc["error"] and "when Redis answers" in doc["error"]
    assert await get(a.port, client) == 403
    assert len([e for e in a.events() if e.get("event") == "deny_not_shared"]) == 1


async def test_a_deny_entry_made_while_cut_off_reaches_the_fleet_when_redis_answers(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """Nothing is lost: an operator denies a certificate on a replica that has lost Redis
    (207, local only). Once that replica reconnects it adds the entry to the fleet's set
    itself and announces it, so the other replica refuses the certificate too. One denied
    and taken off again while cut off is not sent (the replica no longer denies it)."""
    async with cut_off_first(fleet, config_dir, upstream, verdicts, redis_server) as (
        a,
        b,
        proxy,
    ):
        denied, undone = make_clients(config_dir, 2)
        for client in (denied, undone):
            assert await get(a.port, client) == 200 and await get(b.port, client) == 200
        await proxy.cut()
        await eventually(lambda: _shared_down(a))
        status, body = await a.admin("POST", f"/deny?sha256={denied.sha256}")
        assert status == 207 and json.loads(body)["fleet"] is False, body
        assert "when Redis answers" in json.loads(body)["error"]
        assert (await a.admin("POST", f"/deny?sha256={undone.sha256}"))[0] == 207
        assert (await a.admin("DELETE", f"/deny?sha256={undone.sha256}"))[0] == 207
        assert await get(a.port, denied) == 403 and await get(b.port, denied) == 200
        await proxy.restore()
        await eventually(lambda: _shared_up(a))
        await eventually(lambda: _status_everywhere([a, b], denied, 403), within=5)
        assert await _status_everywhere([a, b], undone, 200)
        assert redis_server.members("sidecar:deny") == {denied.sha256}
        late = [e for e in a.events() if e.get("event") == "deny_shared_late"]
        assert [e["cert_sha256"] for e in late] == [denied.sha256]


async def test_a_removal_made_while_cut_off_gives_way_to_the_fleets_entry(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """Fails closed: an entry the fleet holds, taken off on a replica cut off from Redis,
    is not taken off the fleet later (someone may have denied it again meanwhile); the
    replica refuses the certificate again when it reconnects, and says so."""
    async with cut_off_first(fleet, config_dir, upstream, verdicts, redis_server) as (
        a,
        b,
        proxy,
    ):
        [client] = make_clients(config_dir, 1)
        assert (await a.admin("POST", f"/deny?sha256={client.sha256}"))[0] == 200
        await eventually(lambda: _status_everywhere([a, b], client, 403), within=5)
        await proxy.cut()
        await eventually(lambda: _shared_down(a))
        status, body = await a.admin("DELETE", f"/deny?sha256={client.sha256}")
        assert status == 207 and "keep it" in json.loads(body)["error"], body
        assert await get(a.port, client) == 200 and await get(b.port, client) == 403
        await proxy.restore()
        await eventually(lambda: _shared_up(a))
        await eventually(lambda: _status_everywhere([a, b], client, 403), within=5)
        given_way = [e for e in a.events() if e.get("event") == "deny_removal_not_shared"]
        assert [e["cert_sha256"] for e in given_way] == [client.sha256]


async def test_a_malformed_deny_message_is_counted_and_ignored(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    [a] = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 1)
    [client] = make_clients(config_dir, 1)
    assert await get(a.port, client) == 200
    redis = redis_server.client()
    bad = [
        {"v": 1, "op": "deny", "from": "0123456789abcdef", "sha256": "zz"},
        {"v": 1, "op": "deny", "from": "0123456789abcdef"},
        {"v": 1, "op": "deny", "from": "0123456789abcdef", "sha256": client.sha256, "x": 1},
        {"v": 2, "op": "allow", "from": "0123456789abcdef", "sha256": client.sha256},
    ]
    for doc in bad:
        redis.publish("sidecar:events", json.dumps(doc))
    await eventually(
        lambda: _metric_at_least(a, "sidecar_cache_shared_errors_total", len(bad)), within=5
    )
    assert await get(a.port, client) == 200
    # a well-formed one from another replica is obeyed
    good = {"v": 1, "op": "deny", "from": "0123456789abcdef", "sha256": client.sha256}
    redis.publish("sidecar:events", json.dumps(good))
    await eventually(lambda: _status_everywhere([a], client, 403), within=5)


async def _metric_at_least(replica: Replica, name: str, value: float) -> bool:
    return await replica.metric(name, kind="invalid_message") >= value


# ---- a supervisor's list, and the workers it restarts ------------------------------------------


def _workers_of(replica: Replica) -> set[int]:
    """The pids of a supervisor's worker processes (its children, from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == replica.proc.pid:
                    found.add(int(entry.name))
    return found


async def _restart_workers(replica: Replica, count: int) -> None:
    """SIGKILL ``count`` of a supervisor's workers; back once it has restarted them and they
    are ready (and have had the time to be sent what a restarted worker is sent)."""
    before = _workers_of(replica)
    assert len(before) >= count, before
    for pid in sorted(before)[:count]:
        os.kill(pid, signal.SIGKILL)

    async def restarted() -> bool:
        now = _workers_of(replica)
        if len(now) != len(before) or len(now - before) != count:
            return False
        return (await replica.admin("GET", "/readyz"))[0] == 200

    await eventually(restarted, within=30)
    await asyncio.sleep(1.0)


async def _up_in_every_worker(replica: Replica, workers: int) -> bool:
    return await replica.metric("sidecar_cache_shared_up") == workers


async def _holds(replicas: list[Replica], client: Client, status: int) -> None:
    """Every worker of ``replicas`` answers ``status``, and still does a second later."""
    for _ in range(3):
        assert await _status_everywhere(replicas, client, status)
        await asyncio.sleep(0.3)


async def test_a_restarted_worker_does_not_bring_back_an_entry_the_fleet_took_off(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """A denies a certificate through its supervisor (two workers); B takes it off. A worker
    of A that dies and is restarted starts from its supervisor's list, which still names
    the certificate: the certificate stays allowed everywhere (not sent to the fleet again,
    and not refused by the new worker once it has the fleet's set)."""
    a, b = await start_fleet(fleet, config_dir, upstream, verdicts, redis_server.url, 2, workers=2)
    [client] = make_clients(config_dir, 1)
    assert (await a.admin("POST", f"/deny?sha256={client.sha256}"))[0] == 200
    await eventually(lambda: _status_everywhere([a, b], client, 403), within=5)
    assert (await b.admin("DELETE", f"/deny?sha256={client.sha256}"))[0] == 200
    await eventually(lambda: _status_everywhere([a, b], client, 200), within=5)
    await _restart_workers(a, 1)
    await eventually(lambda: _up_in_every_worker(a, 2))
    assert redis_server.members("sidecar:deny") == set()
    await _holds([a, b], client, 200)
    assert redis_server.members("sidecar:deny") == set()


async def test_a_denial_not_sent_yet_survives_the_restart_of_every_worker(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """A, cut off from Redis, denies a certificate (207: sent when Redis answers). Both its
    workers die before Redis answers; the new ones refuse the certificate at once, and send
    the entry when Redis answers: B refuses it too."""
    async with cut_off_first(fleet, config_dir, upstream, verdicts, redis_server, workers=2) as (
        a,
        b,
        proxy,
    ):
        [client] = make_clients(config_dir, 1)
        await proxy.cut()
        await eventually(lambda: _shared_down(a))
        status, body = await a.admin("POST", f"/deny?sha256={client.sha256}")
        assert status == 207 and json.loads(body)["fleet"] is False, body
        await _restart_workers(a, 2)
        assert await _status_everywhere([a], client, 403)
        assert await get(b.port, client) == 200
        await proxy.restore()
        await eventually(lambda: _status_everywhere([a, b], client, 403), within=10)
        assert redis_server.members("sidecar:deny") == {client.sha256}


async def test_a_denial_sent_late_is_the_fleets_for_a_restarted_worker(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """A, cut off, denies a certificate; once Redis answers a worker of A sends it to the
    fleet and tells the supervisor. B takes it off; then a worker of A is restarted: the
    entry is not sent again (it went to the fleet, and the fleet took it off)."""
    async with cut_off_first(fleet, config_dir, upstream, verdicts, redis_server, workers=2) as (
        a,
        b,
        proxy,
    ):
        [client] = make_clients(config_dir, 1)
        await proxy.cut()
        await eventually(lambda: _shared_down(a))
        assert (await a.admin("POST", f"/deny?sha256={client.sha256}"))[0] == 207
        await proxy.restore()
        await eventually(lambda: _status_everywhere([a, b], client, 403), within=10)

        async def both_sent() -> bool:  # each worker of A sends its own (see the note)
            return len([e for e in a.events() if e.get("event") == "deny_shared_late"]) == 2

        await eventually(both_sent, within=15)
        assert (await b.admin("DELETE", f"/deny?sha256={client.sha256}"))[0] == 200
        await eventually(lambda: _status_everywhere([a, b], client, 200), within=5)
        await _restart_workers(a, 1)
        await eventually(lambda: _up_in_every_worker(a, 2))
        await _holds([a, b], client, 200)
        assert redis_server.members("sidecar:deny") == set()


async def test_a_removal_made_while_cut_off_is_not_undone_by_a_restarted_worker(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """A, cut off, denies a certificate and takes it off again (207 both times, the second
    from a supervisor whose workers answer 207). Redis answers; later a worker of A is
    restarted: it does not find the entry in its supervisor's list, and sends nothing."""
    async with cut_off_first(fleet, config_dir, upstream, verdicts, redis_server, workers=2) as (
        a,
        b,
        proxy,
    ):
        [client] = make_clients(config_dir, 1)
        await proxy.cut()
        await eventually(lambda: _shared_down(a))
        assert (await a.admin("POST", f"/deny?sha256={client.sha256}"))[0] == 207
        assert (await a.admin("DELETE", f"/deny?sha256={client.sha256}"))[0] == 207
        await proxy.restore()
        await eventually(lambda: _up_in_every_worker(a, 2))
        assert await _status_everywhere([a, b], client, 200)
        await _restart_workers(a, 1)
        await eventually(lambda: _up_in_every_worker(a, 2))
        await _holds([a, b], client, 200)
        assert redis_server.members("sidecar:deny") == set()


async def test_a_denial_sent_before_a_reload_moved_the_fleet_is_kept_by_a_restarted_worker(
    fleet: Fleet,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: Verdicts,
    redis_server: RedisServer,
) -> None:
    """A denies a certificate, sent to the fleet under one key prefix; a reload moves A to
    another prefix (another fleet), whose set does not hold it; then a worker of A is
    restarted. Every worker of A keeps refusing the certificate: the restarted one counts
    the entry as not sent to its fleet, and sends it there."""
    data = replica_config(
        config_dir,
        upstream_port=upstream.port,
        verdicts=verdicts,
        redis_url=redis_server.url,
        workers=2,
    )
    a = await fleet("moved", data)
    [client] = make_clients(config_dir, 1)
    assert (await a.admin("POST", f"/deny?sha256={client.sha256}"))[0] == 200
    await eventually(lambda: _status_everywhere([a], client, 403), within=5)
    reloads = await a.metric("sidecar_config_reloads_total", result="success")
    data["identity"]["cache"]["shared"]["key_prefix"] = "moved:"
    config_dir.write(data, "moved.yaml")
    a.proc.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return await a.metric("sidecar_config_reloads_total", result="success") >= reloads + 2

    await eventually(reloaded, within=20)
    await _restart_workers(a, 1)
    await eventually(lambda: _up_in_every_worker(a, 2))

    async def in_the_new_set() -> bool:
        return redis_server.members("moved:deny") == {client.sha256}

    await eventually(in_the_new_set, within=10)
    await _holds([a], client, 403)


# ---- the supervisor's file ---------------------------------------------------------------------

SHA_A, SHA_B = "a" * 64, "b" * 64
FLEET = "0123456789abcdef"


def test_the_supervisors_list_says_which_entries_went_to_which_fleet(tmp_path: Path) -> None:
    write_runtime(tmp_path, {SHA_A, SHA_B}, {SHA_B: FLEET, "c" * 64: FLEET})  # c: not denied
    assert read_runtime(tmp_path) == Runtime([SHA_A, SHA_B], {SHA_B: FLEET})
    (tmp_path / RUNTIME_DENY_FILE).write_text(json.dumps([SHA_A.upper()]))  # an earlier version's
    assert read_runtime(tmp_path) == Runtime([SHA_A], {})
    for wrong in (
        '{"denied": "x", "sent": {}}',
        '{"denied": []}',
        '"x"',
        '{"denied": ["zz"], "sent": {}}',
        '{"denied": [], "sent": []}',
        json.dumps({"denied": [], "sent": {SHA_A: 1}}),
    ):
        (tmp_path / RUNTIME_DENY_FILE).write_text(wrong)
        with pytest.raises(ValueError, match=str(tmp_path / RUNTIME_DENY_FILE) + "|fingerprint"):
            read_runtime(tmp_path)
    assert read_runtime(tmp_path / "none") == Runtime([], {})


def _answer(status: int, doc: str, fleet: str | None = FLEET) -> tuple[int, str, dict[str, str]]:
    return status, doc, ({"x-sidecar-fleet": fleet} if fleet is not None else {})


@pytest.mark.parametrize(
    ("answers", "fleet"),
    [
        ([_answer(200, '{"fleet": true}'), _answer(207, '{"fleet": false}', None)], FLEET),
        ([_answer(207, '{"fleet": false}', None)] * 2, None),
        ([_answer(207, '{"fleet": false}', None), None], None),
        ([None, None], None),  # no worker answered: the entry waits in the list
        ([_answer(200, '{"new": true}', None)], None),  # no shared cache: nothing sent
        ([_answer(200, '{"fleet": true}', None)], None),  # no fleet named: not counted
        ([_answer(200, '{"fleet": true}', "../x")], None),
        ([_answer(200, "not json")], None),
    ],
)
def test_a_relayed_denial_counts_as_sent_to_the_fleet_a_worker_names(
    answers: list[tuple[int, str, dict[str, str]] | None], fleet: str | None
) -> None:
    assert _sent_to(answers) == fleet


@pytest.mark.parametrize(
    ("told", "status", "fleet", "header"),
    [
        (FLEET, 200, True, FLEET),  # the fleet the change went through, named
        (False, 207, False, None),
        (None, 200, None, None),  # no shared cache
    ],
)
async def test_a_denials_answer_names_the_fleet_the_change_went_through(
    told: str | bool | None, status: int, fleet: bool | None, header: str | None
) -> None:
    """The name comes from the call that sent the entry, not from whatever cache is current
    when the answer is made (a reload may have replaced it meanwhile)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.revocation.admin import FLEET_HEADER, deny_routes

    from .revocation_parts import no_revocation

    async def fleet_call(sha256: str, add: bool) -> str | bool | None:
        return told

    app = web.Application()
    deny_routes(app, no_revocation(), fleet_call)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post(f"/deny?sha256={SHA_A}")
        doc = await resp.json()
        assert (resp.status, doc.get("fleet"), resp.headers.get(FLEET_HEADER)) == (
            status,
            fleet,
            header,
        )
        resp = await client.delete(f"/deny?sha256={SHA_A}")
        assert (await resp.json()).get("fleet") == fleet and FLEET_HEADER not in resp.headers


async def test_a_workers_late_send_message_is_read_strictly(config_dir: ConfigDir) -> None:
    """The supervisor's socket for workers (``/workers/deny-sent``): a message that is not
    a fingerprint and a fleet's name is refused with 400 naming the problem, and changes
    nothing; one about an entry not on the list is taken and ignored; a good one is written
    down."""
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar import config as config_module
    from sidecar.workers import Supervisor

    data = config_dir.base()
    data["listen"]["workers"] = 2
    path = config_dir.write(data)
    supervisor = Supervisor(config_module.load(path), path, log_format=None)
    supervisor.denied = {SHA_A}
    async with TestClient(TestServer(supervisor.control_app())) as client:
        for body in (
            b"not json",
            b"[]",
            json.dumps({"sha256": SHA_A}).encode(),
            json.dumps({"sha256": "zz", "fleet": FLEET}).encode(),
            json.dumps({"sha256": SHA_A, "fleet": FLEET + "\n"}).encode(),
            json.dumps({"sha256": SHA_A, "fleet": 7}).encode(),
        ):
            resp = await client.post("/workers/deny-sent", data=body)
            assert resp.status == 400, body
            assert "not a sent entry" in (await resp.json())["error"]
        assert supervisor.sent == {}
        resp = await client.post("/workers/deny-sent", json={"sha256": SHA_B, "fleet": FLEET})
        assert resp.status == 200 and supervisor.sent == {}  # not on the list
        resp = await client.post("/workers/deny-sent", json={"sha256": SHA_A, "fleet": FLEET})
        assert resp.status == 200 and supervisor.sent == {SHA_A: FLEET}
    assert read_runtime(supervisor.runtime) == Runtime([SHA_A], {SHA_A: FLEET})


async def test_a_removal_is_answered_by_the_worker_that_had_the_entry(
    config_dir: ConfigDir,
) -> None:
    """A deny entry from the fleet reaches a replica's workers one by one (each hears the
    channel itself). ``DELETE /deny`` on the replica before the second worker heard of it:
    the first worker takes it off (200) and the second says it has no such entry (404). The
    entry was on the list and is off it now, so the replica answers 200 and the worker's
    answer, not the 404 of whichever worker was asked first (the CI run of stop 32 saw that
    404 in ``test_a_restarted_worker_does_not_bring_back_an_entry_the_fleet_took_off``)."""
    from aiohttp import ClientSession, web

    from sidecar import config as config_module
    from sidecar.revocation.admin import deny_routes
    from sidecar.workers import Supervisor

    from .revocation_parts import no_revocation

    data = config_dir.base()
    data["listen"]["workers"] = 2
    path = config_dir.write(data)
    supervisor = Supervisor(config_module.load(path), path, log_format=None)
    told: list[tuple[str, bool]] = []

    async def fleet_call(sha256: str, add: bool) -> str | bool | None:
        told.append((sha256, add))
        return FLEET

    revocations = [no_revocation(), no_revocation()]
    revocations[1].deny(SHA_A, announce=False)  # heard from the fleet; worker 0 not yet
    runners: list[web.AppRunner] = []
    try:
        # worker 0, which has not heard of it, is asked first
        for worker, revocation in zip(supervisor.workers, revocations, strict=True):
            app = web.Application()
            deny_routes(app, revocation, fleet_call)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.UnixSite(runner, str(worker.socket)).start()
            runners.append(runner)
        admin = web.AppRunner(supervisor.admin_app())
        await admin.setup()
        runners.append(admin)
        site = web.TCPSite(admin, "127.0.0.1", 0)
        await site.start()
        port = admin.addresses[0][1]
        async with ClientSession() as session:
            url = f"http://127.0.0.1:{port}/deny?sha256={SHA_A}"
            async with session.delete(url, headers={"X-Sidecar-Admin": "1"}) as resp:
                doc = await resp.json()
                assert (resp.status, doc.get("removed"), doc.get("fleet")) == (200, SHA_A, True)
            assert told == [(SHA_A, False)]
            assert [r.denied()["runtime"] for r in revocations] == [[], []]
            # taken off everywhere now: a second removal finds nothing anywhere
            async with session.delete(url, headers={"X-Sidecar-Admin": "1"}) as resp:
                assert resp.status == 404, await resp.text()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
