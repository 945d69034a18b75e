"""Route policy: longest prefix, deny by default, ambiguous paths refused; decide() table."""

from __future__ import annotations

import pytest

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
    readings,
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


def test_dot_segments_resolve_like_the_upstream_would() -> None:
    # Every reading resolves "/public/../admin/x" to /admin/x: the stricter route applies.
    assert TABLE.match("/public/../admin/x") == ADMIN


def test_harmless_encodings_pass() -> None:
    assert TABLE.match("/admin/a%20b?q=%2F") == ADMIN
    assert TABLE.match("/docs/./x") == ROOT
    assert "/admin/x" in readings("/admin;jsessionid=1/x")


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
