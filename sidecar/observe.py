"""What the status page shows that only the request path sees: the last refusals, the identity
backend's latency over the last five minutes, and its last error.

Bounded and cheap, since the request path feeds them: a refusal is one append to a ring of
50; a lookup the cache could not answer is one bucket increment (cache hits are never
observed). Latency is kept as a log-spaced histogram per 10-second slot, 30 slots, so that
workers' histograms can be added up by the supervisor and quantiles read from the sum.
No I/O, no event loop; the clock is passed in.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence

#: the refusals remembered
REFUSALS = 50
#: the latency window: SLOTS slots of SLOT_SECONDS each
SLOT_SECONDS = 10
SLOTS = 30
WINDOW_SECONDS = SLOT_SECONDS * SLOTS
#: histogram bounds in seconds: 0.5 ms to about 66 s, each 20 % above the one before (a
#: quantile is read to within that); an observation above the last falls in a last bucket
BOUNDS: tuple[float, ...] = tuple(0.0005 * 1.2**i for i in range(65))
#: decisions that are a refusal: the request did not reach the application
REFUSED = frozenset({"denied", "redirected", "unavailable", "error"})
#: the characters of a certificate's fingerprint shown (enough to find it in the access log)
FINGERPRINT_PREFIX = 16


class LatencyWindow:
    """Backend latencies of the last ``WINDOW_SECONDS``, as histograms per time slot."""

    __slots__ = ("_clock", "_counts", "_slots")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: slot number (time // SLOT_SECONDS) of what each ring position holds
        self._slots = [-1] * SLOTS
        self._counts = [[0] * (len(BOUNDS) + 1) for _ in range(SLOTS)]

    def observe(self, seconds: float) -> None:
        slot = int(self._clock() // SLOT_SECONDS)
        position = slot % SLOTS
        counts = self._counts[position]
        if self._slots[position] != slot:  # the ring came round: that slot is old
            self._slots[position] = slot
            for i in range(len(counts)):
                counts[i] = 0
        counts[bisect_left(BOUNDS, seconds)] += 1

    def histogram(self) -> list[int]:
        """The counts per bucket over the window (``BOUNDS``, then one above them)."""
        newest = int(self._clock() // SLOT_SECONDS)
        total = [0] * (len(BOUNDS) + 1)
        for slot, counts in zip(self._slots, self._counts, strict=True):
            if newest - SLOTS < slot <= newest:
                for i, count in enumerate(counts):
                    total[i] += count
        return total


def quantile(histogram: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a ``LatencyWindow`` histogram, in seconds: the upper bound of
    the bucket it falls in (None when the histogram is empty)."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for i, count in enumerate(histogram):
        running += count
        if running >= rank and count:
            return BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1]
    return BOUNDS[-1]


class Observations:
    """The request path's part of the status page (see the module's docstring)."""

    __slots__ = (
        "_wall",
        "last_error",
        "last_lookup_failed",
        "latency",
        "lookups",
        "refusals",
    )

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._wall = wall
        self.latency = LatencyWindow(clock)
        self.refusals: deque[dict[str, object]] = deque(maxlen=REFUSALS)
        #: (when, plain reason, the backend's code) of the last failed lookup
        self.last_error: tuple[float, str, str | None] | None = None
        self.last_lookup_failed = False
        self.lookups = 0

    def looked_up(self, seconds: float, failure: str | None, code: str | None) -> None:
        """A lookup the cache could not answer at once took ``seconds`` (``failure``: it
        failed, why)."""
        self.latency.observe(seconds)
        self.lookups += 1
        self.last_lookup_failed = failure is not None
        if failure is not None:
            self.last_error = (self._wall(), failure, code)

    def refused(
        self,
        *,
        method: str,
        status: int,
        route: str,
        decision: str,
        reason: str,
        verdict: str | None,
        sha256: str | None,
        request_id: str,
    ) -> None:
        """A request the sidecar answered itself instead of forwarding it. Only what the
        access log holds, and less: no address, no path, no subject."""
        self.refusals.append(
            {
                "time": self._wall(),
                "method": method,
                "status": status,
                "route": route,
                "decision": decision,
                "reason": reason,
                "verdict": verdict,
                "certificate": sha256[:FINGERPRINT_PREFIX] if sha256 else None,
                "request_id": request_id,
            }
        )
