"""Trust reports and the status page with ``listen.workers: 2`` (the real ``sidecar run``): the
supervisor serves the admin listener, so a report posted to it must reach exactly one worker,
a verdict dropped after a report must be dropped in every worker, and the status page must
add the workers up.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from .conftest import ConfigDir
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .pki import Issued
from .reporting import FAST, App, app, serial
from .test_signals import start as start_process

#: the sidecar runs as its own process (conftest.pytest_collection_modifyitems)
pytestmark = pytest.mark.own_process

__all__ = ["app", "fake_identityplus"]  # fixtures, imported to be used here


async def usernames(port: int, ctx: ssl.SSLContext, count: int, reply: Any = None) -> list[str]:
    """The username the application received, for ``count`` requests on new connections
    (the kernel spreads new connections over the workers)."""
    names = []
    for _ in range(count):
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"https://localhost:{port}/app/",
                ssl=ctx,
                headers={"X-Reply": json.dumps(reply or {})},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
            seen = json.loads(resp.headers["X-Seen-User"])
            names.append(seen)
    return names


async def until_all(
    port: int, ctx: ssl.SSLContext, name: str, asked: Callable[[], bool] = lambda: True
) -> None:
    """Until every worker answers with ``name`` (the verdict drop reaches them a moment
    after the report's answer) and ``asked()`` holds: eight new connections can all land on
    one worker, so a caller that counts the other worker's lookup says so with ``asked``."""
    deadline = time.monotonic() + 15
    while True:
        names = await usernames(port, ctx, 8)
        if set(names) == {name} and asked():
            return
        assert time.monotonic() < deadline, f"workers say {set(names)}, or one has not asked again"
        await asyncio.sleep(0.2)


async def test_two_workers_one_report_every_verdict_dropped_one_status_page(
    config_dir: ConfigDir, app: App, fake_identityplus: FakeIdentityPlus
) -> None:
    fake = fake_identityplus
    ada: Issued = config_dir.certs.pki.client("Ada Lovelace")
    cert, key = ada.write(config_dir.path, "ada")
    ctx = ssl.create_default_context(cafile=str(config_dir.path / "server-ca.pem"))
    ctx.load_cert_chain(cert, key)
    fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")
    data = config_dir.base(app.port)
    data["listen"]["workers"] = 2
    data["log"] = {"level": "warning"}  # nobody reads the processes' pipes until the end
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake.url,
            "certificate": str(fake.agent_certificate),
            "key": str(fake.agent_key),
            "ca": str(fake.ca_file),
            "timeout": "2s",
            "reports": FAST,
        },
    }
    proc, port, admin_port = await start_process(config_dir, data)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        # both workers cache ada's verdict (each asks Identity Plus once)
        deadline = time.monotonic() + 15
        while fake.calls[serial(ada)] < 2:
            assert time.monotonic() < deadline, "the connections all went to one worker"
            assert set(await usernames(port, ctx, 4)) == {"ref-ada"}

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{admin}/identityplus/bind",
                json={"serial": str(serial(ada)), "local_user_name": "ada.local"},
            ) as resp,
        ):
            answer = await resp.json()
        assert resp.status == 200 and answer["outcome"] == "succeeded", answer
        assert len(fake.reports) == 1  # one worker sent it, once

        # no worker serves the stale verdict, and each asked Identity Plus again
        await until_all(port, ctx, "ada.local", lambda: fake.calls[serial(ada)] >= 4)
        assert fake.calls[serial(ada)] == 4

        # from a response, in whichever worker served it: every worker drops the verdict
        await usernames(port, ctx, 1, {"X-Identity-Unbind": "ada.local"})
        await until_all(port, ctx, "ref-ada")
        assert [c.operation for c in fake.reports] == [
            "Local-User-Information",
            "Local-User-Reference",
        ]

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{admin}/", headers={"Accept": "application/json"}) as resp,
        ):
            doc = await resp.json()
        async with aiohttp.ClientSession() as session, session.get(f"{admin}/") as resp:
            html = await resp.text()
        sidecar = doc["sidecar"]
        assert sidecar["workers"] == 2
        assert [w["answered"] for w in sidecar["worker_list"]] == [True, True]
        assert doc["reports"]["outcomes"] == {"succeeded": 2}
        assert doc["identity"]["lookups"] == fake.calls[serial(ada)]
        assert doc["identity"]["latency_ms"]["samples"] == fake.calls[serial(ada)]
        assert doc["cache"]["misses"] == fake.calls[serial(ada)]
        assert "Workers" in html and "<script" not in html
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await proc.communicate()
