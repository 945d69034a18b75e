"""The identity backend's word on revocation reaches the whole fleet (issue #14): an Identity
Plus ``PB 0004`` (revoked) or ``PB 0005`` (intruder) that one replica hears drops the
certificate's cached verdict on every replica sharing its verdict cache (``identity.cache.
shared``, a real Redis), at once, not when their cached verdicts expire.

Two real sidecars, one fake Identity Plus API, one Redis; requests over real TLS.
"""

from __future__ import annotations

import pytest

from .fake_identityplus import fake_identityplus
from .redisd import RedisServer, redis_server
from .test_identity_e2e import StartIdentityPlus, serial_of, sha256_of, start_ip
from .test_listener import eventually

__all__ = ["fake_identityplus", "redis_server", "start_ip"]  # fixtures


@pytest.mark.parametrize("code", ["PB 0004", "PB 0005"])
async def test_an_identity_plus_revocation_drops_the_verdict_on_every_replica(
    start_ip: StartIdentityPlus, redis_server: RedisServer, code: str
) -> None:
    cache = {"ttl": "5m", "shared": {"url": redis_server.url, "key_prefix": "fleet-test:"}}
    a = await start_ip(cache=cache)
    b = await start_ip(cache=cache)
    who = a.client("Reported")
    a.fake.set_profile(serial_of(who), "OK 0001", service_roles=["member"])
    # replica b asks and caches the allow (here and in Redis)
    assert (await b.get("/app", who)).status == 200
    assert a.fake.calls[serial_of(who)] == 1
    # The API now says revoked. Replica a has not seen the certificate: Redis's copy is
    # gone too (as after its ttl there, or a Redis restart), so a asks the API.
    a.fake.set_simple(serial_of(who), code)
    redis = redis_server.client()
    for key in redis_server.key_names():
        if sha256_of(who) in key:
            redis.delete(key)
    assert (await a.get("/app", who)).status == 403
    assert a.fake.calls[serial_of(who)] == 2
    # b held an allow for five minutes: it is dropped at once, and b refuses too
    b_cache = b.running.sidecar._cache()
    assert b_cache is not None
    b_cert = b.running.sidecar.peer_certs._parsed[who.der]
    await eventually(lambda: b_cache.peek(b_cert) is None, "b's cached verdict to be dropped")
    assert (await b.get("/app", who)).status == 403
