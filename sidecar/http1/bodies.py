"""Request bodies from the bytes a client sent: the two framings of HTTP/1.1 (RFC 9112 §6.2
``Content-Length`` and §7.1 ``chunked``), strict, and no I/O (bytes in, body bytes out).

``decoder(head)`` makes the decoder for a head's framing. ``decode(data)`` takes the next bytes
from the client and returns the body bytes they carry and how many of them it used: once
``done``, the rest of ``data`` is the next request's. A framing error raises ``BodyError``
(400, or 431 for trailers too large): the connection cannot be read any further.

Chunked bodies are read as RFC 9112 §7.1 writes them, no more leniently than llhttp (which
aiohttp's server used): a chunk size is hexadecimal digits only, each line ends with CRLF,
chunk data is followed by CRLF, and an extension is ``;name`` or ``;name=value`` (a token or
a quoted string). The whitespace RFC 9112 lets senders put around ``;`` and ``=`` (BWS, "bad
whitespace" it says they must not generate) is refused, as llhttp refuses it: a body is read
here the way the server before us read it, so that no two readings of one body can differ
(the root of request smuggling). Extensions are read and
dropped, as are trailer fields (well-formed field lines, at most ``max_trailers`` bytes): the
upstream gets the data only, framed anew. nginx drops both too.
"""

from __future__ import annotations

import re
from typing import Final

#: a chunk-size line (without its CRLF) longer than this is refused: an extension is a few
#: bytes, and nothing else may be on the line (nginx and llhttp accept any length; h11 4 KiB)
MAX_CHUNK_LINE = 4096
#: chunk sizes of more digits than this are refused (leading zeros aside): a 64-bit size
_MAX_SIZE_DIGITS = 16

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXTENSION = rb";" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_SIZE_LINE: Final = re.compile(rb"0*([0-9A-Fa-f]{1,%d})(?:%b)*" % (_MAX_SIZE_DIGITS, _EXTENSION))
_FIELD_LINE: Final = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*")


class BodyError(Exception):
    """The body's framing is broken: the status and the sentence for the client."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class LengthDecoder:
    """A body of ``Content-Length`` bytes."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        #: body bytes still to come
        self.remaining = length

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def decode(self, data: bytes) -> tuple[bytes, int]:
        remaining = self.remaining
        if len(data) <= remaining:
            self.remaining = remaining - len(data)
            return data, len(data)
        self.remaining = 0
        return data[:remaining], remaining


# the parts of a chunked body (ChunkedDecoder._state)
_SIZE = 0  # a chunk-size line
_DATA = 1  # chunk data
_DATA_END = 2  # the CRLF after chunk data
_TRAILER = 3  # the trailer section's lines, up to the empty one
_DONE = 4


class ChunkedDecoder:
    """A chunked body (see the module's docstring)."""

    __slots__ = ("_crlf", "_left", "_line", "_max_trailers", "_state", "_trailers")

    def __init__(self, *, max_trailers: int) -> None:
        self._state = _SIZE
        self._line = b""  # a line begun in an earlier ``decode``
        self._left = 0  # chunk data still to come
        self._crlf = 0  # bytes of the CRLF after chunk data seen so far
        self._trailers = 0
        self._max_trailers = max_trailers

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def decode(self, data: bytes) -> tuple[bytes, int]:
        out: list[bytes] = []
        at, end = 0, len(data)
        while at < end:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - at)
                out.append(data if take == end and not at else data[at : at + take])
                at += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
            elif state == _DATA_END:
                expected = 13 if self._crlf == 0 else 10  # CR, then LF
                if data[at] != expected:
                    raise BodyError("The chunked request body has chunk data not ended by CRLF.")
                at += 1
                self._crlf += 1
                if self._crlf == 2:
                    self._crlf = 0
                    self._state = _SIZE
            elif state == _DONE:
                break
            else:
                newline = data.find(b"\n", at)
                if newline < 0:
                    self._more_line(data[at:])
                    at = end
                    break
                line = data[at:newline]
                at = newline + 1
                if self._line:
                    line = self._line + line
                    self._line = b""
                if not line.endswith(b"\r"):
                    raise BodyError("A line of the chunked request body ends without CR.")
                if state == _SIZE:
                    self._size(line[:-1])
                else:
                    self._trailer(line[:-1])
        if not out:
            return b"", at
        return (out[0] if len(out) == 1 else b"".join(out)), at

    def _more_line(self, part: bytes) -> None:
        line = self._line + part
        limit = MAX_CHUNK_LINE + 1 if self._state == _SIZE else self._max_trailers + 1
        if len(line) > limit:
            if self._state == _SIZE:
                raise BodyError("A chunk-size line of the request body is too long.")
            raise BodyError("The request's trailer fields are too large.", 431)
        self._line = line

    def _size(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:
            raise BodyError("A chunk-size line of the request body is too long.")
        match = _SIZE_LINE.fullmatch(line)
        if match is None:
            raise BodyError("The chunked request body has a malformed chunk-size line.")
        size = int(match.group(1), 16)
        if size:
            self._left = size
            self._state = _DATA
        else:
            self._state = _TRAILER  # the last chunk

    def _trailer(self, line: bytes) -> None:
        if not line:
            self._state = _DONE
            return
        self._trailers += len(line) + 2
        if self._trailers > self._max_trailers:
            raise BodyError("The request's trailer fields are too large.", 431)
        if _FIELD_LINE.fullmatch(line) is None:
            raise BodyError("The chunked request body has a malformed trailer field.")


Decoder = LengthDecoder | ChunkedDecoder


def decoder(length: int, chunked: bool, *, max_trailers: int) -> Decoder:
    """The decoder for a body framed as its head says."""
    if chunked:
        return ChunkedDecoder(max_trailers=max_trailers)
    return LengthDecoder(length)
