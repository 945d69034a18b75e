"""The status page on the admin listener (issue #18 §3): what it shows, that its numbers are
the ones ``/metrics`` exports, that it escapes everything, and its collectors on their own
(bounded, fed only where the brief says: refusals and cache misses).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from bisect import bisect_left
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import __version__
from sidecar.observe import (
    BOUNDS,
    REFUSALS,
    SLOT_SECONDS,
    WINDOW_SECONDS,
    LatencyWindow,
    Observations,
    quantile,
)
from sidecar.status import finish, merge, render, wants_json

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .fake_identityplus import fake_identityplus
from .reporting import FAST, Start, app, serial, start, until
from .test_operations import metric, request

__all__ = ["app", "fake_identityplus", "start"]  # fixtures, imported to be used here


async def page(
    running: Running, accept: str | None = "application/json"
) -> tuple[int, dict[str, str], str]:
    headers = {"Accept": accept} if accept is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{running.sidecar.admin_port}/", headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.text()


async def status_of(running: Running) -> dict[str, Any]:
    code, headers, text = await page(running)
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    doc: dict[str, Any] = json.loads(text)
    return doc


async def metrics_text(running: Running) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{running.sidecar.admin_port}/metrics") as resp,
    ):
        return await resp.text()


# ---- what it shows ---------------------------------------------------------------------------


async def test_the_document_says_what_runs_and_numbers_match_metrics(running: Running) -> None:
    bob, stranger = running.certs.bob, running.certs.stranger
    assert await request(running, "/app/", bob) == 200
    assert await request(running, "/app/", bob) == 200
    assert await request(running, "/app/", stranger) == 403
    assert await request(running, "/app/") == 401

    doc = await status_of(running)
    text = await metrics_text(running)

    sidecar = doc["sidecar"]
    assert sidecar["version"] == __version__ and sidecar["build"] in ("compiled", "interpreted")
    assert sidecar["workers"] == 1 and sidecar["uptime_seconds"] >= 0
    assert sidecar["config_file"].endswith("sidecar.yaml")
    assert doc["reload"] == {"last": None, "successes": 0, "failures": 0}
    listener = doc["listener"]
    assert "localhost" in listener["names"] and listener["days_left"] >= 28
    assert listener["server_names"] == listener["names"]
    anchors = doc["trust_anchors"]
    assert [a["kind"] for a in anchors] == ["ca", "ca"]  # the root and the intermediate
    assert all(a["file"].endswith("client-ca.pem") and a["days_left"] > 0 for a in anchors)
    cache = doc["cache"]
    assert cache["hits"] == metric(text, "sidecar_cache_hits_total") == 1
    assert cache["misses"] == metric(text, "sidecar_cache_misses_total") == 2
    assert cache["entries"] == metric(text, "sidecar_cache_entries") == 2
    assert cache["hit_ratio"] == pytest.approx(1 / 3, abs=1e-3)
    assert cache["stale_served"] == 0
    identity = doc["identity"]
    assert identity["backend"] == "static" and identity["health"] == "ok"
    assert identity["latency_ms"]["samples"] == 2  # the two cache misses, not the hit
    assert identity["latency_ms"]["p50"] is not None
    assert identity["credentials"]["state"] == "n/a"
    assert identity["lookups"] == metric(text, "sidecar_identity_lookups_total") == 2
    # newest first; the certificate by a fingerprint prefix; no address, path or subject
    anonymous, refused = doc["refusals"]
    assert anonymous["status"] == 401 and anonymous["certificate"] is None
    assert refused["status"] == 403 and refused["route"] == "/" and refused["decision"] == "denied"
    assert refused["certificate"] == hashlib.sha256(stranger.der).hexdigest()[:16]
    assert set(refused) == {
        "time", "method", "status", "route", "decision", "reason", "verdict", "certificate",
        "request_id",
    }  # fmt: skip
    assert "127.0.0.1" not in json.dumps(doc["refusals"])
    assert doc["reports"]["enabled"] is False and doc["reports"]["pending"] == 0


async def test_reloads_are_shown_with_their_result(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["routes"] = "not a list"
    config_dir.write(data)
    assert await running.sidecar.reload("SIGHUP") is False
    doc = await status_of(running)
    last = doc["reload"]["last"]
    assert last["result"] == "failure" and last["cause"] == "SIGHUP"
    assert any("routes" in problem for problem in last["problems"])
    assert doc["reload"]["failures"] == 1

    config_dir.write(config_dir.base(upstream.port))
    assert await running.sidecar.reload("file changed") is True
    doc = await status_of(running)
    assert doc["reload"]["last"]["result"] == "success"
    assert doc["reload"]["last"]["cause"] == "file changed"
    assert (doc["reload"]["successes"], doc["reload"]["failures"]) == (1, 1)


async def test_the_identityplus_backend_shows_latency_errors_and_credentials(
    start: Start,
) -> None:
    env = await start(reports=FAST)
    ada, eve = env.client("Ada Lovelace"), env.client("Eve Intruder")
    env.fake.set_profile(serial(ada), "OK 0001")
    assert (await env.get("/app/", ada)).status == 200
    doc = await status_of(env.running)
    identity = doc["identity"]
    assert identity["health"] == "ok" and identity["latency_ms"]["samples"] == 1
    assert identity["credentials"]["state"] == "accepted"
    assert identity["credentials"]["agent_expires"] is not None

    env.fake.set_fault(serial(eve), "500")
    assert (await env.get("/app/", eve)).status == 503
    identity = (await status_of(env.running))["identity"]
    assert identity["health"] == "failing"
    assert identity["last_error"]["code"] == "http-status"

    env.fake.refuse_agent(outcome="ER 1103")
    env.fake.set_fault(serial(eve), None)
    assert (await env.get("/app/", eve)).status == 503
    identity = (await status_of(env.running))["identity"]
    assert identity["health"] == "credentials refused"
    assert identity["credentials"]["state"] == "refused"
    assert identity["credentials"]["problem"].startswith("ER 1103")


async def test_pending_and_failed_reports_are_listed(start: Start) -> None:
    env = await start(reports={**FAST, "retries": 0})
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001")
    env.fake.script_reports("Intrusion-Report", "ER 0009")
    await env.get("/app/", ada, {"X-Identity-Intrusion": "fraud"})
    await env.settled()
    env.fake.hold_reports = asyncio.Event()
    await env.get("/app/", ada, {"X-Identity-Trust": "mfa"})
    await until(lambda: len(env.fake.reports) == 2)

    reports = (await status_of(env.running))["reports"]

    assert reports["enabled"] is True and reports["pending"] == 1
    [pending] = reports["pending_reports"]
    assert pending["type"] == "trust" and pending["source"] == "response"
    assert pending["certificate"] == hashlib.sha256(ada.der).hexdigest()[:16]
    [failed] = reports["failed"]
    assert failed["type"] == "intrusion" and failed["code"] == "ER 0009"
    assert reports["outcomes"] == {"failed": 1}
    assert env.fake.hold_reports is not None
    env.fake.hold_reports.set()
    await env.settled()


# ---- as a page -----------------------------------------------------------------------------------


async def test_the_html_page_escapes_what_it_shows_and_runs_nothing(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["<script>alert('x')</script>"] = 1  # an unknown key: the reload problem names it
    config_dir.write(data)
    assert await running.sidecar.reload("SIGHUP") is False

    code, headers, html = await page(running, "text/html,application/xhtml+xml,*/*;q=0.8")

    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert headers["Content-Security-Policy"] == "default-src 'none'; style-src 'unsafe-inline'"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    for heading in (
        "Configuration",
        "Listener certificate",
        "Trust anchors",
        "Identity backend",
        "Verdict cache",
        "refusals",
        "Trust reports",
    ):
        assert heading in html


async def test_curl_gets_the_page_and_asks_for_json_with_accept(running: Running) -> None:
    code, headers, _ = await page(running, None)
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    code, headers, text = await page(running, "*/*")
    assert headers["Content-Type"].startswith("text/html")
    code, headers, text = await page(running, "application/json")
    assert headers["Content-Type"].startswith("application/json") and json.loads(text)


def test_json_is_chosen_only_when_asked_for_before_html() -> None:
    assert wants_json("application/json")
    assert wants_json("application/json, text/html")
    assert wants_json("APPLICATION/JSON;q=1")
    assert not wants_json("text/html, application/json")
    assert not wants_json(None) and not wants_json("") and not wants_json("*/*")


async def test_the_page_is_served_under_the_admin_listeners_rules(running: Running) -> None:
    """A page of another site cannot read it (the listener's cross-site rules)."""
    port = running.sidecar.admin_port
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/", headers={"Sec-Fetch-Site": "cross-site"}) as resp,
    ):
        assert resp.status == 403
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/", headers={"Host": "evil.example"}) as resp,
    ):
        assert resp.status == 421


# ---- the collectors ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_latency_is_kept_for_five_minutes_then_forgotten() -> None:
    clock = Clock()
    window = LatencyWindow(clock)
    for _ in range(98):
        window.observe(0.010)
    window.observe(0.500)
    window.observe(2.0)
    histogram = window.histogram()
    assert sum(histogram) == 100
    p50, p99 = quantile(histogram, 0.5), quantile(histogram, 0.99)
    assert p50 is not None and 0.010 <= p50 <= 0.012
    assert p99 is not None and 0.5 <= p99 <= 0.6
    clock.now += WINDOW_SECONDS - SLOT_SECONDS
    assert sum(window.histogram()) == 100  # still in the window
    window.observe(0.001)
    clock.now += SLOT_SECONDS * 2
    assert sum(window.histogram()) == 1  # the first slot left the window, the last did not
    clock.now += WINDOW_SECONDS
    assert sum(window.histogram()) == 0
    assert quantile(window.histogram(), 0.5) is None


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), min_size=1, max_size=200))
def test_a_quantile_is_the_bound_of_the_bucket_that_holds_the_true_one(
    samples: list[float],
) -> None:
    """Within 20 %: the estimate is the upper bound of the bucket the true quantile is in."""
    window = LatencyWindow(Clock())
    for sample in samples:
        window.observe(sample)
    ordered = sorted(samples)
    for q in (0.5, 0.99):
        true = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        bucket = bisect_left(BOUNDS, true)
        assert quantile(window.histogram(), q) == BOUNDS[min(bucket, len(BOUNDS) - 1)]


def test_refusals_are_bounded_and_hold_no_address_or_path() -> None:
    observations = Observations()
    for i in range(REFUSALS + 10):
        observations.refused(
            method="GET",
            status=403,
            route="/",
            decision="denied",
            reason="unbound",
            verdict="unbound",
            sha256="ab" * 32,
            request_id=f"r{i}",
        )
    assert len(observations.refusals) == REFUSALS
    assert observations.refusals[-1]["request_id"] == f"r{REFUSALS + 9}"
    assert observations.refusals[0]["certificate"] == "ab" * 8


def test_the_supervisors_merge_adds_workers_up() -> None:
    def doc(hits: int, misses: int, refused_at: float, histogram: list[int]) -> dict[str, Any]:
        return {
            "sidecar": {"version": "v", "build": "compiled"},
            "reload": {"last": None, "successes": 0, "failures": 0},
            "listener": {"subject": "CN=x"},
            "trust_anchors": [],
            "identity": {
                "backend": "static",
                "health": "ok",
                "latency_histogram": histogram,
                "last_error": None,
                "credentials": {"state": "n/a", "problem": None},
                "lookups": misses,
            },
            "cache": {"entries": 1, "hits": hits, "misses": misses, "stale_served": 0, "evictions": 0},
            "refusals": [{"time": refused_at, "status": 403}],
            "reports": {"enabled": False, "pending": 0, "pending_reports": [], "failed": [], "outcomes": {"ignored": 1}},
        }  # fmt: skip

    one = [0] * (len(BOUNDS) + 1)
    one[3] = 2
    merged = merge([doc(1, 2, 10.0, one), None, doc(3, 4, 20.0, one)], {"workers": 3})
    assert merged["cache"]["hits"] == 4 and merged["cache"]["misses"] == 6
    assert merged["identity"]["latency_histogram"][3] == 4
    assert [r["worker"] for r in merged["refusals"]] == [2, 0]  # newest first, from both
    assert merged["reports"]["outcomes"] == {"ignored": 2}
    assert merged["sidecar"]["workers"] == 3


async def test_a_fresh_process_shows_no_lookups_yet(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start_sidecar(config_dir.base(upstream.port))
    doc = await status_of(running)
    assert doc["identity"]["health"] == "no lookups yet"
    assert doc["identity"]["latency_ms"] == {
        "p50": None,
        "p99": None,
        "samples": 0,
        "window_seconds": WINDOW_SECONDS,
    }
    assert doc["refusals"] == [] and doc["cache"]["hit_ratio"] is None


def test_a_supervisor_whose_workers_do_not_answer_still_shows_a_page() -> None:
    doc = finish(merge([None, None], {"workers": 2, "version": "v", "build": "compiled"}))
    html = render(doc)
    assert doc["identity"]["health"] == "no worker answered"
    assert "no worker answered" in html and doc["cache"]["hit_ratio"] is None
