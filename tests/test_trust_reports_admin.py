"""``POST /identityplus/{bind,unbind,trust,intrusion}`` on the admin listener (issue #18 §2):
the same reporter as the application's headers, over a real admin socket, to the fake
Identity Plus; and who may call it (local only by default).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar.admin_reports import peer_allowed

from .conftest import ConfigDir, SidecarFactory
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .pki import Issued
from .reporting import FAST, App, Env, Start, app, events, serial, start, until

__all__ = ["app", "fake_identityplus", "start"]  # fixtures, imported to be used here


async def post(
    env: Env,
    kind: str,
    body: Any,
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A report to the admin listener, as a batch job sends it (from ``source``, if given)."""
    port = env.running.sidecar.admin_port
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            f"http://{host}:{port}/identityplus/{kind}",
            data=json.dumps(body) if not isinstance(body, bytes) else body,
            headers={"Content-Type": content_type},
        ) as resp,
    ):
        return resp.status, await resp.json(), dict(resp.headers)


def sha256_of(who: Issued) -> str:
    return hashlib.sha256(who.der).hexdigest()


# ---- each report, by serial or by fingerprint --------------------------------------------------


async def test_a_bind_by_serial_is_sent_and_the_cached_verdict_dropped(start: Start) -> None:
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")
    await env.get("/app/", ada)  # cached

    with capture_logs() as logs:
        status, doc, _ = await post(
            env, "bind", {"serial": f"0x{serial(ada):X}", "local_user_name": "ada.local"}
        )

    assert status == 200, doc
    assert doc["outcome"] == "succeeded" and doc["code"] == "OK 0100" and doc["attempts"] == 1
    [call] = env.fake.reports
    assert call.body == {
        "Local-User-Information": {
            "serial-number": str(serial(ada)),
            "local-user-name": "ada.local",
        }
    }
    [event] = events(logs, type="bind")
    assert event["source"] == "admin" and event["outcome"] == "succeeded"
    await env.get("/app/", ada)
    assert env.app.last_user()["username"] == "ada.local"


async def test_a_certificate_named_by_fingerprint_must_have_been_seen(start: Start) -> None:
    env = await start(reports=FAST)
    ada, stranger = env.client("Ada Lovelace"), env.client("Never Came")
    env.fake.set_profile(serial(ada), "OK 0001")
    await env.get("/app/", ada)

    status, doc, _ = await post(
        env, "intrusion", {"sha256": sha256_of(stranger), "severity": "fraud"}
    )
    assert status == 404 and "give its serial" in doc["error"]

    status, doc, _ = await post(
        env,
        "intrusion",
        {
            "sha256": sha256_of(ada).upper(),
            "severity": "Material Damage",
            "message": "broke the export",
            "ip_address": "203.0.113.7",
            "url": "/app/export",
        },
    )
    assert status == 200 and doc["outcome"] == "succeeded" and doc["reference"] == "intrusion-1"
    [call] = env.fake.reports
    assert call.body == {
        "Intrusion-Report": {
            "intruding-certificate-uid": str(serial(ada)),
            "severity": "material damage",
            "message": "broke the export",
            "intruder-ip-address": "203.0.113.7",
            "intruded-url": "/app/export",
        }
    }
    assert (await env.get("/app/", ada)).status == 403  # its verdict was dropped: PB 0005


async def test_trust_and_unbind_from_the_admin_listener(start: Start) -> None:
    env = await start(reports=FAST)
    bob = env.client("Bob Builder")
    env.fake.bound[serial(bob)] = "bob.local"

    status, doc, _ = await post(
        env, "trust", {"serial": str(serial(bob)), "trust_type": "true identity", "tokens": 100}
    )
    assert status == 200 and doc["outcome"] == "succeeded"
    status, doc, _ = await post(
        env, "unbind", {"serial": str(serial(bob)), "local_user_name": "bob.local"}
    )
    assert status == 200 and doc["outcome"] == "succeeded"
    status, doc, _ = await post(
        env, "unbind", {"serial": str(serial(bob)), "local_user_name": "bob.local"}
    )
    assert status == 200 and doc["outcome"] == "duplicate"  # done already: not sent again
    status, doc, _ = await post(
        env, "unbind", {"serial": str(serial(bob)), "local_user_name": "never.bound"}
    )
    assert status == 200 and doc["outcome"] == "already" and doc["code"] == "ER 0005"

    assert [c.operation for c in env.fake.reports] == [
        "Trust",
        "Local-User-Reference",
        "Local-User-Reference",
    ]
    assert env.fake.reports[0].body["Trust"] == {
        "serial-number": str(serial(bob)),
        "trust-type": "true identity",
        "tokens-of-trust": 100,
    }


BAD_BODIES = [
    ("bind", {"local_user_name": "x"}, "name the certificate"),
    ("bind", {"serial": "12", "local_user_name": ""}, "empty"),
    ("bind", {"serial": "12"}, "local_user_name is required"),
    ("bind", {"serial": "12", "local_user_name": "a,b"}, "','"),
    ("bind", {"serial": "twelve", "local_user_name": "a"}, "not a certificate serial"),
    ("bind", {"serial": "12", "local_user_name": "a", "role": "x"}, "unknown key 'role'"),
    ("trust", {"serial": "12", "trust_type": "lots"}, "unknown trust type"),
    ("trust", {"serial": "12", "trust_type": "mfa", "tokens": 0}, "from 1 to 2500"),
    ("trust", {"serial": "12", "trust_type": "mfa", "tokens": True}, "from 1 to 2500"),
    ("intrusion", {"serial": "12", "severity": "nuclear"}, "unknown severity"),
    ("intrusion", {"serial": "12", "severity": "fraud", "ip_address": "x"}, "not an IP"),
    ("intrusion", {"serial": "12", "severity": "fraud", "url": "/a b"}, "visible ASCII"),
    ("intrusion", {"sha256": "abc", "severity": "fraud"}, "not a SHA-256"),
]


@pytest.mark.parametrize(("kind", "body", "reason"), BAD_BODIES)
async def test_bad_bodies_are_refused_and_nothing_is_sent(
    start: Start, kind: str, body: dict[str, Any], reason: str
) -> None:
    env = await start(reports=FAST)
    status, doc, _ = await post(env, kind, body)
    assert status == 400 and reason in doc["error"], doc
    assert env.fake.reports == []


async def test_what_is_not_a_report_is_refused(start: Start) -> None:
    env = await start(reports=FAST)
    assert (await post(env, "bind", b"[1]"))[0] == 400
    assert (await post(env, "bind", b"{not json"))[0] == 400
    status, doc, _ = await post(env, "vouch", {"serial": "12"})
    assert status == 404 and "no such report" in doc["error"]
    # a form post is what a web page could send: the admin listener's own rule refuses it
    status, doc, _ = await post(env, "bind", b"serial=12", content_type="text/plain")
    assert status == 403 and "X-Sidecar-Admin" in doc["error"]
    assert env.fake.reports == []


async def test_reports_off_or_another_backend_answer_404(
    start: Start, start_sidecar: SidecarFactory, config_dir: ConfigDir, app: App
) -> None:
    env = await start()  # identityplus, reports off
    status, doc, _ = await post(env, "trust", {"serial": "12", "trust_type": "mfa"})
    assert status == 404 and "identity.identityplus.reports" in doc["error"]
    assert env.fake.reports == []


async def test_a_report_over_the_rate_limit_gets_429_with_retry_after(start: Start) -> None:
    env = await start(reports={**FAST, "per_certificate": 1})
    first = await post(env, "trust", {"serial": "12", "trust_type": "mfa"})
    assert first[0] == 200
    status, doc, headers = await post(env, "trust", {"serial": "12", "trust_type": "social"})
    assert status == 429 and doc["outcome"] == "limited"
    assert int(headers["Retry-After"]) >= 1
    assert len(env.fake.reports) == 1


async def test_a_report_still_retrying_answers_202_and_goes_on(start: Start) -> None:
    env = await start(reports={**FAST, "admin_wait": "100ms", "retries": 5})
    env.fake.script_reports("Trust", "ER 1106", "ER 1106")
    env.fake.report_latency = 0.2

    status, doc, _ = await post(env, "trust", {"serial": "12", "trust_type": "mfa"})

    assert status == 202 and doc["outcome"] == "pending" and doc["report_id"] == 1
    await env.settled()
    assert len(env.fake.reports) == 3


async def test_a_report_identity_plus_refuses_answers_502(start: Start) -> None:
    env = await start(reports={**FAST, "retries": 0})
    env.fake.script_reports("Trust", "ER 0009")
    status, doc, _ = await post(env, "trust", {"serial": "12", "trust_type": "mfa"})
    assert status == 502 and doc["outcome"] == "failed" and doc["code"] == "ER 0009"


# ---- local only by default ------------------------------------------------------------------------


def test_loopback_peers_are_allowed_and_others_only_when_listed() -> None:
    listed = (ipaddress.ip_network("192.0.2.0/24"),)
    assert peer_allowed("127.0.0.1", ())
    assert peer_allowed("127.8.9.10", ())
    assert peer_allowed("::1", ())
    assert peer_allowed("::ffff:127.0.0.1", ())  # IPv4 loopback on a dual-stack socket
    assert not peer_allowed("192.0.2.5", ())
    assert peer_allowed("192.0.2.5", listed)
    assert not peer_allowed("198.51.100.1", listed)
    assert peer_allowed("fe80::1%eth0", (ipaddress.ip_network("fe80::/10"),))
    for junk in (None, "", "localhost", "127.0.0.1:80", "unix:/tmp/x", "::ffff:10.0.0.1"):
        assert not peer_allowed(junk, ())


@given(st.ip_addresses())
def test_an_address_is_allowed_exactly_when_loopback_or_listed(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    listed = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    effective = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        effective = address.ipv4_mapped
    expected = effective.is_loopback or any(effective in net for net in listed)
    assert peer_allowed(str(address), listed) is expected
    assert peer_allowed(str(address), ()) is effective.is_loopback


def non_loopback_address() -> str:
    """An address of this machine that is not loopback (the one its default route uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or ipaddress.ip_address(address).is_loopback:
        pytest.fail(
            "this test needs an IPv4 address of this machine that is not loopback "
            "(an interface with a route), to call the admin listener from it",
            pytrace=False,
        )
    return address


async def test_a_peer_that_is_not_local_is_refused_when_the_listener_is_bound_wider(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    app: App,
) -> None:
    address = non_loopback_address()
    data = config_dir.base(app.port)
    data["admin"] = {"host": "0.0.0.0", "port": 0}
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "reports": FAST,
        },
    }
    env = Env(fake_identityplus, await start_sidecar(data), app)
    body = {"serial": "12", "trust_type": "mfa"}

    with capture_logs() as logs:
        status, doc, _ = await post(env, "trust", body, host=address, source=address)
    assert status == 403 and "admin.reports_from" in doc["error"]
    assert any(e["event"] == "admin_request_refused" for e in logs)
    # the same listener still answers everything else to that peer, and reports to loopback
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0))) as s,
        s.get(f"http://{address}:{env.running.sidecar.admin_port}/readyz") as resp,
    ):
        assert resp.status == 200
    assert (await post(env, "trust", body))[0] == 200
    assert len(fake_identityplus.reports) == 1


async def test_a_listed_network_may_send_reports(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    app: App,
) -> None:
    address = non_loopback_address()
    data = config_dir.base(app.port)
    data["admin"] = {"host": "0.0.0.0", "port": 0, "reports_from": [f"{address}/32"]}
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "reports": FAST,
        },
    }
    env = Env(fake_identityplus, await start_sidecar(data), app)
    status, doc, _ = await post(
        env, "trust", {"serial": "12", "trust_type": "mfa"}, host=address, source=address
    )
    assert status == 200, doc
    await until(lambda: len(fake_identityplus.reports) == 1)


async def test_admin_reports_share_the_reporters_limits_with_the_application(
    start: Start,
) -> None:
    env = await start(reports={**FAST, "per_certificate": 1})
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    await env.get("/app/", ada, {"X-Identity-Trust": "mfa"})
    await env.settled()
    status, doc, _ = await post(env, "trust", {"serial": str(serial(ada)), "trust_type": "social"})
    assert status == 429 and doc["outcome"] == "limited"
    assert len(env.fake.reports) == 1
