"""OCSP for client certificates attacked from outside (issue #14): a real ``openssl ocsp``
responder, signing as the CA itself or as a delegated responder, behind a relay that can
delay it; a responder that is down, slow, or signs badly; the real TLS listener, Python's and
curl's clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .pki import Issued
from .revocation_parts import OCSPResponder, Relay, client_with, delegated_responder
from .test_identity_e2e import admin, fetch
from .test_listener import connect, eventually
from .test_operations import metric
from .test_revocation_security import curl, revoked_reply, unavailable_reply


@dataclass
class OCSP:
    """A responder behind a relay: certificates name the relay, which can be slowed or
    pointed at nothing (the responder down)."""

    relay: Relay
    folder: Path
    ca: Issued
    responder: OCSPResponder | None = None

    def client(self, cn: str, *, aia: bool = True) -> Issued:
        return client_with(self.ca, cn, ocsp_urls=[self.relay.url] if aia else [])

    def start(
        self,
        *,
        good: Sequence[Issued] = (),
        revoked: Sequence[Issued] = (),
        delegated: bool = False,
        eku: bool = True,
        badsig: bool = False,
    ) -> OCSPResponder:
        if self.responder is not None:
            self.responder.stop()
        signer = delegated_responder(self.ca, eku=eku) if delegated else self.ca
        folder = self.folder / f"responder-{self.relay.connections}-{len(good)}-{len(revoked)}"
        self.responder = OCSPResponder(
            folder, self.ca, signer, badsig=badsig, good=list(good), revoked=list(revoked)
        )
        self.responder.start()
        self.relay.target = self.responder.port
        return self.responder

    def stop(self) -> None:
        if self.responder is not None:
            self.responder.stop()
            self.responder = None


@pytest.fixture
async def ocsp(config_dir: ConfigDir, tmp_path: Path) -> AsyncIterator[OCSP]:
    relay = Relay(target=9)  # nothing listens on port 9: down until a responder starts
    await relay.start()
    state = OCSP(relay, tmp_path / "ocsp", config_dir.certs.pki.client_intermediate)
    yield state
    state.stop()
    await relay.stop()


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
def start(start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream) -> Start:
    async def run(mode: str, **tls: Any) -> Running:
        data = config_dir.base(upstream.port)
        data["tls"].update({"ocsp": mode, "ocsp_timeout": "1s", **tls})
        running: Running = await start_sidecar(data)
        return running

    return run


@pytest.mark.parametrize("signer", ["the CA", "a delegated responder"])
async def test_the_responders_answer_decides(
    ocsp: OCSP, start: Start, upstream: Upstream, signer: str
) -> None:
    good, bad, stranger = ocsp.client("Good"), ocsp.client("Bad"), ocsp.client("Stranger")
    ocsp.start(good=[good], revoked=[bad], delegated=signer != "the CA")
    running = await start("hard")
    assert (await fetch(running, "/public/x", good)).status == 200
    assert revoked_reply(await fetch(running, "/public/x", bad))
    # the responder does not know this one: no answer to go by (hard: refused)
    assert unavailable_reply(await fetch(running, "/public/x", stranger))
    assert [s.raw_path for s in upstream.seen] == ["/public/x"]
    # answers are kept: asked once per certificate, curl's requests included
    assert ocsp.relay.requests == 3
    assert (await curl(running, good, "/public/y"))[0] == 200
    assert (await curl(running, bad, "/public/y"))[0] == 403
    assert ocsp.relay.requests == 3
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_ocsp_cache_entries") == 3
    for result in ("good", "revoked", "unknown"):
        assert metric(text, "sidecar_ocsp_requests_total", result=result) == 1


async def test_the_responder_is_asked_as_the_connection_starts(ocsp: OCSP, start: Start) -> None:
    """Checked at the handshake where possible: the answer is on its way before the first
    request arrives."""
    good = ocsp.client("Good")
    ocsp.start(good=[good])
    running = await start("hard")
    async with connect(running, good) as conn:
        await eventually(lambda: ocsp.relay.requests == 1, "the question at the handshake")
        await eventually(lambda: running.sidecar.revocation.ocsp_entries == 1, "the answer")
        conn.send(b"GET /public/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await conn.response()).status == 200
    assert ocsp.relay.requests == 1


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("fault", ["down", "slow", "bad signature", "unauthorised responder"])
async def test_a_responder_that_cannot_answer(
    ocsp: OCSP, start: Start, upstream: Upstream, mode: str, fault: str
) -> None:
    """soft lets the request through without an answer; hard refuses it with 503 and
    Retry-After. Either way within the timeout, and a revoked certificate whose answer cannot
    be believed is never reported as good."""
    who = ocsp.client("Visitor")
    if fault == "down":  # nothing listens where the certificate says
        await ocsp.relay.stop()
    elif fault == "slow":
        ocsp.start(revoked=[who])
        ocsp.relay.delay = 10.0  # tls.ocsp_timeout is 1 s
    elif fault == "bad signature":
        ocsp.start(revoked=[who], badsig=True)
    elif fault == "unauthorised responder":
        ocsp.start(revoked=[who], delegated=True, eku=False)
    running = await start(mode)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await fetch(running, "/public/x", who)
    assert loop.time() - started < 8  # bounded by the 1 s timeout, not the 10 s delay
    if mode == "soft":
        assert reply.status == 200
        assert [s.raw_path for s in upstream.seen] == ["/public/x"]
    else:
        assert unavailable_reply(reply)
        assert upstream.seen == []
    kind = {
        "down": "connect",
        "slow": "timeout",
        "bad signature": "bad-signature",
        "unauthorised responder": "bad-signature",
    }[fault]
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_ocsp_requests_total", result=kind) == 1
    outcome = "unknown" if mode == "soft" else "unavailable"
    assert metric(text, "sidecar_revocation_checks_total", outcome=outcome) == 1
    if fault != "slow":  # curl sees the same
        assert (await curl(running, who, "/public/y"))[0] == (200 if mode == "soft" else 503)


async def test_the_configured_responder_is_asked_for_certificates_that_name_none(
    ocsp: OCSP, start: Start
) -> None:
    plain, revoked = ocsp.client("Plain", aia=False), ocsp.client("Revoked", aia=False)
    ocsp.start(good=[plain], revoked=[revoked])
    running = await start("hard")
    # without tls.ocsp_responder: nobody to ask
    assert unavailable_reply(await fetch(running, "/public/x", plain))
    running = await start("hard", ocsp_responder=ocsp.relay.url)
    assert (await fetch(running, "/public/x", plain)).status == 200
    assert revoked_reply(await fetch(running, "/public/x", revoked))


async def test_an_ocsp_revocation_drops_the_cached_verdict_and_reaches_open_connections(
    ocsp: OCSP, start: Start, config_dir: ConfigDir, upstream: Upstream
) -> None:
    alice = config_dir.certs.alice  # names no responder: tls.ocsp_responder
    ocsp.start(good=[alice])
    running = await start("hard", ocsp_responder=ocsp.relay.url, ocsp_max_age="1s")
    async with connect(running, alice) as conn:
        conn.send(b"GET /admin/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await conn.response()).status == 200
        cache = running.sidecar._cache()
        assert cache is not None and len(cache) == 1
        ocsp.start(revoked=[alice])  # the next answer, once the first expires, is revoked
        await asyncio.sleep(1.1)
        conn.send(b"GET /admin/y HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = await conn.response()
        assert response.status == 403
        assert len(cache) == 0
    assert [s.raw_path for s in upstream.seen] == ["/admin/x"]
    assert running.sidecar.revocation.denied()["runtime"] == []  # no deny entry was made
