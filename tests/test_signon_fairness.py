"""One client network cannot use up everyone's sign-on budget (issue #12, second round,
finding 10).

Registering a sign-on intent costs an outbound call, so the gate (``identity/intents.py``)
bounds them per client and per worker. The per-client bucket was per IPv4 address or IPv6
/64, and the worker-wide one was shared by everyone: one subscriber with an ordinary IPv6
/56 (256 /64s), or a few dozen IPv4 addresses in one /24, kept it empty, and every other
visitor who needed the sign-on redirect got 429. The invariant now: **whatever one network
(an IPv6 /48 or an IPv4 /24) sends, a visitor from another network is answered exactly as
if that network had sent nothing.** Fake clock, generated traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.identity import SignOnPurpose
from sidecar.identity.intents import IntentGate, SignOnLimited


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Registry:
    calls: list[str] = field(default_factory=list)

    async def __call__(self, purpose: SignOnPurpose, return_url: str) -> str:
        self.calls.append(return_url)
        return f"https://signon.example/{len(self.calls)}"


#: (seconds since the previous request, who: "victim" or an attacker address, URL number)
Traffic = list[tuple[float, str, int]]


async def replay(traffic: Traffic, victim: str) -> list[tuple[int, bool]]:
    """What the victim got for each of its requests: (its index, refused with 429)."""
    clock, registry = Clock(), Registry()
    gate = IntentGate(registry, clock=clock)
    answers: list[tuple[int, bool]] = []
    for n, (pause, who, url) in enumerate(traffic):
        clock.now += pause
        address = victim if who == "victim" else who
        # distinct URLs: nobody's request is answered from another's intent
        return_url = f"https://app.example/{who}/{url}/{n}"
        try:
            await gate.sign_on("enrol", return_url, address)
            refused = False
        except SignOnLimited:
            refused = True
        if who == "victim":
            answers.append((n, refused))
    return answers


def alone(traffic: Traffic) -> Traffic:
    """The same traffic without the attacker: its pauses kept, so the clock is the same."""
    out: Traffic = []
    carried = 0.0
    for pause, who, url in traffic:
        carried += pause
        if who == "victim":
            out.append((carried, who, url))
            carried = 0.0
    return out


def victim_outcomes(traffic: Traffic, victim: str) -> tuple[list[bool], list[bool]]:
    with_attack = [refused for _, refused in asyncio.run(replay(traffic, victim))]
    without = [refused for _, refused in asyncio.run(replay(alone(traffic), victim))]
    return with_attack, without


# ---- the attacker's reproducer ----------------------------------------------------------------


def flood(addresses: list[str], seconds: int) -> Traffic:
    """Each attacker address asks for a new URL every second; the victim once a second."""
    traffic: Traffic = []
    for second in range(seconds):
        for i, address in enumerate(addresses):
            traffic.append((1.0 if i == 0 else 0.0, address, second))
        traffic.append((0.0, "victim", second))
    return traffic


def test_one_ipv6_56_does_not_lock_out_everyone_else() -> None:
    attacker = [f"2001:db8:0:{i:x}::1" for i in range(256)]  # one /56, one address per /64
    with_attack, without = victim_outcomes(flood(attacker, 60), "2001:db8:ffff::7")
    assert with_attack == without
    assert with_attack.count(True) == without.count(True) < 60


def test_one_ipv4_24_does_not_lock_out_everyone_else() -> None:
    attacker = [f"203.0.113.{i}" for i in range(1, 255)]
    with_attack, without = victim_outcomes(flood(attacker, 60), "198.51.100.7")
    assert with_attack == without


def test_the_network_itself_is_bounded() -> None:
    """What one /48 gets, whatever its spread: far less than the whole worker's budget."""
    attacker = [str(ipaddress.IPv6Address(0x20010DB8 << 96 | i << 64 | 1)) for i in range(4096)]
    registry, clock = Registry(), Clock()

    async def run() -> None:
        gate = IntentGate(registry, clock=clock)
        for second in range(30):
            clock.now += 1
            for n, address in enumerate(attacker[second * 100 : second * 100 + 100]):
                with contextlib.suppress(SignOnLimited):
                    await gate.sign_on("enrol", f"https://a/{second}/{n}", address)

    asyncio.run(run())
    # the worker's 100 at once and 10 a second would be 390 in 30 s; a /48 gets its share
    assert len(registry.calls) <= 30 + 3 * 30, len(registry.calls)


# ---- generated traffic -------------------------------------------------------------------------

_attacker_v6 = st.builds(
    lambda a, b, c: str(ipaddress.IPv6Address((0x20010DB80042 << 80) | (a << 72) | (b << 64) | c)),
    st.integers(0, 255),  # the /56 inside the /48
    st.integers(0, 255),  # the /64 inside the /56
    st.integers(1, 2**16),
)
_attacker_v4 = st.builds(lambda a: f"203.0.113.{a}", st.integers(1, 254))


@st.composite
def traffic(draw: st.DrawFn) -> tuple[Traffic, str]:
    attacker = draw(st.sampled_from([_attacker_v6, _attacker_v4]))
    victim = draw(st.sampled_from(["198.51.100.7", "2001:db8:99::7", "203.0.114.9"]))
    events = draw(
        st.lists(
            st.tuples(
                st.floats(0, 2, allow_nan=False),
                st.one_of(st.just("victim"), attacker),
                st.integers(0, 5),
            ),
            max_size=300,
        )
    )
    return events, victim


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=traffic())
@example(case=(flood([f"2001:db8:42:{i:x}::1" for i in range(256)], 5), "198.51.100.7"))
def test_no_network_changes_what_another_visitor_gets(case: tuple[Traffic, str]) -> None:
    events, victim = case
    with_attack, without = victim_outcomes(events, victim)
    assert with_attack == without
