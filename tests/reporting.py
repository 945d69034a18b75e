"""Helpers for the trust-report tests: an application that sets report headers, a sidecar in
front of it with the identityplus backend aimed at the fake, and what to wait for."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from .conftest import ConfigDir, Running, SidecarFactory, decode_userinfo
from .fake_identityplus import FakeIdentityPlus
from .pki import Issued
from .servers import serve_app

REPORT_HEADERS = (
    "X-Identity-Bind",
    "X-Identity-Unbind",
    "X-Identity-Trust",
    "X-Identity-Intrusion",
)


@dataclass
class App:
    """An upstream that answers each request with the headers its ``X-Reply`` header (JSON)
    asks for, and ``X-Seen-User`` (the username it received): ``/stream/...`` streams its
    body without a length, anything else answers whole; a request with a body is read first
    (the sidecar serves those on aiohttp's path)."""

    port: int
    seen: list[CIMultiDict[str]] = field(default_factory=list)

    def last_user(self) -> dict[str, Any]:
        return decode_userinfo(self.seen[-1]["X-USERINFO"])


@pytest.fixture
async def app() -> AsyncIterator[App]:
    state = App(0)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        state.seen.append(CIMultiDict(request.headers))
        headers = json.loads(request.headers.get("X-Reply", "{}"))
        userinfo = request.headers.get("X-USERINFO")
        # who it was told the request came from: for tests that cannot see it (other processes)
        headers["X-Seen-User"] = json.dumps(
            decode_userinfo(userinfo)["username"] if userinfo else None
        )
        if request.path.startswith("/stream/"):
            response = web.StreamResponse(headers=headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b"part one, ")
            await asyncio.sleep(0.01)
            await response.write(b"part two")
            await response.write_eof()
            return response
        return web.Response(text="page", headers=headers)

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handle)
    runner, state.port = await serve_app(application)
    yield state
    await runner.cleanup()


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Env:
    fake: FakeIdentityPlus
    running: Running
    app: App

    def client(self, cn: str) -> Issued:
        return self.running.certs.pki.client(cn)

    async def get(
        self,
        path: str,
        who: Issued | None,
        reply: dict[str, str] | None = None,
        *,
        method: str = "GET",
        data: bytes | None = None,
    ) -> Reply:
        headers = {"X-Reply": json.dumps(reply or {})}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                self.running.url + path,
                ssl=self.running.client_ssl(who),
                headers=headers,
                data=data,
                allow_redirects=False,
            ) as resp,
        ):
            return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for family in self.running.sidecar.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    async def settled(self) -> None:
        """Until no report is pending any more."""
        await until(lambda: self.running.sidecar.reporter.pending == 0)


Start = Callable[..., Awaitable[Env]]

#: identity.identityplus.reports in these tests: small backoffs, so retries are quick
FAST = {"enabled": True, "backoff": "50ms", "max_backoff": "200ms", "dedupe_window": "10m"}


@pytest.fixture
def start(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    app: App,
) -> Start:
    """A sidecar with the identityplus backend aimed at the fake, in front of ``app``;
    ``reports`` is identity.identityplus.reports (None: left out), ``headers`` the headers
    section's report names, ``cache`` identity.cache, ``routes`` the routes."""

    async def run(
        *,
        reports: dict[str, Any] | bool | None = None,
        backend: str = "identityplus",
        report_headers: dict[str, str] | None = None,
        cache: dict[str, Any] | None = None,
        routes: list[dict[str, Any]] | None = None,
    ) -> Env:
        data = config_dir.base(app.port)
        if routes is not None:
            data["routes"] = routes
        if backend == "identityplus":
            identityplus: dict[str, Any] = {
                "endpoint": fake_identityplus.url,
                "certificate": str(fake_identityplus.agent_certificate),
                "key": str(fake_identityplus.agent_key),
                "ca": str(fake_identityplus.ca_file),
                "signon_url": "https://signon.example",
                "timeout": "1s",
            }
            if reports is not None:
                identityplus["reports"] = reports
            data["identity"] = {"backend": "identityplus", "identityplus": identityplus}
            if cache is not None:
                data["identity"]["cache"] = cache
        if report_headers is not None:
            data["headers"] = {"reports": report_headers}
        running = await start_sidecar(data)
        return Env(fake_identityplus, running, app)

    return run


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not become true in time")
        await asyncio.sleep(0.02)


def serial(who: Issued) -> int:
    return int(who.cert.serial_number)


def events(
    logs: Sequence[MutableMapping[str, Any]], **match: object
) -> list[MutableMapping[str, Any]]:
    return [
        e
        for e in logs
        if e.get("event") == "trust_report" and all(e.get(k) == v for k, v in match.items())
    ]
