"""What a trust report must pass before it is queued: not a duplicate, and within the rates.

Pure bookkeeping on a clock passed in (no event loop, no I/O): the same report (kind,
certificate, subject) is not accepted while one like it is pending, nor within the dedupe
window after one like it went through; reports are rate limited by token buckets, per
certificate and overall. Every table is bounded.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from .intents import Rate

#: (kind, certificate key, subject): what makes two reports the same report
ReportKey = tuple[str, str, str]

#: certificates whose bucket is remembered, reports remembered for deduplication
MAX_BUCKETS = 10_000
MAX_RECENT = 10_000


class Bucket:
    """A token bucket's state; the ``Rate`` is the caller's."""

    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at

    def refill(self, rate: Rate, now: float) -> float:
        self.tokens = min(float(rate.burst), self.tokens + (now - self.at) * rate.per_second)
        self.at = now
        return self.tokens

    def take(self, rate: Rate, now: float) -> bool:
        """One token if there is one."""
        tokens = self.refill(rate, now)
        if tokens < 1.0:
            return False
        self.tokens = tokens - 1.0
        return True


def per_minute(count: int) -> Rate:
    """``count`` at once, then ``count`` a minute."""
    return Rate(burst=count, per_second=count / 60.0)


class ReportGate:
    """Deduplication and rate limits for trust reports (see the module's docstring)."""

    def __init__(
        self,
        *,
        per_certificate: Rate,
        overall: Rate,
        dedupe_window: float,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
        max_recent: int = MAX_RECENT,
    ) -> None:
        self._clock = clock
        self._max_buckets = max_buckets
        self._max_recent = max_recent
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        self._pending: set[ReportKey] = set()
        self._recent: OrderedDict[ReportKey, float] = OrderedDict()
        self.configure(
            per_certificate=per_certificate, overall=overall, dedupe_window=dedupe_window
        )
        self._overall = Bucket(float(overall.burst), clock())

    def configure(self, *, per_certificate: Rate, overall: Rate, dedupe_window: float) -> None:
        """New rates and window (a reload); the buckets keep their tokens."""
        self.per_certificate = per_certificate
        self.overall = overall
        self.dedupe_window = dedupe_window

    @property
    def remembered(self) -> tuple[int, int]:
        """(certificates with a bucket, reports remembered for deduplication)"""
        return len(self._buckets), len(self._recent)

    def duplicate(self, key: ReportKey) -> str | None:
        """Why ``key`` is a duplicate now, or None."""
        if key in self._pending:
            return "the same report is pending"
        until = self._recent.get(key)
        if until is not None and until > self._clock():
            return "the same report was made within identity.identityplus.reports.dedupe_window"
        return None

    def take(self, certificate: str) -> int | None:
        """One token from ``certificate``'s bucket and the overall one, or, when either has
        none, the whole seconds until both would (and no token is taken)."""
        now = self._clock()
        bucket = self._buckets.get(certificate)
        if bucket is None:
            bucket = self._buckets[certificate] = Bucket(float(self.per_certificate.burst), now)
            while len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(certificate)
        mine = bucket.refill(self.per_certificate, now)
        everyone = self._overall.refill(self.overall, now)
        if mine >= 1.0 and everyone >= 1.0:
            bucket.tokens = mine - 1.0
            self._overall.tokens = everyone - 1.0
            return None
        wait = max(
            (1.0 - mine) / self.per_certificate.per_second if mine < 1.0 else 0.0,
            (1.0 - everyone) / self.overall.per_second if everyone < 1.0 else 0.0,
        )
        return max(1, math.ceil(wait - 1e-9))

    def pending(self, key: ReportKey) -> None:
        self._pending.add(key)

    def ended(self, key: ReportKey, *, done: bool) -> None:
        """The report ``key`` ended; ``done``: Identity Plus holds it now, so the same report
        is a duplicate for the window. A bind and an unbind of one user undo each other: each
        forgets the other, so that bind, unbind, bind again all go out."""
        self._pending.discard(key)
        if not done:
            return
        kind, certificate, subject = key
        if kind in ("bind", "unbind"):
            other = "unbind" if kind == "bind" else "bind"
            self._recent.pop((other, certificate, subject), None)
        recent = self._recent
        now = self._clock()
        recent.pop(key, None)
        # Oldest first: drop what has expired, and the oldest beyond the bound.
        while recent and (len(recent) >= self._max_recent or next(iter(recent.values())) <= now):
            recent.popitem(last=False)
        recent[key] = now + self.dedupe_window
