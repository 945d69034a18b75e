"""An upstream's interim (1xx) response with a body, over real TLS.

RFC 9110 §15.2: a 1xx response ends with its header section; it has no content. llhttp
reads no body after 100, 102 and 103, but takes the framing of any other 1xx (150, 199) at its
word, and the body it then read was added to the final response's: a client got more bytes
than the final response's Content-Length, which it reads as the start of its next response
(found by a review of the upstream parser, 2026-12-06). Such an answer is the upstream's
protocol error: 502, nothing of it forwarded, and its connection is not reused.

So is a response nobody asked for, sent after a streamed one's last bytes: the first reaches
the client whole, nothing of the second does.
"""

from __future__ import annotations

import asyncio

import pytest

from .conftest import ConfigDir, SidecarFactory
from .servers import Scripted, StartScripted, answer_ok, keep_alive_ok
from .test_body_security import start
from .test_listener import connect, req

SMUGGLED = b"INJECTED!"


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 150 Odd\r\nContent-Length: 9\r\n\r\n" + SMUGGLED,
        b"HTTP/1.1 199 Odd\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n"
        + SMUGGLED
        + b"\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_an_interim_response_with_a_body_is_502_and_nothing_of_it_is_forwarded(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    scripted: StartScripted,
    interim: bytes,
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if b" /public/first " in head:
            w.write(interim + answer_ok(b"ok"))
            await w.drain()
            return True
        return await keep_alive_ok(state, n, head, w)

    upstream = await scripted(answer)
    running = await start(start_sidecar, config_dir, upstream)
    async with connect(running) as conn:
        conn.send(req("GET", "/public/first"))
        first = await conn.response(timeout=10)
        conn.send(req("GET", "/public/second"))
        second = await conn.response(timeout=10)
    assert first.status == 502
    assert SMUGGLED not in first.body
    # the client's connection is in step: its next answer is the next request's, whole
    assert (second.status, second.body) == (200, b"ok 0")
    assert upstream.connections == 2  # the connection that answered so is not reused


async def test_a_response_sent_after_a_streamed_one_is_never_forwarded(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    """An upstream that sends, with a streamed response's last bytes and in the same write, a
    second response nobody asked for (the relay waits for the rest, and takes the body's
    bytes from the upstream's reads): the client gets the first response whole, nothing of
    the second, its next answer is its next request's, and that connection is not reused."""
    size = 200_000

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if b" /public/first " in head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * (size // 2))
            await w.drain()
            await asyncio.sleep(0.3)  # the client has the head: the relay waits for more
            w.write(b"b" * (size // 2) + answer_ok(SMUGGLED))
            await w.drain()
            return True
        return await keep_alive_ok(state, n, head, w)

    upstream = await scripted(answer)
    running = await start(start_sidecar, config_dir, upstream)
    async with connect(running) as conn:
        conn.send(req("GET", "/public/first"))
        first = await conn.response(timeout=10)
        conn.send(req("GET", "/public/second"))
        second = await conn.response(timeout=10)
    assert first.status == 200
    assert first.body == b"a" * (size // 2) + b"b" * (size // 2)
    assert (second.status, second.body) == (200, b"ok 0")
    assert upstream.connections == 2  # the connection that answered so is not reused
