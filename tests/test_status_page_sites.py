"""The status page with route policy's sites (``servers[]``, #16) and the shared verdict cache
(``identity.cache.shared``, #17): each site's certificate, names and client certificate mode,
and whether the replicas share their verdicts through Redis, with its numbers from the same
collectors as ``/metrics``."""

from __future__ import annotations

from typing import Any

from sidecar.status import finish, merge, render

from .conftest import ConfigDir, SidecarFactory, Upstream
from .redisd import RedisServer, redis_server
from .test_operations import metric, request
from .test_servers_security import sites
from .test_status_page import metrics_text, page, status_of

__all__ = ["redis_server"]  # the fixture


async def test_each_site_shows_its_certificate_names_and_mode(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start_sidecar(sites(config_dir, upstream))
    doc = await status_of(running)

    listed = [
        (s["origin"], s["server_names"], s["client_certificate"], s["subject"])
        for s in doc["servers"]
    ]
    assert listed == [
        ("servers[0]", ["app.example", "*.app.example"], "optional", "CN=app.example"),
        ("servers[1]", ["www.example"], "none", "CN=www.example"),
        ("servers[2]", ["api.example"], "required", "CN=api.example"),
    ]
    assert all(s["days_left"] > 0 and len(s["sha256"]) == 64 for s in doc["servers"])
    # the listener's certificate is the default server's: what a client without SNI gets
    listener = doc["listener"]
    assert listener["subject"] == "CN=app.example"
    assert listener["server_names"] == ["app.example", "*.app.example"]

    code, _, html = await page(running, accept="text/html")
    assert code == 200 and "Sites (servers[], chosen by SNI)" in html
    assert "www.example" in html and "api.example" in html


async def test_the_short_form_lists_no_sites_and_no_shared_cache(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start_sidecar(config_dir.base(upstream.port))
    doc = await status_of(running)
    assert doc["servers"] == [] and doc["cache"]["shared"] is None
    _, _, html = await page(running, accept="text/html")
    assert "Sites (" not in html and "none (each worker caches alone)" in html


async def test_the_shared_cache_is_shown_with_the_numbers_metrics_export(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    redis_server: RedisServer,
) -> None:
    data = config_dir.base(upstream.port)
    data["identity"]["cache"] = {"shared": {"url": redis_server.url, "timeout": "1s"}}
    running = await start_sidecar(data)
    assert await request(running, "/app/", running.certs.bob) == 200

    doc = await status_of(running)
    text = await metrics_text(running)
    shared = doc["cache"]["shared"]
    assert shared["up"] is True and metric(text, "sidecar_cache_shared_up") == 1
    assert shared["misses"] == metric(text, "sidecar_cache_shared_misses_total") == 1
    assert shared["hits"] == metric(text, "sidecar_cache_shared_hits_total") == 0
    _, _, html = await page(running, accept="text/html")
    assert '<span class="ok">up</span>' in html

    redis_server.kill()
    assert await request(running, "/app/", running.certs.alice) == 200  # around Redis
    doc = await status_of(running)
    assert doc["cache"]["shared"]["up"] is False
    _, _, html = await page(running, accept="text/html")
    assert "unreachable: each worker caches alone" in html


def test_the_supervisor_adds_up_its_workers_shared_cache() -> None:
    def doc(shared: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "sidecar": {"version": "v", "build": "compiled"},
            "reload": {"last": None, "successes": 0, "failures": 0},
            "listener": {"subject": "CN=x"},
            "trust_anchors": [],
            "servers": [{"origin": "servers[0]", "server_names": ["a.example"]}],
            "identity": {"backend": "static", "health": "ok", "latency_histogram": [], "last_error": None, "credentials": {"state": "n/a", "problem": None}, "lookups": 0},
            "cache": {"entries": 1, "hits": 0, "misses": 0, "stale_served": 0, "evictions": 0, "shared": shared},
            "refusals": [],
            "reports": {"enabled": False, "pending": 0, "pending_reports": [], "failed": [], "outcomes": {}},
        }  # fmt: skip

    numbers = {"hits": 2, "misses": 1, "skipped": 0, "errors": 0, "fallback_seconds": 0.5}
    up = {"up": True, **numbers, "purges_sent": 1, "purges_received": 0}
    down = {"up": False, **numbers, "purges_sent": 0, "purges_received": 1}
    merged = merge([doc(up), doc(down)], {"workers": 2})
    shared = merged["cache"]["shared"]
    assert shared["up"] is False  # not every worker has Redis
    assert (shared["hits"], shared["purges_sent"], shared["purges_received"]) == (4, 1, 1)
    assert shared["fallback_seconds"] == 1.0
    assert merged["servers"][0]["server_names"] == ["a.example"]
    assert merge([doc(None)], {"workers": 1})["cache"]["shared"] is None
    assert "a.example" in render(finish(merged))
