"""The verdict cache: remembers what the backend said about each certificate, for a while.

Entries are keyed by the certificate's SHA-256 fingerprint (never a serial's text, which
arrives in several spellings), bounded by LRU, and expire on a clock passed in, so the
bookkeeping is testable without sleeping. Concurrent lookups for one certificate share one
backend call (single-flight); lookups for different certificates never wait for each other.
With ``identity.cache.shared``, a miss here asks the shared level (``shared``) before the
backend; a hit here never does. Sign-on URLs are remembered too, for a while (``intents``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..certs import ClientCert, normalize_fingerprint
from ..config import CacheConfig
from ..errors import IdentityUnavailable
from . import Backend, LookupContext, SignOnPurpose, Verdict
from .intents import IntentGate, SignOn

if TYPE_CHECKING:
    from .shared.store import DenySink


@dataclass(slots=True)
class _Entry:
    verdict: Verdict
    #: clock time after which the verdict is no longer fresh
    expires: float
    serial: int


class SharedLevel(Protocol):
    """The cache shared by every replica (``shared.store.SharedCache``), as this one uses it."""

    def attach(self, local: VerdictCache) -> None: ...

    async def start(self) -> None: ...

    async def fetch(
        self,
        sha256: str,
        ask: Callable[[], Awaitable[Verdict]],
        ttl_for: Callable[[Verdict], float],
        still_wanted: Callable[[], bool],
    ) -> tuple[Verdict, float | None]: ...

    async def publish_purge(
        self, *, sha256: str | None = None, serial: int | None = None
    ) -> bool: ...

    def attach_deny(self, sink: DenySink) -> None: ...

    #: told of each denial sent to the fleet late (made while Redis was unavailable)
    on_shared_late: Callable[[str, str], None] | None
    #: which fleet (the deny set's Redis and key)
    fleet_id: str

    def restore_denied(self, sha256: str, *, sent: bool) -> None: ...

    def forget_restored(self, sha256: str) -> bool: ...

    async def publish_deny(self, sha256: str, *, add: bool) -> bool: ...

    async def close(self) -> None: ...


class CacheStats:
    """Counters for the metrics module; they only ever grow (``size`` aside).

    ``misses`` counts lookups not answered from a fresh entry; ``coalesced`` counts those of
    them that joined a backend call already in flight, so backend calls = misses - coalesced.
    """

    __slots__ = ("_size", "coalesced", "evictions", "failures", "hits", "misses", "stale_served")

    def __init__(self, size: Callable[[], int]) -> None:
        self._size = size
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.stale_served = 0
        #: backend calls that raised (IdentityUnavailable or anything else)
        self.failures = 0
        #: entries dropped to stay within max_entries
        self.evictions = 0

    @property
    def size(self) -> int:
        return self._size()

    def __repr__(self) -> str:
        return (
            f"CacheStats(size={self.size}, hits={self.hits}, misses={self.misses}, "
            f"coalesced={self.coalesced}, stale_served={self.stale_served}, "
            f"failures={self.failures}, evictions={self.evictions})"
        )


class VerdictCache:
    """A ``Backend`` in front of a ``Backend``: same calls, remembered answers.

    - Allowing verdicts are kept for ``ttl``, refusals for ``negative_ttl``; a backend's own
      ``Verdict.ttl`` may shorten that, never lengthen it: the configured ttl is the
      operator's bound on how late a revocation is noticed. ``validate`` verdicts are never
      kept, and one drops the entry: after validation the certificate must be asked about
      again.
    - With ``stale_if_error``, an allowing verdict that expired less than that long ago is
      served (marked ``stale=True``) while the backend raises ``IdentityUnavailable``; a
      refusal is never served stale. Otherwise the error propagates: fail closed.
    - A failed backend call is never cached; every lookup waiting on it gets the exception.
    - The shared backend call is shielded: a waiter that is cancelled (its client went away)
      does not cancel the call for the others, and its answer is still stored.
    - A backend call that started before a ``purge``/``forget`` does not store its answer.
    - With a ``shared`` level, a miss asks it first: a verdict found there is kept for what
      remains of its ttl there (never longer), and the backend is asked by one replica of the
      fleet at a time (``SharedCache.fetch``). Purges from other replicas arrive through it.
    """

    def __init__(
        self,
        backend: Backend,
        config: CacheConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedLevel | None = None,
    ) -> None:
        self.backend = backend
        self.shared = shared
        self._ttl = config.ttl
        self._negative_ttl = config.negative_ttl
        self._stale_if_error = config.stale_if_error
        self._max_entries = config.max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        #: integer serial → fingerprints, for purge by serial (two issuers may share a serial)
        self._by_serial: dict[int, set[str]] = {}
        self._inflight: dict[str, asyncio.Task[Verdict]] = {}
        #: bumped by every purge/forget; an answer fetched across one is not stored
        self._generation = 0
        self.stats = CacheStats(self._entries.__len__)
        #: the backend's sign-on calls, coalesced and rate limited
        self.intents = IntentGate(self._backend_sign_on)
        if shared is not None:
            shared.attach(self)

    async def start(self) -> None:
        """Connect the shared level, if any (the sidecar starts with or without it)."""
        if self.shared is not None:
            await self.shared.start()

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def can_enrol(self) -> bool:
        return self.backend.can_enrol

    def __len__(self) -> int:
        return len(self._entries)

    # ---- the request path -----------------------------------------------------------------

    def peek(self, cert: ClientCert) -> Verdict | None:
        """A fresh cached verdict, or None: the synchronous fast path (a dict get, a compare)."""
        entry = self._entries.get(cert.sha256)
        if entry is None or entry.expires <= self._clock():
            return None
        self._entries.move_to_end(cert.sha256)
        self.stats.hits += 1
        return entry.verdict

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        """The verdict for ``cert``: cached, or from the backend (one call per certificate).

        Raises ``IdentityUnavailable`` when the backend fails and no stale verdict may be
        served. Concurrent callers share the first caller's backend call (and its context).
        """
        verdict = self.peek(cert)
        if verdict is not None:
            return verdict
        self.stats.misses += 1
        key = cert.sha256
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch(cert, context), name=f"verdict-{key[:16]}"
            )
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._fetch_done, key))
        else:
            self.stats.coalesced += 1
        return await asyncio.shield(task)

    async def _fetch(self, cert: ClientCert, context: LookupContext) -> Verdict:
        generation = self._generation
        shared = self.shared
        remaining: float | None = None
        if shared is None:
            verdict = await self._ask(cert, context)
        else:
            verdict, remaining = await shared.fetch(
                cert.sha256,
                functools.partial(self._ask, cert, context),
                self.ttl_for,
                functools.partial(self._unchanged_since, generation),
            )
        if generation == self._generation and not verdict.stale:
            self._store(cert, verdict, remaining)
        return verdict

    async def _ask(self, cert: ClientCert, context: LookupContext) -> Verdict:
        """The backend's verdict; or, when it fails, a stale one if ``stale_if_error`` allows
        (``stale=True``: never stored again); otherwise its error."""
        try:
            return await self.backend.lookup(cert, context)
        except IdentityUnavailable:
            self.stats.failures += 1
            stale = self._stale(cert.sha256)
            if stale is None:
                raise
            self.stats.stale_served += 1
            return stale
        except Exception:
            self.stats.failures += 1
            raise

    def _unchanged_since(self, generation: int) -> bool:
        return generation == self._generation

    def ttl_for(self, verdict: Verdict) -> float:
        """How long ``verdict`` may be kept: the configured ttl for its kind, shortened (never
        lengthened) by the backend's own ``ttl``."""
        ttl = self._ttl if verdict.kind == "allow" else self._negative_ttl
        if verdict.ttl is not None:
            ttl = max(0.0, min(ttl, verdict.ttl))
        return ttl

    def _fetch_done(self, key: str, task: asyncio.Task[Verdict]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        # Every waiter may have been cancelled: retrieve the exception so that asyncio does
        # not report it as never retrieved.
        if not task.cancelled():
            task.exception()

    def _stale(self, key: str) -> Verdict | None:
        entry = self._entries.get(key)
        if entry is None or entry.verdict.kind != "allow":
            return None
        if self._clock() - entry.expires >= self._stale_if_error:
            return None
        return dataclasses.replace(entry.verdict, stale=True)

    def _store(self, cert: ClientCert, verdict: Verdict, remaining: float | None = None) -> None:
        key = cert.sha256
        if verdict.kind == "validate":
            self._remove(key)
            return
        ttl = self.ttl_for(verdict)
        if remaining is not None:
            ttl = min(ttl, remaining)
        keep_for_stale = verdict.kind == "allow" and self._stale_if_error > 0
        if ttl <= 0 and not keep_for_stale:
            self._remove(key)
            return
        self._remove(key)
        self._entries[key] = _Entry(verdict, self._clock() + ttl, cert.serial)
        self._by_serial.setdefault(cert.serial, set()).add(key)
        while len(self._entries) > self._max_entries:
            old_key, old = self._entries.popitem(last=False)
            self._unindex(old_key, old.serial)
            self.stats.evictions += 1

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._unindex(key, entry.serial)
        return True

    def _unindex(self, key: str, serial: int) -> None:
        keys = self._by_serial.get(serial)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_serial[serial]

    # ---- administration -------------------------------------------------------------------

    def forget(self, sha256: str) -> None:
        """Drop one certificate's entry (``sha256`` as in ``ClientCert.sha256``)."""
        self._generation += 1
        self._remove(sha256)

    def purge(self, *, sha256: str | None = None, serial: int | None = None) -> int:
        """Drop the entries matching every criterion given (all entries when none is).

        ``sha256`` may be written as operators do (colons, any case); raises ``ValueError``
        when it is not a fingerprint. Returns how many entries were removed.
        """
        self._generation += 1
        if sha256 is None and serial is None:
            removed = len(self._entries)
            self._entries.clear()
            self._by_serial.clear()
            return removed
        if sha256 is None:
            return sum(self._remove(key) for key in list(self._by_serial.get(serial or 0, ())))
        key = normalize_fingerprint(sha256)
        entry = self._entries.get(key)
        if entry is None or (serial is not None and entry.serial != serial):
            return 0
        return int(self._remove(key))

    async def purge_everywhere(
        self, *, sha256: str | None = None, serial: int | None = None
    ) -> tuple[int, bool | None]:
        """``purge`` here, then tell the other replicas through the shared level. Returns the
        entries removed here, and whether the shared level took the purge (None without one)."""
        removed = self.purge(sha256=sha256, serial=serial)
        shared = self.shared
        if shared is None:
            return removed, None
        key = normalize_fingerprint(sha256) if sha256 is not None else None
        return removed, await shared.publish_purge(sha256=key, serial=serial)

    async def sign_on(
        self,
        purpose: SignOnPurpose,
        return_url: str,
        client_ip: str | None,
        *,
        shared: bool = True,
    ) -> SignOn:
        """The backend's sign-on URL, reused (unless not ``shared``) and rate limited by
        ``intents`` (raises ``SignOnLimited`` beyond the limits, ``IdentityUnavailable`` when
        the backend fails)."""
        return await self.intents.sign_on(purpose, return_url, client_ip, shared=shared)

    async def _backend_sign_on(self, purpose: SignOnPurpose, return_url: str) -> str:
        # The backend's method looked up at each call, not bound once: the same backend
        # whatever is done to it (a test wraps it).
        return await self.backend.sign_on(purpose, return_url)

    async def close(self) -> None:
        """Cancel backend calls still in flight, then close the backend and the shared level."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.close()
        if self.shared is not None:
            await self.shared.close()
