"""Signals on the real process: SIGTERM drains, a second signal stops at once, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import ConfigDir
from .servers import serve_app
from .test_cli import free_port
from .test_operations import read_response


@pytest.fixture
async def slow_upstream() -> AsyncIterator[int]:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("sleep", "0")))
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner, port = await serve_app(app, shutdown_timeout=0.1)
    yield port
    await runner.cleanup()


async def start(
    config_dir: ConfigDir, data: dict[str, Any]
) -> tuple[asyncio.subprocess.Process, int, int]:
    port, admin_port = free_port(), free_port()
    data["listen"]["port"] = port
    data["admin"]["port"] = admin_port
    path: Path = config_dir.write(data)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
                    if resp.status == 200:
                        return proc, port, admin_port
            except aiohttp.ClientError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    proc.kill()
    _, err = await proc.communicate()
    raise AssertionError(f"sidecar did not become ready: {err.decode()}")


def client_ctx(config_dir: ConfigDir, name: str) -> Any:
    import ssl

    ctx = ssl.create_default_context(cafile=str(config_dir.path / "server-ca.pem"))
    ctx.load_cert_chain(config_dir.path / f"{name}.pem", config_dir.path / f"{name}.key")
    return ctx


async def test_sigterm_lets_a_slow_request_finish_then_exits_0(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    data["shutdown"] = {"drain_delay": "300ms", "grace_period": "10s"}
    proc, port, admin_port = await start(config_dir, data)
    ctx = client_ctx(config_dir, "bob")
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(
            session.get(f"https://localhost:{port}/app/?sleep=1.5", ssl=ctx)
        )
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
            assert ready.status == 503  # draining, at once
        resp = await slow
        assert resp.status == 200 and await resp.text() == "done"
        resp.release()
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    _, err = await proc.communicate()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(e["event"] == "draining" for e in events) and any(
        e["event"] == "stopped" for e in events
    )


async def test_second_signal_stops_at_once(config_dir: ConfigDir, slow_upstream: int) -> None:
    data = config_dir.base(slow_upstream)
    data["shutdown"] = {"drain_delay": "30s", "grace_period": "30s"}
    proc, _, _ = await start(config_dir, data)
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert proc.returncode is None  # draining for 30 s
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 5) == 0
    await proc.communicate()


async def test_sighup_adds_a_user_while_a_keepalive_connection_stays_open(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    proc, port, _ = await start(config_dir, data)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(config_dir, "stranger"), server_hostname="localhost"
        )
        get = b"GET /app/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
        writer.write(get)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 403")
        data["identity"]["static"]["users"].append(
            {"sub": "sub-m", "username": "mallory", "certificates": [{"file": "stranger.pem"}]}
        )
        config_dir.write(data)
        proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            await asyncio.sleep(0.1)
            writer.write(get)  # the same connection, kept alive across the reload
            if (await read_response(reader)).startswith(b"HTTP/1.1 200"):
                break
        else:
            pytest.fail("SIGHUP did not reload")
        writer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        await proc.communicate()


async def test_two_workers_serve_and_metrics_count_them_all(
    config_dir: ConfigDir, slow_upstream: int
) -> None:
    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await start(config_dir, data)
    try:
        ctx = client_ctx(config_dir, "bob")
        statuses = []
        for _ in range(20):  # new connections, so both workers get some
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"https://localhost:{port}/app/", ssl=ctx) as resp,
            ):
                statuses.append(resp.status)
        assert statuses == [200] * 20
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                text = await resp.text()
            async with session.post(f"http://127.0.0.1:{admin_port}/cache/purge") as resp:
                purged = await resp.json()
        from .test_operations import metric

        assert metric(text, "sidecar_requests_total", decision="forwarded") == 20
        assert metric(text, "sidecar_workers") == 2
        assert purged["workers"] == 2 and 1 <= purged["purged"] <= 2
        assert metric(text, "sidecar_cache_entries") == purged["purged"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await proc.communicate()


async def test_a_worker_that_dies_is_restarted(config_dir: ConfigDir, slow_upstream: int) -> None:
    data = config_dir.base(slow_upstream)
    data["listen"]["workers"] = 2
    proc, port, admin_port = await start(config_dir, data)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        from .test_operations import metric

        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                await asyncio.sleep(0.1)
                async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                    text = await resp.text()
                if metric(text, "sidecar_worker_restarts_total") == 1:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                        if ready.status == 200:
                            break
            else:
                pytest.fail("the dead worker was not restarted")
            async with session.get(
                f"https://localhost:{port}/app/", ssl=client_ctx(config_dir, "bob")
            ) as resp:
                assert resp.status == 200
        new_children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(new_children) == 2 and children[0] not in new_children
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        _, err = await proc.communicate()
    assert b'"worker_died"' in err
