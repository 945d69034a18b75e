"""Every metric and its labels, in one place. Names and labels are public API.

Labels carry only bounded values: route paths from the configuration, a fixed set of methods,
decisions and status classes; never request paths, serials or addresses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import BUILD, __version__

_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)

#: typed as a tuple of any length: mypyc keeps a fixed-length tuple of floats unboxed, and
#: made a new tuple of 14 new floats to hand it to ``bisect_left`` on every observation
_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: remaining lifetimes of client certificates: an hour to five years
_LIFETIME_BUCKETS = tuple(
    float(days * 86400) for days in (1 / 24, 0.25, 1, 3, 7, 14, 30, 60, 90, 180, 365, 730, 1825)
)


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


class Metrics:
    """A set of metrics bound to one registry (a fresh one per app in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Gauge(
            "sidecar_build_info",
            "The sidecar running: its version, and whether its request path is compiled.",
            ["version", "build"],
            registry=r,
        ).labels(__version__, "compiled" if BUILD.compiled else "interpreted").set(1)
        self.upstream_errors = Counter(
            "sidecar_upstream_errors",
            "Upstream failures by kind (connect, timeout, reset, protocol).",
            ["kind"],
            registry=r,
        )
        self.identity_lookups = Counter(
            "sidecar_identity_lookups",
            "Identity backend lookups by backend and outcome code.",
            ["backend", "outcome"],
            registry=r,
        )
        self.signon_intents = Counter(
            "sidecar_signon_intents",
            "Sign-on redirects by result: registered (the identity backend made a new one; with "
            "Identity Plus an intent), coalesced (one made earlier for the same URL reused), "
            "limited (429), failed (503).",
            ["result"],
            registry=r,
        )
        self.front_proxy_certificates = Counter(
            "sidecar_front_proxy_certificates",
            "Requests carrying the front_proxy.certificate_header, by outcome: accepted (from a "
            "trusted proxy, verified), absent (a trusted proxy passed none), unreadable (400), "
            "unverified (403), untrusted (from another peer: stripped, judged without it).",
            ["outcome"],
            registry=r,
        )
        self.legacy_cookies = Counter(
            "sidecar_legacy_cookies",
            "Identity Plus HTTP-legacy session cookies received, by outcome: valid, or ignored "
            "as malformed, invalid (tampered, another host's, an unlisted key) or expired.",
            ["outcome"],
            registry=r,
        )
        self.legacy_returns = Counter(
            "sidecar_legacy_returns",
            "Returns from an Identity Plus HTTP-legacy sign-on, by result: resolved (a session "
            "began), forged, replayed, expired, unresolved (401), failed (503).",
            ["result"],
            registry=r,
        )
        self.connections_refused = Counter(
            "sidecar_connections_refused",
            "Client connections closed at once because limits.max_connections was reached.",
            registry=r,
        )
        self.limit_refusals = Counter(
            "sidecar_limit_refusals",
            "Connections and requests refused by a bound on what one client address (or the "
            "worker) may hold, by limits key: max_connections_per_address (closed at accept), "
            "max_body_streams_per_address and max_websockets_per_address (429), max_websockets "
            "(503).",
            ["limit"],
            registry=r,
        )
        self.identity_duration = Histogram(
            "sidecar_identity_lookup_duration_seconds",
            "Time the identity backend took to answer (cache misses only), by backend.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.reloads = Counter(
            "sidecar_config_reloads",
            "Configuration reloads by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.server_cert_expiry = Gauge(
            "sidecar_server_certificate_expiry_timestamp_seconds",
            "When the TLS listener's certificate expires (Unix time).",
            registry=r,
        )
        self.agent_cert_expiry = Gauge(
            "sidecar_agent_certificate_expiry_timestamp_seconds",
            "When the identity backend's own client certificate expires (Unix time), if it has one.",
            registry=r,
        )
        self.client_certs_expiring = Gauge(
            "sidecar_client_certificates_expiring_soon",
            "Distinct client certificates seen recently that expire within 7 days.",
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "sidecar_tls_handshake_failures",
            "TLS handshakes that failed (bad or untrusted client certificate, protocol errors).",
            registry=r,
        )
        self.tls_handshakes = Counter(
            "sidecar_tls_handshakes",
            "TLS handshakes completed, by whether they resumed a session (from the worker's "
            "session cache, the workers' shared table, or a shared ticket) or were full.",
            ["resumed"],
            registry=r,
        )
        # bound once: the handshake path increments them without a labels() lookup
        self.tls_handshakes_resumed = self.tls_handshakes.labels(resumed="true")
        self.tls_handshakes_full = self.tls_handshakes.labels(resumed="false")
        self.tls_handshakes_deferred = Counter(
            "sidecar_tls_handshakes_deferred",
            "TLS handshake steps that waited for the worker's handshake budget "
            "(limits.handshake_budget) because other handshakes used it up.",
            registry=r,
        )
        self.tls_handshakes_queued = Gauge(
            "sidecar_tls_handshakes_queued",
            "TLS handshake steps waiting now for the worker's handshake budget.",
            registry=r,
        )
        # trust reports (identity.reports): the type is bind, unbind, trust or intrusion
        self.trust_reports = Counter(
            "sidecar_trust_reports",
            "Trust reports by type and outcome: succeeded, already (Identity Plus had it), "
            "failed, invalid, limited, duplicate, overflow (queue full), ignored (reports off, "
            "another backend, or no identified certificate).",
            ["type", "outcome"],
            registry=r,
        )
        self.trust_report_retries = Counter(
            "sidecar_trust_report_retries",
            "Trust report calls made again after a failure or ER 1106, by type.",
            ["type"],
            registry=r,
        )
        self.trust_reports_pending = Gauge(
            "sidecar_trust_reports_pending",
            "Trust reports queued, being sent, or waiting to be sent again.",
            registry=r,
        )
        self._cache = _CacheCollector()
        r.register(self._cache)
        # Revocation and lifetimes (README: Revocation)
        self.client_cert_lifetime = Histogram(
            "sidecar_client_certificate_remaining_seconds",
            "Remaining lifetime of the client certificate of each connection, at its handshake.",
            buckets=_LIFETIME_BUCKETS,
            registry=r,
        )
        self.trust_anchor_expiry = Gauge(
            "sidecar_trust_anchor_expiry_timestamp_seconds",
            "When each trust anchor for client certificates (tls.client_ca, "
            "tls.pinned_certificates) expires (Unix time).",
            ["subject", "sha256"],
            registry=r,
        )
        self._revocation = _RevocationCollector()
        r.register(self._revocation)
        self._shared = _SharedCacheCollector()
        r.register(self._shared)
        # The per-request metrics: plain numbers on the hot path, exported at scrape time.
        self._hot = _RequestCollector()
        r.register(self._hot)

    @property
    def in_flight(self) -> int:
        return self._hot.in_flight

    def request_started(self) -> None:
        self._hot.in_flight += 1

    def request_finished(self) -> None:
        self._hot.in_flight -= 1

    def observe_request(
        self, route: str, method: str, decision: str, status: int, seconds: float
    ) -> None:
        """Count one answered request and its duration."""
        hot = self._hot
        key = (route, method if method in _METHODS else "other", decision, status // 100)
        requests = hot.requests
        requests[key] = requests.get(key, 0) + 1
        duration = hot.durations.get(decision)
        if duration is None:
            duration = hot.durations[decision] = _Histogram()
        duration.observe(seconds)

    def observe_upstream(self, seconds: float) -> None:
        self._hot.upstream.observe(seconds)

    def bind_cache(self, stats: Callable[[], Any]) -> None:
        """Read the verdict cache's counters at scrape time (the cache may be swapped on reload)."""
        self._cache.stats = stats

    def bind_revocation(self, source: Any) -> None:
        """Read revocation's counters and CRL dates at scrape time (``revocation.gate``)."""
        self._revocation.source = source

    def bind_shared_cache(self, stats: Callable[[], Any]) -> None:
        """Read the shared cache's counters at scrape time (``shared.store.SharedStats``; None
        when there is none)."""
        self._shared.stats = stats


#: the ``le`` labels, as prometheus_client writes them
_BUCKET_LABELS: tuple[str, ...] = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*_LATENCY_BUCKETS, math.inf)
)


class _Histogram:
    """Counts per bucket (not cumulative; +Inf last) and the sum."""

    __slots__ = ("counts", "created", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # the first bound at or above: a value equal to a bound belongs to that bucket (le =
        # "less or equal"), as bisect_left finds it. Most requests take under a millisecond:
        # counted from the lowest bound, the first comparison finds them.
        index = 0
        for bound in _LATENCY_BUCKETS:
            if seconds <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for label, count in zip(_BUCKET_LABELS, self.counts, strict=True):
            running += count
            out.append((label, float(running)))
        return out


class _RequestCollector(Collector):
    """sidecar_requests_total, the two duration histograms and the in-flight gauge: kept as
    plain numbers (one event loop updates them) and turned into metrics when scraped, the
    same names, labels and samples as prometheus_client's own Counter, Histogram and Gauge."""

    def __init__(self) -> None:
        self.created = time.time()
        self.in_flight = 0
        #: (route, method, decision, status // 100) -> count
        self.requests: dict[tuple[str, str, str, int], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self.upstream = _Histogram()

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "sidecar_requests",
            "Requests answered, by route, method, decision and status class.",
            labels=["route", "method", "decision", "status_class"],
        )
        for (route, method, decision, klass), count in sorted(self.requests.items()):
            requests.add_metric([route, method, decision, f"{klass}xx"], count)
        yield requests
        durations = HistogramMetricFamily(
            "sidecar_request_duration_seconds",
            "Time from request head to the end of the response, by decision.",
            labels=["decision"],
        )
        for decision, histogram in sorted(self.durations.items()):
            durations.add_metric([decision], histogram.buckets(), histogram.total)
        yield durations
        upstream = HistogramMetricFamily(
            "sidecar_upstream_duration_seconds",
            "Time until the upstream's response headers arrived.",
        )
        upstream.add_metric([], self.upstream.buckets(), self.upstream.total)
        yield upstream
        yield GaugeMetricFamily(
            "sidecar_in_flight_requests", "Requests being handled now.", value=self.in_flight
        )

    def describe(self) -> Iterator[Any]:
        return iter(())


class _CacheCollector(Collector):
    """Exports the verdict cache's own counters: no per-request metrics work on the hot path."""

    def __init__(self) -> None:
        self.stats: Callable[[], Any] = lambda: None
        # Counters must not go backwards when a reload brings a new cache: carry the old totals.
        self._base: dict[str, int] = {}
        self._last: Any = None
        self._last_values: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.stats()
        values = {"hits": 0, "misses": 0, "stale_served": 0, "evictions": 0}
        size = 0
        if stats is not None:
            if self._last is not None and stats is not self._last:
                for key, value in self._last_values.items():
                    self._base[key] = self._base.get(key, 0) + value
            self._last = stats
            values = {key: int(getattr(stats, key)) for key in values}
            self._last_values = dict(values)
            size = int(stats.size)
        names = {
            "hits": ("sidecar_cache_hits", "Verdicts answered from the cache."),
            "misses": ("sidecar_cache_misses", "Lookups the cache could not answer fresh."),
            "stale_served": (
                "sidecar_cache_stale_served",
                "Expired allowing verdicts served while the backend failed.",
            ),
            "evictions": (
                "sidecar_cache_evictions",
                "Verdicts dropped to stay within max_entries.",
            ),
        }
        for key, (name, doc) in names.items():
            yield CounterMetricFamily(name, doc, value=values[key] + self._base.get(key, 0))
        yield GaugeMetricFamily("sidecar_cache_entries", "Verdicts in the cache now.", value=size)

    def describe(self) -> Iterator[Any]:
        return iter(())


class _RevocationCollector(Collector):
    """Revocation's own numbers (``revocation.gate.Revocation``), read when scraped."""

    def __init__(self) -> None:
        self.source: Any = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        revocation = self.source
        if revocation is None:
            return
        checks = CounterMetricFamily(
            "sidecar_revocation_checks",
            "Requests whose client certificate was checked for revocation, by outcome: good, "
            "revoked (403), unknown (allowed without an answer: tls.ocsp soft), unavailable "
            "(refused with 503: no usable CRL, or no OCSP answer under hard).",
            labels=["outcome"],
        )
        for outcome, count in revocation.outcome_counts().items():
            checks.add_metric([outcome], count)
        yield checks
        next_update = GaugeMetricFamily(
            "sidecar_crl_next_update_timestamp_seconds",
            "nextUpdate of the newest CRL of each issuing CA (Unix time): past it plus "
            "tls.crl_grace, that CA's certificates are refused.",
            labels=["issuer"],
        )
        for issuer, when in sorted(revocation.next_updates().items()):
            next_update.add_metric([issuer], when)
        yield next_update
        yield GaugeMetricFamily(
            "sidecar_ocsp_cache_entries", "OCSP answers held now.", value=revocation.ocsp_entries
        )
        for name, doc, results in (
            (
                "sidecar_ocsp_requests",
                "Questions to OCSP responders by result: good, revoked, unknown, or why no "
                "answer was had (timeout, connect, bad-signature, no-responder, ...).",
                revocation.ocsp_results,
            ),
            (
                "sidecar_crl_fetches",
                "CRLs fetched from distribution points by result: ok, or why not (timeout, "
                "too-large, bad-crl, http-status, ...).",
                revocation.fetch_results,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["result"])
            for result, count in sorted(results.items()):
                family.add_metric([result], count)
            yield family
        configured, runtime = revocation.deny_entries
        deny = GaugeMetricFamily(
            "sidecar_deny_list_entries",
            "Certificates on the deny-list, by source: configured (tls.deny), runtime (admin).",
            labels=["source"],
        )
        deny.add_metric(["configured"], configured)
        deny.add_metric(["runtime"], runtime)
        yield deny

    def describe(self) -> Iterator[Any]:
        return iter(())


#: the shared cache's counters: name, help, the stats attribute, its label (for a dict)
_SHARED_COUNTERS: tuple[tuple[str, str, str, str | None], ...] = (
    ("sidecar_cache_shared_hits", "Verdicts found in the shared cache (Redis).", "hits", None),
    (
        "sidecar_cache_shared_misses",
        "Lookups the shared cache could not answer: this replica asked the backend, or "
        "waited for the replica that did.",
        "misses",
        None,
    ),
    (
        "sidecar_cache_shared_skipped",
        "Lookups made without the shared cache, because Redis was unusable.",
        "skipped",
        None,
    ),
    (
        "sidecar_cache_shared_errors",
        "Shared cache problems by kind: timeout, unavailable (connection or server error), "
        "invalid_entry (a stored value or answer that is not ours: a miss), invalid_message.",
        "errors",
        "kind",
    ),
    (
        "sidecar_cache_shared_lock_waits",
        "Waits for another replica's backend call, by how they ended: value, released "
        "(it gave up without one), timeout (the backend's timeout), unavailable.",
        "lock_waits",
        "result",
    ),
    (
        "sidecar_cache_shared_lock_wait_seconds",
        "Time spent waiting for other replicas' backend calls.",
        "lock_wait_seconds",
        None,
    ),
    (
        "sidecar_cache_shared_fallback_seconds",
        "Time spent without the shared cache (each worker caching alone).",
        "fallback_seconds",
        None,
    ),
    (
        "sidecar_cache_shared_purges",
        "Purges sent to the other replicas, and received from them.",
        "purges",
        "direction",
    ),
    (
        "sidecar_cache_shared_resyncs",
        "Times the local cache was emptied on connecting to Redis (purges may have been missed).",
        "resyncs",
        None,
    ),
)


class _SharedCacheCollector(Collector):
    """Exports the shared cache's counters (nothing while there is no shared cache); like
    ``_CacheCollector``, totals carry over when a reload brings a new one (as of the last
    scrape before it)."""

    def __init__(self) -> None:
        self.stats: Callable[[], Any] = lambda: None
        self._base: dict[tuple[str, str], float] = {}
        self._last: Any = None
        self._last_values: dict[tuple[str, str], float] = {}

    def _values(self, stats: Any) -> dict[tuple[str, str], float]:
        values: dict[tuple[str, str], float] = {}
        for name, _, attribute, label in _SHARED_COUNTERS:
            value = getattr(stats, attribute)
            if label is None:
                values[(name, "")] = float(value)
            else:
                for key, count in value.items():
                    values[(name, key)] = float(count)
        return values

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.stats()
        if stats is None and not self._base and self._last is None:
            return
        values: dict[tuple[str, str], float] = {}
        if stats is not None:
            if self._last is not None and stats is not self._last:
                for sample, value in self._last_values.items():
                    self._base[sample] = self._base.get(sample, 0.0) + value
            self._last = stats
            values = self._values(stats)
            self._last_values = dict(values)
        else:
            values = dict.fromkeys(self._last_values, 0.0)
        for name, doc, _, label in _SHARED_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=[label] if label else None)
            for (metric, key), value in values.items():
                if metric == name:
                    family.add_metric(
                        [key] if label else [], value + self._base.get((metric, key), 0.0)
                    )
            yield family
        yield GaugeMetricFamily(
            "sidecar_cache_shared_up",
            "1 while the shared cache (Redis) is in use, 0 while each worker caches alone.",
            value=1.0 if stats is not None and stats.up else 0.0,
        )

    def describe(self) -> Iterator[Any]:
        return iter(())
