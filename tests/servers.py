"""Test servers on 127.0.0.1: an aiohttp application on a free port, and a scripted raw
HTTP/1.1 upstream (the ``scripted`` fixture, shared through conftest)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web


async def serve_app(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None, **runner_kwargs: Any
) -> tuple[web.AppRunner, int]:
    """Start ``app`` (no access log); the runner, for ``cleanup()``, and the port it got."""
    runner = web.AppRunner(app, access_log=None, **runner_kwargs)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    port: int = runner.addresses[0][1]
    return runner, port


@dataclass
class Scripted:
    """A raw HTTP/1.1 upstream: the test writes its answers byte for byte."""

    url: str = ""
    connections: int = 0
    open: int = 0
    max_open: int = 0
    #: each request's head and body, in arrival order
    requests: list[bytes] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def methods(self) -> list[str]:
        return [r.split(b" ", 1)[0].decode() for r in self.requests]


#: (the upstream, index of the request on its connection, request head, writer) -> keep open
Answer = Callable[[Scripted, int, bytes, asyncio.StreamWriter], Awaitable[bool]]
StartScripted = Callable[[Answer], Awaitable[Scripted]]


def answer_ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_alive_ok(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
    w.write(answer_ok(b"ok %d" % n))
    await w.drain()
    return True


@pytest.fixture
async def scripted() -> AsyncIterator[StartScripted]:
    servers: list[asyncio.Server] = []
    writers: set[asyncio.StreamWriter] = set()

    async def start(answer: Answer) -> Scripted:
        state = Scripted()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            writer.transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
            state.connections += 1
            state.open += 1
            state.max_open = max(state.max_open, state.open)
            try:
                for n in range(1000):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    state.requests.append(head + await reader.readexactly(length))
                    if not await answer(state, n, head, writer):
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                state.open -= 1
                writers.discard(writer)
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return state

    yield start
    for writer in list(writers):
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()
