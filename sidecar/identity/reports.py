"""Trust reports: what the application (through response headers) and the operator (through
the admin listener) tell Identity Plus about a certificate, sent in the background.

``Reporter.from_response`` takes the report headers that ``headers.response_fields`` removed
from a response, once that response has gone to the client, with the certificate of the
request that produced it: a report always concerns that certificate, never one the
application names. ``Reporter.submit`` is what both it and ``POST /identityplus/...`` call.

Before anything is queued a report is checked (``report_values``; bad values are dropped),
deduplicated (the same report pending, or sent within ``dedupe_window``, is not sent again),
and rate limited per certificate and overall (token buckets, per worker). Then it waits in its
certificate's chain, so that one certificate's reports go out in the order they were made,
for one of ``concurrency`` call slots. A call that fails or is answered ``ER 1106`` is made
again after a backoff (doubled each time, with jitter), at most ``retries`` times; a call
Identity Plus refuses for good (another ``ER``, a ``PB``) is not. ``ER 0007`` (an intrusion
already reported), ``ER 0003`` (a bind already made) and ``ER 0005`` (an unbind of a user
never bound) count as done. After a bind, an unbind or an intrusion report, the certificate's
verdict is dropped from every cache that holds it (``forget``: here, the other workers, and
the shared cache with every replica behind it), so that its next request sees the new
profile; the report ends (its ``result``, the pending count) only once that is done.

Every report ends in one ``trust_report`` log event (its outcome, Identity Plus's code and
reference number) and one count in ``sidecar_trust_reports_total{type, outcome}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

from ..certs import ClientCert
from ..config import ReportsConfig
from ..errors import IdentityUnavailable
from ..metrics import Metrics
from . import User
from .intents import Rate
from .report_gate import Bucket, ReportGate, per_minute
from .report_values import (
    KINDS,
    Captured,
    CommunityReply,
    InvalidReport,
    ReportKind,
    ReportRequest,
    from_headers,
)

Outcome = Literal[
    "succeeded", "already", "failed", "invalid", "limited", "duplicate", "overflow", "ignored"
]
#: outcomes after which Identity Plus holds what the report said
DONE: frozenset[str] = frozenset({"succeeded", "already"})
#: an ER code answered as an exception (this service's own credentials): not worth retrying
_ER_CODE = re.compile(r"^ER \d{4}$")
#: answers that mean the report's effect is already there, per kind
_ALREADY: dict[str, frozenset[str]] = {
    "bind": frozenset({"ER 0003"}),  # the user name is already associated
    "unbind": frozenset({"ER 0005"}),  # the user name was never associated
    "trust": frozenset(),
    "intrusion": frozenset({"ER 0007"}),  # an intrusion was already reported on it
}
_RETRY_CODE = "ER 1106"  # "General Identity Plus API Problem"
#: the kinds after which the certificate's cached verdict is out of date
_CHANGES_PROFILE = frozenset({"bind", "unbind", "intrusion"})
#: failed reports kept for the status page; pending ones shown there
_KEEP_FAILED = 20
_SHOW_PENDING = 20
#: log events for reports refused before queueing: at most this many per second (a broken
#: application could set a bad header on every response)
_REFUSAL_LOGS = Rate(burst=20, per_second=10.0)


def _log() -> Any:
    # Looked up per event (they are rare): see identityplus._log.
    return structlog.get_logger("sidecar.reports")


class Community(Protocol):
    """The Identity Plus calls a report becomes (``IdentityPlusBackend``)."""

    async def bind(self, serial: int, local_user_name: str) -> CommunityReply: ...

    async def unbind(self, local_user_name: str) -> CommunityReply: ...

    async def trust(
        self,
        serial: int,
        trust_type: str,
        *,
        tokens: int | None = None,
        local_user_name: str | None = None,
    ) -> CommunityReply: ...

    async def report_intrusion(
        self,
        serial: int,
        severity: str,
        *,
        message: str | None = None,
        ip_address: str | None = None,
        url: str | None = None,
    ) -> CommunityReply: ...


@dataclass(frozen=True, slots=True)
class Target:
    """The certificate a report concerns."""

    serial: int
    #: None when an operator named the certificate by its serial alone
    sha256: str | None = None
    #: the site-local user Identity Plus has bound to it (an ``OK 0002`` verdict), if known
    local_user_name: str | None = None

    @property
    def key(self) -> str:
        """What its reports are chained, deduplicated and rate limited by: the serial, which
        is how Identity Plus knows it, whether the report named it so or by fingerprint."""
        return f"serial:{self.serial:X}"

    @property
    def label(self) -> str:
        """As the status page shows it: its fingerprint's first 16 hex digits, or its serial."""
        return self.sha256[:16] if self.sha256 is not None else self.key

    def describe(self) -> dict[str, object]:
        return {
            "cert_sha256": self.sha256,
            "cert_serial": f"{self.serial:X}",
        }


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a report came from: a response (with its request), or the admin listener."""

    source: Literal["response", "admin"]
    request_id: str | None = None
    client_ip: str | None = None
    #: the request's path, without query (an intrusion's ``intruded-url``)
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """How a report ended."""

    outcome: Outcome
    reason: str
    code: str | None = None
    reference: str | None = None
    attempts: int = 0
    #: ``limited``: the seconds until it would pass
    retry_after: int | None = None


class Report:
    """A report accepted for sending; ``result`` is done once it has ended."""

    __slots__ = (
        "attempts",
        "id",
        "key",
        "next_attempt",
        "origin",
        "request",
        "result",
        "state",
        "submitted",
        "target",
    )

    def __init__(
        self,
        report_id: int,
        request: ReportRequest,
        target: Target,
        origin: Origin,
        key: tuple[str, str, str],
        submitted: float,
    ) -> None:
        self.id = report_id
        self.request = request
        self.target = target
        self.origin = origin
        self.key = key
        self.submitted = submitted
        self.attempts = 0
        #: queued (behind others of its certificate, or for a call slot), sending, waiting
        self.state = "queued"
        #: wall time of the next attempt while waiting to retry
        self.next_attempt: float | None = None
        self.result: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": self.request.kind,
            "certificate": self.target.label,
            "source": self.origin.source,
            "state": self.state,
            "attempts": self.attempts,
            "submitted": self.submitted,
            "next_attempt": self.next_attempt,
        }


class Reporter:
    """Checks, queues and sends trust reports (see the module's docstring).

    ``backend`` returns the current Identity Plus backend, or None when the identity backend
    is another one (it is asked at each attempt: a reload may swap it); ``forget`` drops a
    certificate's cached verdict everywhere it is cached (awaited before the report ends).
    """

    def __init__(
        self,
        config: ReportsConfig,
        *,
        backend: Callable[[], Community | None],
        forget: Callable[[Target], Awaitable[None]],
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._backend = backend
        self._forget = forget
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._jitter = jitter
        self._ids = itertools.count(1)
        self._chains: dict[str, deque[Report]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed: deque[dict[str, object]] = deque(maxlen=_KEEP_FAILED)
        self._log_bucket = Bucket(float(_REFUSAL_LOGS.burst), clock())
        self._suppressed = 0
        self._closed = False
        self._config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        self._gate = ReportGate(
            per_certificate=per_minute(config.per_certificate),
            overall=per_minute(config.overall),
            dedupe_window=config.dedupe_window,
            clock=clock,
        )

    def apply(self, config: ReportsConfig) -> None:
        """Use ``config`` from now on (a reload); reports already queued keep going."""
        if config.concurrency != self._config.concurrency:
            # Calls in flight give their slot back to the semaphore they took it from.
            self._slots = asyncio.Semaphore(config.concurrency)
        self._config = config
        self._gate.configure(
            per_certificate=per_minute(config.per_certificate),
            overall=per_minute(config.overall),
            dedupe_window=config.dedupe_window,
        )

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    @property
    def admin_wait(self) -> float:
        return self._config.admin_wait

    @property
    def pending(self) -> int:
        """Reports accepted and not yet ended (queued, being sent, or waiting to retry)."""
        return sum(len(chain) for chain in self._chains.values())

    # ---- accepting --------------------------------------------------------------------------

    def from_response(
        self,
        cert: ClientCert | None,
        user: User | None,
        verdict_code: str | None,
        captured: Captured,
        *,
        client_ip: str | None,
        path: str | None,
        request_id: str | None,
    ) -> None:
        """The report headers of a response that has gone to the client (see ``submit``).

        Only a request whose certificate Identity Plus identified (its verdict, ``verdict_code``,
        let the user be announced upstream) can be reported on: the application knows who it
        is answering then, and no one else. A user without a verdict (a route where the
        certificate alone decides) is not enough: Identity Plus knows certificates by serial
        alone, and that certificate may be another issuer's, whose serial an Identity Plus
        certificate of someone else may have. An HTTP-legacy session's stand-in
        (``ClientCert.known_by_serial``) counts as identified: its serial is the one Identity
        Plus resolved at sign-on, and its verdict is Identity Plus's; its ``sha256`` is the
        key its verdict is cached under, which is what is dropped after the report.
        """
        origin = Origin("response", request_id, client_ip, path)
        if not self._config.enabled:
            for index, _ in captured:
                self._refused(_kind(index), None, origin, "ignored", _OFF)
            return
        requests, refused = from_headers(captured)
        if cert is None or user is None or verdict_code is None:
            for request in requests:
                self._refused(
                    request.kind,
                    None,
                    origin,
                    "ignored",
                    "the request that produced this response had no identified certificate: "
                    "Identity Plus did not identify it (no certificate, or a route where the "
                    "certificate alone decides)",
                )
            requests = []
        target = (
            Target(
                cert.serial,
                cert.sha256,
                user.username if user is not None and verdict_code == "OK 0002" else None,
            )
            if cert is not None
            else None
        )
        for kind, reason in refused:
            self._refused(kind, target, origin, "invalid", reason)
        for request in requests:
            assert target is not None
            if request.kind == "unbind" and request.local_user_name != target.local_user_name:
                # Identity Plus unbinds by name alone: only the requester's own name is theirs.
                self._refused(
                    request.kind,
                    target,
                    origin,
                    "invalid",
                    "an unbind must name the user bound to the requesting certificate",
                    request,
                )
                continue
            if request.kind == "bind" and request.local_user_name == target.local_user_name:
                self._refused(
                    request.kind,
                    target,
                    origin,
                    "duplicate",
                    "the certificate is bound to this user already",
                    request,
                )
                continue
            self.submit(request, target, origin)

    def submit(self, request: ReportRequest, target: Target, origin: Origin) -> Report | Result:
        """Queue a checked report: the ``Report`` (its ``result`` says how it ends), or the
        ``Result`` of refusing it at once (off, duplicate, limited, queue full)."""
        kind = request.kind
        if self._closed:
            return self._refused(
                kind, target, origin, "ignored", "the sidecar is stopping", request
            )
        if not self._config.enabled:
            return self._refused(kind, target, origin, "ignored", _OFF, request)
        if self._backend() is None:
            return self._refused(
                kind,
                target,
                origin,
                "ignored",
                "trust reports need identity.backend: identityplus",
                request,
            )
        key = (kind, target.key, request.subject)
        duplicate = self._gate.duplicate(key)
        if duplicate is not None:
            return self._refused(kind, target, origin, "duplicate", duplicate, request)
        wait = self._gate.take(target.key)
        if wait is not None:
            return self._refused(
                kind,
                target,
                origin,
                "limited",
                "too many reports about this certificate, or in all "
                "(identity.identityplus.reports.per_certificate, overall)",
                request,
                retry_after=wait,
            )
        if self.pending >= self._config.max_pending:
            return self._refused(
                kind,
                target,
                origin,
                "overflow",
                "too many reports pending (identity.identityplus.reports.max_pending)",
                request,
            )
        report = Report(next(self._ids), request, target, origin, key, self._wall())
        self._gate.pending(key)
        chain = self._chains.get(target.key)
        if chain is None:
            chain = self._chains[target.key] = deque()
            task = asyncio.get_running_loop().create_task(
                self._run(target.key, chain), name=f"trust-report-{target.key[:16]}"
            )
            self._tasks[target.key] = task
        chain.append(report)
        return report

    # ---- sending ----------------------------------------------------------------------------

    async def _run(self, certificate: str, chain: deque[Report]) -> None:
        """Send one certificate's reports, in order, until none is left."""
        try:
            while chain:
                report = chain[0]
                result = await self._deliver(report)
                try:
                    await self._drop_verdict(report, result)
                finally:
                    # still in the chain (pending) until its verdict is gone everywhere
                    chain.popleft()
                    self._finish(report, result)
        except asyncio.CancelledError:
            for report in chain:
                self._finish(
                    report,
                    Result(
                        "failed",
                        "the sidecar stopped before it was sent",
                        None,
                        None,
                        report.attempts,
                    ),
                )
            chain.clear()
            raise
        finally:
            self._chains.pop(certificate, None)
            self._tasks.pop(certificate, None)

    async def _deliver(self, report: Report) -> Result:
        """Make the call, again after a backoff while it fails (see the module's docstring)."""
        kind = report.request.kind
        while True:
            report.state = "queued"
            async with self._slots:
                report.state = "sending"
                report.attempts += 1
                reply: CommunityReply | None = None
                failure: IdentityUnavailable | None = None
                try:
                    reply = await self._call(report)
                except IdentityUnavailable as unavailable:
                    failure = unavailable
                except Exception as exc:  # a bug, not the service: never retried
                    _log().error("trust_report_error", report_id=report.id, exc_info=exc)
                    return Result(
                        "failed", f"unexpected error: {exc!r}", None, None, report.attempts
                    )
            if reply is not None:
                code = reply.code
                if code.startswith("OK"):
                    return Result(
                        "succeeded", reply.message, code, reply.reference, report.attempts
                    )
                if code in _ALREADY[kind]:
                    return Result("already", reply.message, code, None, report.attempts)
                if code != _RETRY_CODE:
                    return Result(
                        "failed",
                        f"{_SERVICE} refused the report: {reply.message or code}",
                        code,
                        None,
                        report.attempts,
                    )
                reason = f"{_SERVICE} answered {code}: {reply.message}"
                code_seen: str | None = code
            else:
                assert failure is not None
                reason, code_seen = failure.reason, failure.code
                if code_seen is not None and _ER_CODE.match(code_seen):
                    return Result("failed", reason, code_seen, None, report.attempts)
            if report.attempts > self._config.retries:
                return Result(
                    "failed",
                    f"{reason} (gave up after {report.attempts} attempts)",
                    code_seen,
                    None,
                    report.attempts,
                )
            delay = self._backoff(report.attempts)
            report.state = "waiting"
            report.next_attempt = self._wall() + delay
            if self._metrics is not None:
                self._metrics.trust_report_retries.labels(kind).inc()
            await asyncio.sleep(delay)
            report.next_attempt = None

    def _backoff(self, attempts: int) -> float:
        """``backoff`` doubled for each attempt made after the first, up to ``max_backoff``;
        then between half and all of it (jitter: retries of many reports do not align)."""
        config = self._config
        full = min(config.max_backoff, config.backoff * 2.0 ** (attempts - 1))
        return full * (0.5 + 0.5 * self._jitter())

    async def _call(self, report: Report) -> CommunityReply:
        backend = self._backend()
        if backend is None:
            raise IdentityUnavailable(
                "the identity backend is no longer identityplus", code="ER 0000"
            )
        request, target, origin = report.request, report.target, report.origin
        if request.kind == "bind":
            assert request.local_user_name is not None
            return await backend.bind(target.serial, request.local_user_name)
        if request.kind == "unbind":
            assert request.local_user_name is not None
            return await backend.unbind(request.local_user_name)
        if request.kind == "trust":
            assert request.trust_type is not None
            return await backend.trust(
                target.serial,
                request.trust_type,
                tokens=request.tokens,
                local_user_name=target.local_user_name,
            )
        assert request.severity is not None
        return await backend.report_intrusion(
            target.serial,
            request.severity,
            message=request.message,
            ip_address=origin.client_ip,
            url=origin.path,
        )

    # ---- ending -----------------------------------------------------------------------------

    async def _drop_verdict(self, report: Report, result: Result) -> None:
        """After a report that changed the certificate's profile: its verdict, everywhere."""
        if result.outcome not in DONE or report.request.kind not in _CHANGES_PROFILE:
            return
        try:
            await self._forget(report.target)
        except Exception as exc:  # the report is done all the same; its chain goes on
            _log().error("trust_report_forget_failed", report_id=report.id, exc_info=exc)

    def _finish(self, report: Report, result: Result) -> None:
        request, target = report.request, report.target
        self._gate.ended(report.key, done=result.outcome in DONE)
        if result.outcome == "failed":
            self._failed.append(
                {
                    "time": self._wall(),
                    "id": report.id,
                    "type": request.kind,
                    "certificate": target.label,
                    "source": report.origin.source,
                    "code": result.code,
                    "reason": result.reason,
                    "attempts": result.attempts,
                    "request_id": report.origin.request_id,
                }
            )
        self._record(request.kind, target, report.origin, result, request, report.id)
        if not report.result.done():
            report.result.set_result(result)

    def _refused(
        self,
        kind: ReportKind,
        target: Target | None,
        origin: Origin,
        outcome: Outcome,
        reason: str,
        request: ReportRequest | None = None,
        *,
        retry_after: int | None = None,
    ) -> Result:
        """A report that ends before it is queued."""
        result = Result(outcome, reason, retry_after=retry_after)
        self._record(kind, target, origin, result, request, None)
        return result

    def _record(
        self,
        kind: ReportKind,
        target: Target | None,
        origin: Origin,
        result: Result,
        request: ReportRequest | None,
        report_id: int | None,
    ) -> None:
        """The one log event and the one count of every report."""
        if self._metrics is not None:
            self._metrics.trust_reports.labels(kind, result.outcome).inc()
        outcome = result.outcome
        if outcome in DONE:
            level = "info"
        elif outcome == "duplicate":
            level = "debug"  # an application may say the same on every response
        elif origin.source == "response" and outcome != "failed" and not self._may_log():
            return
        else:
            level = "warning"
        fields: dict[str, object] = {
            "type": kind,
            "outcome": outcome,
            "source": origin.source,
            "reason": result.reason,
        }
        if report_id is not None:
            fields["report_id"] = report_id
        if result.code is not None:
            fields["code"] = result.code
        if result.reference is not None:
            fields["reference"] = result.reference
        if result.attempts:
            fields["attempts"] = result.attempts
        if origin.request_id is not None:
            fields["request_id"] = origin.request_id
        if target is not None:
            fields.update(target.describe())
        if request is not None:
            fields.update(request.fields())
        if self._suppressed and level == "warning":
            fields["suppressed"] = self._suppressed
            self._suppressed = 0
        getattr(_log(), level)("trust_report", **fields)

    def _may_log(self) -> bool:
        """A refusal's log event fits within ``_REFUSAL_LOGS``; else it is counted as
        suppressed (the next warning says how many)."""
        if self._log_bucket.take(_REFUSAL_LOGS, self._clock()):
            return True
        self._suppressed += 1
        return False

    # ---- reading and stopping ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What the status page shows: the settings, pending reports and recent failures."""
        pending = [report for chain in self._chains.values() for report in chain]
        pending.sort(key=lambda r: r.id)
        config = self._config
        return {
            "enabled": config.enabled,
            "pending": len(pending),
            "pending_reports": [r.describe() for r in pending[:_SHOW_PENDING]],
            "failed": list(self._failed),
            "settings": {
                "concurrency": config.concurrency,
                "max_pending": config.max_pending,
                "retries": config.retries,
                "per_certificate_per_minute": config.per_certificate,
                "overall_per_minute": config.overall,
            },
        }

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Stop taking reports; give those being sent ``timeout`` seconds, then give up on
        the rest (each logged as failed)."""
        self._closed = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


_OFF = "trust reports are off (identity.identityplus.reports)"
_SERVICE = "Identity Plus"


def _kind(index: int) -> ReportKind:
    return KINDS[index]


__all__ = [
    "Community",
    "InvalidReport",
    "Origin",
    "Report",
    "Reporter",
    "Result",
    "Target",
]
