"""Trust reports on routes where Identity Plus was not asked (route policy, #16, with #18).

Identity Plus knows a certificate by its serial number alone, and a serial is unique only
among one issuer's certificates. On an ``access: certificate`` route the certificate alone
decides (a service's, possibly from another CA: SPIFFE, an internal PKI): the identity
backend is never asked, yet the application gets a user and could set report headers. A
report sent then would name that serial to Identity Plus, and bind, vouch for or report as an
intruder whoever holds the Identity Plus certificate with the same serial: someone else. Such
reports are dropped (``ignored``), the headers still removed.
"""

from __future__ import annotations

from structlog.testing import capture_logs

from .fake_identityplus import fake_identityplus
from .reporting import FAST, REPORT_HEADERS, Start, app, events, serial, start

__all__ = ["app", "fake_identityplus", "start"]  # fixtures

ROUTES = [
    # services: the certificate alone decides (here: any with this CN), no backend call
    {"path": "/service/", "access": "certificate", "allow": {"subject": {"CN": ["Orders"]}}},
    {"path": "/"},
]
ALL_FOUR = {
    "X-Identity-Bind": "orders.local",
    "X-Identity-Unbind": "orders.local",
    "X-Identity-Trust": "social",
    "X-Identity-Intrusion": "fraud",
}


async def test_no_report_about_a_certificate_identity_plus_was_not_asked_about(
    start: Start,
) -> None:
    env = await start(reports=FAST, routes=ROUTES)
    orders = env.client("Orders")
    # Identity Plus holds a profile under the same serial: someone else's certificate
    env.fake.set_profile(serial(orders), "OK 0001", organizational_reference="ref-victim")

    with capture_logs() as logs:
        reply = await env.get("/service/pay", orders, ALL_FOUR)
        await env.settled()

    assert reply.status == 200
    assert env.app.last_user()["username"] == "Orders"  # let in by the certificate alone
    assert [name for name in REPORT_HEADERS if name in reply.headers] == []
    assert env.fake.calls.get(serial(orders), 0) == 0  # Identity Plus never asked about it
    assert env.fake.reports == []  # and never told anything about that serial
    assert env.metric("sidecar_trust_reports_total", outcome="ignored") == 4
    ignored = events(logs, outcome="ignored")
    assert ignored and "Identity Plus" in ignored[0]["reason"]


async def test_the_same_certificate_on_a_route_identity_plus_decides_is_reported(
    start: Start,
) -> None:
    env = await start(reports=FAST, routes=ROUTES)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")

    reply = await env.get("/app/", ada, {"X-Identity-Trust": "social"})
    await env.settled()

    assert reply.status == 200 and "X-Identity-Trust" not in reply.headers
    assert [c.operation for c in env.fake.reports] == ["Trust"]
