"""Request heads, read from the bytes a client sent: all of the HTTP/1.1 protocol's framing
limits and refusals in one place, and no I/O (bytes in, one result out).

``HeadReader.read`` looks at the start of a connection's buffer and says one of four things:

- ``None``: no complete head yet, and nothing wrong so far (need more bytes);
- a ``Head``: a request without a body (nearly all a browser sends), parsed, and how many
  bytes of the buffer it took;
- a ``HandOff``: a request this protocol does not serve; aiohttp's server (``fallback``)
  takes the connection over with these bytes and serves it or refuses it itself, as it
  always did: a body, an upgrade, ``Expect``, a version other than 1.0 and 1.1, a head llhttp
  refuses, a line or a header count past its limit (aiohttp says which one: 414 or 431), bare
  LF line ends, a missing or repeated Host;
- a ``Refusal``: a head that cannot be acceptable however it ends (longer than the request
  line and the whole header block may be), refused at once (431) rather than held in memory
  until the header deadline.

Framing is by the blank line; parsing by httptools (llhttp, Node's parser), fed the whole head
at once. Like h11 and nginx, nothing is buffered past what a head may be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import httptools

from ..config import LimitsConfig

_HEAD_END = b"\r\n\r\n"
# Headers that take a request off the fast path (aiohttp serves it): a body, an upgrade, an
# interim response to send. Lower case, as llhttp gives names as sent.
_UNUSUAL = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH")}


class HeadLimits:
    """The framing limits of a request head (``limits.max_*``) and two sizes they imply."""

    __slots__ = ("max_head", "max_header_line", "max_headers", "max_request_line", "short_head")

    def __init__(self, limits: LimitsConfig) -> None:
        self.max_request_line = limits.max_request_line
        self.max_header_line = limits.max_header_line
        self.max_headers = limits.max_headers
        # A head longer than this may break a line limit: it is measured line by line.
        self.short_head = min(limits.max_request_line, limits.max_header_line)
        # Bytes without a complete head beyond which the head cannot be acceptable: the
        # request line and the whole header block (limits.max_header_block), with their CRLFs.
        self.max_head = limits.max_request_line + limits.max_header_block + 4


@dataclass(slots=True)  # not frozen: made per request, and a frozen one costs more
class Head:
    """A request head without a body, as the client sent it."""

    method: str
    target: str
    #: names and values as sent, in order
    raw_headers: list[tuple[bytes, bytes]]
    http10: bool
    #: the client asked for the connection to stay open
    keep_alive: bool
    #: the bytes of the buffer the head took
    size: int


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


BARE_LF: Final = HandOff("a line ends with a bare LF")
LONG_LINE: Final = HandOff("a line is longer than its limit (414 or 431)")
MALFORMED: Final = HandOff("llhttp refuses the head (400)")
BODY: Final = HandOff("a body follows the head")
UPGRADE: Final = HandOff("an upgrade, or Expect: an answer before the answer")
TOO_MANY_HEADERS: Final = HandOff("more headers than limits.max_headers (431)")
VERSION: Final = HandOff("neither HTTP/1.0 nor HTTP/1.1")
HOST: Final = HandOff("no Host in HTTP/1.1, or more than one (400)")
TOO_LARGE: Final = Refusal(431, "The request headers are too large.")


class HeadReader:
    """Reads the request heads of one connection (see the module's docstring)."""

    __slots__ = (
        "_complete",
        "_hosts",
        "_keep_alive",
        "_parser",
        "_raw_headers",
        "_unusual",
        "_url",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        # the head being parsed, from llhttp's callbacks
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._unusual = False
        self._hosts = 0
        self._keep_alive = False

    def read(self, buffer: bytearray, limits: HeadLimits) -> Head | HandOff | Refusal | None:
        """The first request head in ``buffer`` (not consumed: ``Head.size`` says how much
        it takes), or why there is none."""
        end = buffer.find(_HEAD_END)
        if end < 0:
            if b"\n\n" in buffer:
                return BARE_LF
            if len(buffer) > limits.max_request_line and b"\n" not in buffer:
                return LONG_LINE  # the request line alone is too long already
            if len(buffer) > limits.max_head:
                return TOO_LARGE  # held in memory no further
            return None
        size = end + 4
        head = bytes(buffer[:size]) if size < len(buffer) else bytes(buffer)
        if size > limits.short_head and not _within_line_limits(head, limits):
            return LONG_LINE
        self._url = b""
        self._raw_headers = []
        self._complete = self._unusual = False
        self._hosts = 0
        parser = self._parser
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            return UPGRADE
        except httptools.HttpParserError:
            return MALFORMED
        if self._unusual:
            return UPGRADE if self._complete else BODY
        if not self._complete:
            return BODY
        if len(self._raw_headers) > limits.max_headers:
            return TOO_MANY_HEADERS
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            return VERSION
        # One Host, or none in HTTP/1.0 (RFC 9112 §3.2): aiohttp answers the others with 400.
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            return HOST
        return Head(
            _method(parser.get_method()),
            self._url.decode("utf-8", "surrogateescape"),
            self._raw_headers,
            version == "1.0",
            self._keep_alive,
            size,
        )

    # ---- httptools callbacks (the whole head is fed at once) -----------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        lower = name.lower()
        if lower == b"host":
            self._hosts += 1
        elif lower in _UNUSUAL:
            self._unusual = True

    def on_message_complete(self) -> None:
        self._complete = True
        # Read now: once the message is complete llhttp resets its flags for the next one,
        # and should_keep_alive() would only give the version's default.
        self._keep_alive = self._parser.should_keep_alive()


def _within_line_limits(head: bytes, limits: HeadLimits) -> bool:
    lines = head.split(b"\r\n")
    if len(lines[0]) > limits.max_request_line:
        return False
    longest = limits.max_header_line
    return all(len(line) <= longest for line in lines[1:])


def _method(raw: bytes) -> str:
    return _METHODS.get(raw) or raw.decode("ascii")  # llhttp knows only ASCII methods
