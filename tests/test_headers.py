"""Header rules: spoofed identity and forwarding headers never pass; ours are exact."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar.headers import (
    HAS_DATE,
    HAS_LENGTH,
    HAS_SERVER,
    HeaderRules,
    request_fields,
    response_fields,
)
from sidecar.http1.upstream import request_head as head_from_lines
from sidecar.identity import User

from .header_views import response_headers, upstream_headers

RULES = HeaderRules("X-APP-CERTIFICATE", "X-USERINFO", (ipaddress.ip_network("10.0.0.0/8"),))
USER = User("sub-1", "alice", "Alice", None, "a@example.com", ("administrator",))


def build(h: CIMultiDict[str], **kwargs: Any) -> CIMultiDict[str]:
    """upstream_headers with the test's rules and defaults for what a test does not vary."""
    args: dict[str, Any] = {
        "client_ip": "1.2.3.4",
        "trusted": False,
        "request_id": "r",
        "user": None,
        "certificate_b64": None,
    }
    args.update(kwargs)
    return upstream_headers(RULES, h, **args)


def incoming(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_spoofed_identity_headers_removed_in_any_case_and_repeat() -> None:
    h = incoming(
        ("Host", "app.example"),
        ("x-app-certificate", "forged"),
        ("X-App-Certificate", "forged2"),
        ("X-USERINFO", "forged"),
        ("x-userinfo", "forged"),
        ("Accept", "*/*"),
    )
    out = build(h, request_id="r1")
    assert "X-APP-CERTIFICATE" not in out and "X-USERINFO" not in out
    assert out.getall("Accept") == ["*/*"] and out["Host"] == "app.example"

    out = build(h, request_id="r1", user=USER, certificate_b64="Q0VSVA==")
    assert out.getall("X-APP-CERTIFICATE") == ["Q0VSVA=="]
    assert out.getall("X-USERINFO") == [USER.header_value]


def test_underscore_spellings_of_protected_headers_are_removed() -> None:
    h = incoming(
        ("Host", "h"),
        ("X_USERINFO", "forged"),
        ("x_app_certificate", "forged"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X-Custom_Header", "kept"),
    )
    out = build(h)
    names = {k.lower() for k in out}
    assert "x_userinfo" not in names and "x_app_certificate" not in names
    assert "x_forwarded_for" not in names
    assert out["X-Custom_Header"] == "kept"


def test_hop_by_hop_and_connection_named_removed_but_host_kept() -> None:
    h = incoming(
        ("Host", "h"),
        ("Connection", "keep-alive, X-Secret, host, Content-Length"),
        ("Keep-Alive", "timeout=5"),
        ("X-Secret", "s"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Proxy-Authorization", "Basic x"),
        ("Upgrade", "h2c"),
        ("X-Kept", "k"),
    )
    out = build(h)
    names = {k.lower() for k in out}
    assert names.isdisjoint(
        {
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "upgrade",
        }
    )
    assert out["Host"] == "h" and out["X-Kept"] == "k"


def test_forwarding_headers_from_untrusted_peer_are_replaced() -> None:
    h = incoming(
        ("Host", "app"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("x-forwarded-for", "7.7.7.7"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "evil"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Request-ID", "spoofed"),
    )
    out = build(h, request_id="mine")
    assert out.getall("X-Forwarded-For") == ["1.2.3.4"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["app"]
    assert out.getall("X-Real-IP") == ["1.2.3.4"]
    assert out.getall("X-Request-ID") == ["mine"]
    assert "Forwarded" not in out


def test_trusted_proxy_headers_are_kept_and_appended() -> None:
    h = incoming(
        ("Host", "app"),
        ("X-Forwarded-For", "9.9.9.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "public.example"),
    )
    out = build(h, client_ip="10.0.0.5", trusted=True, request_id="abc")
    assert out.getall("X-Forwarded-For") == ["9.9.9.9, 10.0.0.5"]
    assert out["X-Forwarded-Host"] == "public.example"
    assert RULES.is_trusted_proxy("10.1.2.3") and not RULES.is_trusted_proxy("11.0.0.1")
    assert RULES.is_trusted_proxy("::ffff:10.0.0.1") and not RULES.is_trusted_proxy("garbage")


def test_response_headers_drop_hop_by_hop() -> None:
    h = incoming(
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "x"),
        ("Transfer-Encoding", "chunked"),
    )
    out = response_headers(h)
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "X-Internal" not in out and "Transfer-Encoding" not in out and "Connection" not in out


def test_request_fields_work_on_the_bytes_as_sent() -> None:
    raw = [
        (b"Host", b"app.example"),
        (b"X-Cafe", b"cr\xc3\xa8me \xff"),  # a value not ASCII, not even UTF-8: passed as is
        (b"X-Caf\xc3\xa9", b"1"),  # a name with more than letters, digits, - and _: dropped
        (b"x_custom", b"1"),
        (b"Connection", b"X-Custom, keep-alive"),  # names x_custom (read as x-custom)
        (b"X-USERINFO", b"forged"),
    ]
    block, has_host = request_fields(
        RULES,
        raw,
        client_ip="1.2.3.4",
        trusted=False,
        request_id="r1",
        user=USER,
        certificate_b64="Q0VSVA==",
    )
    assert has_host
    assert block == (
        b"Host: app.example\r\n"
        b"X-Cafe: cr\xc3\xa8me \xff\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: app.example\r\nX-Real-IP: 1.2.3.4\r\nX-Request-ID: r1\r\n"
        b"X-APP-CERTIFICATE: Q0VSVA==\r\nX-USERINFO: " + USER.header_value.encode() + b"\r\n"
    )
    # The name cache must not let one spelling's verdict leak to another.
    block, has_host = request_fields(
        RULES,
        [(b"X_USERINFO", b"forged"), (b"x-userinfo", b"forged")],
        client_ip="1.2.3.4",
        trusted=False,
        request_id="r2",
        user=None,
        certificate_b64=None,
    )
    assert not has_host and b"forged" not in block


def test_response_fields_drop_connection_named_and_report_framing() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Content-Length", b"2"),
        (b"X-Secret-Hop", b"x"),
        (b"Connection", b"keep-alive, x-secret-hop"),
        (b"X-Request-ID", b"upstream's own"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    block, flags, captured = response_fields(raw)
    assert block == b"Content-Type: text/plain\r\nContent-Length: 2\r\n"
    assert flags == HAS_LENGTH and captured is None
    block, flags, captured = response_fields(
        [(b"Date", b"d"), (b"Server", b"s"), (b"Connection", b"close")]
    )
    assert block == b"Date: d\r\nServer: s\r\n"
    assert flags == HAS_DATE | HAS_SERVER and captured is None


@pytest.mark.parametrize(
    "raw",
    [
        [(b"X-Evil", b"a\r\nX-Injected: 1")],  # a whole extra line
        [(b"X-Evil", b"a\r\n\r\nGET /admin HTTP/1.1")],  # the head ended early
        [(b"X-Evil", b"a\nb")],
        [(b"X-Evil", b"a\rb")],
        [(b"Host", b"h\r\nX-Injected: 1")],  # also echoed in X-Forwarded-Host
    ],
    ids=["crlf-line", "crlf-request", "lf", "cr", "host"],
)
@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
def test_request_fields_refuse_cr_or_lf_in_a_value(
    raw: list[tuple[bytes, bytes]], trusted: bool
) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        request_fields(
            RULES,
            raw,
            client_ip="10.0.0.1",
            trusted=trusted,
            request_id="r",
            user=USER,
            certificate_b64="Q0VSVA==",
        )


def test_trusted_forwarded_for_values_are_checked_too() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        request_fields(
            RULES,
            [(b"X-Forwarded-For", b"1.1.1.1\r\nX-Injected: 1")],  # merged, not kept as sent
            client_ip="10.0.0.1",
            trusted=True,
            request_id="r",
            user=None,
            certificate_b64=None,
        )


@pytest.mark.parametrize(
    ("certificate_b64", "userinfo"),
    [("Q0VSVA==\r\nX-Injected: 1", ""), ("Q0VSVA==", "e30=\r\nX-Injected: 1"), ("Q0\nVA", "")],
    ids=["certificate", "userinfo", "lf"],
)
def test_identity_values_are_checked_for_cr_or_lf(certificate_b64: str, userinfo: str) -> None:
    # Ours are base64, but a backend may hand over the X-USERINFO value it made: the lines
    # are checked once where they are made (and kept), not on every request.
    user = User("sub-2", "mallory", header_value=userinfo) if userinfo else USER
    for _ in range(2):  # the second time from the cache, if anything were kept
        with pytest.raises(ValueError, match="CR or LF"):
            request_fields(
                RULES,
                [(b"Host", b"h")],
                client_ip="1.2.3.4",
                trusted=False,
                request_id="r",
                user=user,
                certificate_b64=certificate_b64,
            )


@pytest.mark.parametrize("userinfo", ["e30=\r\nX-Injected: 1", "e30=\nX-Injected: 1", "e30=\r"])
def test_identity_values_are_checked_with_certificate_formats_too(userinfo: str) -> None:
    """With ``certificate_formats`` the X-USERINFO line is made on every request (the
    certificate lines are kept per chain): its value is checked there."""
    from .pki import make_ca, make_leaf

    rules = HeaderRules("X-APP-CERTIFICATE", "X-USERINFO", certificate_formats=("client-cert",))
    der = make_leaf(make_ca("Formats CA"), "alice").der
    user = User("sub-2", "mallory", header_value=userinfo)
    with pytest.raises(ValueError, match="CR or LF in an identity header"):
        rules.identity_lines("", user, der, ())
    assert rules.identity_lines("", USER, der, ()).endswith(
        b"X-USERINFO: " + USER.header_bytes + b"\r\n"
    )


def test_identity_lines_are_kept_per_certificate_and_user_within_a_bound() -> None:
    rules = HeaderRules("X-APP-CERTIFICATE", "X-USERINFO")
    bob = User("sub-3", "bob", roles=("member",))
    first = rules.identity_lines("QUFB", USER)
    assert first == b"X-APP-CERTIFICATE: QUFB\r\nX-USERINFO: " + USER.header_bytes + b"\r\n"
    assert rules.identity_lines("QUFB", USER) is first  # made once
    assert rules.identity_lines("QUFB", bob).endswith(bob.header_bytes + b"\r\n")  # not mixed up
    assert rules.identity_lines("QkJC", USER).startswith(b"X-APP-CERTIFICATE: QkJC\r\n")
    for i in range(5000):  # many certificates: memory stays bounded
        rules.identity_lines(f"{i:08d}", USER)
    assert len(rules._identity_blocks) <= 1024


def test_request_target_with_cr_or_lf_is_refused() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        head_from_lines("GET", "/a\r\nX-Injected: 1", b"Host: h\r\n", None)
