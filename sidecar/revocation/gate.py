"""The request path's question: is this client certificate refused now, and why.

``Revocation.check`` is called for every request before any cached verdict is used. It is one
dict lookup keyed by the certificate's fingerprint: the answer computed last for it, valid for
the current *generation* of revocation data (bumped by every CRL, deny entry or reload that
could change an answer) and until the moment that answer could change by itself (a CRL
passing its nextUpdate and grace, an OCSP answer expiring). Only when that is stale are the
sources asked again, in order (each source's decision is final):

1. the deny-list (``tls.deny`` and run-time entries): 403 ``revoked``;
2. CRLs (``tls.crl`` files, and with ``tls.crl_fetch`` the distribution points) for the
   client certificate and, with ``crl_mode: chain``, each intermediate above it: listed
   (in any CRL that speaks for it, even an expired one) is 403 ``revoked``; no usable CRL
   (none, under ``require``; or all past nextUpdate + ``crl_grace``; or none can be fetched)
   is 503 ``revocation_unavailable``;
3. OCSP (``tls.ocsp``): ``revoked`` is 403; no answer (down, slow, a bad signature, the
   responder does not know it) is allowed under ``soft``, 503 under ``hard``.

A CRL or OCSP answer not yet held is fetched: ``check`` then answers ``PENDING`` and starts
the fetch, and ``settle`` waits for it (each fetch is bounded by its timeout). Fails closed:
whatever cannot be decided (a fetch that never settles) is 503, never allowed.

A newly loaded CRL, OCSP ``revoked`` answer or deny entry drops the cached verdicts of the
certificates it revokes (``forget``), and ``on_revoked`` is told of each certificate known by
fingerprint to be revoked, for whatever shares verdicts beyond this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding

from ..certs import ClientCert, read_certificates
from ..config import TLSConfig
from ..log import get_logger
from .chain import Anchors, Facts
from .crl import CRL, newest, verify
from .deny import DenyList
from .fetch import CRLFetcher, Transports
from .ocsp import Answer, OCSPClient

log = get_logger("sidecar.revocation")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a certificate is refused: ``status`` 403 (revoked) or 503 (cannot tell now)."""

    status: int
    #: for the access log and metrics: ``revoked`` or ``revocation_unavailable``
    code: str
    #: plain words for the client
    reason: str
    #: for the operator's log: which source, which CA
    detail: str


#: ``check``'s answer while a CRL or OCSP answer is being fetched: ``settle`` waits for it
PENDING = Refusal(0, "pending", "", "")

_REVOKED = "your client certificate has been revoked"
_UNAVAILABLE = "the revocation status of your client certificate cannot be checked right now"

#: outcomes of a check, counted per request (``counts``)
GOOD, REVOKED, UNKNOWN, UNAVAILABLE = range(4)
OUTCOMES = ("good", "revoked", "unknown", "unavailable")

#: answers remembered; beyond this the memory is emptied and refilled
_MEMO_MAX = 65536
#: an answer is computed again at least this often (and a CRL or OCSP answer due to be
#: fetched again is noticed)
_MEMO_TTL = 60.0
#: how often the background task looks at CRLs (expiry, refresh), and how often an expired
#: CRL is logged
_TICK = 5.0
_LOG_EVERY = 60.0
#: ``settle`` waits this many times at most for answers on their way
_ROUNDS = 4

#: (fingerprint, serial) → None: drops cached verdicts (the verdict cache's ``purge``)
Forget = Callable[[str | None, int | None], object]


def revoked(detail: str) -> Refusal:
    return Refusal(403, "revoked", _REVOKED, detail)


def unavailable(detail: str) -> Refusal:
    return Refusal(503, "revocation_unavailable", _UNAVAILABLE, detail)


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a ``TLSConfig`` gives revocation, read off the event loop (``prepare``)."""

    config: TLSConfig
    anchors: Anchors
    anchors_digest: frozenset[bytes]


def prepare(config: TLSConfig) -> Prepared:
    """Read the trust anchors for ``config`` (blocking: run it in a thread on reload). Raises
    ``CertificateError`` when a file has become unreadable since it was checked."""
    client_ca = [c for path in config.client_ca for c in read_certificates(path)]
    pinned = [c for path in config.pinned_certificates for c in read_certificates(path)]
    anchors = Anchors(client_ca, pinned)
    digest = frozenset(c.public_bytes(Encoding.DER) for c in (*client_ca, *pinned))
    return Prepared(config, anchors, digest)


class _Memo:
    __slots__ = ("generation", "outcome", "result", "until")

    def __init__(self, generation: int, until: float, result: Refusal | None, outcome: int) -> None:
        self.generation = generation
        self.until = until
        self.result = result
        self.outcome = outcome


class Revocation:
    """Revocation for one process (see the module's docstring). Long-lived: a reload
    ``apply``s a new configuration; run-time deny entries, fetched CRLs and OCSP answers stay.
    """

    def __init__(
        self,
        prepared: Prepared,
        *,
        transports: Transports,
        lifetime: Callable[[float], object] = lambda seconds: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        #: how CRLs and OCSP answers are fetched (``client.HttpTransport``, from the application)
        self._transports = transports
        self._lifetime = lifetime
        self._generation = 0
        self._memo: dict[str, _Memo] = {}
        #: requests that got PENDING from ``check`` and are counted when ``settle`` answers
        self._owed: dict[str, int] = {}
        self.counts = [0, 0, 0, 0]
        #: drops cached verdicts (set by the application: the verdict cache changes on reload)
        self.forget: Forget | None = None
        #: told (fingerprint, why) of each certificate found revoked by fingerprint
        self.on_revoked: list[Callable[[str, str], object]] = []
        self._deny = DenyList()
        self._crls: list[CRL] = []
        self._by_ca: dict[str, list[CRL]] = {}
        self._fetcher: CRLFetcher | None = None
        self._ocsp = OCSPClient(
            timeout=prepared.config.ocsp_timeout,
            max_age=prepared.config.ocsp_max_age,
            transports=transports,
            clock=clock,
        )
        self._ocsp.answered = self._answered
        self._logged: dict[tuple[str, bool, bool, frozenset[str] | None], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing: list[CRLFetcher] = []
        self._anchors = prepared.anchors
        self._anchors_digest = prepared.anchors_digest
        self._active = False
        self.apply(prepared)

    # ---- configuration ----------------------------------------------------------------------

    def chain_above(self, cert: ClientCert) -> tuple[bytes, ...] | None:
        """The anchors above ``cert`` as a verified chain lists them (``Anchors.path_above``):
        for a connection that resumed a session, whose chain OpenSSL did not keep."""
        return self._anchors.path_above(cert)

    def apply(self, prepared: Prepared) -> None:
        """Use a (re)loaded configuration from now on. Answers are computed again; the cached
        verdicts of certificates newly denied or newly listed in a CRL are dropped."""
        config = prepared.config
        self._config = config
        self._chain = config.crl_mode[0] == "chain"
        self._require = config.crl_mode[1] == "require"
        self._grace = config.crl_grace
        self._ocsp_mode = config.ocsp
        self._responder = config.ocsp_responder
        if prepared.anchors_digest != self._anchors_digest:
            self._ocsp.clear()  # answers were verified against the anchors of before
        self._anchors, self._anchors_digest = prepared.anchors, prepared.anchors_digest
        self._ocsp.configure(timeout=config.ocsp_timeout, max_age=config.ocsp_max_age)
        old_crls, self._crls = self._crls, list(config.crls())
        self._by_ca = {}
        for crl in self._crls:
            self._by_ca.setdefault(crl.ca, []).append(crl)
        if config.crl_fetch.enabled:
            if self._fetcher is None:
                self._fetcher = CRLFetcher(
                    config.crl_fetch,
                    self._verify_fetched,
                    self._fetched,
                    self._transports,
                    clock=self._clock,
                )
            else:
                self._fetcher.configure(config.crl_fetch)
        elif self._fetcher is not None:
            self._closing.append(self._fetcher)
            self._fetcher = None
        old_deny = self._deny
        self._deny = old_deny.replaced(
            (e.fingerprint for e in config.deny if e.fingerprint),
            ((e.issuer_key, e.serial_number) for e in config.deny if e.issuer_key),
        )
        self._update()
        for sha256 in self._deny.fingerprints - old_deny.fingerprints:
            self._drop(sha256, None)
            self._tell(sha256, "tls.deny")
        for _, serial in self._deny.pairs - old_deny.pairs:
            self._drop(None, serial)
        self._newly_listed(self._crls, old_crls)

    def _update(self) -> None:
        """Something an answer depends on changed: every answer is computed again."""
        config = self._config
        self._crl_on = bool(self._crls) or self._fetcher is not None
        self._active = self._crl_on or config.ocsp != "off" or bool(self._deny)
        self._generation += 1
        self._memo.clear()

    def _newly_listed(self, new: Iterable[CRL], old: Iterable[CRL]) -> None:
        before: dict[tuple[str, bool, bool, frozenset[str] | None], set[int]] = {}
        for crl in old:
            before.setdefault(crl.group, set()).update(crl.revoked)
        for crl in new:
            for serial in crl.revoked - before.get(crl.group, set()):
                self._drop(None, serial)

    def _verify_fetched(self, der: bytes, url: str) -> CRL:
        return verify(der, self._anchors.certificates(), url)

    def _fetched(self, crl: CRL, old: CRL | None) -> None:
        self._update()
        self._newly_listed([crl], [old] if old is not None else [])

    # ---- the request path -------------------------------------------------------------------

    def check(self, cert: ClientCert, now: float) -> Refusal | None:
        """Refused now (403 revoked, 503 cannot tell), ``PENDING`` (an answer is being fetched:
        ``settle``), or None. A dict lookup unless something changed (module docstring)."""
        if not self._active:
            return None
        memo = self._memo.get(cert.sha256)
        if memo is None or memo.generation != self._generation or now >= memo.until:
            memo = self._evaluate(cert, now)
        result = memo.result
        if result is PENDING:
            owed = self._owed
            if len(owed) >= _MEMO_MAX:
                owed.clear()
            owed[cert.sha256] = owed.get(cert.sha256, 0) + 1
        else:
            self.counts[memo.outcome] += 1
        return result

    async def settle(self, cert: ClientCert) -> Refusal | None:
        """``check``'s answer once whatever it waits for has arrived: the last word before a
        verdict is used (a CRL or deny entry loaded meanwhile counts too). Fails closed: an
        answer that does not settle within a few rounds of fetches is 503."""
        if not self._active:
            return None
        memo = self._current(cert, self._clock())
        for _ in range(_ROUNDS):
            if memo.result is not PENDING:
                break
            tasks = self._waiting_for(cert)
            if tasks:
                await asyncio.wait(tasks)  # each is bounded by its own timeout
            memo = self._current(cert, self._clock())
        if memo.result is PENDING:
            memo = _Memo(
                self._generation, 0.0, unavailable("no revocation answer arrived"), UNAVAILABLE
            )
        owed = self._owed.get(cert.sha256, 0)
        if owed:
            if owed == 1:
                del self._owed[cert.sha256]
            else:
                self._owed[cert.sha256] = owed - 1
            self.counts[memo.outcome] += 1
        return memo.result

    def status(self, cert: ClientCert, now: float | None = None) -> Refusal | None:
        """What ``check`` would answer for ``cert`` now (``PENDING`` included), without
        counting a request: for ``explain``."""
        if not self._active:
            return None
        return self._current(cert, self._clock() if now is None else now).result

    def connection_started(self, cert: ClientCert) -> None:
        """A connection with ``cert`` completed its handshake (resumed sessions too): what the
        first request will need (a CRL, an OCSP answer) is fetched from now. Also notes the
        certificate's remaining lifetime (``sidecar_client_certificate_remaining_seconds``)."""
        now = self._clock()
        self._lifetime(cert.not_after_ts - now)
        if self._active:
            self._current(cert, now)

    def _current(self, cert: ClientCert, now: float) -> _Memo:
        memo = self._memo.get(cert.sha256)
        if memo is None or memo.generation != self._generation or now >= memo.until:
            memo = self._evaluate(cert, now)
        return memo

    def _waiting_for(self, cert: ClientCert) -> list[asyncio.Task[None]]:
        tasks: list[asyncio.Task[None]] = []
        asking = self._ocsp.asking(cert.sha256)
        if asking is not None:
            tasks.append(asking)
        if self._fetcher is not None:
            for link in self._anchors.facts(cert).links:
                tasks.extend(self._fetcher.inflight(link.crl_urls))
        return tasks

    # ---- deciding ---------------------------------------------------------------------------

    def _evaluate(self, cert: ClientCert, now: float) -> _Memo:
        result: Refusal | None = None
        until = now + _MEMO_TTL
        outcome = GOOD
        denied = self._deny.matches(cert)
        if denied is not None:
            result, outcome = revoked(f"on {denied}"), REVOKED
        else:
            facts = self._anchors.facts(cert)
            if self._crl_on and not facts.self_trusted:
                result, until = self._by_crl(facts, now, until)
                if result is not None:
                    outcome = REVOKED if result.status == 403 else UNAVAILABLE
            if result is None and self._ocsp_mode != "off" and not facts.self_trusted:
                result, until, outcome = self._by_ocsp(cert, facts, now, until)
        if result is PENDING:
            until = now  # not remembered: asked again until the answer is here
        elif result is not None:
            log.warning(
                "revocation_refused",
                code=result.code,
                detail=result.detail,
                cert_sha256=cert.sha256,
                cert_subject=cert.subject,
                cert_serial=cert.serial_hex,
            )
        memo = _Memo(self._generation, until, result, outcome)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[cert.sha256] = memo
        return memo

    def _by_crl(self, facts: Facts, now: float, until: float) -> tuple[Refusal | None, float]:
        if not facts.complete:
            if self._require:
                return unavailable(
                    f"its issuer {facts.issuer_name} is not in tls.client_ca, so no CRL can "
                    "be checked for it (tls.crl_mode require)"
                ), until
            return None, until
        grace = self._grace
        links = facts.links if self._chain else facts.links[:1]
        for link in links:
            found = [
                c
                for c in self._by_ca.get(link.issuer, ())
                if c.covers(link.issuer, link.is_ca, link.crl_urls)
            ]
            fetcher = self._fetcher
            if fetcher is not None and link.crl_urls:
                found += [
                    c
                    for c in fetcher.crls(link.crl_urls, now)
                    if c.covers(link.issuer, link.is_ca, link.crl_urls)
                ]
            which = "an intermediate CA certificate above it" if link.is_ca else "it"
            for crl in found:
                if link.serial in crl.revoked:
                    return revoked(
                        f"{which} (serial {link.serial:X}) is listed in the CRL of "
                        f"{crl.issuer} ({crl.source})"
                    ), until
            usable = [c.next_update + grace for c in found if now <= c.next_update + grace]
            if usable:
                until = min(until, max(usable))
                continue
            if fetcher is not None and link.crl_urls:
                state = fetcher.pending(link.crl_urls, now)
                if state is True:
                    return PENDING, now
                return unavailable(f"no usable CRL for {link.issuer_name}: {state}"), now + 1.0
            if found:
                last = max(c.next_update for c in found)
                return unavailable(
                    f"the CRL of {link.issuer_name} expired at {_iso(last)} and "
                    f"tls.crl_grace ({grace:g} s) has passed"
                ), until
            if self._require:
                return unavailable(
                    f"no CRL for {link.issuer_name}, which issued {which} (tls.crl_mode require)"
                ), until
        return None, until

    def _by_ocsp(
        self, cert: ClientCert, facts: Facts, now: float, until: float
    ) -> tuple[Refusal | None, float, int]:
        answer = self._ocsp.answer(cert.sha256, now)
        if answer is not None:
            until = min(until, answer.expires)
            if now >= answer.refresh_at:
                self._ask(cert, facts)  # in the background: this answer serves meanwhile
            if answer.status == "good":
                return None, until, GOOD
            if answer.status == "revoked":
                when = f" at {_iso(answer.revoked_at)}" if answer.revoked_at else ""
                why = f" ({answer.reason})" if answer.reason else ""
                return revoked(f"the OCSP responder says it was revoked{when}{why}"), until, REVOKED
            return self._no_answer("the OCSP responder does not know it (unknown)", until)
        failure = self._ocsp.failure(cert.sha256, now)
        if failure is None and self._ask(cert, facts):
            return PENDING, now, GOOD
        failure = failure or self._ocsp.failure(cert.sha256, now)
        reason = failure.reason if failure is not None else "no answer"
        return self._no_answer(f"OCSP: {reason}", min(until, failure.until if failure else now))

    def _no_answer(self, detail: str, until: float) -> tuple[Refusal | None, float, int]:
        if self._ocsp_mode == "soft":
            return None, until, UNKNOWN
        return unavailable(detail), until, UNAVAILABLE

    def _ask(self, cert: ClientCert, facts: Facts) -> bool:
        """Start asking the OCSP responder about ``cert``; False when it cannot be asked (the
        failure is remembered then)."""
        if self._ocsp.asking(cert.sha256) is not None:
            return True
        if facts.issuer is None or facts.certificate is None:
            self._ocsp.fail(
                cert.sha256,
                "no-issuer",
                f"its issuer {facts.issuer_name} is not in tls.client_ca",
            )
            return False
        url = self._responder or (facts.ocsp_urls[0] if facts.ocsp_urls else None)
        if url is None:
            self._ocsp.fail(
                cert.sha256,
                "no-responder",
                "it names no OCSP responder (authorityInfoAccess) and tls.ocsp_responder is not set",
            )
            return False
        self._ocsp.ask(cert.sha256, facts.certificate, facts.issuer, url)
        return True

    def _answered(self, sha256: str, answer: Answer) -> None:
        self._memo.pop(sha256, None)
        if answer.status == "revoked":
            self._drop(sha256, None)
            self._tell(sha256, "OCSP")

    # ---- the deny-list at run time (admin listener) -----------------------------------------

    def deny(self, sha256: str, *, announce: bool = True) -> bool:
        """Refuse a certificate from now on (every request, open connections included); drops
        its cached verdict. False when it was denied at run time already. ``announce=False``
        for an entry that came from elsewhere (a supervisor's list, a fleet-wide channel):
        ``on_revoked`` is not told, so that it is not sent back where it came from."""
        if sha256 in self._deny.runtime:
            return False
        self._deny.runtime.add(sha256)
        self._update()
        self._drop(sha256, None)
        if announce:
            self._tell(sha256, "the deny-list (run time)")
        log.warning("deny_added", cert_sha256=sha256)
        return True

    def allow(self, sha256: str) -> str:
        """Take a run-time entry off: ``removed``, ``configured`` (it is in ``tls.deny``: only
        the configuration can take it off) or ``absent``."""
        if sha256 in self._deny.runtime:
            self._deny.runtime.discard(sha256)
            self._update()
            log.warning("deny_removed", cert_sha256=sha256)
            return "removed"
        if sha256 in self._deny.fingerprints:
            return "configured"
        return "absent"

    def denied(self) -> dict[str, list[str]]:
        deny = self._deny
        return {
            "configured": sorted(deny.fingerprints)
            + sorted(f"{issuer} serial {serial:X}" for issuer, serial in deny.pairs),
            "runtime": sorted(deny.runtime),
        }

    # ---- the identity backend's word --------------------------------------------------------

    def backend_revoked(self, cert: ClientCert, code: str) -> None:
        """The identity backend said this certificate is revoked (Identity Plus ``PB 0004``
        revoked, ``PB 0005`` intruder). The verdict cache stores that refusal itself; this
        tells ``on_revoked`` (the hook a fleet-wide channel publishes from)."""
        log.info("identity_backend_revoked", cert_sha256=cert.sha256, code=code)
        self._tell(cert.sha256, f"the identity backend ({code})")

    # ---- housekeeping -----------------------------------------------------------------------

    def _drop(self, sha256: str | None, serial: int | None) -> None:
        forget = self.forget
        if forget is not None:
            forget(sha256, serial)

    def _tell(self, sha256: str, why: str) -> None:
        for listener in list(self.on_revoked):
            try:
                listener(sha256, why)
            except Exception as exc:  # one listener's bug must not stop a revocation
                log.error("revocation_listener_failed", error=repr(exc), exc_info=exc)

    def held(self) -> list[CRL]:
        """The newest CRL of each CA and scope, from files and distribution points."""
        fetched = self._fetcher.held() if self._fetcher is not None else []
        return list(newest([*self._crls, *fetched]).values())

    def next_updates(self) -> dict[str, float]:
        """For the gauge: per issuing CA, the earliest nextUpdate of its newest CRLs."""
        out: dict[str, float] = {}
        for crl in self.held():
            out[crl.issuer] = min(out.get(crl.issuer, crl.next_update), crl.next_update)
        return out

    def expired(self, now: float | None = None) -> list[CRL]:
        """The newest CRLs past nextUpdate and ``crl_grace``: certificates they speak for are
        refused."""
        moment = self._clock() if now is None else now
        return [c for c in self.held() if moment > c.next_update + self._grace]

    def problem(self) -> str | None:
        """For ``/readyz``: a CRL expired past its grace (fail closed: its CA's certificates
        are refused), or None."""
        expired = self.expired()
        if not expired:
            return None
        first = min(expired, key=lambda c: c.next_update)
        more = f" (and {len(expired) - 1} more)" if len(expired) > 1 else ""
        return (
            f"CRL expired: {first.issuer} (nextUpdate {_iso(first.next_update)}, "
            f"tls.crl_grace {self._grace:g} s): its certificates are refused{more}"
        )

    def outcome_counts(self) -> dict[str, int]:
        return dict(zip(OUTCOMES, self.counts, strict=True))

    @property
    def ocsp_entries(self) -> int:
        return len(self._ocsp)

    @property
    def ocsp_results(self) -> dict[str, int]:
        return self._ocsp.results

    @property
    def fetch_results(self) -> dict[str, int]:
        return self._fetcher.results if self._fetcher is not None else {}

    @property
    def deny_entries(self) -> tuple[int, int]:
        return (len(self._deny.fingerprints) + len(self._deny.pairs), len(self._deny.runtime))

    def start(self) -> None:
        """Start the background task (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="revocation")

    async def _watch(self) -> None:
        """Say loudly, once a minute, which CRLs are past nextUpdate (and past the grace);
        fetch again the CRLs from distribution points that are due, traffic or not."""
        while True:
            await asyncio.sleep(_TICK)
            now = self._clock()
            for crl in self.held():
                if now <= crl.next_update:
                    self._logged.pop(crl.group, None)
                    continue
                if now - self._logged.get(crl.group, float("-inf")) < _LOG_EVERY:
                    continue
                self._logged[crl.group] = now
                late = crl.next_update + self._grace
                if now > late:
                    log.error(
                        "crl_expired",
                        issuer=crl.issuer,
                        source=crl.source,
                        next_update=_iso(crl.next_update),
                        grace=self._grace,
                        effect="certificates this CRL speaks for are refused (503)",
                    )
                else:
                    log.warning(
                        "crl_stale",
                        issuer=crl.issuer,
                        source=crl.source,
                        next_update=_iso(crl.next_update),
                        refused_in=round(late - now),
                    )
            if self._fetcher is not None:
                self._fetcher.refresh_due(now)
            for closing in self._closing:
                await closing.close()
            self._closing.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for fetcher in [*self._closing, *([self._fetcher] if self._fetcher else [])]:
            await fetcher.close()
        self._closing.clear()
        await self._ocsp.close()


def _iso(ts: float | None) -> str:
    if ts is None:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


__all__ = ["PENDING", "Prepared", "Refusal", "Revocation", "prepare"]
