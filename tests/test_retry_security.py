"""Only idempotent requests are sent again when a reused upstream connection fails.

The race every keep-alive client meets: the upstream closes an idle connection just as a
request goes out on it, before any byte of response. A GET, HEAD, OPTIONS or TRACE is then sent
again on a new connection; any other method (POST, PUT, PATCH, DELETE, ...) may already have
been acted on, so the client gets 502 and the upstream saw it once. Through the real listener,
on its own path and on aiohttp's.
"""

from __future__ import annotations

import asyncio

import pytest

from .conftest import ConfigDir, Running, SidecarFactory
from .servers import Scripted, StartScripted, answer_ok
from .test_listener import connect, req, warm

IDEMPOTENT = ["GET", "HEAD", "OPTIONS", "TRACE"]
NOT_IDEMPOTENT = ["POST", "PUT", "PATCH", "DELETE", "PROPFIND"]


async def closes_the_second_request(
    state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter
) -> bool:
    """Each upstream connection answers its first request, and closes at the second one
    without a byte of answer."""
    if n == 1:
        return False
    body = b"answered"
    w.write(answer_ok(body)[: -len(body)] if head.startswith(b"HEAD ") else answer_ok(body))
    return True


async def start(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> tuple[Running, Scripted]:
    up = await scripted(closes_the_second_request)
    running: Running = await start_sidecar(config_dir.base(up.port))
    return running, up


@pytest.mark.parametrize("method", IDEMPOTENT + NOT_IDEMPOTENT)
async def test_listener_path_sends_again_only_idempotent_requests(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted, method: str
) -> None:
    running, up = await start(start_sidecar, config_dir, scripted)
    await warm(running)  # one upstream connection, idle in the pool
    async with connect(running) as conn:
        conn.send(req(method, "/public/again"))
        response = await conn.response(method)
    sent = [r.split(b" ", 2)[:2] for r in up.requests]
    if method in IDEMPOTENT:
        assert response.status == 200
        assert sent == [[b"GET", b"/public/warm"], *[[method.encode(), b"/public/again"]] * 2]
    else:
        assert response.status == 502
        assert sent == [[b"GET", b"/public/warm"], [method.encode(), b"/public/again"]]


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
async def test_aiohttp_path_sends_again_only_idempotent_requests(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted, method: str
) -> None:
    running, up = await start(start_sidecar, config_dir, scripted)
    async with connect(running) as conn:
        # a body hands the connection to aiohttp; its request leaves a pooled connection
        conn.send(req("POST", "/public/body", body=b"payload"))
        assert (await conn.response()).status == 200
        conn.send(req(method, "/public/again"))  # no body: served by aiohttp, on that one
        response = await conn.response()
    methods = up.methods()
    if method in IDEMPOTENT:
        assert response.status == 200
        assert methods == ["POST", method, method]
    else:
        assert response.status == 502
        assert methods == ["POST", method]
