"""A closed connection's objects are freed when it closes, by reference counting, not later by
the cyclic garbage collector: over real TLS, with the collector held off while connections come
and go, nothing of theirs is left for it to find.

The protocol objects of a connection referred to each other (the connection and its response
writer; the head reader and its llhttp parser). Each closed connection then waited for a
collection, and with it whatever it still held: in S2 (a new connection per request) a gen-0
collection ran every ~2,000 connections and took up to 80 ms, a pause every open connection
waited through."""

from __future__ import annotations

import asyncio
import collections
import gc
import time

from sidecar.http1 import heads

from .conftest import Running
from .test_listener import upstream
from .test_tls_tickets_workers import fetch

__all__ = ["upstream"]

#: the request path's per-connection types, by module and name (compiled or not)
PER_CONNECTION = {
    "sidecar.http1.client.ClientConnection",
    "sidecar.http1.client.ResponseWriter",
    "sidecar.http1.heads.HeadReader",
    "sidecar.flow.FlowControl",
    "sidecar.tls_transport.TLSProtocol",
    "sidecar.tls_transport.TLSTransport",
    "httptools.parser.parser.HttpRequestParser",
}


def _name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _per_connection() -> list[object]:
    return [
        obj for obj in gc.get_objects() if _name(obj) in PER_CONNECTION and obj is not heads._CLOSED
    ]


def _alive(earlier: set[int]) -> collections.Counter[str]:
    """The per-connection objects alive now but ``earlier`` (ids of objects held meanwhile)."""
    return collections.Counter(_name(obj) for obj in _per_connection() if id(obj) not in earlier)


async def test_closed_connections_leave_nothing_for_the_cyclic_collector(
    running: Running,
) -> None:
    ctx = running.client_ssl(running.certs.alice)
    port = running.sidecar.port
    first = await fetch(port, ctx, "/app/warm")  # imports, caches: made before counting
    assert first.status == 200
    gc.collect()
    # what earlier tests in this process left (a connection still lingering): held, so that
    # none of it is freed, or found as garbage, while this test counts its own
    held = _per_connection()
    earlier = {id(obj) for obj in held}
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(10):
            got = await fetch(port, ctx, f"/app/{i}", first.session)
            assert got.status == 200
        # the sidecar's side of the last connections ends a moment after the client's
        deadline = time.monotonic() + 5
        while (alive := _alive(earlier)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        gc.collect()
        cyclic = collections.Counter(
            _name(obj)
            for obj in gc.garbage
            if _name(obj) in PER_CONNECTION and id(obj) not in earlier
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert alive == {}, f"not freed when their connections closed: {dict(alive)}"
    assert cyclic == {}
    del held
