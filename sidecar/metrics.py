"""Every metric and its labels, in one place. Names and labels are public API.

Labels carry only bounded values: route paths from the configuration, a fixed set of methods,
decisions and status classes; never request paths, serials or addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)

_LATENCY_BUCKETS = (
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


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


class Metrics:
    """A set of metrics bound to one registry (a fresh one per app in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests",
            "Requests answered, by route, method, decision and status class.",
            ["route", "method", "decision", "status_class"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request head to the end of the response, by decision.",
            ["decision"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_duration_seconds",
            "Time until the upstream's response headers arrived.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
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
        self.in_flight = Gauge(
            "sidecar_in_flight_requests", "Requests being handled now.", registry=r
        )
        self.connections_refused = Counter(
            "sidecar_connections_refused",
            "Client connections closed at once because limits.max_connections was reached.",
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
        self._cache = _CacheCollector()
        r.register(self._cache)
        # Bounded: routes come from the configuration, methods from a fixed set.
        self._request_children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}

    def observe_request(
        self, route: str, method: str, decision: str, status: int, seconds: float
    ) -> None:
        """Count one answered request; label children are looked up once per label set."""
        method = method_label(method)
        key = (route, method, decision, status // 100)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, decision, f"{status // 100}xx"),
                self.request_duration.labels(decision),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def bind_cache(self, stats: Callable[[], Any]) -> None:
        """Read the verdict cache's counters at scrape time (the cache may be swapped on reload)."""
        self._cache.stats = stats


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
