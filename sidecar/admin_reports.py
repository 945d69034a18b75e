"""``POST /identityplus/{bind,unbind,trust,intrusion}`` on the admin listener: trust reports for
batch jobs and support staff, through the same reporter as the application's headers.

The body is JSON naming the certificate (``sha256``, ``serial``, or both) and the report's
values (``report_values.ADMIN_KEYS``). The call waits up to ``reports.admin_wait`` for the
outcome: 200 once Identity Plus has it (or had it: ``already``, or a ``duplicate``), 202
while it is still being retried (it goes on in the background), 502 when Identity Plus
refused it or kept failing, 400 for a bad body, 404 when the certificate is named by a
fingerprint this process has not seen (give its serial) or reports are off, 429 over the
rate limits, 503 when the queue is full or the process is stopping.

Local only by default (``peer_allowed``): a peer that is not a loopback address must be in
``admin.reports_from``. The admin listener's own rules (``admin.refusal``) apply first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from .certs import ClientCert, normalize_fingerprint, parse_serial
from .identity.report_values import KINDS, InvalidReport, ReportKind, from_admin
from .identity.reports import Origin, Report, Reporter, Result, Target
from .log import get_logger

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAX_URL = 2048

log = get_logger("sidecar.admin")

#: the status each way a report can end answers with
_STATUS = {
    "succeeded": 200,
    "already": 200,
    "duplicate": 200,
    "failed": 502,
    "invalid": 400,
    "limited": 429,
    "overflow": 503,
    "ignored": 503,
}


def peer_allowed(peer: str | None, allowed: Sequence[IPNetwork]) -> bool:
    """Whether a peer may send trust reports: a loopback address (an IPv4 one written as
    IPv6 included), or one in ``allowed``. Fails closed: anything that is not an address
    (a Unix socket's empty name included) is refused."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return True
    return any(address in network for network in allowed)


def _json(
    status: int, doc: dict[str, object], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(doc) + "\n",
        content_type="application/json",
        headers=headers,
    )


def report_view(
    reporter: Reporter,
    *,
    seen: Callable[[str], ClientCert | None],
    allowed: Callable[[], Sequence[IPNetwork]] | None,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of ``POST /identityplus/{kind}``. ``seen`` finds a recently seen client
    certificate by fingerprint; ``allowed`` gives ``admin.reports_from`` (None: no peer check,
    for a worker's private socket, which only its supervisor reaches: it checks)."""

    async def view(request: web.Request) -> web.Response:
        if allowed is not None and not peer_allowed(request.remote, allowed()):
            log.warning(
                "admin_request_refused",
                method=request.method,
                path=request.path[:200],
                client=request.remote,
                status=403,
                reason="trust reports from a peer that is not local",
            )
            return _json(
                403,
                {
                    "error": "trust reports are accepted from loopback addresses only, and "
                    "from the networks listed in admin.reports_from"
                },
            )
        kind = request.match_info["kind"]
        if kind not in KINDS:
            return _json(404, {"error": f"no such report: {kind} (one of {', '.join(KINDS)})"})
        if request.content_type != "application/json":
            return _json(415, {"error": "send the report as Content-Type: application/json"})
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _json(400, {"error": "the body is not JSON"})
        if not isinstance(body, dict):
            return _json(400, {"error": "the body must be a JSON object"})
        return await _report(reporter, _kind(kind), body, seen)

    return view


def _kind(text: str) -> ReportKind:
    return KINDS[KINDS.index(text)]


async def _report(
    reporter: Reporter,
    kind: ReportKind,
    body: dict[str, object],
    seen: Callable[[str], ClientCert | None],
) -> web.Response:
    try:
        target = _target(body, seen)
        values = from_admin(kind, body)
        origin = Origin("admin", None, _address(body.get("ip_address")), _url(body.get("url")))
    except InvalidReport as exc:
        return _json(400, {"error": str(exc)})
    except LookupError as exc:
        # (a supervisor then asks its next worker, which may have seen it)
        return _json(404, {"error": str(exc.args[0]), "unknown_certificate": True})
    if not reporter.enabled:
        return _json(404, {"error": "trust reports are off: set identity.identityplus.reports"})
    submitted = reporter.submit(values, target, origin)
    if isinstance(submitted, Result):
        return _answer(submitted, None)
    return await _wait(submitted, reporter.admin_wait)


async def _wait(report: Report, seconds: float) -> web.Response:
    try:
        result = await asyncio.wait_for(asyncio.shield(report.result), seconds)
    except TimeoutError:
        return _json(
            202,
            {
                "outcome": "pending",
                "report_id": report.id,
                "attempts": report.attempts,
                "reason": "not sent yet, or being retried; it goes on in the background "
                "(the status page lists it)",
            },
        )
    return _answer(result, report.id)


def _answer(result: Result, report_id: int | None) -> web.Response:
    doc: dict[str, object] = {"outcome": result.outcome, "reason": result.reason}
    for key, value in (
        ("report_id", report_id),
        ("code", result.code),
        ("reference", result.reference),
        ("attempts", result.attempts or None),
    ):
        if value is not None:
            doc[key] = value
    headers = {"Retry-After": str(result.retry_after)} if result.retry_after is not None else None
    return _json(_STATUS[result.outcome], doc, headers)


def _target(body: dict[str, object], seen: Callable[[str], ClientCert | None]) -> Target:
    """The certificate a body names: by ``serial`` (what Identity Plus knows it by), by
    ``sha256`` if this process saw it lately, or both (the serial is what is reported)."""
    sha_value, serial_value = body.get("sha256"), body.get("serial")
    if sha_value is None and serial_value is None:
        raise InvalidReport("name the certificate: sha256, serial, or both")
    sha256: str | None = None
    if sha_value is not None:
        if not isinstance(sha_value, str):
            raise InvalidReport("sha256 must be a string")
        try:
            sha256 = normalize_fingerprint(sha_value)
        except ValueError as exc:
            raise InvalidReport(f"sha256: {exc}") from None
    serial: int | None = None
    if serial_value is not None:
        if isinstance(serial_value, bool) or not isinstance(serial_value, str | int):
            raise InvalidReport("serial must be a string (decimal, 0x hex or colon hex)")
        try:
            serial = parse_serial(str(serial_value))
        except ValueError as exc:
            raise InvalidReport(str(exc)) from None
        if serial <= 0:
            raise InvalidReport("serial must be positive")
    if serial is None:
        assert sha256 is not None
        cert = seen(sha256)
        if cert is None:
            raise LookupError(
                "no certificate with this fingerprint was seen lately: give its serial"
            )
        serial = cert.serial
    return Target(serial, sha256)


def _address(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidReport("ip_address must be a string")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise InvalidReport(f"ip_address is not an IP address: {value[:60]!r}") from None


def _url(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_URL:
        raise InvalidReport(f"url must be a string of 1 to {_MAX_URL} characters")
    if not all("\x21" <= char <= "\x7e" for char in value):
        raise InvalidReport("url must be visible ASCII (percent-encode the rest)")
    return value
