"""The request head reader (``sidecar.http1.heads``), the way h11 tests its readers: byte
strings in, one result out, no connection and no event loop."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import LimitsConfig
from sidecar.http1.heads import (
    BARE_LF,
    HEADER_LINE_TOO_LONG,
    HOST,
    MALFORMED,
    REQUEST_LINE_TOO_LONG,
    TOO_LARGE,
    TOO_MANY_HEADERS,
    TRANSFER_CODING,
    UPGRADE,
    VERSION,
    HandOff,
    Head,
    HeadLimits,
    HeadReader,
    Refusal,
)

LIMITS = HeadLimits(LimitsConfig())
SMALL = HeadLimits(
    LimitsConfig(max_request_line=256, max_header_line=256, max_headers=8, max_header_block=1024)
)


def read(data: bytes, limits: HeadLimits = LIMITS) -> Head | HandOff | Refusal | None:
    return HeadReader().read(bytearray(data), limits)


def head(data: bytes, limits: HeadLimits = LIMITS) -> Head:
    result = read(data, limits)
    assert isinstance(result, Head), result
    return result


def test_a_get_is_read_whole() -> None:
    got = head(b"GET /a?b=c HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n")
    assert (got.method, got.target, got.http10, got.keep_alive) == ("GET", "/a?b=c", False, True)
    assert got.raw_headers == [(b"Host", b"example"), (b"Accept", b"*/*")]
    assert got.size == len(b"GET /a?b=c HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n")


def test_names_and_values_stay_as_sent() -> None:
    got = head(b"GET / HTTP/1.1\r\nhOsT: h\r\nX_Odd-Name: \xe9t\xe9\r\n\r\n")
    assert got.raw_headers == [(b"hOsT", b"h"), (b"X_Odd-Name", b"\xe9t\xe9")]


def test_only_the_first_of_pipelined_heads_is_read() -> None:
    first = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
    second = b"HEAD /2 HTTP/1.1\r\nHost: h\r\n\r\n"
    reader = HeadReader()
    buffer = bytearray(first + second)
    got = reader.read(buffer, LIMITS)
    assert isinstance(got, Head) and got.size == len(first)
    assert len(buffer) == len(first + second)  # not consumed: the caller does
    del buffer[: got.size]
    again = reader.read(buffer, LIMITS)  # the same reader, for the next one
    assert isinstance(again, Head) and (again.method, again.target) == ("HEAD", "/2")


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    ],
)
def test_keep_alive_as_the_client_asked(data: bytes, keep_alive: bool) -> None:
    got = head(data)
    assert got.keep_alive is keep_alive
    assert got.http10 is data.startswith(b"GET / HTTP/1.0")


def test_any_method_llhttp_knows() -> None:
    assert head(b"PROPFIND / HTTP/1.1\r\nHost: h\r\n\r\n").method == "PROPFIND"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"G",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\r",
    ],
)
def test_an_unfinished_head_needs_more(data: bytes) -> None:
    assert read(data) is None


@pytest.mark.parametrize(
    ("data", "length", "chunked", "expect"),
    [
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n", 3, False, False),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n", 3, False, False),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", 0, False, False),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 0, True, False),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked \r\n\r\n", 0, True, False),
        (
            b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 9\r\n\r\n",
            9,
            False,
            True,
        ),
        # HTTP/1.0 knows no 100 Continue (RFC 9110 §10.1.1): the body comes at once
        (b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n", 9, False, False),
        # another expectation is not ours to meet: ignored, and not forwarded either
        (b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: x\r\nContent-Length: 9\r\n\r\n", 9, False, False),
    ],
)
def test_how_the_body_is_framed(data: bytes, length: int, chunked: bool, expect: bool) -> None:
    got = head(data)
    assert (got.length, got.chunked, got.expect) == (length, chunked, expect)
    assert all(name.lower() != b"expect" for name, _ in got.raw_headers)


def test_the_head_after_a_body_is_read_by_a_fresh_parser() -> None:
    reader = HeadReader()
    first = reader.read(
        bytearray(b"POST /1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"), LIMITS
    )
    assert isinstance(first, Head) and first.length == 5
    # the body is not llhttp's to read: the next head is a head, not 5 bytes of body
    again = reader.read(bytearray(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"), LIMITS)
    assert isinstance(again, Head) and (again.method, again.target) == ("GET", "/2")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    ],
)
def test_an_upgrade_goes_to_aiohttp(data: bytes) -> None:
    assert read(data) is UPGRADE


def test_upgrade_without_connection_upgrade_is_a_plain_request() -> None:
    # a proxy may ignore Upgrade (RFC 9110 §7.8): it is hop by hop, and stripped
    assert isinstance(read(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"), Head)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\nHost: h\n\n", BARE_LF),
        (b"GET / HTTP/1.1\r\n\r\n", HOST),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HOST),
        (b"GET / HTTP/1.1\r\nHost h\r\n\r\n", MALFORMED),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", MALFORMED),
        (b"GET / HTTP/0.9\r\nHost: h\r\n\r\n", VERSION),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", VERSION),
        # ambiguous framing: llhttp refuses it
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            MALFORMED,
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\n", MALFORMED),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            MALFORMED,
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", MALFORMED),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", MALFORMED),
        # a coding before chunked would be lost; HTTP/1.0 has no transfer codings
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            TRANSFER_CODING,
        ),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", TRANSFER_CODING),
    ],
)
def test_what_is_refused_and_why(data: bytes, why: Refusal) -> None:
    assert read(data) is why
    assert isinstance(why, Refusal) and why.status == 400


def test_lines_past_their_limits_are_414_or_431() -> None:
    assert read(b"GET /" + b"a" * 300, SMALL) is REQUEST_LINE_TOO_LONG  # no line end yet
    assert read(b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: h\r\n\r\n", SMALL) is (
        REQUEST_LINE_TOO_LONG
    )
    assert read(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 300 + b"\r\n\r\n", SMALL) is (
        HEADER_LINE_TOO_LONG
    )
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(8))
    assert read(b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n", SMALL) is TOO_MANY_HEADERS
    assert (REQUEST_LINE_TOO_LONG.status, HEADER_LINE_TOO_LONG.status) == (414, 431)
    assert TOO_MANY_HEADERS.status == 431


def test_a_head_that_cannot_end_in_time_is_refused_at_once() -> None:
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(30))  # past 256 + 1024 + 4
    refused = read(b"GET / HTTP/1.1\r\nHost: h\r\n" + lines, SMALL)
    assert refused is TOO_LARGE
    assert isinstance(refused, Refusal) and refused.status == 431


_TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20
)
_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
_HEADERS = st.lists(
    st.tuples(_TOKEN, _VALUE).filter(
        lambda nv: (
            nv[0].lower()
            not in (
                "host",
                "transfer-encoding",
                "upgrade",
                "expect",
                "content-length",
                "connection",
            )
        )
    ),
    max_size=10,
)


@settings(max_examples=200, derandomize=True)
@given(
    path=st.text("abcdefghijklmnopqrstuvwxyz0123456789/-._~%?=&", max_size=60),
    headers=_HEADERS,
    cut=st.integers(min_value=0),
)
def test_every_prefix_needs_more_and_the_whole_reads_back(
    path: str, headers: list[tuple[str, str]], cut: int
) -> None:
    fields = [("Host", "h"), *headers]
    data = f"GET /{path} HTTP/1.1\r\n".encode() + b"".join(
        f"{name}: {value}\r\n".encode() for name, value in fields
    )
    data += b"\r\n"
    assert read(data[: cut % len(data)]) is None
    got = head(data)
    assert got.target == f"/{path}"
    assert got.raw_headers == [(n.encode(), v.encode()) for n, v in fields]
    assert got.size == len(data)


class _Ignore:
    """Callbacks for a bare llhttp parser: none."""


_LINE_METHOD = st.sampled_from([b"GET", b"POST", b"OPTIONS"])
_LINE_TARGET = st.lists(
    st.sampled_from([b"/", b"a", b"HTTP", b"/HTTP/1.1", b"/HTTP/1.0", b"1.1", b".", b"?x=", b"*"]),
    min_size=1,
    max_size=5,
).map(b"".join)
_LINE_END = st.sampled_from(
    [
        b" HTTP/1.1",
        b" HTTP/1.0",
        b"  HTTP/1.0",
        b" HTTP/0.9",
        b" HTTP/2.0",
        b" HTTP/1.2",
        b"",
        b" HTTP/1.1 X",
    ]
)


@settings(max_examples=500, derandomize=True)
@given(
    before=st.sampled_from([b"", b"\r\n"]),
    method=_LINE_METHOD,
    space=st.sampled_from([b" ", b"  "]),
    target=_LINE_TARGET,
    end=_LINE_END,
)
def test_the_version_is_the_one_llhttp_reads(
    before: bytes, method: bytes, space: bytes, target: bytes, end: bytes
) -> None:
    """The request line's version, read from the head's bytes where they are the method,
    the target and " HTTP/1.1" or " HTTP/1.0", is llhttp's: a target ending in "/HTTP/1.1"
    is HTTP/0.9 to llhttp, and refused as such, whatever the rest of the head says; an empty
    line first or two spaces (llhttp takes both) change nothing."""
    data = before + method + space + target + end + b"\r\nHost: h\r\nX: a HTTP/1.1\r\n\r\n"
    oracle = httptools.HttpRequestParser(_Ignore())
    try:
        oracle.feed_data(data)
    except httptools.HttpParserError:
        assert isinstance(read(data), Refusal)
        return
    version = oracle.get_http_version()
    got = read(data)
    if version in ("1.0", "1.1"):
        assert isinstance(got, Head), (data, got)
        assert got.http10 == (version == "1.0")
    else:
        assert got is VERSION, (data, version)


def test_a_target_ending_like_a_version_is_no_version() -> None:
    assert read(b"GET /HTTP/1.1\r\nHost: h\r\n\r\n") is VERSION  # HTTP/0.9 to llhttp
    assert head(b"GET /HTTP/1.1 HTTP/1.0\r\nHost: h\r\n\r\n").http10
    assert not head(b"GET /HTTP/1.0 HTTP/1.1\r\nHost: h\r\n\r\n").http10
