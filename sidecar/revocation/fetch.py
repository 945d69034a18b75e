"""The cache of CRLs fetched from the distribution points that certificates name
(``tls.crl_fetch``), and the ``Transport`` it fetches through (``client.HttpTransport``, given
by the application, so that nothing the request path imports needs aiohttp), which raises
``FetchError`` with a short ``kind`` fit for a metrics label.

``CRLFetcher`` keeps one slot per URL: the CRL last fetched from it (verified against the
trust anchors before it is kept), when to fetch it again, and the fetch in flight. It is
single-flight per URL; a CRL is fetched again in the background once 80 % of its validity
has passed, while the old one still serves; a failure is retried after a backoff (2 s,
doubling, at most 5 min), and until then answers at once as failed. The cache is bounded in
entries and in bytes (least recently used slots go first), and each CRL in ``max_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..config import CRLFetchConfig
from ..log import get_logger
from .crl import CRL, CRLError

log = get_logger("sidecar.revocation")

_BACKOFF_FIRST = 2.0
_BACKOFF_MAX = 300.0
#: a CRL is fetched again once this share of its validity (thisUpdate to nextUpdate) passed
_REFRESH_SHARE = 0.8
#: ... but not sooner than this after it was fetched (a CRL published close to its end)
_REFRESH_MIN = 30.0


class FetchError(Exception):
    """An exchange that gave nothing usable. ``kind``: ``timeout``, ``connect``, ``reset``,
    ``http-status``, ``too-large``, ``protocol``, ``bad-crl`` (and the OCSP client's own)."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


class Transport(Protocol):
    """One HTTP exchange for revocation data (``client.HttpTransport``; a fake in tests)."""

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        limit: int,
        body: bytes | None = None,
        content_type: str | None = None,
        accept: str,
    ) -> bytes:
        """The body of an HTTP 200 answer, at most ``limit`` bytes; raises ``FetchError``."""
        ...

    async def close(self) -> None: ...


#: a new ``Transport`` whose exchanges are each bounded by this many seconds
Transports = Callable[[float], Transport]


@dataclass(slots=True)
class _Slot:
    crl: CRL | None = None
    fetched: float = 0.0
    refresh_at: float = 0.0
    #: not fetched again before this after a failure
    retry_at: float = 0.0
    failures: int = 0
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class CRLFetcher:
    """CRLs from distribution points (see the module's docstring).

    ``verify(der, url)`` checks a fetched CRL against the trust anchors (raises ``CRLError``);
    ``loaded(new, old)`` is told of every CRL kept (``old``: the one it replaces, if any).
    """

    def __init__(
        self,
        config: CRLFetchConfig,
        verify: Callable[[bytes, str], CRL],
        loaded: Callable[[CRL, CRL | None], None],
        transports: Transports,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._verify = verify
        self._loaded = loaded
        self._transports = transports
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._bytes = 0
        self._http: Transport | None = None
        #: fetch results by kind (``ok``, ``timeout``, ``bad-crl``, ...), for the metrics
        self.results: dict[str, int] = {}

    def configure(self, config: CRLFetchConfig) -> None:
        """New limits (a reload): the transport is made again with the new timeout."""
        if config.timeout != self.config.timeout and self._http is not None:
            http, self._http = self._http, None
            asyncio.get_running_loop().create_task(http.close())
        self.config = config
        self._evict()

    @property
    def entries(self) -> int:
        return sum(1 for slot in self._slots.values() if slot.crl is not None)

    @property
    def size(self) -> int:
        return self._bytes

    def crls(self, urls: Iterable[str], now: float) -> list[CRL]:
        """The CRLs held for ``urls``; one due to be fetched again is, in the background."""
        out = []
        for url in urls:
            slot = self._slots.get(url)
            if slot is None or slot.crl is None:
                continue
            self._slots.move_to_end(url)
            out.append(slot.crl)
            if now >= slot.refresh_at and now >= slot.retry_at and slot.task is None:
                self._start(url, slot)
        return out

    def pending(self, urls: Iterable[str], now: float) -> bool | str:
        """For a certificate with no usable CRL: True when a fetch for one of ``urls`` is in
        flight (or starts now); otherwise why none can give one (the last error), as text."""
        last = "no CRL could be fetched"
        for url in urls:
            slot = self._slots.get(url)
            if slot is None:
                slot = self._slots[url] = _Slot()
            if slot.task is not None:
                return True
            if now >= slot.retry_at and (slot.crl is None or now >= slot.refresh_at):
                self._start(url, slot)
                return True
            if slot.error is not None:
                last = f"{url}: {slot.error}"
        return last

    def refresh_due(self, now: float) -> None:
        """Fetch again, in the background, every CRL held that is due (traffic or not)."""
        for url, slot in list(self._slots.items()):
            if (
                slot.crl is not None
                and slot.task is None
                and now >= slot.refresh_at
                and now >= slot.retry_at
            ):
                self._start(url, slot)

    def inflight(self, urls: Iterable[str]) -> list[asyncio.Task[None]]:
        tasks = []
        for url in urls:
            slot = self._slots.get(url)
            if slot is not None and slot.task is not None:
                tasks.append(slot.task)
        return tasks

    def held(self) -> list[CRL]:
        return [slot.crl for slot in self._slots.values() if slot.crl is not None]

    def _start(self, url: str, slot: _Slot) -> None:
        task = asyncio.get_running_loop().create_task(self._fetch(url, slot), name="crl-fetch")
        slot.task = task

    async def _fetch(self, url: str, slot: _Slot) -> None:
        try:
            if self._http is None:
                self._http = self._transports(self.config.timeout)
            der = await self._http.exchange(
                "GET", url, limit=self.config.max_size, accept="application/pkix-crl"
            )
            try:
                crl = self._verify(der, url)
            except CRLError as exc:
                raise FetchError("bad-crl", str(exc)) from None
        except FetchError as exc:
            self._failed(url, slot, exc)
        except Exception as exc:  # a bug rather than the network: fail closed all the same
            self._failed(url, slot, FetchError("error", repr(exc)))
        else:
            self._kept(url, slot, crl)
        finally:
            slot.task = None

    def _kept(self, url: str, slot: _Slot, crl: CRL) -> None:
        now = self._clock()
        self.results["ok"] = self.results.get("ok", 0) + 1
        old = slot.crl
        if old is not None:
            self._bytes -= old.size
        slot.crl, slot.fetched, slot.failures, slot.error = crl, now, 0, None
        life = crl.next_update - crl.this_update
        slot.refresh_at = max(now + _REFRESH_MIN, crl.this_update + _REFRESH_SHARE * life)
        slot.retry_at = 0.0
        self._bytes += crl.size
        if url not in self._slots:  # evicted while the fetch ran: held again
            self._slots[url] = slot
        self._slots.move_to_end(url)
        self._evict(keep=url)
        log.info(
            "crl_fetched",
            url=url,
            issuer=crl.issuer,
            entries=len(crl.revoked),
            next_update=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(crl.next_update)),
        )
        self._loaded(crl, old)

    def _failed(self, url: str, slot: _Slot, exc: FetchError) -> None:
        now = self._clock()
        self.results[exc.kind] = self.results.get(exc.kind, 0) + 1
        slot.failures += 1
        slot.error = exc.reason
        slot.retry_at = now + min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (slot.failures - 1))
        log.warning(
            "crl_fetch_failed",
            url=url,
            kind=exc.kind,
            reason=exc.reason,
            retry_in=round(slot.retry_at - now, 1),
            holding=slot.crl is not None,
        )

    def _evict(self, keep: str | None = None) -> None:
        limit_entries, limit_bytes = self.config.max_entries, self.config.max_bytes
        for url in list(self._slots):
            if self.entries <= limit_entries and self._bytes <= limit_bytes:
                break
            slot = self._slots[url]
            if url == keep or slot.task is not None:
                continue
            if slot.crl is not None:
                self._bytes -= slot.crl.size
            del self._slots[url]
        # slots that never held a CRL (failures remembered) are bounded too
        while len(self._slots) > 4 * limit_entries:
            url, slot = next(iter(self._slots.items()))
            if slot.task is not None or url == keep:
                break
            if slot.crl is not None:
                self._bytes -= slot.crl.size
            del self._slots[url]

    async def close(self) -> None:
        tasks = [slot.task for slot in self._slots.values() if slot.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
            self._http = None
