"""Flow control without sockets: ``flow.FlowControl`` on a fake clock, and the listener's
``ClientConnection`` on a fake transport that plays asyncio's write-buffer water marks.

The invariant under test: while a connection's write buffer is above its high-water mark,
the connection neither starts another request nor reads more input; reading resumes only
when nothing holds it; a client that takes too little for ``send_timeout`` is cut off.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.flow import PIPELINE, WRITING, FlowControl
from sidecar.http1.client import ClientConnection

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .test_limits import request

# ---- a fake clock and transport --------------------------------------------------------------


class ClockLoop(asyncio.AbstractEventLoop):
    """Only what ``FlowControl`` asks of a loop: the time, timers (fired by ``advance``), and
    futures (from the running loop)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        self.timers.append(handle)
        return handle

    def get_debug(self) -> bool:
        return False

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = [h for h in self.timers if not h.cancelled() and h.when() <= self.now]
            if not due:
                return
            handle = min(due, key=lambda h: h.when())
            self.timers.remove(handle)
            handle._run()

    def armed(self) -> int:
        return sum(1 for h in self.timers if not h.cancelled())


class Switch:
    """A transport's reading switch and ``abort``, recorded."""

    def __init__(self) -> None:
        self.reading = True
        self.calls: list[str] = []
        self.aborted = False

    def pause_reading(self) -> None:
        self.calls.append("pause")
        self.reading = False

    def resume_reading(self) -> None:
        self.calls.append("resume")
        self.reading = True

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def clock() -> ClockLoop:
    return ClockLoop()  # type: ignore[abstract]  # the rest of a loop is not used


def flow_on(clock: ClockLoop, send_timeout: float = 60.0) -> tuple[FlowControl, Switch]:
    flow = FlowControl(clock, send_timeout)
    switch = Switch()
    flow.attach(switch, switch)
    return flow, switch


# ---- FlowControl --------------------------------------------------------------------------


def test_reading_resumes_only_when_no_reason_holds_it(clock: ClockLoop) -> None:
    flow, switch = flow_on(clock)
    flow.hold(PIPELINE)
    flow.pause_writing()
    flow.hold(PIPELINE)  # held already: nothing more
    assert switch.calls == ["pause"]
    flow.resume_writing()
    assert switch.calls == ["pause"]  # the pipeline still holds it
    flow.release(PIPELINE)
    assert switch.calls == ["pause", "resume"]
    flow.release(WRITING)  # not held: nothing
    assert switch.calls == ["pause", "resume"]


def test_client_that_takes_nothing_is_aborted_after_send_timeout(clock: ClockLoop) -> None:
    flow, switch = flow_on(clock, send_timeout=60)
    flow.pause_writing()
    clock.advance(59.9)
    assert not switch.aborted
    clock.advance(0.2)
    assert switch.aborted


def test_each_pause_has_send_timeout_of_its_own(clock: ClockLoop) -> None:
    flow, switch = flow_on(clock, send_timeout=60)
    flow.pause_writing()
    clock.advance(30)
    flow.resume_writing()  # the client took enough
    clock.advance(20)
    flow.pause_writing()  # at 50 s: the deadline is now 110 s
    clock.advance(50)  # 100 s: the first pause's deadline (60 s) is long past
    assert not switch.aborted
    assert clock.armed() == 1  # one timer, moved lazily
    clock.advance(10.1)
    assert switch.aborted


def test_a_client_that_drains_in_time_is_never_aborted(clock: ClockLoop) -> None:
    flow, switch = flow_on(clock, send_timeout=5)
    for _ in range(100):  # a large download: pauses and resumes all along
        flow.pause_writing()
        clock.advance(1)
        flow.resume_writing()
    clock.advance(100)
    assert not switch.aborted
    assert clock.armed() == 0


def test_close_ends_the_deadline_and_the_reading_calls(clock: ClockLoop) -> None:
    flow, switch = flow_on(clock, send_timeout=1)
    flow.pause_writing()
    flow.close()
    clock.advance(10)
    assert not switch.aborted
    flow.resume_writing()  # late callbacks after the connection is lost do nothing
    assert switch.calls == ["pause"]


def test_detach_lets_go_of_reading(clock: ClockLoop) -> None:
    flow, switch = flow_on(clock, send_timeout=1)
    flow.hold(PIPELINE)
    flow.detach()
    assert switch.calls == ["pause", "resume"]
    clock.advance(10)
    assert not switch.aborted


async def test_drain_waits_for_resume_and_fails_once_closed(clock: ClockLoop) -> None:
    flow, _ = flow_on(clock)
    await flow.drain()  # not paused: at once
    flow.pause_writing()
    waiting = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    assert not waiting.done()
    flow.resume_writing()
    await asyncio.wait_for(waiting, 1)
    flow.pause_writing()
    waiting = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    flow.close()  # the connection is lost (or aborted for send_timeout)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiting, 1)


# ---- ClientConnection on a fake transport -------------------------------------------------


class FakeTransport:
    """A client transport with asyncio's flow control: ``pause_writing`` once more than
    ``high`` bytes are buffered, ``resume_writing`` once ``take`` leaves at most ``low``."""

    def __init__(self, protocol: asyncio.Protocol, *, high: int, low: int) -> None:
        self.protocol = protocol
        self.high, self.low = high, low
        self.buffer = bytearray()
        self.written = bytearray()
        self.paused = False
        self.reading = True
        self.closing = False
        self.aborted = False
        #: bytes held by the listener each time it resumed reading
        self.resumed_with: list[int] = []

    # asyncio.Transport, as far as the listener uses it
    def write(self, data: bytes) -> None:
        assert not self.closing
        self.buffer += data
        self.written += data
        if not self.paused and len(self.buffer) > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        held = self.protocol._buffer  # type: ignore[attr-defined]
        self.resumed_with.append(len(held))

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self.aborted = True
        self._end()

    def _end(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.Protocol:
        return self.protocol

    # the client
    def take(self) -> None:
        """The client reads everything written so far."""
        self.buffer.clear()
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def paths(self) -> list[str]:
        """The paths the forwarded answers (conftest's echo upstream) name, in order."""
        return re.findall(r'"path": "([^"]*)"', self.written.decode("latin-1"))

    def statuses(self) -> list[int]:
        return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.written)]


async def start(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream, send_timeout: str
) -> Running:
    data = config_dir.base(upstream.port)
    data["limits"] = {"send_timeout": send_timeout}
    result: Running = await start_sidecar(data)
    return result


@pytest.fixture
async def running(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    # long enough never to strike in these tests but the one that waits for it
    return await start(start_sidecar, config_dir, upstream, "60s")


def attach(running: Running, *, high: int, low: int) -> tuple[ClientConnection, FakeTransport]:
    listener = running.sidecar._listener
    assert listener is not None
    conn = listener.protocol()  # the HTTP protocol, as the TLS layer makes it after a handshake
    transport = FakeTransport(conn, high=high, low=low)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


async def quiet(check: Callable[[], bool] = lambda: False, rounds: int = 200) -> None:
    """Let the loop run until ``check`` holds, or until nothing happened for a while."""
    for _ in range(rounds):
        if check():
            return
        await asyncio.sleep(0.005)


async def test_no_request_starts_while_the_client_takes_nothing(
    running: Running, upstream: Upstream
) -> None:
    conn, transport = attach(running, high=4096, low=1024)
    paths = [f"/public/p{i}" for i in range(60)]
    conn.data_received(b"".join(request(p) for p in paths))
    await quiet(lambda: transport.paused)
    assert transport.paused
    await quiet()  # nothing more happens while the answers are not taken
    answered = len(transport.statuses())
    assert 0 < answered < len(paths)
    assert len(upstream.seen) == answered  # no request started upstream meanwhile
    assert not transport.reading
    while len(transport.paths()) < len(paths):  # the client reads, now and then
        assert not transport.closing
        transport.take()
        await quiet(lambda: transport.paused or len(transport.paths()) == len(paths))
    assert transport.paths() == paths  # all of them, in order
    assert [s.raw_path for s in upstream.seen] == paths
    assert transport.is_reading() and not transport.aborted


async def test_own_answers_stop_too_while_the_client_takes_nothing(running: Running) -> None:
    conn, transport = attach(running, high=4096, low=1024)
    conn.data_received(request("/app/x") * 200)  # no certificate: 401 each, no upstream
    await quiet(lambda: transport.paused)
    await quiet()
    answered = transport.statuses()
    assert set(answered) == {401} and len(answered) < 200
    assert not transport.reading
    transport.take()
    await quiet(lambda: transport.paused)
    assert len(transport.statuses()) > len(answered)


async def test_client_that_takes_nothing_is_cut_off_after_send_timeout(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(start_sidecar, config_dir, upstream, "1s")
    conn, transport = attach(running, high=4096, low=1024)
    conn.data_received(request("/app/x") * 200)
    await quiet(lambda: transport.paused)
    await quiet(lambda: transport.aborted, rounds=2000)  # send_timeout: 1 s
    assert transport.aborted
    assert running.sidecar._listener is not None
    await quiet(lambda: conn not in running.sidecar._listener.clients)  # type: ignore[union-attr]
    assert conn not in running.sidecar._listener.clients


async def test_reading_resumes_only_once_the_pipeline_is_short(
    running: Running, upstream: Upstream
) -> None:
    conn, transport = attach(running, high=1 << 30, low=1 << 29)  # writes never back up
    pad = "X-Pad: " + "p" * 1000
    count = 600  # about 600 KiB pipelined: over the 256 KiB held behind a request in flight
    conn.data_received(b"".join(request(f"/public/m/{i}", pad) for i in range(count)))
    await asyncio.sleep(0)
    assert not transport.reading  # more than the limit behind the request in flight
    await quiet(lambda: len(transport.paths()) == count, rounds=2000)
    assert len(transport.paths()) == count
    assert transport.resumed_with, "reading never resumed"
    assert max(transport.resumed_with) <= 256 * 1024, transport.resumed_with
    assert transport.reading
