"""The server name a TLS ClientHello asks for (SNI), read before OpenSSL sees the handshake.

With several servers (``servers[]``) the context a connection is made with must be chosen
before the handshake starts: OpenSSL takes from it whether to ask for a client certificate,
and Python cannot change that per connection once the handshake runs. ``tls_transport``
therefore holds the first bytes of a connection until ``ClientHelloReader`` has read the
ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), which may span records. Pure and bounded; a
reading that disagrees with OpenSSL's cannot help anyone: the servername callback refuses
the handshake when OpenSSL's name chooses another server (``tls.ServerContexts``).
"""

from __future__ import annotations

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
#: a record's plaintext is at most 2^14 bytes (RFC 8446 §5.1)
_MAX_RECORD = 1 << 14
#: a ClientHello is a few hundred bytes to a few KiB (post-quantum key shares included): one
#: longer than this is not read, and the connection gets the first server
MAX_HELLO = 1 << 16
#: what is held at most before giving up (the ClientHello and its record headers)
MAX_BUFFER = MAX_HELLO + 5 * (MAX_HELLO // _MAX_RECORD + 2)


class ClientHelloReader:
    """The first bytes of a connection, held until they hold its ClientHello (``feed``).
    Records are read as they complete, each byte once, so a client that sends its hello a
    byte at a time, or in one-byte records, costs no more than one that sends it at once."""

    __slots__ = ("_message", "_pos", "data")

    def __init__(self) -> None:
        #: every byte fed so far (what OpenSSL is to read once the server is chosen)
        self.data = bytearray()
        self._pos = 0  # where the next record starts in ``data``
        self._message = bytearray()  # the handshake message, from the records read so far

    def feed(self, data: bytes | bytearray) -> tuple[bool, str | None]:
        """Add ``data``; then ``(done, name)``: ``done`` False while more bytes are needed to
        read the ClientHello; then the host name it asks for (as sent), or None when it names
        none or the bytes are not a ClientHello (OpenSSL refuses those)."""
        buffer = self.data
        buffer += data
        while True:
            pos = self._pos
            if len(buffer) < pos + 5:
                return (len(buffer) > MAX_BUFFER, None)
            if buffer[pos] != _HANDSHAKE:
                return (True, None)
            length = int.from_bytes(buffer[pos + 3 : pos + 5], "big")
            if length == 0 or length > _MAX_RECORD:
                return (True, None)
            end = pos + 5 + length
            if len(buffer) < end:
                return (len(buffer) > MAX_BUFFER, None)
            message = self._message
            message += buffer[pos + 5 : end]
            self._pos = end
            if len(message) >= 4:
                if message[0] != _CLIENT_HELLO:
                    return (True, None)
                size = int.from_bytes(message[1:4], "big")
                if size > MAX_HELLO:
                    return (True, None)
                if len(message) >= 4 + size:
                    return (True, _server_name(bytes(message[4 : 4 + size])))


def requested_name(data: bytes | bytearray) -> tuple[bool, str | None]:
    """``ClientHelloReader.feed`` for bytes that came at once."""
    return ClientHelloReader().feed(data)


def _server_name(hello: bytes) -> str | None:
    """The first entry of the server_name extension of a ClientHello body, if it is a
    host name (OpenSSL reads only that one)."""
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + hello[pos]  # legacy_session_id
        pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher_suites
        pos += 1 + hello[pos]  # legacy_compression_methods
        if pos + 2 > len(hello):
            return None  # no extensions
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        if end > len(hello):
            return None
        while pos + 4 <= end:
            kind = int.from_bytes(hello[pos : pos + 2], "big")
            size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
            pos += 4
            if pos + size > end:
                return None
            if kind == _SERVER_NAME:
                entries = hello[pos + 2 : pos + size]
                if len(entries) < 3 or entries[0] != _HOST_NAME:
                    return None
                length = int.from_bytes(entries[1:3], "big")
                if 3 + length > len(entries):
                    return None
                name = entries[3 : 3 + length]
                return name.decode("ascii") if name.isascii() else ""
            pos += size
    except IndexError:
        return None
    return None
