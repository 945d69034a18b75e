"""Trust reports about requests identified by an HTTP-legacy session (#18 with #15 item 4).

A session cookie stands for a certificate the sidecar never saw, known by its serial alone
(``ClientCert.known_by_serial``). That serial is the one Identity Plus resolved at sign-on,
so it names an Identity Plus certificate, and the session's verdict is Identity Plus's: the
application may report on such a request as on one with a certificate. The report goes to
Identity Plus by that serial, and the session's cached verdict is dropped, so that the next
request sees the new profile. Without a session Identity Plus made (a forged cookie, none at
all) the report headers are removed and ignored, as for any request nobody identified.

End to end over real TLS: the browser signs on against the fake Identity Plus, gets its
session cookie, and a real upstream sets the report headers.
"""

from __future__ import annotations

import json
from typing import Any

from structlog.testing import capture_logs

from sidecar.sessions import COOKIE_NAME

from .conftest import ConfigDir, Running, SidecarFactory
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .reporting import FAST, App, app, events, until
from .test_legacy_security import get, legacy_config, session_for

__all__ = ["app", "fake_identityplus"]  # fixtures, imported to be used here


async def _start(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, fake: FakeIdentityPlus, app: App
) -> Running:
    running: Running = await start_sidecar(legacy_config(config_dir, fake, app.port, reports=FAST))
    return running


def _reply(headers: dict[str, str]) -> dict[str, str]:
    """What the test application is to answer with (see ``reporting.App``)."""
    return {"X-Reply": json.dumps(headers)}


async def _settled(running: Running) -> None:
    await until(lambda: running.sidecar.reporter.pending == 0)


def _seen_user(reply: Any) -> object:
    [seen] = reply.header("X-Seen-User")
    return json.loads(seen)


async def test_a_bind_on_a_session_request_goes_to_its_serial_and_the_next_request_carries_it(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    fake_identityplus: FakeIdentityPlus,
    app: App,
) -> None:
    running = await _start(start_sidecar, config_dir, fake_identityplus, app)
    serial = running.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, "OK 0001", organizational_reference="ref-alice")
    session = await session_for(running, fake_identityplus, serial)
    cookies = {COOKIE_NAME: session}
    first = await get(running, "/app/first", cookies=cookies)
    assert first.status == 200 and _seen_user(first) == "ref-alice"
    assert fake_identityplus.calls[serial] == 1

    with capture_logs() as logs:
        reply = await get(
            running, "/app/page", cookies=cookies, headers=_reply({"X-Identity-Bind": "alice"})
        )
        assert reply.status == 200 and reply.header("X-Identity-Bind") == []
        await _settled(running)

    [call] = fake_identityplus.reports
    assert call.operation == "Local-User-Information"
    assert call.body == {
        "Local-User-Information": {"serial-number": str(serial), "local-user-name": "alice"}
    }
    [event] = events(logs, type="bind")
    assert event["outcome"] == "succeeded" and event["cert_serial"] == f"{serial:X}"
    # the session's verdict was dropped: asked again, and the bound user is announced
    after = await get(running, "/app/next", cookies=cookies)
    assert after.status == 200 and _seen_user(after) == "alice"
    assert fake_identityplus.calls[serial] == 2


async def test_an_intrusion_report_on_a_session_request_refuses_the_session_next(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    fake_identityplus: FakeIdentityPlus,
    app: App,
) -> None:
    running = await _start(start_sidecar, config_dir, fake_identityplus, app)
    serial = running.certs.alice.cert.serial_number
    fake_identityplus.set_profile(serial, local_user_name="alice")
    session = await session_for(running, fake_identityplus, serial)
    cookies = {COOKIE_NAME: session}

    reply = await get(
        running, "/app/page", cookies=cookies, headers=_reply({"X-Identity-Intrusion": "fraud"})
    )
    assert reply.status == 200 and reply.header("X-Identity-Intrusion") == []
    await _settled(running)

    [call] = fake_identityplus.reports
    assert call.operation == "Intrusion-Report"
    assert call.body["Intrusion-Report"]["intruding-certificate-uid"] == str(serial)
    # the fake answers PB 0005 from now on; the session's cached allow is gone
    assert (await get(running, "/app/page", cookies=cookies)).status == 403


async def test_a_forged_session_cookie_reports_nothing(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    fake_identityplus: FakeIdentityPlus,
    app: App,
) -> None:
    """Not a session this sidecar sealed: the request is one without any identity, and its
    report headers are removed and ignored (on a public route, where it is forwarded)."""
    running = await _start(start_sidecar, config_dir, fake_identityplus, app)
    with capture_logs() as logs:
        reply = await get(
            running,
            "/public/page",
            cookies={COOKIE_NAME: "forged." + "A" * 60},
            headers=_reply({"X-Identity-Intrusion": "fraud"}),
        )
    assert reply.status == 200 and reply.header("X-Identity-Intrusion") == []
    assert _seen_user(reply) is None
    assert fake_identityplus.reports == []
    [event] = events(logs, type="intrusion")
    assert event["outcome"] == "ignored" and "no identified certificate" in event["reason"]
