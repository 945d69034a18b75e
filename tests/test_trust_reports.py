"""Trust reports through the whole sidecar (issue #18 §1): a real upstream sets report headers
on its responses, a real TLS client with a real certificate makes the requests, and the fake
Identity Plus records what it was asked.

Every report type goes end to end, and so do the rules around them: the headers never reach
the client (reports on or off, on every response path: the listener's whole and streamed
relays and aiohttp's path for requests with a body), the report concerns the requesting
certificate only, bad values are dropped, failures are retried with backoff and given up,
the same report goes out once, rates are bounded per certificate and overall, at most
``concurrency`` calls are in flight, and the verdict cache is dropped after a bind, so that
the next request carries the bound user.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from multidict import CIMultiDict
from structlog.testing import capture_logs

from sidecar.headers import REPORT_KINDS
from sidecar.identity.report_values import KINDS

from .conftest import ConfigDir, SidecarFactory
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .reporting import (
    FAST,
    REPORT_HEADERS,
    Start,
    app,
    events,
    serial,
    start,
    until,
)
from .servers import Scripted, StartScripted

__all__ = ["app", "fake_identityplus", "start"]  # fixtures, imported to be used here


def test_the_two_lists_of_report_kinds_agree() -> None:
    assert KINDS == REPORT_KINDS


ALL_FOUR = {
    "X-Identity-Bind": "ada.local",
    "X-Identity-Unbind": "ada.local",
    "X-Identity-Trust": "social",
    "X-Identity-Intrusion": 'fraud; message="stolen card"',
}
PATHS = [
    pytest.param("GET", "/app/page", None, id="listener-whole"),
    pytest.param("GET", "/stream/page", None, id="listener-streamed"),
    pytest.param("POST", "/app/form", b"a=1", id="aiohttp-with-body"),
]


@pytest.mark.parametrize(("method", "path", "data"), PATHS)
async def test_report_headers_are_removed_and_ignored_with_identityplus_when_reports_are_off(
    start: Start, method: str, path: str, data: bytes | None
) -> None:
    env = await start()  # identityplus, reports left out: off
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")

    with capture_logs() as logs:
        reply = await env.get(path, ada, ALL_FOUR, method=method, data=data)

    assert reply.status == 200
    assert [name for name in REPORT_HEADERS if name in reply.headers] == []
    assert env.fake.reports == []
    assert env.metric("sidecar_trust_reports_total", outcome="ignored") == 4
    ignored = events(logs, outcome="ignored")
    assert ignored and "off" in ignored[0]["reason"]


async def test_configured_report_header_names_are_the_ones_removed(start: Start) -> None:
    names = {
        "bind": "X-App-Bind",
        "unbind": "X-App-Unbind",
        "trust": "X-App-Trust",
        "intrusion": "X_App_Intrusion",
    }
    env = await start(reports=FAST, report_headers=names)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")

    reply = await env.get(
        "/app/", ada, {"x-app-bind": "ada.local", "X-App-Intrusion": "mistake", "X-Other": "kept"}
    )

    assert reply.status == 200
    assert "X-App-Bind" not in reply.headers and "X-App-Intrusion" not in reply.headers
    assert reply.headers["X-Other"] == "kept"
    await until(lambda: len(env.fake.reports) == 2)
    assert {c.operation for c in env.fake.reports} == {"Local-User-Information", "Intrusion-Report"}


# ---- each report type, end to end --------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "data"), PATHS)
async def test_a_bind_is_sent_for_the_requesting_certificate_and_the_next_request_carries_the_user(
    start: Start, method: str, path: str, data: bytes | None
) -> None:
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")
    assert (await env.get("/app/first", ada)).status == 200
    assert env.app.last_user()["username"] == "ref-ada"  # cached: OK 0001, not bound

    with capture_logs() as logs:
        reply = await env.get(path, ada, {"X-Identity-Bind": "ada.local"}, method=method, data=data)
        assert reply.status == 200 and "X-Identity-Bind" not in reply.headers
        await env.settled()

    [call] = env.fake.reports
    assert call.method == "PUT" and call.operation == "Local-User-Information"
    assert call.body == {
        "Local-User-Information": {
            "serial-number": str(serial(ada)),
            "local-user-name": "ada.local",
        }
    }
    assert call.agent_sha256 == env.fake.agent.sha256
    [event] = events(logs, type="bind")
    assert event["outcome"] == "succeeded" and event["code"] == "OK 0100"
    assert event["cert_sha256"] == hashlib.sha256(ada.der).hexdigest()
    assert event["local_user_name"] == "ada.local" and event["source"] == "response"
    # the verdict was dropped: the next request asks again and carries the bound user
    assert (await env.get("/app/next", ada)).status == 200
    assert env.fake.calls[serial(ada)] == 2
    assert env.app.last_user()["username"] == "ada.local"
    assert env.metric("sidecar_trust_reports_total", type="bind", outcome="succeeded") == 1


async def test_an_unbind_names_the_requesters_own_bound_user_and_the_profile_follows(
    start: Start,
) -> None:
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")
    await env.get("/app/", ada, {"X-Identity-Bind": "ada.local"})
    await env.settled()
    assert (await env.get("/app/", ada)).status == 200
    assert env.app.last_user()["username"] == "ada.local"  # OK 0002 now

    reply = await env.get("/app/logout", ada, {"X-Identity-Unbind": "ada.local"})
    assert "X-Identity-Unbind" not in reply.headers
    await env.settled()

    unbind = env.fake.reports[-1]
    assert unbind.method == "DELETE"
    assert unbind.body == {"Local-User-Reference": {"local-user-name": "ada.local"}}
    await env.get("/app/", ada)
    assert env.app.last_user()["username"] == "ref-ada"  # unbound, and the cache knew at once


async def test_an_unbind_of_another_users_name_is_dropped(start: Start) -> None:
    """Identity Plus unbinds by name alone: an application answering ada must not be able to
    unbind bob, by mistake or because ada chose what it echoes."""
    env = await start(reports=FAST)
    ada, bob = env.client("Ada Lovelace"), env.client("Bob Builder")
    env.fake.set_profile(serial(ada), "OK 0002", local_user_name="ada.local")
    env.fake.set_profile(serial(bob), "OK 0002", local_user_name="bob.local")
    env.fake.bound.update({serial(ada): "ada.local", serial(bob): "bob.local"})

    with capture_logs() as logs:
        reply = await env.get("/app/", ada, {"X-Identity-Unbind": "bob.local"})
    assert reply.status == 200 and "X-Identity-Unbind" not in reply.headers

    assert env.fake.reports == []
    [event] = events(logs, type="unbind")
    assert (
        event["outcome"] == "invalid" and "bound to the requesting certificate" in event["reason"]
    )
    assert env.fake.bound[serial(bob)] == "bob.local"


async def test_trust_is_sent_with_its_type_its_tokens_and_the_bound_user(start: Start) -> None:
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0002", local_user_name="ada.local")

    await env.get("/app/", ada, {"X-Identity-Trust": "Email_Validation; tokens=25"})
    await env.settled()

    [call] = env.fake.reports
    assert call.method == "PUT"
    assert call.body == {
        "Trust": {
            "serial-number": str(serial(ada)),
            "trust-type": "email validation",
            "tokens-of-trust": 25,
            "local-user-name": "ada.local",
        }
    }
    assert env.fake.calls[serial(ada)] == 1  # trust does not change the profile: still cached


async def test_an_intrusion_report_gets_a_reference_and_the_next_request_is_refused(
    start: Start,
) -> None:
    env = await start(reports=FAST)
    eve = env.client("Eve Intruder")
    env.fake.set_profile(serial(eve), "OK 0001", organizational_reference="ref-eve")
    assert (await env.get("/app/", eve)).status == 200

    with capture_logs() as logs:
        reply = await env.get(
            "/app/admin/export?all=1",
            eve,
            {
                "X-Identity-Intrusion": 'policy-violation; message="tried to \\"export\\" everything"'
            },
        )
        assert reply.status == 200 and "X-Identity-Intrusion" not in reply.headers
        await env.settled()

    [call] = env.fake.reports
    assert call.body == {
        "Intrusion-Report": {
            "intruding-certificate-uid": str(serial(eve)),
            "severity": "policy violation",
            "message": 'tried to "export" everything',
            "intruder-ip-address": "127.0.0.1",
            "intruded-url": "/app/admin/export",  # the path, never the query
        }
    }
    [event] = events(logs, type="intrusion")
    assert event["outcome"] == "succeeded" and event["reference"] == "intrusion-1"
    # dropped from the cache: Identity Plus now says PB 0005, and the next request gets 403
    assert (await env.get("/app/", eve)).status == 403


async def test_an_intrusion_already_reported_counts_as_done(start: Start) -> None:
    env = await start(reports=FAST)
    eve = env.client("Eve Intruder")
    env.fake.set_profile(serial(eve), "OK 0001")
    env.fake.script_reports("Intrusion-Report", "ER 0007")

    with capture_logs() as logs:
        await env.get("/app/", eve, {"X-Identity-Intrusion": "fraud"})
        await env.settled()

    [event] = events(logs, type="intrusion")
    assert event["outcome"] == "already" and event["code"] == "ER 0007"
    assert len(env.fake.reports) == 1  # not retried
    assert env.metric("sidecar_trust_reports_total", type="intrusion", outcome="already") == 1


# ---- after the response, in the background, bounded ---------------------------------------------


async def test_the_report_goes_out_after_the_response_without_delaying_it(start: Start) -> None:
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    env.fake.hold_reports = asyncio.Event()  # Identity Plus does not answer reports for now

    reply = await env.get("/stream/", ada, {"X-Identity-Trust": "mfa"})

    # the whole response arrived while the report's call is still waiting for its answer
    assert reply.body == b"part one, part two"
    await until(lambda: len(env.fake.reports) == 1)
    assert env.running.sidecar.reporter.pending == 1
    env.fake.hold_reports.set()
    await env.settled()


async def test_failures_and_er_1106_are_retried_with_backoff(start: Start) -> None:
    env = await start(reports={**FAST, "retries": 3})
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    env.fake.script_reports("Trust", "500", "ER 1106", "invalid-json")

    with capture_logs() as logs:
        await env.get("/app/", ada, {"X-Identity-Trust": "billing"})
        await env.settled()

    assert [c.operation for c in env.fake.reports] == ["Trust"] * 4
    [event] = events(logs, type="trust")
    assert event["outcome"] == "succeeded" and event["attempts"] == 4
    assert env.metric("sidecar_trust_report_retries_total", type="trust") == 3


async def test_a_report_that_keeps_failing_is_given_up_and_shown_as_failed(start: Start) -> None:
    env = await start(reports={**FAST, "retries": 2})
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    env.fake.script_reports("Trust", "ER 1106", "ER 1106", "ER 1106", "OK 0000")

    with capture_logs() as logs:
        await env.get("/app/", ada, {"X-Identity-Trust": "billing"})
        await env.settled()

    assert len(env.fake.reports) == 3  # the first call and two retries, no more
    [event] = events(logs, type="trust")
    assert event["outcome"] == "failed" and event["code"] == "ER 1106"
    assert "gave up after 3 attempts" in event["reason"]
    [failed] = env.running.sidecar.reporter.snapshot()["failed"]
    assert failed["type"] == "trust" and failed["code"] == "ER 1106"


async def test_a_refusal_from_identity_plus_is_not_retried(start: Start) -> None:
    env = await start(reports={**FAST, "retries": 3})
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    env.fake.bound[99] = "taken"

    with capture_logs() as logs:
        await env.get("/app/", ada, {"X-Identity-Bind": "taken"})  # ER 0004: someone else's
        await env.settled()

    assert len(env.fake.reports) == 1
    [event] = events(logs, type="bind")
    assert event["outcome"] == "failed" and event["code"] == "ER 0004"


async def test_the_same_report_is_sent_once(start: Start) -> None:
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    env.fake.hold_reports = asyncio.Event()

    for _ in range(3):  # the same, while the first is pending
        await env.get("/app/", ada, {"X-Identity-Trust": "social"})
    env.fake.hold_reports.set()
    await env.settled()
    await env.get("/app/", ada, {"X-Identity-Trust": "social"})  # and after it went through
    await env.get("/app/", ada, {"X-Identity-Trust": "transaction"})  # another report: sent

    assert [c.body["Trust"]["trust-type"] for c in env.fake.reports] == ["social", "transaction"]
    assert env.metric("sidecar_trust_reports_total", outcome="duplicate") == 3


async def test_bind_unbind_and_bind_again_all_go_out(start: Start) -> None:
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    for header in ("X-Identity-Bind", "X-Identity-Unbind", "X-Identity-Bind"):
        await env.get("/app/", ada, {header: "ada.local"})
        await env.settled()
    assert [c.operation for c in env.fake.reports] == [
        "Local-User-Information",
        "Local-User-Reference",
        "Local-User-Information",
    ]
    await env.get("/app/", ada, {"X-Identity-Bind": "ada.local"})  # bound already: not sent
    await env.settled()
    assert len(env.fake.reports) == 3


async def test_reports_are_rate_limited_per_certificate(start: Start) -> None:
    env = await start(reports={**FAST, "per_certificate": 2})
    ada, bob = env.client("Ada Lovelace"), env.client("Bob Builder")
    for who in (ada, bob):
        env.fake.set_profile(serial(who), "OK 0001")

    with capture_logs() as logs:
        for kind in ("social", "billing", "editorial", "mfa"):
            await env.get("/app/", ada, {"X-Identity-Trust": kind})
        await env.get("/app/", bob, {"X-Identity-Trust": "social"})  # bob has his own bucket
        await env.settled()

    sent = [(c.serial, c.body["Trust"]["trust-type"]) for c in env.fake.reports]
    assert sent == [(serial(ada), "social"), (serial(ada), "billing"), (serial(bob), "social")]
    limited = events(logs, outcome="limited")
    assert len(limited) == 2 and "per_certificate" in limited[0]["reason"]


async def test_reports_are_rate_limited_overall(start: Start) -> None:
    env = await start(reports={**FAST, "overall": 3})
    people = [env.client(f"Person {i}") for i in range(5)]
    for who in people:
        env.fake.set_profile(serial(who), "OK 0001")
        await env.get("/app/", who, {"X-Identity-Trust": "social"})
    await env.settled()
    assert len(env.fake.reports) == 3
    assert env.metric("sidecar_trust_reports_total", outcome="limited") == 2


async def test_at_most_concurrency_calls_are_in_flight(start: Start) -> None:
    env = await start(reports={**FAST, "concurrency": 2})
    people = [env.client(f"Person {i}") for i in range(6)]
    env.fake.report_latency = 0.2
    for who in people:
        env.fake.set_profile(serial(who), "OK 0001")
    await asyncio.gather(*(env.get("/app/", who, {"X-Identity-Trust": "mfa"}) for who in people))
    await env.settled()
    assert len(env.fake.reports) == 6
    assert env.fake.max_reports_in_flight == 2


async def test_one_certificates_reports_go_out_in_order(start: Start) -> None:
    env = await start(reports={**FAST, "concurrency": 4})
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    env.fake.report_latency = 0.05
    await env.get(
        "/app/",
        ada,
        {
            "X-Identity-Bind": "ada.local",
            "X-Identity-Trust": "social",
            "X-Identity-Intrusion": "mistake",
        },
    )
    await env.settled()
    assert [c.operation for c in env.fake.reports] == [
        "Local-User-Information",
        "Trust",
        "Intrusion-Report",
    ]
    assert env.fake.max_reports_in_flight == 1


# ---- what is never sent ----------------------------------------------------------------------------


async def test_a_response_to_a_request_without_an_identified_certificate_reports_nothing(
    start: Start,
) -> None:
    env = await start(reports=FAST)
    with capture_logs() as logs:
        reply = await env.get("/public/page", None, {"X-Identity-Intrusion": "fraud"})
    assert reply.status == 200 and "X-Identity-Intrusion" not in reply.headers
    assert env.fake.reports == []
    [event] = events(logs, type="intrusion")
    assert event["outcome"] == "ignored" and "no identified certificate" in event["reason"]


BAD_VALUES = [
    pytest.param(b"X-Identity-Bind: \r\n", "empty", id="empty-user-name"),
    pytest.param(b"X-Identity-Bind: ada, bob\r\n", "','", id="two-names-folded"),
    pytest.param(b"X-Identity-Bind: ada; tokens=5\r\n", "';'", id="parameters-on-a-name"),
    pytest.param(b"X-Identity-Bind: ada\tX-Evil: 1\r\n", "U+0009", id="tab-injection"),
    pytest.param(b"X-Identity-Bind: ada\xc2\x85x\r\n", "U+0085", id="next-line-character"),
    pytest.param(b"X-Identity-Bind: \xe2\x80\xaeada\r\n", "U+202E", id="bidi-override"),
    pytest.param(b"X-Identity-Bind: ada\xc2\xa0lovelace\r\n", "U+00A0", id="look-alike-space"),
    pytest.param(b"X-Identity-Bind: \xff\xfe\r\n", "not UTF-8", id="not-utf8"),
    pytest.param(b"X-Identity-Bind: " + b"a" * 201 + b"\r\n", "longer than 200", id="too-long"),
    pytest.param(b"X-Identity-Trust: lots\r\n", "unknown trust type", id="unknown-trust-type"),
    pytest.param(b"X-Identity-Trust: social; tokens=99999\r\n", "from 1 to 2500", id="tokens"),
    pytest.param(b"X-Identity-Trust: social; tokens=-1\r\n", "from 1 to 2500", id="negative"),
    pytest.param(b"X-Identity-Trust: social; weight=2\r\n", "unknown parameter", id="param"),
    pytest.param(b"X-Identity-Intrusion: nuclear\r\n", "unknown severity", id="severity"),
    pytest.param(
        b'X-Identity-Intrusion: fraud; message="unclosed\r\n', "not closed", id="unclosed-quote"
    ),
    pytest.param(
        b'X-Identity-Intrusion: fraud; message="a"; message="b"\r\n', "twice", id="repeated"
    ),
    pytest.param(
        b"X-Identity-Bind: ada\r\nX-Identity-Bind: bob\r\n", "different values", id="conflict"
    ),
]


@pytest.mark.parametrize(("lines", "reason"), BAD_VALUES)
async def test_bad_values_are_logged_and_dropped_never_sent(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    fake_identityplus: FakeIdentityPlus,
    scripted: StartScripted,
    lines: bytes,
    reason: str,
) -> None:
    """The upstream writes its response head byte for byte: whatever it puts in a report
    header, the client never sees it, and nothing is sent that was not understood."""

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + lines + b"\r\nok")
        await w.drain()
        return True

    upstream = await answer_with(scripted, answer)
    data = config_dir.base(upstream.port)
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "timeout": "1s",
            "reports": FAST,
        },
    }
    running = await start_sidecar(data)
    alice = running.certs.alice
    fake_identityplus.set_profile(serial(alice), "OK 0001")

    with capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as session,
            session.get(running.url + "/app/", ssl=running.client_ssl(alice)) as resp,
        ):
            body = await resp.read()
            headers = CIMultiDict(resp.headers)

    assert resp.status == 200 and body == b"ok"
    assert [n for n in REPORT_HEADERS if n in headers] == []
    assert "X-Evil" not in headers
    assert fake_identityplus.reports == []
    [event] = events(logs, outcome="invalid")
    assert reason in event["reason"], event


async def answer_with(
    scripted: StartScripted,
    answer: Callable[[Scripted, int, bytes, asyncio.StreamWriter], Awaitable[bool]],
) -> Scripted:
    return await scripted(answer)


async def test_a_flood_of_bad_headers_is_counted_in_full_and_logged_in_part(start: Start) -> None:
    """An application that sets a bad header on every response cannot flood the log: every
    report is counted, the log events are bounded, and the next one says how many it left out."""
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    with capture_logs() as logs:
        await asyncio.gather(
            *(env.get("/app/", ada, {"X-Identity-Trust": "lots"}) for _ in range(40))
        )
    assert env.metric("sidecar_trust_reports_total", outcome="invalid") == 40
    logged = events(logs, outcome="invalid")
    assert 20 <= len(logged) < 40
    assert env.fake.reports == []
    await asyncio.sleep(0.2)  # the log's bucket refills (10 a second)
    with capture_logs() as logs:
        await env.get("/app/", ada, {"X-Identity-Trust": "lots"})
    [after] = events(logs, outcome="invalid")
    # Every one left out is counted by the next event logged: by this one, or (when the
    # bucket refilled during the flood, on a slow machine) by one logged in between.
    told = sum(int(e.get("suppressed", 0)) for e in [*logged, after])
    assert len(logged) + told == 40
    assert after.get("suppressed", 0) > 0 or any("suppressed" in e for e in logged)
