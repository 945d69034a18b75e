"""The deny-list on the admin listener: ``GET``, ``POST`` and ``DELETE /deny?sha256=``.

``deny_routes`` adds the three routes to a worker's (or a single process's) admin application,
behind the same ``admin.guard`` as every other route (a state change needs ``X-Sidecar-Admin``
or a JSON body). With ``listen.workers`` above 1 the supervisor relays ``POST`` and ``DELETE``
to every worker and keeps the run-time entries in ``RUNTIME_DENY_FILE`` in its private runtime
folder, next to the workers' admin sockets, so that a worker it restarts starts with them
(``read_runtime``).

With a shared cache the file also says which entries a worker has told the fleet of, and
which fleet (a relayed ``POST`` whose answer says ``"fleet": true`` names it in
``FLEET_HEADER``; a worker that sends one late tells the supervisor). A restarted worker
counts those sent to its own fleet as the fleet's: once it has the fleet's set, an entry
another replica took off meanwhile goes here too, instead of coming back. The others (made
while Redis was unavailable, or sent to the fleet of a shared cache a reload replaced) it
sends when Redis answers, as the worker that made them would have.

With a shared cache (``identity.cache.shared``) ``fleet`` takes each change to every replica
through Redis; the answer says whether it did (``"fleet": true``), or, with Redis unusable,
that the change holds here only for now (207, ``"fleet": false``): a denial goes to the fleet
when Redis answers, a removal does not.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from aiohttp import web

from ..certs import normalize_fingerprint
from .gate import Revocation

#: the supervisor's list of run-time deny entries, in its runtime folder (one JSON list)
RUNTIME_DENY_FILE = "deny.json"

#: ``fleet(sha256, add)``: the fleet's name (``SharedCache.fleet_id``, of the cache the change
#: went through) once every replica was told, False when they could not be, None without a
#: shared cache
Fleet = Callable[[str, bool], Awaitable[str | bool | None]]

#: what a 207 says (``fleet`` false): a denial is sent when Redis answers (``shared.store``),
#: a removal is not (the fleet's entry wins then: it fails closed)
_DENIED_LOCAL_ONLY = (
    "the shared cache is unavailable: the entry is local only for now; this replica adds it "
    "to every replica's list when Redis answers"
)
_REMOVED_LOCAL_ONLY = (
    "the shared cache is unavailable: taken off here only; the other replicas keep it, and "
    "when Redis answers this one takes the fleet's list again (denying it again if the list "
    "still holds it): repeat the call then"
)


def _json(status: int, doc: Mapping[str, object]) -> web.Response:
    return web.Response(status=status, text=json.dumps(doc) + "\n", content_type="application/json")


def fingerprint_of(query: Mapping[str, str]) -> str:
    """The ``sha256`` parameter, normalised; raises ``ValueError`` naming the problem."""
    unknown = set(query) - {"sha256"}
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    text = query.get("sha256")
    if text is None:
        raise ValueError("give the certificate's SHA-256 fingerprint: ?sha256=")
    return normalize_fingerprint(text)


def _fleet_answer(doc: dict[str, object], told: str | bool | None, local_only: str) -> web.Response:
    """``doc`` with what ``fleet`` said (see ``Fleet``): 200, or 207 when the fleet was not
    told; no ``"fleet"`` without a shared cache."""
    if told is None:
        return _json(200, doc)
    reached = told is not False
    doc["fleet"] = reached
    if not reached:
        doc["error"] = local_only
    return _json(200 if reached else 207, doc)


def deny_routes(
    app: web.Application,
    revocation: Revocation,
    fleet: Fleet | None = None,
) -> None:
    """``GET /deny`` lists the entries; ``POST /deny?sha256=`` refuses a certificate from now
    on (open connections included) and drops its cached verdict; ``DELETE /deny?sha256=``
    takes a run-time entry off (one in ``tls.deny`` is the configuration's: 409)."""

    async def listing(request: web.Request) -> web.Response:
        return _json(200, revocation.denied())

    async def add(request: web.Request) -> web.Response:
        try:
            sha256 = fingerprint_of(request.query)
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        new = revocation.deny(sha256)
        told = await fleet(sha256, True) if fleet is not None else None
        answer = _fleet_answer({"denied": sha256, "new": new}, told, _DENIED_LOCAL_ONLY)
        if isinstance(told, str):
            answer.headers[FLEET_HEADER] = told
        return answer

    async def remove(request: web.Request) -> web.Response:
        try:
            sha256 = fingerprint_of(request.query)
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        result = revocation.allow(sha256)
        if result == "configured":
            return _json(
                409,
                {
                    "error": "this certificate is denied by tls.deny: remove it from the configuration"
                },
            )
        if result == "absent":
            return _json(404, {"error": "this certificate is not on the run-time deny-list"})
        told = await fleet(sha256, False) if fleet is not None else None
        return _fleet_answer({"removed": sha256}, told, _REMOVED_LOCAL_ONLY)

    app.router.add_get("/deny", listing)
    app.router.add_post("/deny", add)
    app.router.add_delete("/deny", remove)


#: the header a worker's answer names its fleet in (``SharedCache.fleet_id``) when the fleet
#: took the change: its supervisor writes it down (see the module's docstring)
FLEET_HEADER = "X-Sidecar-Fleet"


class Runtime(NamedTuple):
    """The run-time entries a supervisor keeps for the workers it (re)starts: every entry,
    and, for those a worker has told a fleet of, which fleet (``SharedCache.fleet_id``)."""

    denied: list[str]
    sent: dict[str, str]


def read_runtime(folder: Path) -> Runtime:
    """The supervisor's run-time entries (none when there is no file). Raises ``ValueError``
    naming the file when it is not what ``write_runtime`` writes (or a JSON list of
    fingerprints, as earlier versions wrote it: none of them counted as sent)."""
    path = folder / RUNTIME_DENY_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return Runtime([], {})
    if isinstance(doc, list):
        doc = {"denied": doc, "sent": {}}
    sent = doc.get("sent") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("denied"), list)
        or not isinstance(sent, dict)
        or not all(isinstance(fleet, str) for fleet in sent.values())
    ):
        raise ValueError(
            f"{path}: not a deny list (denied: a list of fingerprints; sent: fingerprint to fleet)"
        )
    denied = [normalize_fingerprint(str(item)) for item in doc["denied"]]
    listed = set(denied)
    kept = {normalize_fingerprint(str(sha256)): fleet for sha256, fleet in sent.items()}
    return Runtime(denied, {k: v for k, v in kept.items() if k in listed})


def write_runtime(folder: Path, entries: set[str], sent: dict[str, str]) -> None:
    """Replace the file at once (a worker starting meanwhile reads the old or the new list)."""
    target = folder / RUNTIME_DENY_FILE
    temporary = target.with_suffix(".tmp")
    kept = {sha256: sent[sha256] for sha256 in sorted(sent) if sha256 in entries}
    temporary.write_text(json.dumps({"denied": sorted(entries), "sent": kept}))
    temporary.replace(target)
