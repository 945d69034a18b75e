"""The status page (``GET /`` on the admin listener): what an operator opens first when
someone says "I can't get in".

A worker builds its ``document`` (a JSON object) from what it runs: the build, the
configuration and its last reload, the listener's certificate and the trust anchors in force,
the identity backend's health, latency and credentials, the verdict cache, the last
refusals, and the pending and failed trust reports. Counters are read from the metrics
registry, the same collectors ``/metrics`` exports. A supervisor ``merge``s its workers'
documents. ``respond`` answers the document as JSON (``Accept: application/json``) or as
a plain server-rendered HTML page: every value escaped, a little CSS, no script.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry

from .certs import read_certificates
from .errors import CertificateError
from .hosts import certificate_names
from .observe import BOUNDS, WINDOW_SECONDS, Observations, quantile

#: refusals and failed reports shown
SHOW_REFUSALS = 50
SHOW_FAILED = 20
_HEADERS = {
    # Nothing on this page runs or loads anything: it cannot be turned against its reader.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Document = dict[str, Any]


# ---- what a worker knows ------------------------------------------------------------------


def certificate_info(cert: x509.Certificate, now: float | None = None) -> dict[str, Any]:
    """A certificate as the page shows it: who, until when, and its fingerprint."""
    not_after = cert.not_valid_after_utc
    left = not_after.timestamp() - (time.time() if now is None else now)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": not_after.isoformat(),
        "days_left": int(left // 86400),
        "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    }


def certificates(
    server_certificate: Path | None,
    client_ca: Iterable[Path],
    pinned: Iterable[Path],
    sites: Iterable[tuple[str, Sequence[str], Path, str]] = (),
) -> dict[str, Any]:
    """The listener's certificate and the trust anchors, as loaded (at start and each reload:
    what is in force, not what the files hold since). With ``servers[]``, ``sites`` gives each
    one (where configured, its names, its certificate, its client certificate mode): the
    listener's certificate is then the first server's, the one clients without SNI get."""
    listener = _leaf(server_certificate)
    anchors: list[dict[str, Any]] = []
    for kind, paths in (("ca", client_ca), ("pinned", pinned)):
        for path in paths:
            try:
                for cert in read_certificates(path):
                    anchors.append({**certificate_info(cert), "file": str(path), "kind": kind})
            except CertificateError as exc:
                anchors.append({"file": str(path), "kind": kind, "error": str(exc)})
    servers = [
        {
            "origin": origin,
            "server_names": list(names),
            "client_certificate": mode,
            **_leaf(certificate),
        }
        for origin, names, certificate, mode in sites
    ]
    return {"listener": listener, "trust_anchors": anchors, "servers": servers}


def _leaf(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {"none": "listen.tls: false, no certificate served"}
    try:
        leaf = read_certificates(path)[0]
    except CertificateError as exc:
        return {"error": str(exc)}
    return {**certificate_info(leaf), "names": certificate_names(leaf)}


def counters(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of the metric family ``name`` (``_created`` ones aside), read from the
    registry as a scrape would."""
    out: list[tuple[dict[str, str], float]] = []
    for family in registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.append((dict(sample.labels), float(sample.value)))
    return out


def _total(registry: CollectorRegistry, name: str) -> float:
    return sum(value for _, value in counters(registry, name))


def document(
    *,
    version: str,
    build: str,
    started: float,
    config_file: str | None,
    reload: Mapping[str, Any] | None,
    certs: Mapping[str, Any],
    server_names: Sequence[str],
    backend: str,
    credential_problem: str | None,
    agent_expiry: float | None,
    observations: Observations,
    reports: Mapping[str, Any],
    registry: CollectorRegistry,
    shared_cache: bool = False,
) -> Document:
    """One worker's status (see the module's docstring)."""
    now = time.time()
    histogram = observations.latency.histogram()
    reloads = {
        labels.get("result", ""): value
        for labels, value in counters(registry, "sidecar_config_reloads")
    }
    hits = _total(registry, "sidecar_cache_hits")
    misses = _total(registry, "sidecar_cache_misses")
    outcomes: dict[str, float] = {}
    for labels, value in counters(registry, "sidecar_trust_reports"):
        outcome = labels.get("outcome", "")
        outcomes[outcome] = outcomes.get(outcome, 0.0) + value
    last_error = observations.last_error
    return {
        "sidecar": {
            "version": version,
            "build": build,
            "started": started,
            "uptime_seconds": round(now - started, 1),
            "config_file": config_file,
            "workers": 1,
        },
        "reload": {
            "last": dict(reload) if reload is not None else None,
            "successes": int(reloads.get("success", 0)),
            "failures": int(reloads.get("failure", 0)),
        },
        "listener": {**certs.get("listener", {}), "server_names": list(server_names)},
        "trust_anchors": list(certs.get("trust_anchors", [])),
        "servers": list(certs.get("servers", [])),
        "identity": {
            "backend": backend,
            "health": _health(backend, credential_problem, observations),
            "latency_histogram": histogram,
            "last_error": (
                {"time": last_error[0], "reason": last_error[1], "code": last_error[2]}
                if last_error is not None
                else None
            ),
            "credentials": {
                "state": (
                    "n/a"
                    if backend != "identityplus"
                    else ("refused" if credential_problem else "accepted")
                ),
                "problem": credential_problem,
                "agent_expires": (
                    datetime.fromtimestamp(agent_expiry, UTC).isoformat()
                    if agent_expiry is not None
                    else None
                ),
            },
            "lookups": int(_total(registry, "sidecar_identity_lookups")),
        },
        "cache": {
            "entries": int(_total(registry, "sidecar_cache_entries")),
            "hits": int(hits),
            "misses": int(misses),
            "stale_served": int(_total(registry, "sidecar_cache_stale_served")),
            "evictions": int(_total(registry, "sidecar_cache_evictions")),
            "shared": _shared(registry) if shared_cache else None,
        },
        "refusals": list(reversed(observations.refusals)),
        "reports": {**reports, "outcomes": {k: int(v) for k, v in sorted(outcomes.items())}},
    }


def _shared(registry: CollectorRegistry) -> dict[str, Any]:
    """The shared cache (identity.cache.shared), from the metrics ``/metrics`` exports."""
    purges = {
        labels.get("direction", ""): int(value)
        for labels, value in counters(registry, "sidecar_cache_shared_purges")
    }
    return {
        "up": _total(registry, "sidecar_cache_shared_up") == 1,
        "hits": int(_total(registry, "sidecar_cache_shared_hits")),
        "misses": int(_total(registry, "sidecar_cache_shared_misses")),
        "skipped": int(_total(registry, "sidecar_cache_shared_skipped")),
        "errors": int(_total(registry, "sidecar_cache_shared_errors")),
        "fallback_seconds": round(_total(registry, "sidecar_cache_shared_fallback_seconds"), 1),
        "purges_sent": purges.get("sent", 0),
        "purges_received": purges.get("received", 0),
    }


def _health(backend: str, credential_problem: str | None, observations: Observations) -> str:
    if credential_problem:
        return "credentials refused"
    if observations.last_lookup_failed:
        return "failing"
    if observations.lookups == 0:
        return "no lookups yet"
    return "ok"


# ---- a supervisor's workers, as one ---------------------------------------------------------

_HEALTH_ORDER = ("credentials refused", "failing", "ok", "no lookups yet")
#: what the page shows of the backend when no worker answered
_NO_IDENTITY: Document = {
    "backend": "unknown",
    "last_error": None,
    "credentials": {"state": "unknown", "problem": None, "agent_expires": None},
}


def merge(workers: Sequence[Document | None], supervisor: Mapping[str, Any]) -> Document:
    """One document for a supervisor and its workers (None: a worker that did not answer):
    counters summed, latency histograms added, the newest refusals and failures of all."""
    docs = [(i, d) for i, d in enumerate(workers) if d is not None]
    first = docs[0][1] if docs else {}
    histogram = [0] * (len(BOUNDS) + 1)
    for _, doc in docs:
        for i, count in enumerate(doc["identity"].get("latency_histogram", [])):
            if i < len(histogram):
                histogram[i] += int(count)
    refusals = [{**refusal, "worker": i} for i, doc in docs for refusal in doc.get("refusals", [])]
    refusals.sort(key=lambda r: r.get("time", 0), reverse=True)
    failed = [{**item, "worker": i} for i, doc in docs for item in doc["reports"].get("failed", [])]
    failed.sort(key=lambda r: r.get("time", 0), reverse=True)
    pending = [
        {**item, "worker": i}
        for i, doc in docs
        for item in doc["reports"].get("pending_reports", [])
    ]
    errors = [doc["identity"]["last_error"] for _, doc in docs if doc["identity"].get("last_error")]
    problems = [
        doc["identity"]["credentials"]["problem"]
        for _, doc in docs
        if doc["identity"]["credentials"].get("problem")
    ]
    healths = [doc["identity"]["health"] for _, doc in docs]
    outcomes: dict[str, int] = {}
    for _, doc in docs:
        for key, value in doc["reports"].get("outcomes", {}).items():
            outcomes[key] = outcomes.get(key, 0) + int(value)

    def total(section: str, key: str) -> int:
        return sum(int(doc[section].get(key, 0)) for _, doc in docs)

    identity = dict(first.get("identity") or _NO_IDENTITY)
    identity.update(
        {
            "health": min(healths, key=_HEALTH_ORDER.index) if healths else "no worker answered",
            "latency_histogram": histogram,
            "last_error": max(errors, key=lambda e: e.get("time", 0)) if errors else None,
            "lookups": total("identity", "lookups"),
        }
    )
    if problems:
        identity["credentials"] = {**identity["credentials"], "state": "refused"}
        identity["credentials"]["problem"] = problems[0]
    return {
        "sidecar": {**dict(first.get("sidecar", {})), **supervisor},
        "reload": {
            "last": [
                {**(doc["reload"]["last"] or {}), "worker": i}
                for i, doc in docs
                if doc["reload"].get("last")
            ],
            "successes": total("reload", "successes"),
            "failures": total("reload", "failures"),
        },
        "listener": first.get("listener") or {"error": "no worker answered"},
        "trust_anchors": first.get("trust_anchors", []),
        "servers": first.get("servers", []),
        "identity": identity,
        "cache": {
            **{
                key: total("cache", key)
                for key in ("entries", "hits", "misses", "stale_served", "evictions")
            },
            "shared": _merge_shared([doc["cache"].get("shared") for _, doc in docs]),
        },
        "refusals": refusals[:SHOW_REFUSALS],
        "reports": {
            "enabled": any(doc["reports"].get("enabled") for _, doc in docs),
            "pending": total("reports", "pending"),
            "pending_reports": pending,
            "failed": failed[:SHOW_FAILED],
            "settings": first.get("reports", {}).get("settings", {}),
            "outcomes": dict(sorted(outcomes.items())),
        },
    }


def _merge_shared(workers: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The workers' shared-cache numbers added up: up only while every worker has Redis."""
    answers = [w for w in workers if w is not None]
    if not answers:
        return None
    merged: dict[str, Any] = {"up": all(bool(w.get("up")) for w in answers)}
    for key in ("hits", "misses", "skipped", "errors", "purges_sent", "purges_received"):
        merged[key] = sum(int(w.get(key, 0)) for w in answers)
    merged["fallback_seconds"] = round(sum(float(w.get("fallback_seconds", 0)) for w in answers), 1)
    return merged


# ---- answering --------------------------------------------------------------------------------


def finish(doc: Document) -> Document:
    """The numbers read from others (quantiles, the hit ratio), added before answering."""
    identity = doc["identity"]
    histogram = identity.get("latency_histogram", [])
    p50, p99 = quantile(histogram, 0.5), quantile(histogram, 0.99)
    identity["latency_ms"] = {
        "p50": None if p50 is None else round(p50 * 1000, 1),
        "p99": None if p99 is None else round(p99 * 1000, 1),
        "samples": sum(histogram),
        "window_seconds": WINDOW_SECONDS,
    }
    cache = doc["cache"]
    asked = cache.get("hits", 0) + cache.get("misses", 0)
    cache["hit_ratio"] = round(cache["hits"] / asked, 4) if asked else None
    return doc


def wants_json(accept: str | None) -> bool:
    """JSON when the client asks for it before (or instead of) HTML."""
    if not accept:
        return False
    kinds = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    if "application/json" not in kinds:
        return False
    return "text/html" not in kinds or kinds.index("application/json") < kinds.index("text/html")


def respond(doc: Document, accept: str | None) -> web.Response:
    """The status document as JSON or as the HTML page."""
    doc = finish(doc)
    if wants_json(accept):
        return web.Response(
            text=json.dumps(doc, indent=2, sort_keys=False) + "\n",
            content_type="application/json",
            headers=_HEADERS,
        )
    return web.Response(text=render(doc), content_type="text/html", headers=_HEADERS)


# ---- the page --------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;width:100%}table.kv th{width:13em}th,td{text-align:left;padding:.2em .6em .2em 0;vertical-align:top}
th{font-weight:600;color:#555;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.95em}.ok{color:#0a6b2d}.bad{color:#b00020;font-weight:600}.warn{color:#8a5a00}
.muted{color:#777}p.note{color:#555;margin:.3em 0}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _when(value: object) -> str:
    if not isinstance(value, int | float):
        return "—"
    moment = datetime.fromtimestamp(value, UTC)
    ago = time.time() - value
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({_duration(ago)} ago)"


def _duration(seconds: float) -> str:
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    """Key-value rows; values are HTML already escaped by the caller."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def _table(headings: Sequence[str], rows: Iterable[Sequence[object]], empty: str) -> str:
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    if not body:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headings)
    return f"<table><tr>{head}</tr>{body}</table>"


def _expiry(cert: Mapping[str, Any]) -> str:
    if "error" in cert:
        return f'<span class="bad">{_e(cert["error"])}</span>'
    if "none" in cert:
        return '<span class="muted">none</span>'
    days = cert.get("days_left", 0)
    css = "bad" if days < 7 else ("warn" if days < 30 else "ok")
    when = str(cert.get("not_after", ""))[:16].replace("T", " ")
    return f'{_e(when)} UTC <span class="{css}">({_e(days)} days left)</span>'


def _shared_rows(shared: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if shared is None:
        return [("shared cache", '<span class="muted">none (each worker caches alone)</span>')]
    state = (
        '<span class="ok">up</span>'
        if shared.get("up")
        else '<span class="bad">unreachable: each worker caches alone</span>'
    )
    return [
        ("shared cache", state),
        (
            "shared hits",
            f"{_e(shared.get('hits'))} hits, {_e(shared.get('misses'))} misses, "
            f"{_e(shared.get('skipped'))} lookups without it, {_e(shared.get('errors'))} errors",
        ),
        ("without it", f"{_e(shared.get('fallback_seconds'))} s in all"),
        (
            "purges",
            f"{_e(shared.get('purges_sent'))} sent, {_e(shared.get('purges_received'))} received",
        ),
    ]


def render(doc: Document) -> str:
    """The HTML page for a (finished) status document."""
    s, identity, cache, reports = doc["sidecar"], doc["identity"], doc["cache"], doc["reports"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>sidecar status</title><style>{_CSS}</style></head><body>",
        f"<h1>mTLS identity sidecar {_e(s.get('version'))}</h1>",
        f'<p class="note">{_e(s.get("build"))} build · up {_e(_duration(s.get("uptime_seconds", 0)))}'
        f" · {_e(s.get('workers'))} worker(s) · the same as JSON: "
        "<code>curl -H 'Accept: application/json' …/</code></p>",
    ]
    workers = s.get("worker_list")
    if workers:
        parts.append("<h2>Workers</h2>")
        parts.append(
            _table(
                ("worker", "pid", "alive", "ready", "restarts"),
                (
                    (
                        w.get("index"),
                        w.get("pid"),
                        w.get("alive"),
                        w.get("ready"),
                        w.get("restarts"),
                    )
                    for w in workers
                ),
                "no worker",
            )
        )
    reload = doc["reload"]
    lasts = reload["last"] if isinstance(reload["last"], list) else [reload["last"]]
    parts.append("<h2>Configuration</h2>")
    parts.append(
        _rows(
            [
                ("file", f"<code>{_e(s.get('config_file'))}</code>"),
                (
                    "reloads",
                    f"{_e(reload['successes'])} succeeded, {_e(reload['failures'])} failed",
                ),
            ]
            + [
                (
                    "last reload" + (f" (worker {last['worker']})" if "worker" in last else ""),
                    f"{_e(_when(last.get('time')))} · {_e(last.get('cause'))} · "
                    f'<span class="{"ok" if last.get("result") == "success" else "bad"}">'
                    f"{_e(last.get('result'))}</span>"
                    + "".join(f"<br><code>{_e(p)}</code>" for p in last.get("problems", [])),
                )
                for last in lasts
                if last
            ]
            + (
                []
                if any(lasts)
                else [("last reload", '<span class="muted">none since the start</span>')]
            )
        )
    )
    listener = doc["listener"]
    parts.append("<h2>Listener certificate</h2>")
    parts.append(
        _rows(
            [
                (
                    "subject",
                    _e(listener.get("subject", listener.get("error", listener.get("none")))),
                ),
                ("names", _e(", ".join(listener.get("names", [])))),
                ("server names in force", _e(", ".join(listener.get("server_names", [])))),
                ("expires", _expiry(listener)),
                ("SHA-256", f"<code>{_e(listener.get('sha256'))}</code>"),
            ]
        )
    )
    sites = doc.get("servers") or []
    if sites:
        parts.append("<h2>Sites (servers[], chosen by SNI)</h2>")
        parts.append(
            "<table><tr><th>where</th><th>names</th><th>client certificate</th>"
            "<th>certificate subject</th><th>expires</th></tr>"
            + "".join(
                f"<tr><td>{_e(site.get('origin'))}</td>"
                f"<td>{_e(', '.join(site.get('server_names', [])))}</td>"
                f"<td>{_e(site.get('client_certificate'))}</td>"
                f"<td>{_e(site.get('subject', ''))}</td><td>{_expiry(site)}</td></tr>"
                for site in sites
            )
            + "</table>"
        )
    parts.append("<h2>Trust anchors</h2>")
    anchors = doc["trust_anchors"]
    parts.append(
        "<table><tr><th>subject</th><th>kind</th><th>file</th><th>expires</th></tr>"
        + "".join(
            f"<tr><td>{_e(a.get('subject', ''))}</td><td>{_e(a.get('kind'))}</td>"
            f"<td><code>{_e(a.get('file'))}</code></td><td>{_expiry(a)}</td></tr>"
            for a in anchors
        )
        + "</table>"
    )
    latency, error, creds = identity["latency_ms"], identity["last_error"], identity["credentials"]
    health = identity["health"]
    health_css = "ok" if health == "ok" else ("muted" if health == "no lookups yet" else "bad")
    parts.append("<h2>Identity backend</h2>")
    parts.append(
        _rows(
            [
                ("backend", _e(identity["backend"])),
                ("health", f'<span class="{health_css}">{_e(health)}</span>'),
                (
                    f"latency, last {WINDOW_SECONDS // 60} min",
                    f"p50 {_e(_ms(latency['p50']))} · p99 {_e(_ms(latency['p99']))} · "
                    f"{_e(latency['samples'])} lookups (cache misses)",
                ),
                (
                    "last error",
                    (
                        f"{_e(_when(error.get('time')))} · {_e(error.get('code'))} · {_e(error.get('reason'))}"
                        if error
                        else '<span class="muted">none</span>'
                    ),
                ),
                (
                    "credentials",
                    f'<span class="{"bad" if creds.get("state") == "refused" else "ok"}">'
                    f"{_e(creds.get('state'))}</span>"
                    + (f" · {_e(creds['problem'])}" if creds.get("problem") else "")
                    + (
                        f" · agent certificate expires {_e(creds['agent_expires'])}"
                        if creds.get("agent_expires")
                        else ""
                    ),
                ),
            ]
        )
    )
    ratio = cache.get("hit_ratio")
    parts.append("<h2>Verdict cache</h2>")
    parts.append(
        _rows(
            [
                ("entries", _e(cache["entries"])),
                (
                    "hit ratio",
                    _e("—" if ratio is None else f"{ratio:.1%}")
                    + f" ({_e(cache['hits'])} hits, {_e(cache['misses'])} misses)",
                ),
                ("stale serves", _e(cache["stale_served"])),
                ("evictions", _e(cache["evictions"])),
                *_shared_rows(cache.get("shared")),
            ]
        )
    )
    parts.append(f"<h2>Last {SHOW_REFUSALS} refusals</h2>")
    parts.append(
        _table(
            (
                "time",
                "status",
                "method",
                "route",
                "decision",
                "reason",
                "verdict",
                "certificate",
                "request id",
            ),
            (
                (
                    _when(r.get("time")),
                    r.get("status"),
                    r.get("method"),
                    r.get("route"),
                    r.get("decision"),
                    r.get("reason"),
                    r.get("verdict"),
                    r.get("certificate"),
                    r.get("request_id"),
                )
                for r in doc["refusals"]
            ),
            "no request has been refused since the start",
        )
    )
    parts.append("<h2>Trust reports</h2>")
    outcomes = ", ".join(f"{k} {v}" for k, v in reports.get("outcomes", {}).items()) or "none"
    parts.append(
        _rows(
            [
                ("enabled", "yes" if reports.get("enabled") else "no"),
                ("pending", _e(reports.get("pending"))),
                ("outcomes so far", _e(outcomes)),
            ]
        )
    )
    parts.append(
        _table(
            ("id", "type", "certificate", "source", "state", "attempts"),
            (
                (
                    p.get("id"),
                    p.get("type"),
                    p.get("certificate"),
                    p.get("source"),
                    p.get("state"),
                    p.get("attempts"),
                )
                for p in reports.get("pending_reports", [])
            ),
            "no report pending",
        )
    )
    parts.append("<p class=note>Failed reports (newest first):</p>")
    parts.append(
        _table(
            ("time", "type", "certificate", "source", "code", "reason", "attempts"),
            (
                (
                    _when(f.get("time")),
                    f.get("type"),
                    f.get("certificate"),
                    f.get("source"),
                    f.get("code"),
                    f.get("reason"),
                    f.get("attempts"),
                )
                for f in reports.get("failed", [])
            ),
            "no report has failed",
        )
    )
    parts.append("</body></html>\n")
    return "".join(parts)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"≤ {value:g} ms"
