"""A WebSocket relayed frame by frame between the client and the upstream application
(``relay``), with an idle timeout, and close codes passed on as RFC 6455 wants them. The
message size bound is aiohttp's, on both sides (``forward``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

# Close codes that stand for a missing close frame or status; they may not be sent (RFC 6455).
_NO_STATUS = frozenset({0, 1005})  # aiohttp reports an empty close frame as 0
_ABNORMAL = frozenset({1006, 1015})

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class _Activity:
    """When a frame last passed, either way: what keeps a relayed WebSocket from being idle."""

    __slots__ = ("_loop", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.last = loop.time()

    def touch(self) -> None:
        self.last = self._loop.time()

    def idle_for(self) -> float:
        return self._loop.time() - self.last


@dataclass(slots=True)
class _End:
    """How a relayed WebSocket ended: the side whose doing it was (``culprit``), the close
    code it sent (None when it vanished or failed), and whether its message was too large
    (aiohttp has closed that side with 1009 then)."""

    culprit: _Socket
    code: int | None
    reason: str
    too_big: bool = False


async def relay(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, idle_timeout: float
) -> None:
    """Copy frames both ways until one side ends it or no frame passed for ``idle_timeout``;
    then close both sides.

    A side that closed gets its own code echoed (RFC 6455 §5.5.1) and the other side the same
    code and reason. A side whose message was over the size limit has been closed with 1009
    (Message Too Big) and the other side gets 1001 (Going Away). A side that vanished without
    a close frame makes the other one see 1014 (Bad Gateway: the upstream) or 1001 (the
    client). An idle WebSocket is closed with 1001 on both sides: the proxy goes away from it,
    neither peer ended it.
    """
    loop = asyncio.get_running_loop()
    activity = _Activity(loop)
    to_upstream = asyncio.ensure_future(_pump(client, upstream, activity))
    to_client = asyncio.ensure_future(_pump(upstream, client, activity))
    tasks = (to_upstream, to_client)
    end: _End | None = None
    try:
        while True:
            remaining = idle_timeout - activity.idle_for()
            if remaining <= 0:
                break  # idle
            done, _ = await asyncio.wait(
                tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                end = (to_client if to_client.done() else to_upstream).result()
                break
        # Cancelling the server side's receive is harmless; the client side's would mark
        # the connection as failed, so that one is left to close(), which interrupts it.
        if not to_upstream.done():
            to_upstream.cancel()
            await asyncio.wait((to_upstream,))
        if end is None:
            await asyncio.gather(
                client.close(code=WSCloseCode.GOING_AWAY, message=b"idle"),
                upstream.close(code=WSCloseCode.GOING_AWAY, message=b"idle"),
            )
            return
        culprit = end.culprit
        other: _Socket = upstream if culprit is client else client
        if end.too_big:
            code, reason = int(WSCloseCode.GOING_AWAY), ""
        elif end.code is not None:
            code, reason = _sendable(end.code), end.reason
        elif culprit is upstream:
            code, reason = int(WSCloseCode.BAD_GATEWAY), ""
        else:
            code, reason = int(WSCloseCode.GOING_AWAY), ""
        if not end.too_big:  # that side is closed already, with 1009
            await culprit.close(code=code, message=reason.encode())
        await other.close(code=code, message=reason.encode())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(source: _Socket, sink: _Socket, activity: _Activity) -> _End:
    """Copy frames until ``source`` closes, fails, or ``sink`` cannot take one."""
    while True:
        msg = await source.receive()
        activity.touch()
        try:
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return _End(source, int(msg.data), msg.extra or "")
            elif msg.type is WSMsgType.ERROR:
                error = msg.data
                too_big = (
                    isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG
                )
                return _End(source, None, "", too_big=too_big)
            else:  # CLOSING (we are closing it) or CLOSED
                return _End(source, None, "")
        except (ConnectionError, aiohttp.ClientError):
            return _End(sink, None, "")


def _sendable(code: int) -> int:
    if code in _NO_STATUS:
        return WSCloseCode.OK
    if code in _ABNORMAL or not 1000 <= code <= 4999:
        return WSCloseCode.BAD_GATEWAY
    return code
