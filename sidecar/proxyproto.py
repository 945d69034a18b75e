"""The PROXY protocol (versions 1 and 2) as a load balancer sends it: bytes in, a header out.

``parse(data)`` looks at the bytes a connection has received so far and answers ``None``
(need more), a ``Parsed`` (the header and the bytes after it), or raises
``ProxyProtocolError`` naming what is wrong. It never consumes more than the header declares,
holds no state and does no I/O: the listener keeps the bytes, asks again after each read,
and closes the connection on a refusal. The rules are HAProxy's specification
(``doc/proxy-protocol.txt``): the version 1 line is at most 107 bytes and ends with CRLF,
addresses are canonical (no leading zeros), ``UNKNOWN`` keeps the connection's own
addresses; version 2 starts with the 12-byte signature, ``LOCAL`` keeps the connection's
own addresses, ``PROXY`` carries them for AF_INET, AF_INET6 or AF_UNIX, and the bytes after
the addresses are TLVs, kept raw (a CRC32C one is checked). Trusting the sender is the
caller's decision: the specification forbids guessing whether a header is there.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Literal

#: the version 2 signature (section 2.2)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: the longest version 1 line, CRLF included (section 2.1: "PROXY UNKNOWN" with IPv6 fields)
V1_MAX_LINE = 107
#: the longest header accepted, in bytes. Version 2 allows 16 + 65,535; senders write a few
#: hundred at most (addresses, HAProxy's SSL and unique-id TLVs, AWS's VPC endpoint TLV), and
#: this is what a broken or hostile trusted peer can make a connection hold before it is
#: refused.
MAX_LENGTH = 4096

#: TLV types this module reads (the others are kept raw, unread)
PP2_TYPE_CRC32C = 0x03

Command = Literal["proxy", "local"]
Family = Literal["inet", "inet6", "unix", "unspec"]
Transport = Literal["stream", "dgram", "unspec"]


class ProxyProtocolError(ValueError):
    """The bytes are not a PROXY protocol header this reader accepts; the message says why.

    The connection must be closed: nothing after a refused header can be trusted."""


@dataclass(frozen=True, slots=True)
class TLV:
    """One type-length-value of a version 2 header, as sent."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A PROXY protocol header. Addresses are None when the header carries none (``LOCAL``,
    ``UNKNOWN``, ``AF_UNSPEC``); AF_UNIX addresses are paths, without the NUL padding."""

    version: int
    command: Command
    family: Family
    transport: Transport
    source: str | None
    destination: str | None
    source_port: int | None
    destination_port: int | None
    tlvs: tuple[TLV, ...]
    #: bytes of the connection that the header took
    length: int

    @property
    def client(self) -> tuple[str, int] | None:
        """The client's IP address and port, or None when the connection's own peer address
        stands (``LOCAL``, ``UNKNOWN``, ``AF_UNSPEC``, AF_UNIX, or a datagram header on this
        stream connection)."""
        if (
            self.command != "proxy"
            or self.family not in ("inet", "inet6")
            or self.transport != "stream"
            or self.source is None
            or self.source_port is None
        ):
            return None
        return self.source, self.source_port

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of that type, or None."""
        for item in self.tlvs:
            if item.type == type_:
                return item.value
        return None


@dataclass(frozen=True, slots=True)
class Parsed:
    """A complete header, and what the connection received after it."""

    header: ProxyHeader
    rest: bytes


def parse(data: bytes, *, max_length: int = MAX_LENGTH) -> Parsed | None:
    """The header at the start of ``data``: ``None`` while it is incomplete (read more, then
    call again with everything received), a ``Parsed`` once it is whole.

    Raises ``ProxyProtocolError`` as soon as the bytes cannot become a valid header, and
    when the header would be longer than ``max_length``. Fails closed: anything that is not
    exactly a header of the specification is refused, never guessed at.
    """
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data, max_length)
    if data[0] == ord("P"):
        return _parse_v1(data)
    raise ProxyProtocolError(
        "not a PROXY protocol header: the connection starts with neither the version 2 "
        "signature nor 'PROXY'"
    )


# ---- version 1 ----------------------------------------------------------------------------

_V1_PREFIX = b"PROXY "
#: an IPv4 address in the canonical form section 2.1 asks for: no leading zeros
_IPV4 = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"
_PORT = r"(?:0|[1-9][0-9]{0,4})"
_V1_TCP4 = re.compile(rf"TCP4 ({_IPV4}) ({_IPV4}) ({_PORT}) ({_PORT})")
# IPv6 as inet_ntop writes it (hex groups, one "::", and the dotted IPv4 tail of mapped
# addresses, which HAProxy sends); ipaddress checks the 128 bits below.
_V1_TCP6 = re.compile(rf"TCP6 ([0-9A-Fa-f:.]{{2,45}}) ([0-9A-Fa-f:.]{{2,45}}) ({_PORT}) ({_PORT})")
#: what a version 1 line may hold before its CRLF: printable US-ASCII
_V1_CHARS = re.compile(rb"[\x20-\x7e]*")


def _parse_v1(data: bytes) -> Parsed | None:
    end = data.find(b"\r\n", 0, V1_MAX_LINE)
    if end < 0:
        head = data[:V1_MAX_LINE]
        if not _V1_PREFIX.startswith(head[: len(_V1_PREFIX)]):
            raise ProxyProtocolError("not a PROXY protocol header: version 1 starts with 'PROXY '")
        # The line is not complete: refuse at once what no later byte can repair.
        chars = head[:-1] if head.endswith(b"\r") else head
        if not _V1_CHARS.fullmatch(chars):
            raise ProxyProtocolError(
                "PROXY version 1 line holds a byte that is not printable US-ASCII "
                "(or a lone CR or LF)"
            )
        if len(data) >= V1_MAX_LINE:
            raise ProxyProtocolError(
                f"PROXY version 1 line has no CRLF in its first {V1_MAX_LINE} bytes"
            )
        return None
    line = data[:end]
    if not line.startswith(_V1_PREFIX):
        raise ProxyProtocolError("not a PROXY protocol header: version 1 starts with 'PROXY '")
    if not _V1_CHARS.fullmatch(line):
        raise ProxyProtocolError(
            "PROXY version 1 line holds a byte that is not printable US-ASCII (or a lone CR or LF)"
        )
    text = line[len(_V1_PREFIX) :].decode("ascii")
    length = end + 2
    if text == "UNKNOWN" or text.startswith("UNKNOWN "):
        # Section 2.1: the rest of an UNKNOWN line is ignored; the connection's own addresses
        # stand.
        header = ProxyHeader(1, "proxy", "unspec", "unspec", None, None, None, None, (), length)
        return Parsed(header, data[length:])
    if text.startswith("TCP4 "):
        m = _V1_TCP4.fullmatch(text)
        family: Family = "inet"
    elif text.startswith("TCP6 "):
        m = _V1_TCP6.fullmatch(text)
        family = "inet6"
    else:
        raise ProxyProtocolError(
            f"PROXY version 1 protocol is not TCP4, TCP6 or UNKNOWN: {text.split(' ', 1)[0]!r}"
        )
    if m is None:
        raise ProxyProtocolError(
            f"PROXY version 1 {text[:4]} line is not 'source destination source-port "
            "destination-port' in canonical form, one space apart"
        )
    source, destination = m.group(1), m.group(2)
    if family == "inet6":
        source, destination = _ipv6(source), _ipv6(destination)
    ports = int(m.group(3)), int(m.group(4))
    if max(ports) > 65535:
        raise ProxyProtocolError("PROXY version 1 port is larger than 65535")
    header = ProxyHeader(
        1, "proxy", family, "stream", source, destination, ports[0], ports[1], (), length
    )
    return Parsed(header, data[length:])


def _ipv6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyProtocolError(f"PROXY version 1 TCP6 address is not IPv6: {text!r}") from None


# ---- version 2 ----------------------------------------------------------------------------

#: family and transport byte -> (family, transport, bytes of the address block)
_V2_FAMILIES: dict[int, tuple[Family, Transport, int]] = {
    0x00: ("unspec", "unspec", 0),
    0x11: ("inet", "stream", 12),
    0x12: ("inet", "dgram", 12),
    0x21: ("inet6", "stream", 36),
    0x22: ("inet6", "dgram", 36),
    0x31: ("unix", "stream", 216),
    0x32: ("unix", "dgram", 216),
}


def _parse_v2(data: bytes, max_length: int) -> Parsed | None:
    seen = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(seen):
        raise ProxyProtocolError("not a PROXY protocol header: the version 2 signature is wrong")
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError(f"PROXY protocol version {version} is not supported")
        if command > 1:
            raise ProxyProtocolError(f"PROXY version 2 command {command:#x} is not LOCAL or PROXY")
    if len(data) > 13 and data[12] & 0x0F == 1 and data[13] not in _V2_FAMILIES:
        raise ProxyProtocolError(
            f"PROXY version 2 address family and protocol {data[13]:#04x} is not one the "
            "specification defines"
        )
    if len(data) < 16:
        return None
    declared = struct.unpack_from("!H", data, 14)[0]
    length = 16 + declared
    if length > max_length:
        raise ProxyProtocolError(
            f"PROXY version 2 header of {length} bytes is longer than the {max_length} accepted"
        )
    if len(data) < length:
        return None
    block = data[16:length]
    if data[12] & 0x0F == 0:
        # LOCAL (section 2.2): the proxy's own connection (a health check). The block and its
        # family are ignored; the connection's own addresses stand.
        header = ProxyHeader(2, "local", "unspec", "unspec", None, None, None, None, (), length)
        return Parsed(header, data[length:])
    family, transport, size = _V2_FAMILIES[data[13]]
    if declared < size:
        raise ProxyProtocolError(
            f"PROXY version 2 length {declared} is shorter than the {size}-byte address block "
            f"of its family"
        )
    if family == "unspec":
        # AF_UNSPEC: an unsupported protocol; its address block (and anything after it) is
        # ignored and the connection's own addresses stand.
        header = ProxyHeader(2, "proxy", family, transport, None, None, None, None, (), length)
        return Parsed(header, data[length:])
    source: str | None = None
    destination: str | None = None
    source_port: int | None = None
    destination_port: int | None = None
    if family == "inet":
        source = str(ipaddress.IPv4Address(block[0:4]))
        destination = str(ipaddress.IPv4Address(block[4:8]))
        source_port, destination_port = struct.unpack_from("!HH", block, 8)
    elif family == "inet6":
        source = str(ipaddress.IPv6Address(block[0:16]))
        destination = str(ipaddress.IPv6Address(block[16:32]))
        source_port, destination_port = struct.unpack_from("!HH", block, 32)
    elif family == "unix":
        source, destination = _unix_path(block[0:108]), _unix_path(block[108:216])
    tlvs = _tlvs(block[size:])
    _check_crc32c(data[:length], tlvs, 16 + size)
    header = ProxyHeader(
        2,
        "proxy",
        family,
        transport,
        source,
        destination,
        source_port,
        destination_port,
        tlvs,
        length,
    )
    return Parsed(header, data[length:])


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def _tlvs(raw: bytes) -> tuple[TLV, ...]:
    """The TLVs after the address block; every one must fit exactly in what is left."""
    out: list[TLV] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 3:
            raise ProxyProtocolError(
                f"PROXY version 2 TLV at byte {offset} of the extensions is cut short "
                "(a TLV needs at least 3 bytes)"
            )
        kind = raw[offset]
        size = struct.unpack_from("!H", raw, offset + 1)[0]
        end = offset + 3 + size
        if end > len(raw):
            raise ProxyProtocolError(
                f"PROXY version 2 TLV of type {kind:#04x} declares {size} bytes, more than the "
                "header holds"
            )
        out.append(TLV(kind, raw[offset + 3 : end]))
        offset = end
    return tuple(out)


def _check_crc32c(header: bytes, tlvs: tuple[TLV, ...], tlv_start: int) -> None:
    """Section 2.2.3: a CRC32C TLV must match the header with its own value zeroed."""
    offset = tlv_start
    for item in tlvs:
        if item.type == PP2_TYPE_CRC32C:
            if len(item.value) != 4:
                raise ProxyProtocolError("PROXY version 2 CRC32C TLV is not 4 bytes")
            start = offset + 3
            zeroed = header[:start] + b"\x00\x00\x00\x00" + header[start + 4 :]
            if crc32c(zeroed) != struct.unpack("!I", item.value)[0]:
                raise ProxyProtocolError("PROXY version 2 CRC32C checksum does not match")
        offset += 3 + len(item.value)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, RFC 4960 appendix B), as the PROXY protocol's checksum TLV uses."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
