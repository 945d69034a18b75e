"""Request body framing (``sidecar.http1.bodies``), the way h11 tests its readers: bytes in,
body bytes out, no connection. Generated bodies check the invariants: whatever the chunking
and however the bytes are split in arrival, the body comes out whole and the bytes after it
are left for the next request; and the decoder is never more lenient than llhttp (Node's
parser, which aiohttp's server used for these bodies before).
"""

from __future__ import annotations

import httptools
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.http1.bodies import (
    MAX_CHUNK_LINE,
    BodyError,
    ChunkedDecoder,
    LengthDecoder,
    decoder,
)

NEXT = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"


def decode_in(pieces: list[bytes], dec: ChunkedDecoder | LengthDecoder) -> tuple[bytes, bytes]:
    """Feed ``pieces`` in order; the body, and what was left once it was done."""
    body = b""
    for i, piece in enumerate(pieces):
        got, used = dec.decode(piece)
        body += got
        if dec.done:
            return body, piece[used:] + b"".join(pieces[i + 1 :])
        assert used == len(piece)
    raise AssertionError("not done")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p] or [b""]


# ---- examples -----------------------------------------------------------------------------


def test_a_length_body_and_what_follows() -> None:
    dec = LengthDecoder(5)
    assert dec.decode(b"he") == (b"he", 2)
    assert not dec.done
    assert dec.decode(b"llo" + NEXT) == (b"llo", 3)
    assert dec.done


def test_chunk_extensions_and_trailers_are_read_and_dropped() -> None:
    raw = (
        b"5;name=value\r\nhello\r\n"
        b'6;a="quoted \\" \\x";b\r\n world\r\n'
        b"000;last\r\nX-Trailer: dropped\r\nOther:\tv\r\n\r\n"
    )
    assert decode_in([raw + NEXT], ChunkedDecoder(max_trailers=1024)) == (b"hello world", NEXT)


def bytewise(dec: ChunkedDecoder, raw: bytes) -> None:
    """Feed ``raw`` byte by byte (no state that only whole reads reach); fail if accepted."""
    for i in range(len(raw)):
        dec.decode(raw[i : i + 1])
        if dec.done:
            raise AssertionError("accepted")


@pytest.mark.parametrize(
    "raw",
    [
        b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace after the size, without an extension
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",  # bare LF
        b"5\r\nhello\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",  # no size
        b"10000000000000000000001\r\n",  # past 64 bits
        b"5\r\nhelloX\r\n0\r\n\r\n",  # data not followed by CRLF
        b"5;\r\nhello\r\n0\r\n\r\n",  # an extension without a name
        b"5;a=b c\r\nhello\r\n0\r\n\r\n",
        b"5 ;a\r\nhello\r\n0\r\n\r\n",  # BWS: llhttp refuses it too
        b"5; a=b\r\nhello\r\n0\r\n\r\n",
        b"5;a =b\r\nhello\r\n0\r\n\r\n",
        b'5;a="b\r\nhello\r\n0\r\n\r\n',  # an unterminated quoted string
        b"5;a=\x01\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX-T 1\r\n\r\n",  # a trailer that is no field line
        b"5\r\nhello\r\n0\r\n X-T: 1\r\n\r\n",  # a folded trailer
        b"5\r\nhello\r\n0\r\nX-T: a\x00b\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\n",
    ],
)
def test_malformed_chunked_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(BodyError) as refused:
        bytewise(ChunkedDecoder(max_trailers=1024), raw)
    assert refused.value.status == 400


def test_a_chunk_size_line_is_bounded() -> None:
    line = b"5;" + b"a" * MAX_CHUNK_LINE
    with pytest.raises(BodyError):
        ChunkedDecoder(max_trailers=1024).decode(line + b"\r\n")
    with pytest.raises(BodyError):  # nor held in memory while it does not end
        bytewise(ChunkedDecoder(max_trailers=1024), b"5;" + b"a" * MAX_CHUNK_LINE)


def test_trailers_are_bounded_431() -> None:
    fields = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(20))
    with pytest.raises(BodyError) as refused:
        ChunkedDecoder(max_trailers=1024).decode(b"0\r\n" + fields + b"\r\n")
    assert refused.value.status == 431
    with pytest.raises(BodyError) as unending:  # one line that never ends
        bytewise(ChunkedDecoder(max_trailers=1024), b"0\r\nX: " + b"v" * 2000)
    assert unending.value.status == 431


def test_decoder_chooses_by_framing() -> None:
    assert isinstance(decoder(5, False, max_trailers=10), LengthDecoder)
    assert isinstance(decoder(0, True, max_trailers=10), ChunkedDecoder)


# ---- generated ------------------------------------------------------------------------------

_TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+.^_`|~-",
    min_size=1,
    max_size=8,
)
_QUOTED = st.lists(
    st.sampled_from(["a", "b", " ", "\t", "!", "#", "[", "]", "~", '\\"', "\\\\"]), max_size=8
).map(lambda parts: '"' + "".join(parts) + '"')
_BWS = st.just("")  # BWS is refused, as llhttp refuses it (see the module under test)
_EXTENSION = st.tuples(
    _BWS, _BWS, _TOKEN, st.one_of(st.none(), st.tuples(_BWS, _BWS, st.one_of(_TOKEN, _QUOTED)))
).map(lambda e: f"{e[0]};{e[1]}{e[2]}" + ("" if e[3] is None else f"{e[3][0]}={e[3][1]}{e[3][2]}"))
_TRAILER = st.tuples(
    _TOKEN, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
).map(lambda t: f"{t[0]}: {t[1].strip()}")


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A body, and one chunked encoding of it (any chunk sizes, extensions, trailers)."""
    body = draw(st.binary(max_size=300))
    sizes: list[int] = []
    left = len(body)
    while left:
        size = draw(st.integers(1, left))
        sizes.append(size)
        left -= size
    out, at = [], 0
    for size in sizes:
        digits = draw(st.sampled_from(["%x", "%X", "0%x", "00%x"])) % size
        extensions = "".join(draw(st.lists(_EXTENSION, max_size=2)))
        out.append(f"{digits}{extensions}\r\n".encode() + body[at : at + size] + b"\r\n")
        at += size
    last = draw(st.sampled_from(["0", "00", "000"])) + "".join(
        draw(st.lists(_EXTENSION, max_size=2))
    )
    trailers = "".join(f"{t}\r\n" for t in draw(st.lists(_TRAILER, max_size=3)))
    out.append(f"{last}\r\n{trailers}\r\n".encode())
    return body, b"".join(out)


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(encoded=chunked_bodies(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_any_chunking_in_any_pieces_gives_the_body_and_leaves_the_rest(
    encoded: tuple[bytes, bytes], cuts: list[int]
) -> None:
    body, raw = encoded
    pieces = split(raw + NEXT, cuts)
    assert decode_in(pieces, ChunkedDecoder(max_trailers=4096)) == (body, NEXT)


@settings(max_examples=200, derandomize=True)
@given(body=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_a_length_body_in_any_pieces(body: bytes, cuts: list[int]) -> None:
    pieces = split(body + NEXT, cuts)
    if not body:
        return
    assert decode_in(pieces, LengthDecoder(len(body))) == (body, NEXT)


class _Llhttp:
    """llhttp's reading of a chunked request body: the body, or None if it refuses it."""

    def __init__(self) -> None:
        self.body = b""
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    @classmethod
    def read(cls, raw: bytes) -> bytes | None:
        reader = cls()
        parser = httptools.HttpRequestParser(reader)
        try:
            parser.feed_data(
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + raw
            )
        except httptools.HttpParserError:
            return None
        return reader.body if reader.complete else None


def ours(raw: bytes) -> bytes | None:
    dec = ChunkedDecoder(max_trailers=4096)
    try:
        body, used = dec.decode(raw)
    except BodyError:
        return None
    return body if dec.done and used == len(raw) else None


_MUTATION = st.tuples(
    st.integers(min_value=0),
    st.sampled_from(["replace", "insert", "delete"]),
    st.sampled_from(list(b'\r\n \t;="\\0aF-+xX:\x00\x7f\xff')),
)


@settings(max_examples=500, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(encoded=chunked_bodies(), mutations=st.lists(_MUTATION, min_size=1, max_size=3))
@example(encoded=(b"", b"0\r\n\r\n"), mutations=[(1, "insert", ord(" "))])
def test_never_more_lenient_than_llhttp(
    encoded: tuple[bytes, bytes], mutations: list[tuple[int, str, int]]
) -> None:
    """Whatever a mutated encoding is, when we accept it llhttp reads the same body from it."""
    raw = bytearray(encoded[1])
    for at, how, byte in mutations:
        at %= len(raw) + 1
        if how == "insert":
            raw.insert(at, byte)
        elif at < len(raw):
            if how == "replace":
                raw[at] = byte
            else:
                del raw[at]
    got = ours(bytes(raw))
    if got is not None:
        assert _Llhttp.read(bytes(raw)) == got
