"""What one client address holds: ``address_key`` says which addresses count as one client,
``PerAddress`` counts what each holds against a bound (connections, streamed request bodies,
WebSockets: nginx's ``limit_conn``).

An IPv4 address is one client; an IPv6 address counts with its /64, the prefix one subscriber
(a home, a phone, a virtual machine) is given and picks addresses from at will (RFC 6177,
RFC 8981): one client holding many addresses of a /64 is still one client. No I/O.
"""

from __future__ import annotations

import ipaddress


def address_key(address: str | None) -> str | None:
    """The client an address belongs to (None: no address to count by, e.g. a Unix socket)."""
    if not address:
        return None
    if ":" not in address:
        return address  # IPv4, as the socket gave it
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class PerAddress:
    """How many of one thing each client address holds."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def take(self, key: str | None, bound: int) -> bool:
        """Count one more for ``key``, unless it holds ``bound`` already (False then)."""
        if key is None:
            return True
        counts = self._counts
        held = counts.get(key, 0)
        if held >= bound:
            return False
        counts[key] = held + 1
        return True

    def give(self, key: str | None) -> None:
        """One that ``take`` counted is given back."""
        if key is None:
            return
        counts = self._counts
        held = counts.get(key, 0) - 1
        if held > 0:
            counts[key] = held
        else:
            counts.pop(key, None)

    def held(self, key: str | None) -> int:
        return 0 if key is None else self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)
