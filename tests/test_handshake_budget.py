"""The worker's handshake budget (``handshakes.HandshakeScheduler``), with a fake loop and a
fake clock: which steps run in which turn of the loop, deterministically.

Each fake connection's step "costs" a fixed number of seconds on the fake clock. A turn of the
fake loop runs the callbacks scheduled before it began (as asyncio's ``call_soon`` does), then
what the test sends during it (the I/O of that turn).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import TLSConfig
from sidecar.handshakes import HandshakeScheduler

from .conftest import Certs
from .test_tls_transport import Clock as FakeClock
from .test_tls_transport import Conn as MemoryConn
from .test_tls_transport import Listener, client_ctx, socket_read, state, tls_files  # noqa: F401


class Conn(MemoryConn):
    def client_hello(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.client.do_handshake()
        self.to_server()

    def client_finish(self) -> None:
        self.client.do_handshake()
        self.to_server()


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def turn(self) -> None:
        """The callbacks scheduled before this turn (not those they schedule)."""
        due, self.soon = self.soon, []
        for callback in due:
            callback()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Step:
    def __init__(self, name: str, clock: Clock, log: list[str], cost: float = 0.001) -> None:
        self.name = name
        self.clock = clock
        self.log = log
        self.cost = cost
        self.ended = False
        self.reading = True

    def handshake_step(self) -> None:
        if self.ended:
            return
        assert self.reading, f"{self.name} stepped while not reading"
        self.clock.now += self.cost
        self.log.append(self.name)

    def handshake_deferred(self) -> None:
        self.reading = False

    def handshake_resumed(self) -> None:
        self.reading = True


def make(budget: float) -> tuple[FakeLoop, Clock, HandshakeScheduler, list[str]]:
    loop = FakeLoop()
    clock = Clock()
    scheduler = HandshakeScheduler(loop, budget, clock)
    return loop, clock, scheduler, []


def test_within_the_budget_a_step_runs_at_once() -> None:
    _, clock, scheduler, log = make(0.0025)
    a, b = Step("a", clock, log), Step("b", clock, log)
    scheduler.step(a)
    scheduler.step(b)
    assert log == ["a", "b"]
    assert scheduler.queued == 0 and scheduler.deferred == 0


def test_beyond_the_budget_steps_wait_for_later_turns_in_order() -> None:
    loop, clock, scheduler, log = make(0.0025)
    conns = [Step(f"c{i}", clock, log) for i in range(8)]
    for conn in conns:  # eight ClientHellos found ready in one turn
        scheduler.step(conn)
    assert log == ["c0", "c1", "c2"]  # 3 ms: the third step overran the 2.5 ms budget
    assert scheduler.queued == 5 and scheduler.deferred == 5
    assert not any(c.reading for c in conns[3:])  # queued connections are not read
    loop.turn()
    assert log[3:] == ["c3", "c4", "c5"]
    assert all(c.reading for c in conns[:6]) and not any(c.reading for c in conns[6:])
    loop.turn()
    assert log[6:] == ["c6", "c7"]
    assert scheduler.queued == 0
    loop.turn()  # the budget resets; nothing left
    assert loop.soon == []


def test_open_connections_are_served_between_turns() -> None:
    """What an open connection's read does in a turn runs before the next queued steps:
    at most one budget of handshake work (plus one step) lies between two of its turns."""
    loop, clock, scheduler, log = make(0.002)
    for i in range(20):
        scheduler.step(Step(f"h{i}", clock, log))
    turns = 0
    while scheduler.queued:
        before = clock.now
        loop.turn()
        log.append("hot")  # the hot client's request, read in the same turn's I/O
        turns += 1
        assert clock.now - before <= 0.002 + 0.001
    assert turns >= 6
    assert log.count("hot") == turns


def test_a_new_arrival_waits_behind_the_queue() -> None:
    """First come first served: a ClientHello arriving in a turn whose budget is not spent
    still waits behind the ones queued earlier."""
    loop, clock, scheduler, log = make(0.002)
    for i in range(4):
        scheduler.step(Step(f"early{i}", clock, log))
    assert scheduler.queued == 2
    loop.turn()  # early2, early3 run; the budget is spent
    late = Step("late", clock, log)
    scheduler.step(late)
    assert log[-1] == "early3" and scheduler.queued == 1
    loop.turn()
    assert log[-1] == "late"


def test_a_step_that_costs_more_than_the_budget_still_runs_one_per_turn() -> None:
    loop, clock, scheduler, log = make(0.001)
    conns = [Step(f"rsa{i}", clock, log, cost=0.005) for i in range(3)]
    for conn in conns:
        scheduler.step(conn)
    assert log == ["rsa0"]
    loop.turn()
    assert log == ["rsa0", "rsa1"]
    loop.turn()
    assert log == ["rsa0", "rsa1", "rsa2"]


def test_a_connection_that_ended_while_queued_is_skipped() -> None:
    loop, clock, scheduler, log = make(0.001)
    a, b, c = (Step(n, clock, log) for n in "abc")
    for conn in (a, b, c):
        scheduler.step(conn)
    b.ended = True  # its client_hello_timeout fired, or a reload aborted it
    loop.turn()
    loop.turn()
    assert log == ["a", "c"]
    assert scheduler.queued == 0


def test_no_budget_runs_every_step_at_once() -> None:
    loop, clock, scheduler, log = make(0.0)
    for i in range(50):
        scheduler.step(Step(f"c{i}", clock, log))
    assert len(log) == 50 and scheduler.queued == 0 and loop.soon == []


def test_a_reload_that_removes_the_budget_drains_the_queue_in_one_turn() -> None:
    loop, clock, scheduler, log = make(0.001)
    for i in range(10):
        scheduler.step(Step(f"c{i}", clock, log))
    assert scheduler.queued == 9
    scheduler.budget = 0.0
    scheduler.step(Step("new", clock, log))  # behind the queue, not ahead of it
    assert scheduler.queued == 10
    loop.turn()
    assert log == [f"c{i}" for i in range(10)] + ["new"]
    assert scheduler.queued == 0


def test_a_step_that_raises_does_not_lose_the_queue() -> None:
    loop, clock, scheduler, log = make(0.001)

    class Broken(Step):
        def handshake_step(self) -> None:
            super().handshake_step()
            raise RuntimeError("boom")

    scheduler.step(Step("a", clock, log))
    scheduler.step(Broken("b", clock, log))
    scheduler.step(Step("c", clock, log))
    with contextlib.suppress(RuntimeError):
        loop.turn()
    loop.turn()
    assert log == ["a", "b", "c"]


@settings(max_examples=200, deadline=None)
@given(
    budget=st.sampled_from([0.0, 0.0005, 0.001, 0.002, 0.01]),
    plan=st.lists(
        st.tuples(st.integers(0, 6), st.floats(0.0001, 0.004), st.booleans()),
        min_size=1,
        max_size=12,
    ),
)
def test_every_step_runs_once_in_arrival_order_and_each_turn_stays_bounded(
    budget: float, plan: list[tuple[int, float, bool]]
) -> None:
    """Whatever arrives, in any turns, at any cost: every live step runs exactly once, in the
    order it arrived; a turn's handshake work is at most the budget plus one step; the queue
    empties."""
    loop, clock, scheduler, log = make(budget)
    arrived: list[str] = []
    ended: set[str] = set()
    n = 0
    for arrivals, cost, end_one in plan:
        before = clock.now
        loop.turn()
        new: list[Any] = []
        for _ in range(arrivals):
            conn = Step(f"c{n}", clock, log, cost=cost)
            n += 1
            arrived.append(conn.name)
            new.append(conn)
            scheduler.step(conn)
        if end_one and new:
            new[-1].ended = True
            if new[-1].name not in log:
                ended.add(new[-1].name)
        if budget > 0:
            assert clock.now - before <= budget + 2 * 0.004 + 1e-9
    for _ in range(1000):
        if not scheduler.queued:
            break
        loop.turn()
    assert scheduler.queued == 0
    assert log == [name for name in arrived if name not in ended]


# ---- TLSProtocol under a budget: real TLS over memory BIOs, fake TCP and clocks -----------------


def budgeted(listener: Listener) -> FakeClock:
    """Give ``listener`` a budget so small that every step after the first in a turn waits."""
    turns = FakeClock()
    listener.handshakes = HandshakeScheduler(turns, 1e-9, time.perf_counter)
    return turns


def test_queued_handshakes_are_not_read_and_complete_in_order(
    tls_files: TLSConfig,  # noqa: F811
    certs: Certs,
    tmp_path: Path,
) -> None:
    listener = Listener(state(tls_files))
    turns = budgeted(listener)
    conns = [Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path)) for _ in range(3)]
    for conn in conns:  # three ClientHellos in one turn
        conn.client_hello()

    def answered() -> list[bool]:
        return [bool(c.tcp.written) for c in conns]

    def reading() -> list[bool]:
        return [c.tcp.reading for c in conns]

    assert answered() == [True, False, False], "only the first ClientHello is answered at once"
    assert listener.handshakes.queued == 2
    assert listener.metrics.tls_handshakes_deferred._value.get() == 2
    third = conns[2]
    # a queued connection that receives more than a handshake flight is no longer read
    socket_read(third.tls, b"\x17\x03\x03\x40\x00" + b"x" * 70000)
    assert reading() == [True, True, False]
    turns.run_soon()
    assert answered() == [True, True, False] and reading() == [True, True, False]
    turns.run_soon()
    assert reading() == [True, True, True], "read again when its turn comes"
    assert listener.handshakes.queued == 0
    for conn in conns[:2]:
        # the client's second flight; it may wait a turn too
        conn.to_client()
        conn.client_finish()
        for _ in range(4):
            turns.run_soon()
        assert conn.listener.apps and conn.tls.handshaking is False
    assert len(listener.apps) == 2 and listener.failures == 1  # the third, its junk
    assert third.tcp.end() != "", "its junk ended the handshake"


def test_a_queued_handshake_still_times_out(
    tls_files: TLSConfig,  # noqa: F811
    certs: Certs,
    tmp_path: Path,
) -> None:
    """The ClientHello deadline keeps running while the step waits; a step whose connection
    ended meanwhile does nothing."""
    listener = Listener(state(tls_files))
    turns = budgeted(listener)
    a = Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))
    b = Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))
    a.client_hello()
    b.client_hello()
    assert listener.handshakes.queued == 1
    b.clock.advance(listener.limits.client_hello_timeout)
    assert b.tcp.end() == "aborted" and listener.failures == 1
    turns.run_soon()
    assert not b.tcp.written, "no TLS work for a connection that timed out"
    assert listener.handshakes.queued == 0
    # and the handshake deadline after the hello
    c = Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))
    c.client_hello()
    turns.run_soon()
    assert c.tcp.written
    c.clock.advance(listener.limits.handshake_timeout)
    assert c.tcp.end() == "aborted" and listener.failures == 2


def test_an_aborted_queued_handshake_is_skipped(
    tls_files: TLSConfig,  # noqa: F811
    certs: Certs,
    tmp_path: Path,
) -> None:
    """A reload that changes trust aborts handshakes under way, queued ones included."""
    listener = Listener(state(tls_files))
    turns = budgeted(listener)
    a = Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))
    b = Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))
    a.client_hello()
    b.client_hello()
    b.tls.abort()
    turns.run_soon()
    assert b.tcp.end() == "aborted" and not b.tcp.written
