"""Trust reports with a verdict cache shared through Redis (#18 with #17).

A bind, an unbind or an intrusion report changes what Identity Plus says of the certificate:
its verdict must go from every replica, and from Redis, not only from the cache of the
process that sent the report. Two sidecars share one real Redis here, in front of the same
application and the same fake Identity Plus; the report goes through one of them, and the
next request through either must see the new profile.
"""

from __future__ import annotations

from .fake_identityplus import fake_identityplus
from .redisd import RedisServer, redis_server
from .reporting import FAST, Env, Start, app, serial, start, until

__all__ = ["app", "fake_identityplus", "redis_server", "start"]  # fixtures


async def _replicas(start: Start, redis_server: RedisServer) -> tuple[Env, Env]:
    # a generous Redis timeout: the machine may be loaded, and a call that times out would
    # send the lookup around Redis (a different path from the one under test)
    shared = {"shared": {"url": redis_server.url, "timeout": "1s"}}
    one = await start(reports=FAST, cache=shared)
    two = await start(reports=FAST, cache=shared)
    return one, two


async def _shared_hit(env: Env) -> None:
    await until(lambda: env.metric("sidecar_cache_shared_hits_total") >= 1)


async def test_a_bind_drops_the_verdict_in_every_replica_and_in_redis(
    start: Start, redis_server: RedisServer
) -> None:
    one, two = await _replicas(start, redis_server)
    ada = one.client("Ada Lovelace")
    one.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")
    assert (await one.get("/app/first", ada)).status == 200
    assert (await two.get("/app/first", ada)).status == 200
    await _shared_hit(two)  # the second replica has it from Redis, not from Identity Plus
    assert one.fake.calls[serial(ada)] == 1
    assert one.app.last_user()["username"] == "ref-ada"

    reply = await one.get("/app/page", ada, {"X-Identity-Bind": "ada.local"})
    assert reply.status == 200 and "X-Identity-Bind" not in reply.headers
    await one.settled()
    assert [c.operation for c in one.fake.reports] == ["Local-User-Information"]

    # the other replica was told: its next request carries the bound user
    assert (await two.get("/app/next", ada)).status == 200
    assert two.app.last_user()["username"] == "ada.local"
    # and Redis no longer holds the old verdict: the replica that sent the report asks again
    assert (await one.get("/app/next", ada)).status == 200
    assert one.app.last_user()["username"] == "ada.local"


async def test_an_intrusion_report_refuses_the_next_request_on_every_replica(
    start: Start, redis_server: RedisServer
) -> None:
    one, two = await _replicas(start, redis_server)
    eve = one.client("Eve Intruder")
    one.fake.set_profile(serial(eve), "OK 0001", organizational_reference="ref-eve")
    assert (await one.get("/app/", eve)).status == 200
    assert (await two.get("/app/", eve)).status == 200
    await _shared_hit(two)

    reply = await one.get("/app/admin", eve, {"X-Identity-Intrusion": "fraud"})
    assert reply.status == 200 and "X-Identity-Intrusion" not in reply.headers
    await one.settled()
    assert [c.operation for c in one.fake.reports] == ["Intrusion-Report"]

    # Identity Plus now says PB 0005 for it, on every replica
    assert (await two.get("/app/", eve)).status == 403
    assert (await one.get("/app/", eve)).status == 403
