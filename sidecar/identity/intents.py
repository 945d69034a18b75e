"""Bounds on sign-on redirects: each one may cost an outbound call (an Identity Plus intent).

``IntentGate`` stands between the handler and a backend's ``sign_on``. A sign-on URL made for
a purpose and return URL is reused for ``REUSE_FOR`` seconds (an Identity Plus intent lives
about 30 s: the margin leaves a browser sent there at the last moment time to arrive), and
concurrent requests for it share one call. New calls are rate limited by token buckets, one
for each network a client belongs to and one for the whole worker: its address (an IPv6 /64,
which one subscriber usually holds whole), its IPv6 /56 (a subscriber's usual delegation),
and its IPv4 /24 or IPv6 /48 (a site, or a provider's block). A network's rate is a small
share of the worker's, so no one network can use up the budget everyone else signs on with.
A request over any limit raises ``SignOnLimited`` (the handler answers 429 with
``Retry-After``). Tables are bounded; the clock is passed in, so tests need no sleeping.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import SignOnPurpose

#: seconds a sign-on URL is reused for the same purpose and return URL
REUSE_FOR = 20.0


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket: ``burst`` calls at once, then ``per_second``."""

    burst: int
    per_second: float


#: per client address: a person signs on once, a page that fails a few more times; an office
#: behind one address gets 20 at once and 20 a minute
PER_ADDRESS = Rate(burst=20, per_second=1 / 3)
#: per IPv6 /56, what a provider delegates to one subscriber: its 256 /64s share this
PER_SUBSCRIBER = Rate(burst=20, per_second=1.0)
#: per IPv4 /24 and IPv6 /48. A network and one visitor elsewhere together stay within
#: OVERALL (30 + 20 < 100 at once, 3 + 1/3 < 10 a second), so whatever one network sends,
#: every other visitor is answered as if it had sent nothing
PER_NETWORK = Rate(burst=30, per_second=3.0)
#: per worker, whatever the addresses: bounds the calls any number of clients can cause
OVERALL = Rate(burst=100, per_second=10.0)
#: buckets remembered, addresses and networks together (the least recently used are forgotten:
#: a forgotten bucket starts full again; a network's is used by each of its addresses' calls)
MAX_ADDRESSES = 10_000
#: sign-on URLs remembered for reuse, and the longest return URL remembered (bytes held)
MAX_URLS = 2048
MAX_URL_LENGTH = 2048

Register = Callable[[SignOnPurpose, str], Awaitable[str]]
_Key = tuple[SignOnPurpose, str]


class SignOnLimited(Exception):
    """Too many sign-on calls from this address (or in all): try again in ``retry_after`` s."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"sign-on rate limited, retry after {retry_after} s")


@dataclass(frozen=True, slots=True)
class SignOn:
    """Where to send the browser; ``coalesced`` when no new call was made for it."""

    location: str
    coalesced: bool


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at

    def refill(self, rate: Rate, now: float) -> float:
        self.tokens = min(float(rate.burst), self.tokens + (now - self.at) * rate.per_second)
        self.at = now
        return self.tokens


def _address(client_ip: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not client_ip:
        return None
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_key(client_ip: str | None) -> str:
    """The bucket an address counts against: itself (IPv4, or the IPv4 in an IPv4-mapped
    IPv6 address), its /64 (IPv6), or one shared bucket when unknown."""
    address = _address(client_ip)
    if address is None:
        return ""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def network_keys(client_ip: str | None) -> tuple[str, ...]:
    """The networks an address belongs to, widest last: its IPv4 /24, or its IPv6 /56 and /48
    (none when unknown: the one shared address bucket is all there is)."""
    address = _address(client_ip)
    if address is None:
        return ()
    if isinstance(address, ipaddress.IPv6Address):
        return (
            str(ipaddress.IPv6Network((address, 56), strict=False)),
            str(ipaddress.IPv6Network((address, 48), strict=False)),
        )
    return (str(ipaddress.IPv4Network((address, 24), strict=False)),)


class IntentGate:
    """Coalesces and rate-limits calls to ``register`` (a backend's ``sign_on``)."""

    def __init__(
        self,
        register: Register,
        *,
        clock: Callable[[], float] = time.monotonic,
        reuse_for: float = REUSE_FOR,
        per_address: Rate = PER_ADDRESS,
        per_subscriber: Rate = PER_SUBSCRIBER,
        per_network: Rate = PER_NETWORK,
        overall: Rate = OVERALL,
        max_addresses: int = MAX_ADDRESSES,
        max_urls: int = MAX_URLS,
    ) -> None:
        self._register = register
        self._clock = clock
        self._reuse_for = reuse_for
        self._per_address = per_address
        self._per_subscriber = per_subscriber
        self._per_network = per_network
        self._overall_rate = overall
        self._max_addresses = max_addresses
        self._max_urls = max_urls
        self._overall = _Bucket(float(overall.burst), clock())
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        #: (purpose, return URL) -> (location, when it stops being reused), oldest first
        self._recent: OrderedDict[_Key, tuple[str, float]] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[str]] = {}

    @property
    def remembered_addresses(self) -> int:
        return len(self._buckets)

    @property
    def remembered_urls(self) -> int:
        return len(self._recent)

    async def sign_on(
        self,
        purpose: SignOnPurpose,
        return_url: str,
        client_ip: str | None,
        *,
        shared: bool = True,
    ) -> SignOn:
        """The sign-on URL for ``return_url``: reused, shared, or from a new call.

        ``shared=False`` always makes a new call (rate limited all the same) and remembers
        nothing: for a sign-on whose reference comes back as the proof of who signed on
        (HTTP legacy), where a visitor handed another's sign-on URL could take their identity.

        Raises ``SignOnLimited`` when a new call is needed and a rate forbids it, and
        whatever ``register`` raises (``IdentityUnavailable``) to every request sharing it.
        """
        key: _Key = (purpose, return_url)
        now = self._clock()
        if not shared:
            self._take(address_key(client_ip), now)
            return SignOn(await self._register(purpose, return_url), False)
        recent = self._recent.get(key)
        if recent is not None:
            if recent[1] > now:
                return SignOn(recent[0], True)
            del self._recent[key]
        task = self._inflight.get(key)
        if task is not None:
            return SignOn(await asyncio.shield(task), True)
        self._take(client_ip, now)
        task = asyncio.get_running_loop().create_task(self._call(key, now))
        self._inflight[key] = task
        task.add_done_callback(functools.partial(self._done, key))
        return SignOn(await asyncio.shield(task), False)

    def _take(self, client_ip: str | None, now: float) -> None:
        """One token from every bucket the address counts against (its own, its networks',
        the worker's), or ``SignOnLimited`` (and none taken)."""
        networks = network_keys(client_ip)
        # IPv6: /56 then /48; IPv4: its /24; an unknown address: none
        rates = (self._per_subscriber, self._per_network)[-len(networks) :] if networks else ()
        levels = [(self._bucket(address_key(client_ip), now), self._per_address)]
        levels += [
            (self._bucket(key, now), rate) for key, rate in zip(networks, rates, strict=True)
        ]
        levels.append((self._overall, self._overall_rate))
        wait = 0.0
        for bucket, rate in levels:
            tokens = bucket.refill(rate, now)
            if tokens < 1.0:
                wait = max(wait, (1.0 - tokens) / rate.per_second)
        if wait > 0.0:
            raise SignOnLimited(max(1, math.ceil(wait - 1e-9)))
        for bucket, _ in levels:
            bucket.tokens -= 1.0

    def _bucket(self, key: str, now: float) -> _Bucket:
        """The bucket for an address or a network, made full when new (or forgotten)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            # Full for whichever rate it has: refill() caps it at that rate's burst.
            bucket = self._buckets[key] = _Bucket(float("inf"), now)
            while len(self._buckets) > self._max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    async def _call(self, key: _Key, started: float) -> str:
        location = await self._register(key[0], key[1])
        if len(key[1]) <= MAX_URL_LENGTH:
            self._remember(key, location, started + self._reuse_for)
        return location

    def _remember(self, key: _Key, location: str, until: float) -> None:
        recent = self._recent
        recent.pop(key, None)
        now = self._clock()
        # Oldest first: drop what has expired, and the oldest beyond the bound.
        while recent and (len(recent) >= self._max_urls or next(iter(recent.values()))[1] <= now):
            recent.popitem(last=False)
        recent[key] = (location, until)

    def _done(self, key: _Key, task: asyncio.Task[str]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone
