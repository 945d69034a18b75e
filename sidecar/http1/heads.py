"""Request heads, read from the bytes a client sent: all of the HTTP/1.1 protocol's framing
limits and refusals in one place, and no I/O (bytes in, one result out).

``HeadReader.read`` looks at the start of a connection's buffer and says one of four things:

- ``None``: no complete head yet, and nothing wrong so far (need more bytes);
- a ``Head``: a request, parsed, with how its body is framed (``length``, ``chunked``; the
  body itself is ``http1.bodies``'), whether the client waits for ``100 Continue``
  (``expect``), and how many bytes of the buffer the head took;
- a ``HandOff``: an upgrade (a WebSocket, or ``CONNECT``), which aiohttp's server
  (``fallback``) takes over with the connection;
- a ``Refusal``: a head that is not acceptable, and the status that says why: llhttp refuses
  it (400: ambiguous or malformed framing among others), a line past its limit (414 for the
  request line, else 431), more header lines than allowed (431), a head that cannot end
  within ``limits.max_header_block`` (431, at once rather than held until the header
  deadline), bare LF line ends, a missing or repeated Host (400), a version other than 1.0
  and 1.1 (400), a transfer coding other than ``chunked`` or one in HTTP/1.0 (400, RFC 9112
  §6.1).

Framing is by the blank line; parsing by httptools (llhttp, Node's parser), fed the whole head
at once. Like h11 and nginx, nothing is buffered past what a head may be.
"""

from __future__ import annotations

from typing import Final

import httptools

from ..config import LimitsConfig

#: where a request head ends
HEAD_END = b"\r\n\r\n"
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH")}
# Lower case, as llhttp gives names as sent: the headers the body's framing is read from.
_CONTENT_LENGTH = b"content-length"
_EXPECT = b"expect"
_FRAMING = frozenset({_CONTENT_LENGTH, b"transfer-encoding", _EXPECT})


class HeadLimits:
    """The framing limits of a request head (``limits.max_*``) and two sizes they imply; and
    the two deadlines of a connection between requests (``header_timeout``,
    ``keepalive_timeout``), read for every request: here a native attribute, where the
    configuration's model takes about 330 instructions per read."""

    __slots__ = (
        "header_timeout",
        "keepalive_timeout",
        "max_head",
        "max_header_line",
        "max_headers",
        "max_request_line",
        "short_head",
    )

    def __init__(self, limits: LimitsConfig) -> None:
        self.header_timeout = limits.header_timeout
        self.keepalive_timeout = limits.keepalive_timeout
        self.max_request_line = limits.max_request_line
        self.max_header_line = limits.max_header_line
        self.max_headers = limits.max_headers
        # A head longer than this may break a line limit: it is measured line by line.
        self.short_head = min(limits.max_request_line, limits.max_header_line)
        # Bytes without a complete head beyond which the head cannot be acceptable: the
        # request line and the whole header block (limits.max_header_block), with their CRLFs.
        self.max_head = limits.max_request_line + limits.max_header_block + 4


class Head:
    """A request head, as the client sent it (``Expect`` excepted: it is answered here).

    A plain class, not a dataclass: the compiled build compiles this ``__init__``, where a
    dataclass's generated one runs interpreted (1.2 % of a worker's time on S1)."""

    __slots__ = (
        "chunked",
        "expect",
        "http10",
        "keep_alive",
        "length",
        "method",
        "raw_headers",
        "size",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        raw_headers: list[tuple[bytes, bytes]],
        http10: bool,
        keep_alive: bool,
        size: int,
        length: int = 0,
        chunked: bool = False,
        expect: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        #: names and values as sent, in order
        self.raw_headers = raw_headers
        self.http10 = http10
        #: the client asked for the connection to stay open
        self.keep_alive = keep_alive
        #: the bytes of the buffer the head took
        self.size = size
        #: the body's Content-Length (0: none, or chunked)
        self.length = length
        #: the body is chunked (RFC 9112 §7.1)
        self.chunked = chunked
        #: the client waits for ``100 Continue`` before it sends the body (HTTP/1.1 only)
        self.expect = expect

    def __repr__(self) -> str:
        return f"Head({self.method} {self.target!r}, {self.size} bytes)"


class HandOff:
    """A request for aiohttp's server: the reason, for tests and for whoever reads this."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"HandOff({self.why!r})"


class Refusal:
    """A head refused here: the status and the sentence for the client; the connection ends."""

    __slots__ = ("status", "text")

    def __init__(self, status: int, text: str) -> None:
        self.status = status
        self.text = text

    def __repr__(self) -> str:
        return f"Refusal({self.status})"


UPGRADE: Final = HandOff("an upgrade: a WebSocket, or CONNECT")
BARE_LF: Final = Refusal(400, "A line of the request head ends without CR.")
REQUEST_LINE_TOO_LONG: Final = Refusal(414, "The request line is too long.")
HEADER_LINE_TOO_LONG: Final = Refusal(431, "The request headers are too large.")
MALFORMED: Final = Refusal(400, "The request is not valid HTTP/1.1.")
TOO_MANY_HEADERS: Final = Refusal(431, "The request has too many headers.")
VERSION: Final = Refusal(400, "The request is not valid HTTP/1.1.")
HOST: Final = Refusal(400, "The request must have one Host header.")
TRANSFER_CODING: Final = Refusal(
    400, "The request's Transfer-Encoding is not one this service reads: only chunked is."
)
TOO_LARGE: Final = Refusal(431, "The request headers are too large.")


#: what a closed reader holds instead of its parser (bound to no reader: it is never fed)
_CLOSED: Final = httptools.HttpRequestParser(object())


class HeadReader:
    """Reads the request heads of one connection (see the module's docstring)."""

    __slots__ = (
        "_complete",
        "_expect",
        "_hosts",
        "_keep_alive",
        "_length",
        "_parser",
        "_raw_headers",
        "_stale",
        "_te",
        "_url",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        #: the parser waits for a body it will never be given: a new one for the next head
        self._stale = False
        # the head being parsed, from llhttp's callbacks
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._hosts = 0
        self._keep_alive = False
        self._length = b""
        self._te = b""
        self._expect = False

    def close(self) -> None:
        """The connection is lost. The parser refers back to this reader (its callbacks), a
        cycle only the cyclic GC would free: it goes now (a ``read`` after this makes a new
        one)."""
        self._parser = _CLOSED
        self._stale = True

    def read(self, buffer: bytearray, limits: HeadLimits) -> Head | HandOff | Refusal | None:
        """The first request head in ``buffer`` (not consumed: ``Head.size`` says how much
        it takes), or why there is none."""
        end = buffer.find(HEAD_END)
        if end < 0:
            if b"\n\n" in buffer:
                return BARE_LF
            if len(buffer) > limits.max_request_line and b"\n" not in buffer:
                return REQUEST_LINE_TOO_LONG  # the request line alone is too long already
            if len(buffer) > limits.max_head:
                return TOO_LARGE  # held in memory no further
            return None
        size = end + 4
        head = bytes(buffer[:size]) if size < len(buffer) else bytes(buffer)
        if size > limits.short_head:
            too_long = _line_too_long(head, limits)
            if too_long is not None:
                return too_long
        self._url = b""
        self._raw_headers = []
        self._complete = self._expect = False
        self._hosts = 0
        self._length = self._te = b""
        if self._stale:
            self._parser = httptools.HttpRequestParser(self)
            self._stale = False
        parser = self._parser
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._stale = True
            return UPGRADE
        except httptools.HttpParserError:
            self._stale = True
            return BARE_LF if b"\n\n" in head else MALFORMED
        keep_alive = self._keep_alive
        if not self._complete:
            self._stale = True  # the body is ours to read (http1.bodies), not llhttp's
            keep_alive = parser.should_keep_alive()  # its flags are as the head left them
        if len(self._raw_headers) > limits.max_headers:
            return TOO_MANY_HEADERS
        method = parser.get_method()
        http10 = _http10(head, method, self._url)
        if http10 is None:  # llhttp says which, if either
            version = parser.get_http_version()
            if version != "1.1" and version != "1.0":
                return VERSION
            http10 = version == "1.0"
        # One Host, or none in HTTP/1.0 (RFC 9112 §3.2).
        if self._hosts > 1 or (self._hosts == 0 and not http10):
            return HOST
        length = 0
        chunked = False
        if self._te:
            # llhttp let only a list ending in chunked through. A coding before it would be
            # lost (Transfer-Encoding is hop by hop) and HTTP/1.0 has no transfer codings
            # (RFC 9112 §6.1): such framing is not to be trusted.
            if http10 or self._te.strip().lower() != b"chunked":
                return TRANSFER_CODING
            chunked = True
        elif self._length:
            length = int(self._length)  # llhttp let only one run of digits through
        return Head(
            _method(method),
            self._url.decode("utf-8", "surrogateescape"),
            self._raw_headers,
            http10,
            keep_alive,
            size,
            length,
            chunked,
            self._expect and not http10,
        )

    # ---- httptools callbacks (the whole head is fed at once) -----------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"host":
            self._hosts += 1
        elif lower in _FRAMING:
            if lower == _EXPECT:
                # Answered here, hop by hop: 100-continue is the one expectation there is (RFC
                # 9110 §10.1.1); an upstream may rightly never send 100 Continue itself.
                self._expect = self._expect or value.strip().lower() == b"100-continue"
                return
            if lower == _CONTENT_LENGTH:
                self._length = value
            else:
                self._te = value
        self._raw_headers.append((name, value))

    def on_message_complete(self) -> None:
        self._complete = True
        # Read now: once the message is complete llhttp resets its flags for the next one,
        # and should_keep_alive() would only give the version's default.
        self._keep_alive = self._parser.should_keep_alive()


def _http10(head: bytes, method: bytes, url: bytes) -> bool | None:
    """Whether the request line llhttp accepted is HTTP/1.0 (True) or HTTP/1.1 (False), read
    from the head's bytes: None unless they are exactly ``method``, one space, ``url`` (as
    llhttp handed them over), then " HTTP/1.0" or " HTTP/1.1" and CRLF, the version llhttp
    read (it allows an empty line before the request line and more than one space: those go
    the long way). Then llhttp's ``get_http_version`` says, whose ``str.format`` costs about
    2,200 instructions a request; slices and comparisons here cost a few hundred (not
    ``find`` or ``startswith``: their arguments are parsed as a tuple on every call)."""
    after = len(method)
    end = after + 1 + len(url)
    if len(head) < end + 11 or head[after] != 32:
        return None
    if head[:after] != method or head[after + 1 : end] != url:
        return None
    version = head[end : end + 11]
    if version == b" HTTP/1.1\r\n":
        return False
    if version == b" HTTP/1.0\r\n":
        return True
    return None


def _line_too_long(head: bytes, limits: HeadLimits) -> Refusal | None:
    lines = head.split(b"\r\n")
    if len(lines[0]) > limits.max_request_line:
        return REQUEST_LINE_TOO_LONG
    longest = limits.max_header_line
    if any(len(line) > longest for line in lines[1:]):
        return HEADER_LINE_TOO_LONG
    return None


def _method(raw: bytes) -> str:
    return _METHODS.get(raw) or raw.decode("ascii")  # llhttp knows only ASCII methods
