"""Report headers never reach the client (issue #18 §1): an application's
``X-Identity-Bind``, ``-Unbind``, ``-Trust`` and ``-Intrusion`` (or the names configured) are
removed from every upstream response, on every path (the listener's whole and streamed
relays, aiohttp's path for requests with a body), whether trust reports are on or off, so
that a misconfigured application never shows them to browsers. Names are compared as the
request side compares them (``headers._normal``): any case, and every character that is not a
letter or digit read as ``-``, as PHP, lighttpd and CGI read them, so ``X.Identity.Bind`` or
``x~identity~intrusion`` is a report header too, removed and (with reports on) reported.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.headers import ResponseRules, response_fields

from .conftest import ConfigDir, SidecarFactory
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .reporting import FAST, REPORT_HEADERS, App, Env, Start, app, serial, start

__all__ = ["app", "fake_identityplus", "start"]  # fixtures, imported to be used here

#: RFC 9110 tchar punctuation: what a header name may hold besides letters and digits
_PUNCTUATION = "!#$%&'*+-.^_`|~"


def _as_read(name: str) -> str:
    """A header name as PHP, lighttpd and CGI read it (and ``headers._normal`` compares it)."""
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower())


#: the four report headers spelled with other punctuation, as an application server reads
#: each one as the default name
PUNCTUATED = {
    "X.Identity.Bind": "ada.local",
    "x~identity~unbind": "ada.local",
    "X-Identity_Trust": "social",
    "X!IDENTITY.Intrusion": 'fraud; message="stolen card"',
}


ALL_FOUR = {
    "X-Identity-Bind": "ada.local",
    "X-Identity-Unbind": "ada.local",
    "X-Identity-Trust": "social",
    "X-Identity-Intrusion": 'fraud; message="stolen card"',
}
PATHS = [
    pytest.param("GET", "/app/page", None, id="listener-whole"),
    pytest.param("GET", "/stream/page", None, id="listener-streamed"),
    pytest.param("POST", "/app/form", b"a=1", id="aiohttp-with-body"),
]


@pytest.mark.parametrize(("method", "path", "data"), PATHS)
async def test_report_headers_never_reach_the_client_when_reports_are_off(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    app: App,
    fake_identityplus: FakeIdentityPlus,
    method: str,
    path: str,
    data: bytes | None,
) -> None:
    """A misconfigured application leaks nothing to browsers: with the static backend (no
    report can be made at all) the four headers are removed from every response path."""
    running = await start_sidecar(config_dir.base(app.port))
    env = Env(fake_identityplus, running, app)

    reply = await env.get(path, running.certs.alice, ALL_FOUR, method=method, data=data)

    assert reply.status == 200, reply.body
    leaked = [name for name in REPORT_HEADERS if name in reply.headers]
    assert leaked == [], f"forwarded to the client: {leaked}"
    assert reply.body in (b"page", b"part one, part two")


async def test_configured_names_are_the_ones_removed(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    app: App,
    fake_identityplus: FakeIdentityPlus,
) -> None:
    data = config_dir.base(app.port)
    data["headers"] = {
        "reports": {
            "bind": "X-App-Bind",
            "unbind": "X-App-Unbind",
            "trust": "X-App-Trust",
            "intrusion": "X_App_Intrusion",
        }
    }
    env = Env(fake_identityplus, await start_sidecar(data), app)
    reply = await env.get(
        "/app/",
        env.running.certs.alice,
        {
            "x-app-bind": "ada.local",
            "X-App-Intrusion": "mistake",
            "X-Identity-Bind": "an ordinary header now",
        },
    )
    assert reply.status == 200
    assert "X-App-Bind" not in reply.headers and "X-App-Intrusion" not in reply.headers
    assert reply.headers["X-Identity-Bind"] == "an ordinary header now"


@pytest.mark.parametrize(("method", "path", "data"), PATHS)
async def test_report_headers_spelled_with_other_punctuation_never_reach_the_client(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    app: App,
    fake_identityplus: FakeIdentityPlus,
    method: str,
    path: str,
    data: bytes | None,
) -> None:
    """``X.Identity.Bind`` is ``X-Identity-Bind`` to PHP and lighttpd: removed on every path."""
    running = await start_sidecar(config_dir.base(app.port))
    env = Env(fake_identityplus, running, app)

    reply = await env.get(path, running.certs.alice, PUNCTUATED, method=method, data=data)

    assert reply.status == 200, reply.body
    reported = {_as_read(name) for name in REPORT_HEADERS}
    leaked = [name for name in reply.headers if _as_read(name) in reported]
    assert leaked == [], f"forwarded to the client: {leaked}"
    assert reply.body in (b"page", b"part one, part two")


async def test_a_report_header_spelled_with_other_punctuation_is_reported(start: Start) -> None:
    """With reports on, the application's ``X.Identity.Bind`` is the bind it means (the
    same name to its server), not an ordinary header passed on."""
    env = await start(reports=FAST)
    ada = env.client("Ada Lovelace")
    env.fake.set_profile(serial(ada), "OK 0001", organizational_reference="ref-ada")

    reply = await env.get("/app/page", ada, {"X.Identity.Bind": "ada.local"})
    assert reply.status == 200 and "X.Identity.Bind" not in reply.headers
    await env.settled()

    [call] = env.fake.reports
    assert call.operation == "Local-User-Information"
    assert call.body == {
        "Local-User-Information": {
            "serial-number": str(serial(ada)),
            "local-user-name": "ada.local",
        }
    }


def test_response_fields_read_any_punctuation_in_a_report_header_name_as_a_dash() -> None:
    rules = ResponseRules(
        ("X-Identity-Bind", "X_Report_Unbind", "X-Identity-Trust", "X-Identity-Intrusion")
    )
    raw = [
        (b"X.Identity.Bind", b"ada"),
        (b"x~report|unbind", b"bob"),  # configured with underscores: any punctuation matches
        (b"X-IDENTITY.TRUST", b"mfa"),
        (b"X!Identity#Intrusion", b"fraud"),
        (b"XIdentityBind", b"kept"),  # no separator: another name to every server
        (b"X-Identity.Bindery", b"kept too"),
    ]
    block, _, captured = response_fields(raw, rules)
    assert block == b"XIdentityBind: kept\r\nX-Identity.Bindery: kept too\r\n"
    assert captured == [(0, b"ada"), (1, b"bob"), (2, b"mfa"), (3, b"fraud")]


@st.composite
def _spelled(draw: st.DrawFn, name: str) -> bytes:
    """``name`` in any case, each dash any tchar punctuation."""
    out = []
    for c in name:
        if c == "-":
            out.append(draw(st.sampled_from(_PUNCTUATION)))
        else:
            out.append(draw(st.sampled_from((c.lower(), c.upper()))))
    return "".join(out).encode("ascii")


@given(
    st.lists(
        st.tuples(
            st.one_of(
                *(_spelled(name) for name in REPORT_HEADERS),
                st.sampled_from([b"Server", b"X-A", b"X-Identity-Bindery", b"Connection"]),
            ),
            st.binary(max_size=10).filter(lambda v: b"\r" not in v and b"\n" not in v),
        ),
        max_size=12,
    )
)
def test_no_report_header_in_any_punctuation_is_ever_passed_on(
    raw: list[tuple[bytes, bytes]],
) -> None:
    block, _, captured = response_fields(raw)
    reported = {_as_read(name) for name in REPORT_HEADERS}
    passed = [line.split(b":", 1)[0].decode() for line in block.split(b"\r\n")[:-1]]
    assert [n for n in passed if _as_read(n) in reported] == []
    expected = [v for n, v in raw if _as_read(n.decode()) in reported]
    assert [v for _, v in captured or []] == expected


def test_response_fields_remove_report_headers_in_any_spelling_and_hand_them_back() -> None:
    rules = ResponseRules(
        ("X-Identity-Bind", "X_Report_Unbind", "X-Identity-Trust", "X-Identity-Intrusion")
    )
    raw = [
        (b"Content-Type", b"text/html"),
        (b"x-identity-bind", b"ada"),
        (b"X-Report-Unbind", b"bob"),  # a dash for the configured underscore
        (b"X_IDENTITY_TRUST", b"mfa"),
        (b"Content-Length", b"2"),
        (b"X-Identity-Intrusion", b"fraud"),
        (b"X-Identity-Bindery", b"kept"),
    ]
    block, _, captured = response_fields(raw, rules)
    assert block == b"Content-Type: text/html\r\nContent-Length: 2\r\nX-Identity-Bindery: kept\r\n"
    assert captured == [(0, b"ada"), (1, b"bob"), (2, b"mfa"), (3, b"fraud")]


_NAMES = [b"X-Identity-Bind", b"x_identity_trust", b"X-IDENTITY-INTRUSION", b"Server", b"X-A"]


@given(
    st.lists(
        st.tuples(
            st.sampled_from([*_NAMES, b"Connection"]),
            st.binary(max_size=10).filter(lambda v: b"\r" not in v and b"\n" not in v),
        ),
        max_size=12,
    )
)
def test_no_report_header_is_ever_passed_on(raw: list[tuple[bytes, bytes]]) -> None:
    """Whatever else the response holds (a Connection header naming them included)."""
    block, _, captured = response_fields(raw)
    assert b"x-identity-" not in block.lower().replace(b"_", b"-")
    expected = [v for n, v in raw if n.lower().replace(b"_", b"-").startswith(b"x-identity-")]
    assert [v for _, v in captured or []] == expected
