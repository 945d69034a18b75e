"""Route policy: longest prefix, deny by default, ambiguous paths refused; decide() table."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import parse
from sidecar.identity import User, Verdict
from sidecar.policy import (
    NO_CERTIFICATE,
    NO_ROUTE,
    BadPath,
    Deny,
    Forward,
    Redirect,
    Route,
    RouteTable,
    Unavailable,
    decide,
)

PUBLIC = Route("/public/", public=True)
ADMIN = Route("/admin/", roles=frozenset({"administrator"}))
ROOT = Route("/")
API = Route("/api/v1/", roles=frozenset({"api", "administrator"}))
TABLE = RouteTable([ROOT, PUBLIC, ADMIN, API])
ONLY_APP = RouteTable([Route("/app/")])


@pytest.mark.parametrize(
    ("raw", "route"),
    [
        ("/", ROOT),
        ("/anything", ROOT),
        ("/public/", PUBLIC),
        ("/public/a/b?x=1", PUBLIC),
        ("/publicity", ROOT),
        ("/admin/", ADMIN),
        ("/admin", ADMIN),  # the trailing slash route covers the bare path
        ("/admin/users?id=1", ADMIN),
        ("/administrator", ROOT),
        ("/api/v1/x", API),
        ("/api/v2/x", ROOT),
    ],
)
def test_longest_prefix(raw: str, route: Route) -> None:
    assert TABLE.match(raw) == route


def test_no_route_matches() -> None:
    assert ONLY_APP.match("/other") is None
    assert ONLY_APP.match("/app/x") == Route("/app/")


@pytest.mark.parametrize(
    "raw",
    [
        "/public/%2e%2e/admin/x",  # encoded dots
        "/public/%2E%2E/admin/",
        "/public%2F..%2Fadmin/",  # encoded slashes
        "/public/..;/admin/",  # Tomcat path parameters
        "//admin/x",  # merged slashes
        "/public/.%2e/admin",
    ],
)
def test_readings_that_reach_another_route_are_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        TABLE.match(raw)


@pytest.mark.parametrize(
    "raw", ["/a\\b", "/a%5cb", "/a%00b", "/../etc/passwd", "relative", "/a%0ab"]
)
def test_malformed_paths(raw: str) -> None:
    with pytest.raises(BadPath):
        TABLE.match(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/public/../admin/x",  # resolved, it would be /admin/x
        "/admin/../public/x",  # resolved, /public/x: an application routing on the raw path reads /admin/
        "/docs/./x",  # harmless where it leads, refused all the same: nothing to guess
        "/docs/x/..",
        "/docs/..;x/y",
        "/docs/.. /y".replace(" ", "%20"),  # Windows drops the space: ".."
    ],
)
def test_dot_segments_are_refused_wherever_they_lead(raw: str) -> None:
    with pytest.raises(BadPath, match="segment"):
        TABLE.match(raw)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("/public/x#y", "#"),
        ("http://h/public/x", "absolute"),
        ("*", "absolute"),
        ("/public/%zz", "not percent-encoding"),
        ("/public/%c0%ae", "overlong"),
        ("/public/%252e", "twice"),
        ("/public/%2525", "twice"),
    ],
)
def test_targets_no_reading_makes_safe(raw: str, problem: str) -> None:
    with pytest.raises(BadPath, match=problem):
        TABLE.match(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/ADMIN/users",  # Express, ASP.NET, IIS: /admin/users
        "/Public/x",
        "/admin./users",  # IIS: /admin/users
        "/admin%20/users",
        "/adm%2569n/x",  # decoded twice: /admin/x
        "/public;x%3f/..",
    ],
)
def test_readings_of_other_servers_that_reach_another_route_are_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        TABLE.match(raw)


@pytest.mark.parametrize(
    "nasty",
    [
        "/" + ";x/" * 70,  # params dropped: every reading but the raw one stays at "/"
        "/" + "/" * 70 + "admin/x",  # slashes merged
        "/;" + "%2F" * 70 + "admin/",  # in one segment, decoded
        "/" + "a.php/" * 70,  # each script restarts every reading
    ],
)
def test_a_path_whose_route_stays_undecided_is_refused(nasty: str) -> None:
    # Readings are followed only while some may still fall under another route; one that
    # keeps them undecided for 64 segments or pieces is refused.
    with pytest.raises(BadPath, match="ambiguous"):
        TABLE.match(nasty)


def test_a_path_decided_early_may_be_long() -> None:
    assert TABLE.match("/public/" + ";x/%2F/a.b/" * 600) == PUBLIC
    assert TABLE.match("/app/" + "x/" * 3000) == ROOT


def test_the_route_cache_is_emptied_when_full() -> None:
    table = RouteTable([ROOT, PUBLIC])
    for i in range(20_000):
        table.match(f"/x/{i:05d}")
    assert table.cache_bytes <= 1 << 20
    assert table.match("/public/a") == PUBLIC


ALICE = User("a", "alice", roles=("administrator",))
BOB = User("b", "bob", roles=("member",))
ALLOW_ALICE = Verdict.allow(ALICE)
ALLOW_BOB = Verdict.allow(BOB)
DENIED = Verdict.deny("certificate is not bound to a user", code="unbound")
VALIDATE = Verdict("validate", "needs validation", "PB 0003")
UNKNOWN = Verdict("unknown", "the identity service does not know this certificate", "PB 0001")


@pytest.mark.parametrize(
    ("route", "verdict", "has_cert", "failed", "enrol", "expected"),
    [
        (None, ALLOW_ALICE, True, False, False, NO_ROUTE),
        (PUBLIC, None, False, False, False, Forward(None)),
        (PUBLIC, ALLOW_BOB, True, False, False, Forward(BOB)),
        (PUBLIC, DENIED, True, False, False, Forward(None)),
        (PUBLIC, None, True, True, False, Forward(None)),
        (PUBLIC, VALIDATE, True, False, False, Forward(None)),
        (ROOT, None, False, False, False, NO_CERTIFICATE),
        (ROOT, None, False, False, True, Redirect("enrol", "a client certificate is required")),
        (ROOT, None, True, True, False, Unavailable("the identity service is unavailable")),
        (
            ROOT,
            DENIED,
            True,
            False,
            False,
            Deny(403, "certificate is not bound to a user", "unbound"),
        ),
        (ROOT, VALIDATE, True, False, False, Redirect("validate", "needs validation", None)),
        (ROOT, UNKNOWN, True, False, False, NO_CERTIFICATE),
        (ROOT, UNKNOWN, True, False, True, Redirect("enrol", "a client certificate is required")),
        (PUBLIC, UNKNOWN, True, False, True, Forward(None)),
        (ROOT, ALLOW_BOB, True, False, False, Forward(BOB)),
        (
            ADMIN,
            ALLOW_BOB,
            True,
            False,
            False,
            Deny(403, "your account lacks a role this path requires", "missing_role"),
        ),
        (ADMIN, ALLOW_ALICE, True, False, False, Forward(ALICE)),
        (API, ALLOW_ALICE, True, False, False, Forward(ALICE)),
        (ADMIN, Verdict("allow", "x", "odd", user=None), True, False, False, Deny(403, "x", "odd")),
    ],
)
def test_decide(
    route: Route | None,
    verdict: Verdict | None,
    has_cert: bool,
    failed: bool,
    enrol: bool,
    expected: object,
) -> None:
    assert (
        decide(route, verdict, has_certificate=has_cert, backend_failed=failed, enrol=enrol)
        == expected
    )


def test_routes_that_differ_only_in_case_are_refused_by_check_config(tmp_path: Path) -> None:
    from sidecar.config import ConfigError, RouteConfig

    RouteConfig(path="/Admin/")  # a route may have capitals
    with pytest.raises(ConfigError) as caught:
        parse(
            {"tls": {}, "routes": [{"path": "/admin/"}, {"path": "/Admin/"}, {"path": "/"}]},
            base_dir=tmp_path,
        )
    assert "routes[1].path: differs from routes[0] only in letter case: /Admin/" in (
        caught.value.problems
    )
